"""studies/report.py (docs/STUDY.md's results section): C1-C5, the layer-choice family and finding 2 against a direct
`paired_comparison` on the same per-example correctness, Holm over the whole family against a step-down written
here, each verdict rule at its boundaries, comparisons 0 by construction outside the family, and what is missing
reported as missing.  The stores are written through the store's API with known answers (no model is run)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats as scipy_stats

from svdicl.experiments.condition import MatrixCondition, write_conditions
from svdicl.stats import paired_comparison
from svdicl.store import CellKey, Result, Store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))
import analysis
import family
import render
import report
from findings import Planned, planned

ROOT = Path(__file__).resolve().parents[1]
MODEL = "toy-model"
N, SEEDS = 40, (0, 1, 2)
RATES = [0, 0.5, 0.9]


def answers(rng: np.random.Generator, accuracy: float, seeds: int = len(SEEDS)) -> np.ndarray:
    """examples x seeds of 0/1 correctness."""
    return (rng.random((N, seeds)) < accuracy).astype(float)


def put_cells(store: Store, task: str, name: str, correct: np.ndarray, seeds, edit: str, calibration: str | None) -> list[str]:
    """One test cell per seed whose samples give `correct` (under `calibration` when given)."""
    ids = []
    for j, seed in enumerate(seeds):
        rows = []
        for i, c in enumerate(correct[:, j]):
            answer = {"prediction": int(not c), "correct": bool(c)}
            calibrated = {"calibrated": {calibration: answer}} if calibration else {}
            rows.append({"id": f"{task}-{i}", "gold": 0, **answer, **calibrated})
        key = CellKey(MODEL, task, "test", 1, seed, edit, options={"arm": name})
        ids.append(store.put(key, Result({"accuracy": float(correct[:, j].mean())}, N, rows)).id)
    return ids


def write_search(folder: Path, task: str, arms: dict, *, rate_star: float, seeds=SEEDS, layer: int = 5,
                 unpruned_calibrated: dict | None = None, per_layer: dict | None = None) -> None:  # fmt: skip
    """A svdicl.search/1 record naming cells with the given answers: `arms` maps a name to (rate, calibration,
    control, correctness) or to the name of an earlier arm it is the same as (ξ* = 0)."""
    store = Store(folder)
    entries = {}
    for name, spec in arms.items():
        if isinstance(spec, str):
            entries[name] = {**entries[spec], "name": name, "same_as": spec}
            continue
        rate, calibration, control, correct = spec
        edit = "none" if rate == 0 and control is None else f"{layer}:mlp:{rate}"
        cells = put_cells(store, task, name, correct, seeds, edit, calibration)
        entries[name] = {"name": name, "rate": rate, "calibration": calibration, "control": control, "cells": cells,
                         "same_as": None, "top_answer_share": 0.5, "balanced_accuracy": 0.5, "auc": None}  # fmt: skip
    curves = {m: {"values": [v, 0.1, 0.1], "rate_star": 0} for m, v in (unpruned_calibrated or {}).items()}
    record = {
        "format": "svdicl.search/1", "task": task, "module": "mlp", "layer": layer, "rates": RATES, "rate_star": rate_star,
        "validation": {"n": 20, "values": [0.5, 0.5, 0.5], "calibrated": curves},
        "test": {"n": N, "baseline": {"value": 0.5}, "pruned": {"value": 0.5}},
        "arms": list(entries.values()), "seeds": [{"seed": s} for s in seeds],
        "condition": {"aggregate": "max", "per_layer": per_layer} if per_layer else None,
    }  # fmt: skip
    (folder / "search").mkdir(parents=True, exist_ok=True)
    (folder / "search" / f"{task}-mlp.json").write_text(json.dumps(record))


def full_arms(rng, *, best: str = "domain", pruned_rate: float = 0.5) -> tuple[dict, dict]:
    """Every arm of a calibrated task with ξ* > 0, and the answers each has."""
    data = {name: answers(rng, q) for name, q in (("unpruned", 0.5), ("unpruned + domain", 0.6), ("unpruned + batch", 0.55),
            ("pruned", 0.75), ("pruned + domain", 0.8), ("random subspace", 0.5), ("norm-matched noise", 0.45))}  # fmt: skip
    arms = {
        "unpruned": (0, None, None, data["unpruned"]),
        "unpruned + domain": (0, "domain", None, data["unpruned + domain"]),
        "unpruned + batch": (0, "batch", None, data["unpruned + batch"]),
        "pruned": (pruned_rate, None, None, data["pruned"]),
        "pruned + domain": (0.9, "domain", None, data["pruned + domain"]),
        "random subspace": (pruned_rate, None, "random-subspace", data["random subspace"]),
        "norm-matched noise": (pruned_rate, None, "matched-noise", data["norm-matched noise"]),
    }
    curves = {"domain": 0.7, "batch": 0.6} if best == "domain" else {"domain": 0.6, "batch": 0.7}
    return arms, {"data": data, "curves": curves}


def zero_arms(rng) -> dict:
    """A calibrated task where ξ* = 0 and ξ*_domain = 0: pruned is unpruned, pruned + domain is unpruned + domain."""
    return {
        "unpruned": (0, None, None, answers(rng, 0.5)),
        "unpruned + domain": (0, "domain", None, answers(rng, 0.7)),
        "pruned": "unpruned",
        "pruned + domain": "unpruned + domain",
    }


def write_layer_conditions(folder: Path, values: list[float], model: str = MODEL) -> None:
    """The conditions.csv/json a search writes before scoring: per layer, an MLP matrix of condition number `value`
    and one of condition number 2 (a layer's number is its largest)."""
    rows = [MatrixCondition(i, "mlp", m, f"layers.{i}.mlp.{m}", (4, 8), top, 1.0, 1e-6)
            for i, v in enumerate(values) for m, top in (("down", v), ("up", 2.0))]  # fmt: skip
    write_conditions(rows, folder, model_name=model, fingerprint="fp")


def plan(task: str, design: str = "algorithm1", module: str = "mlp", part: str = "") -> Planned:
    return Planned(MODEL, design, task, module, part or f"{MODEL}/{design}/{module}")


@pytest.fixture
def studies(tmp_path):
    """A studies folder: sst2 with every arm (ξ* = 0.5, best calibration domain), rte with ξ* = 0, cb not run."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "studies"
    arms, known = full_arms(rng)
    conditions = [10.0 + i * i for i in range(8)]  # in the record, and in the store's conditions files
    write_search(folder / MODEL / "algorithm1", "sst2", arms, rate_star=0.5, unpruned_calibrated=known["curves"],
                 per_layer={str(i): c for i, c in enumerate(conditions)})  # fmt: skip
    write_layer_conditions(folder / MODEL / "algorithm1", conditions)
    write_search(folder / MODEL / "algorithm1", "rte", zero_arms(rng), rate_star=0, unpruned_calibrated={"domain": 0.7})
    return folder, known


def by_label(comparisons, task):
    return {c.label: c for c in comparisons if c.task == task}


def test_c1_to_c5_equal_a_direct_paired_comparison_of_the_same_answers(studies):
    folder, known = studies
    data = known["data"]
    result = analysis.analyse(folder, [plan("sst2")], [])
    found = by_label(result.family, "sst2")
    expected = {
        "C1": ("unpruned", "pruned"),
        "C2": ("unpruned + domain", "pruned"),  # domain: the best calibration on validation at rate 0
        "C3": ("unpruned + domain", "pruned + domain"),
        "C4": ("random subspace", "pruned"),
        "C5": ("norm-matched noise", "pruned"),
    }
    for label, (a, b) in expected.items():
        direct = paired_comparison(data[a], data[b])
        got = found[label]
        assert (got.a, got.b, got.status) == (a, b, family.TESTED)
        assert (got.paired.difference, got.paired.low, got.paired.high, got.paired.p_value, got.paired.mde) == pytest.approx(
            (direct.difference, direct.low, direct.high, direct.p_value, direct.mde)
        )
        assert got.paired.n == N and got.paired.seeds == len(SEEDS)
    (row,) = result.rows
    assert (row.unpruned, row.pruned) == pytest.approx((data["unpruned"].mean(), data["pruned"].mean()))
    assert row.best_calibration == "domain" and row.rate_star == 0.5 and row.seeds == SEEDS


def test_the_best_calibration_is_chosen_on_validation_never_on_test(tmp_path):
    arms, known = full_arms(np.random.default_rng(1), best="batch")
    arms["pruned + batch"] = (0.5, "batch", None, answers(np.random.default_rng(2), 0.6))
    write_search(tmp_path / MODEL / "algorithm1", "sst2", arms, rate_star=0.5, unpruned_calibrated=known["curves"])
    found = by_label(analysis.analyse(tmp_path, [plan("sst2")], []).family, "sst2")
    assert found["C2"].a == found["C3"].a == "unpruned + batch"  # batch has the higher validation value, domain the higher test


def holm_reference(p_values):
    """Holm's step-down written out: sort ascending, multiply the i-th smallest by (m - i), keep it monotone, cap at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def test_holm_runs_over_the_whole_family_and_leaves_out_what_is_zero_by_construction(studies):
    folder, _ = studies
    result = analysis.analyse(folder, [plan("sst2"), plan("rte")], [])
    tested = [c for c in result.family if c.status == family.TESTED]
    assert [c.p_holm for c in tested] == pytest.approx(holm_reference([c.paired.p_value for c in tested]))
    assert len(tested) == 5 + 1  # sst2's five, rte's C2 (pruned − unpruned + domain is not 0 when ξ* = 0)
    rte = by_label(result.family, "rte")
    for label in ("C1", "C3", "C4", "C5"):  # ξ* = 0 (and ξ*_domain = 0): the same answers, no test
        assert rte[label].status == family.ZERO and rte[label].p_holm is None and rte[label].paired is None
        assert rte[label].verdict == family.NOT_HOLD  # counted as "no gain"
    assert rte["C2"].status == family.TESTED


def test_a_c2_that_holds_at_xi_star_0_is_marked_as_calibration_losing_not_pruning(tmp_path):
    rng = np.random.default_rng(3)
    arms = {**zero_arms(rng), "unpruned + domain": (0, "domain", None, answers(rng, 0.2))}  # calibration loses on test
    write_search(tmp_path / MODEL / "algorithm1", "emoc", arms, rate_star=0, unpruned_calibrated={"domain": 0.7})
    result = analysis.analyse(tmp_path, [plan("emoc"), plan("sst2")], [])
    c2 = by_label(result.family, "emoc")["C2"]
    assert c2.status == family.TESTED and c2.verdict == family.HOLDS  # the registered rule is applied unchanged
    assert c2.note == "pruned is unpruned, ξ* = 0: pruning did nothing here"
    assert "| holds (pruned is unpruned, ξ* = 0: pruning did nothing here) |" in render.comparison_table([c2], "h")
    claims = report.results_section(result, None)
    assert "1 of the 1 C2 comparisons that hold come with a C1 that does not hold (toy-model EmoC MLP at ξ* = 0)" in claims


def test_a_c2_at_xi_star_0_that_does_not_hold_is_not_explained_away(studies):
    folder, _ = studies
    result = analysis.analyse(folder, [plan("sst2"), plan("rte")], [])
    c2 = by_label(result.family, "rte")["C2"]
    assert c2.note and c2.verdict != family.HOLDS  # marked in its row, but nothing to explain away
    assert "C2 comparisons that hold come with a C1" not in report.results_section(result, None)


def test_a_c2_that_holds_without_a_c1_gain_is_named_and_one_with_a_c1_gain_is_not(tmp_path):
    """C2 holds in both searches because calibration loses on test; only on emoc does pruning itself not gain."""
    rng = np.random.default_rng(4)
    arms, _ = full_arms(rng)
    arms["unpruned + domain"] = (0, "domain", None, answers(rng, 0.1))
    write_search(tmp_path / MODEL / "algorithm1", "sst2", arms, rate_star=0.5, unpruned_calibrated={"domain": 0.7})
    unpruned = answers(rng, 0.7)
    pruned = unpruned.copy()
    pruned[:4] = 0  # a small loss: C1's CI lies below +0.03
    emoc = {**full_arms(rng)[0], "unpruned": (0, None, None, unpruned), "pruned": (0.5, None, None, pruned),
            "unpruned + domain": (0, "domain", None, answers(rng, 0.1))}  # fmt: skip
    write_search(tmp_path / MODEL / "algorithm1", "emoc", emoc, rate_star=0.5, unpruned_calibrated={"domain": 0.7})
    result = analysis.analyse(tmp_path, [plan("sst2"), plan("emoc")], [])
    verdicts = {t: {k: c.verdict for k, c in by_label(result.family, t).items()} for t in ("sst2", "emoc")}
    assert (verdicts["sst2"]["C1"], verdicts["sst2"]["C2"]) == (family.HOLDS, family.HOLDS)
    assert (verdicts["emoc"]["C1"], verdicts["emoc"]["C2"]) == (family.NOT_HOLD, family.HOLDS)
    assert not by_label(result.family, "emoc")["C2"].note  # ξ* > 0: the row carries no note
    assert "1 of the 2 C2 comparisons that hold come with a C1 that does not hold (toy-model EmoC MLP):" in (
        report.results_section(result, None)
    )


@pytest.mark.parametrize(
    ("difference", "ci_high", "p_holm", "expected"),
    [
        (0.05, 0.09, 0.0499, family.HOLDS),
        (0.05, 0.09, 0.05, family.INCONCLUSIVE),  # p must be below 0.05
        (0.001, 0.02, 0.01, family.HOLDS),  # a significant gain holds even when small
        (0.001, 0.0299, 0.2, family.NOT_HOLD),  # the CI lies below +0.03
        (0.001, 0.03, 0.2, family.INCONCLUSIVE),  # ... not when it reaches it
        (-0.04, 0.05, 0.01, family.NOT_HOLD),  # a significant loss
        (-0.04, 0.05, 0.06, family.INCONCLUSIVE),
        (0.0, 0.0, 1.0, family.NOT_HOLD),
    ],
)
def test_the_verdict_rule_at_its_boundaries(difference, ci_high, p_holm, expected):
    assert family.verdict(difference, ci_high, p_holm) == expected


@pytest.mark.parametrize(
    ("holds", "not_hold", "total", "expected"),
    [
        (2, 0, 4, family.HOLDS),  # at least half
        (2, 2, 4, family.HOLDS),  # holds is read first
        (2, 0, 5, family.INCONCLUSIVE),
        (1, 3, 5, family.NOT_HOLD),
        (0, 2, 5, family.INCONCLUSIVE),
        (0, 0, 0, family.INCONCLUSIVE),
    ],
)
def test_the_claim_rule_counts_half_of_the_comparisons(holds, not_hold, total, expected):
    assert family.claim_rule(holds, not_hold, total) == expected


def test_a_claim_with_missing_comparisons_is_open_and_says_what_the_rule_gives_so_far(studies):
    folder, _ = studies
    result = analysis.analyse(folder, [plan("sst2"), plan("rte"), plan("cb")], [])
    c1 = next(c for c in result.claims if c.labels == ("C1",))
    sst2 = by_label(result.family, "sst2")["C1"].verdict
    assert (c1.total, c1.missing, c1.zero, c1.not_hold) == (3, 1, 1, 1 + (sst2 == family.NOT_HOLD))
    assert c1.verdict == family.OPEN and c1.so_far in (family.HOLDS, family.NOT_HOLD, family.INCONCLUSIVE)
    complete = analysis.analyse(folder, [plan("sst2"), plan("rte")], [])
    c1 = next(c for c in complete.claims if c.labels == ("C1",))
    assert c1.missing == 0 and c1.verdict == family.claim_rule(c1.holds, c1.not_hold, 2)


def test_a_search_whose_samples_files_a_checkout_lacks_is_missing_until_they_are_back(studies, tmp_path):
    folder, _ = studies
    before = analysis.analyse(folder, [plan("sst2"), plan("rte")], [])
    lacking = next((folder / MODEL / "algorithm1" / "samples" / "rte").iterdir())
    lacking.rename(tmp_path / lacking.name)  # e.g. an ignored, not yet packed file of another machine
    result = analysis.analyse(folder, [plan("sst2"), plan("rte")], [])
    assert [c.task for c in result.family if c.status == family.MISSING] == ["rte"] * len(by_label(before.family, "rte"))
    assert by_label(result.family, "sst2")["C1"].paired == by_label(before.family, "sst2")["C1"].paired


def test_copa_has_no_calibration_comparisons_in_the_design(tmp_path):
    result = analysis.analyse(tmp_path, [plan("copa"), plan("sst2")], [])
    copa = by_label(result.family, "copa")
    assert copa["C2"].status == copa["C3"].status == family.NOT_APPLICABLE
    assert {c.status for c in result.family} == {family.MISSING, family.NOT_APPLICABLE}
    c2 = next(c for c in result.claims if c.labels == ("C2",))
    assert (c2.total, c2.missing) == (1, 1)  # sst2's only


def test_layer_choice_pairs_the_seeds_both_records_share(studies):
    folder, _ = studies
    rng = np.random.default_rng(3)
    oracle = answers(rng, 0.6, seeds=1)
    write_search(folder / MODEL / "layer-oracle", "sst2", {"unpruned": (0, None, None, answers(rng, 0.5, 1)),
                 "pruned": (0.9, None, None, oracle)}, rate_star=0.9, seeds=(0,), layer=7)  # fmt: skip
    same = {"unpruned": (0, None, None, answers(rng, 0.5)), "pruned": (0.5, None, None, answers(rng, 0.6))}
    write_search(folder / MODEL / "layer-fixed", "sst2", same, rate_star=0.5, layer=5)  # Algorithm 1's layer and ξ*
    plans = [plan("sst2"), plan("sst2", "layer-oracle", part="x"), plan("sst2", "layer-fixed")]
    layers = {c.design: c for c in analysis.analyse(folder, plans, []).layers}
    mine = Store(folder / MODEL / "algorithm1").samples
    record = json.loads((folder / MODEL / "algorithm1" / "search" / "sst2-mlp.json").read_text())
    pruned = next(a for a in record["arms"] if a["name"] == "pruned")
    cells = {c.id: c for c in Store(folder / MODEL / "algorithm1").cells()}
    seed0 = np.array([[s["correct"] for s in mine(cells[pruned["cells"][0]])]], dtype=float).T  # seed 0 only
    direct = paired_comparison(oracle, seed0)
    got = layers["layer-oracle"]
    assert got.status == family.TESTED and got.paired.seeds == 1 and got.label == "vs oracle layer"
    assert (got.paired.difference, got.paired.p_value) == pytest.approx((direct.difference, direct.p_value))
    assert got.p_holm == pytest.approx(got.paired.p_value)  # the only tested one of its family
    assert layers["layer-fixed"].status == family.ZERO  # the same edit (layer 5, ξ* 0.5) as Algorithm 1's


def test_finding_2_compares_the_last_two_layers_with_the_first_two_at_the_deepest_rate(studies):
    folder, _ = studies
    store, rng = Store(folder / MODEL / "layer-oracle"), np.random.default_rng(4)
    data = {layer: answers(rng, q, 1) for layer, q in ((None, 0.7), (0, 0.3), (1, 0.35), (6, 0.65), (7, 0.7))}
    for layer, correct in data.items():
        rows = [{"id": f"v{i}", "gold": 0, "prediction": 0, "correct": bool(c)} for i, c in enumerate(correct[:, 0])]
        edit = "none" if layer is None else f"{layer}:mlp:0.995"
        store.put(CellKey(MODEL, "sst2", "validation", 1, 0, edit), Result({"accuracy": 0.5}, N, rows))
    plans = [plan("sst2"), plan("sst2", "layer-sweep", part="s")]  # 8 layers: the sst2 record's condition numbers
    found = {c.label: c for c in analysis.analyse(folder, plans, []).collapse}
    shallow, deep = np.hstack([data[0], data[1]]), np.hstack([data[6], data[7]])
    direct = paired_comparison(shallow, deep)
    judged = found["last two − first two"]
    assert judged.status == family.TESTED and judged.paired.difference == pytest.approx(direct.difference)
    assert judged.paired.p_value == pytest.approx(direct.p_value) and judged.verdict == family.HOLDS
    unpruned = np.hstack([data[None], data[None]])
    assert found["first two − unpruned"].paired.difference == pytest.approx(paired_comparison(unpruned, shallow).difference)
    assert found["first two − unpruned"].verdict is None  # descriptive
    table = report.results_section(analysis.analyse(folder, plans, []), None).split("Finding 2: validation")[1]
    assert "| n × layers |" in table and f"| {len(data[0])} × 2 |" in table  # two layers per arm, not two seeds
    (row,) = render.comparison_rows([judged])
    csv_row = dict(zip(render.COMPARISON_FIELDS, row, strict=True))
    assert (csv_row["runs"], csv_row["runs_over"]) == (2, "layers")  # the CSV says what the 2 counts, too
    next((folder / MODEL / "layer-oracle" / "samples").rglob("*-0_mlp_0.995-*")).unlink()  # a checkout lacks it
    assert {c.status for c in analysis.analyse(folder, plans, []).collapse} == {family.MISSING}


def write_shots_sweep(folder: Path, keep: dict[int, float], skip: str = "") -> dict[tuple[int, int, str], np.ndarray]:
    """Finding 3's sweep grid for the MLP: shots per class 0, 2, 5 x seeds x (unpruned, layers 0-1 x 7 rates); the
    pruned cells of `shots` keep each correct unpruned answer with probability keep[shots]. Returns the answers."""
    rng, store, data = np.random.default_rng(5), Store(folder), {}
    edits = ["none", *(f"{layer}:mlp:{rate:g}" for layer in (0, 1) for rate in RATES_ABOVE_0)]
    for shots in (0, 2, 5):
        for seed in SEEDS:
            base = (rng.random(N) < 0.8).astype(float)
            for edit in edits:
                correct = base if edit == "none" else base * (rng.random(N) < keep[shots])
                data[shots, seed, edit] = correct
                if f"{shots}/{seed}/{edit}" == skip:
                    continue
                rows = [{"id": f"v{i}", "gold": 0, "prediction": int(not c), "correct": bool(c)} for i, c in enumerate(correct)]
                store.put(CellKey(MODEL, "sst2", "validation", shots, seed, edit), Result({"accuracy": 0.5}, N, rows))
    return data


RATES_ABOVE_0 = (0.1, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995)


def test_finding_3_compares_the_retention_after_shallow_pruning_with_fewer_and_with_10_demonstrations(tmp_path):
    folder = tmp_path / "studies"
    data = write_shots_sweep(folder / MODEL / "shots", {0: 1.0, 2: 0.5, 5: 0.5})
    plans = [plan("sst2", "shots", "mlp", part="s")]
    result = analysis.analyse(folder, plans, [])
    found = {c.label: c for c in result.shots}

    def retention(shots):  # per example: pruned correctness over layers x rates x seeds − unpruned over seeds
        pruned = np.mean([data[key] for key in data if key[0] == shots and key[2] != "none"], axis=0)
        return pruned - np.mean([data[shots, seed, "none"] for seed in SEEDS], axis=0)

    for fewer, label in ((0, "retention, 0 − 10 demonstrations"), (2, "retention, 4 − 10 demonstrations")):
        direct = paired_comparison(retention(5), retention(fewer))
        got = found[label]
        assert got.status == family.TESTED and got.paired.n == N and got.paired.seeds == 2 * 7 * len(SEEDS)
        assert (got.paired.difference, got.paired.low, got.paired.high) == pytest.approx(
            (direct.difference, direct.low, direct.high)
        )
    assert found["retention, 0 − 10 demonstrations"].verdict == family.HOLDS  # keeps everything against half
    assert found["retention, 4 − 10 demonstrations"].verdict != family.HOLDS  # the same collapse
    holm = sorted(c.paired.p_value for c in result.shots if c.status == family.TESTED)
    assert sorted(c.p_holm for c in result.shots if c.status == family.TESTED) == pytest.approx(
        [min(1.0, 2 * holm[0]), min(1.0, max(2 * holm[0], holm[1]))]
    )
    unpruned = found["unpruned, 10 − 0 demonstrations"]
    expected = np.mean([data[5, s, "none"] for s in SEEDS]) - np.mean([data[0, s, "none"] for s in SEEDS])
    assert unpruned.status == family.DESCRIPTIVE and unpruned.paired.difference == pytest.approx(expected)
    claim = next(c for c in result.claims if "paper finding 3" in c.claim)
    assert (claim.total, claim.holds, claim.missing) == (2, 1, 0) and claim.verdict == family.HOLDS
    text = report.results_section(result, None)
    assert (
        "Finding 3 (amendment" in text and "| retention, 0 − 10 demonstrations | retention at 10 − retention at 0 |" not in text
    )
    assert "| retention, 0 − 10 demonstrations | retention at 0 − retention at 10 |" in text


def test_finding_3_is_missing_until_every_cell_of_its_grid_is_in(tmp_path):
    folder = tmp_path / "studies"
    write_shots_sweep(folder / MODEL / "shots", {0: 1.0, 2: 0.5, 5: 0.5}, skip="2/1/1:mlp:0.99")
    result = analysis.analyse(folder, [plan("sst2", "shots", "mlp", part="s")], [])
    assert [c.status for c in result.shots] == [family.MISSING] * 2  # and no baselines without a full grid
    assert next(c for c in result.claims if "paper finding 3" in c.claim).verdict == family.OPEN


def test_finding_4_is_spearman_of_the_condition_numbers_with_depth(studies):
    folder, _ = studies
    (trend,) = analysis.analyse(folder, [plan("sst2")], []).trends
    rho = scipy_stats.spearmanr(range(8), [10.0 + i * i for i in range(8)])
    assert (trend.rho, trend.p_value, trend.layers) == pytest.approx((rho.statistic, rho.pvalue, 8))
    assert trend.verdict == family.HOLDS
    assert analysis.Trend("m", "mlp", 8, -0.1, 0.5).verdict == family.NOT_HOLD
    assert analysis.Trend("m", "mlp", 8, 0.3, 0.2).verdict == family.INCONCLUSIVE


def test_cut_searches_leave_every_family_and_claim_and_finding_4_keeps_their_model(studies):
    folder, _ = studies
    big = Planned("big-model", "algorithm1", "cb", "mlp", "big-model/algorithm1/mlp")  # cut before any record
    write_layer_conditions(folder / "big-model" / "algorithm1", [50.0 - i for i in range(6)], model="big-model")
    parts = [f"{MODEL}/algorithm1/mlp", big.part]
    result = analysis.analyse(folder, [plan("sst2"), plan("rte"), big], parts, {big.part})
    complete = analysis.analyse(folder, [plan("sst2"), plan("rte")], parts[:1])
    assert result.family == complete.family and result.claims[:4] == complete.claims[:4]
    assert all(c.missing == 0 and c.verdict != family.OPEN for c in result.claims[:4])
    assert (result.cut_parts, result.missing_parts) == ([big.part], parts[:1])
    (trend,) = [t for t in result.trends if t.model == "big-model"]
    assert (trend.layers, trend.rho, trend.verdict) == (6, pytest.approx(-1.0), family.NOT_HOLD)  # falls with depth
    missing = analysis.analyse(folder, [plan("sst2"), plan("rte"), big], parts)  # not cut: its searches are missing
    assert [c.status for c in missing.family if c.model == "big-model"] == [family.MISSING] * 5
    assert next(c for c in missing.claims if c.labels == ("C1",)).verdict == family.OPEN
    text = report.results_section(result, None)
    assert (
        f'in the pre-registered order (the amendment "Cut, 2026-12-05" under What CPU time buys), 1 of 2 parts: `{big.part}`.'
        in text
    )
    assert f"| {big.part} | cut | 0 |" in text and f"Parts not finished: `{parts[0]}` (1 cut" in text


class Part:
    def __init__(self, name, tasks, cut=False):
        self.name, self.tasks, self.cut = name, tasks, cut

    def argv(self):
        return ["search", "--tasks", ",".join(self.tasks)]


def test_write_report_rewrites_only_the_results_section_and_reports_what_is_missing(studies, monkeypatch):
    folder, _ = studies
    (folder / "cpu-time.tsv").write_text(
        "part\texit\tuser_s\tsys_s\twall_s\n"
        f"{MODEL}/algorithm1/mlp\t130\t10.0\t1.0\t20.0\n{MODEL}/algorithm1/mlp\t0\t100.0\t9.0\t200.0\n"
    )
    parts = [Part(f"{MODEL}/algorithm1/mlp", ["sst2", "rte"]), Part(f"{MODEL}/algorithm1/attn", ["sst2"])]
    monkeypatch.setitem(sys.modules, "study", SimpleNamespace(parts=lambda: parts))  # write_report imports it
    doc = folder.parent / "docs" / "STUDY.md"
    doc.parent.mkdir()
    doc.write_text(f"# Study\n\ndesign\n\n{report.START}\nSTALE\n{report.END}\n\ntail\n")
    report.write_report(folder, doc)
    text = doc.read_text()
    assert text.startswith("# Study\n\ndesign\n\n<!-- results:start -->\n") and text.endswith("<!-- results:end -->\n\ntail\n")
    assert "STALE" not in text and "| toy-model | SST-2 | MLP | C2 | pruned − (unpruned + domain) |" in text
    assert f"Parts not finished: `{MODEL}/algorithm1/attn`." in text
    assert "- confirmatory, toy-model algorithm1 ATTN: SST-2 (C1, C2, C3, C4, C5)" in text
    assert "| pruning raises ICL accuracy (paper finding 1) (C1) | 3 | " in text and "**open**" in text
    with open(folder / "tables" / "missing.csv", encoding="utf-8") as handle:
        missing = list(csv.DictReader(handle))
    assert {"kind": "part", "what": f"{MODEL}/algorithm1/attn"}.items() <= missing[0].items()
    assert [(m["task"], m["module"], m["what"]) for m in missing[1:]] == [
        *(("sst2", "attn", f"C{i}") for i in range(1, 6)),
        ("", "attn", "Spearman ρ"),  # finding 4 has no record of this module yet
    ]
    with open(folder / "tables" / "cpu-time.csv", encoding="utf-8") as handle:
        cpu = list(csv.DictReader(handle))
    assert (cpu[0]["done"], cpu[0]["invocations"], float(cpu[0]["cpu_s"])) == ("True", "2", 120.0)
    with open(folder / "tables" / "comparisons.csv", encoding="utf-8") as handle:
        rows = {(r["task"], r["module"], r["label"]): r for r in csv.DictReader(handle)}
    c1 = by_label(analysis.analyse(folder, [plan("sst2")], []).family, "sst2")["C1"]
    assert float(rows[("sst2", "mlp", "C1")]["difference"]) == pytest.approx(c1.paired.difference)
    assert (rows[("sst2", "mlp", "C1")]["runs"], rows[("sst2", "mlp", "C1")]["runs_over"]) == (str(len(SEEDS)), "seeds")
    figure = doc.parent / "figures" / "study" / "c1-c5.png"
    first = figure.read_bytes()
    report.write_report(folder, doc)
    assert figure.read_bytes() == first and doc.read_text() == text  # the same stores give the same bytes


def test_a_page_without_the_markers_is_refused_in_one_line(studies, monkeypatch):
    folder, _ = studies
    monkeypatch.setitem(sys.modules, "study", SimpleNamespace(parts=list))
    doc = folder / "STUDY.md"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs one <!-- results:start --> line"):
        report.write_report(folder, doc)
    assert doc.read_text() == "no markers\n" and not (folder / "tables").exists()


def test_the_plan_has_each_search_of_the_design_once_whatever_parts_rerun_it(monkeypatch):
    spec = importlib.util.spec_from_file_location("study_for_plan", ROOT / "studies" / "study.py")
    runner = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, runner)  # its dataclass looks its module up while it is defined
    spec.loader.exec_module(runner)
    monkeypatch.setattr(runner, "oracle_layer", lambda *args: pytest.fail("the plan must not read the sweeps' stores"))
    plans = planned(runner.parts())
    keys = [(p.model, p.design, p.task, p.module) for p in plans]
    assert len(keys) == len(set(keys))
    designs = Counter(p.design for p in plans)
    assert designs["algorithm1"] == 3 * 7 * 2 + 3 * 2  # three models on all seven tasks, the 1.5B on three
    assert (designs["layer-fixed"], designs["layer-oracle"], designs["layer-sweep"]) == (6, 6, 6)
    assert (designs["authors-format"], designs["authors-5-demos"], designs["shots"]) == (4, 6, 2)
    assert all("/seeds-" not in p.part for p in plans)  # the first part to cover a search names it
