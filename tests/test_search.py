"""`svdicl search` (Algorithm 1): the largest condition number among the top k on planted spectra, rate*
as the validation argmax with ties to the smaller rate, test numbers equal to a direct evaluation, resume,
several seeds, replayable configs, export, and one-line errors."""

from __future__ import annotations

import csv
import json
import statistics

import numpy as np
import pytest
import torch
import yaml
from conftest import EXAMPLES, Calls, one_line_error, save_model, toy_loaded

import svdicl.experiments.calls as scoring_calls
import svdicl.experiments.condition as condition
from svdicl.calibration import METHODS
from svdicl.cli import main, parse_args
from svdicl.errors import SvdiclError
from svdicl.experiments.arms import GROUPS, parse_arms
from svdicl.experiments.condition import condition_numbers
from svdicl.experiments.grid import parse_list
from svdicl.experiments.run_scoring import evaluate_run
from svdicl.experiments.runs import finish_run, prepare_run
from svdicl.experiments.search import (
    SearchConfig,
    candidate_rates,
    choose_layer,
    choose_rate,
    conditions_for,
    samples_ci,
    search,
)
from svdicl.experiments.search_output import read_search, write_search
from svdicl.experiments.searches import export_folders, search_configs
from svdicl.experiments.sweep import load_task_splits
from svdicl.prune import EditRecord, pruned
from svdicl.report import build_report
from svdicl.requests import Scores
from svdicl.specs import PruneSpec
from svdicl.stats import compare, holm, paired_comparison, wilson_interval
from svdicl.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")


def plant(weight: torch.Tensor, condition_number: float, seed: int) -> None:
    """Overwrite `weight` with U diag(s) V^T, s log-spaced from `condition_number` down to 1."""
    generator = torch.Generator().manual_seed(seed)
    m, n = weight.shape
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=generator, dtype=torch.float64))
    s = torch.logspace(torch.log10(torch.tensor(condition_number)).item(), 0, min(m, n), dtype=torch.float64)
    with torch.no_grad():
        weight.copy_((u * s) @ v.T)


def planted_loaded():
    """Layer 1's MLP has the largest condition number (1e4), layer 2's the second (1e3); ATTN's largest is layer 0's."""
    loaded = toy_loaded()
    layers = loaded.model.model.layers
    plant(layers[1].mlp.down_proj.weight, 1e4, 0)
    plant(layers[2].mlp.up_proj.weight, 1e3, 1)
    plant(layers[0].self_attn.o_proj.weight, 1e5, 2)
    return loaded


def test_algorithm1_picks_the_largest_condition_number_among_the_top_k(tmp_path, monkeypatch):
    loaded = planted_loaded()
    found = condition_numbers(loaded.model, "all", "all")
    mlp = choose_layer(found, "mlp", top_k=2)
    assert mlp.top_layers == (1, 2) and mlp.layer == 1
    # float32 storage moves sigma_min = 1 by ~eps * sigma_max * sqrt(n), so the planted numbers hold to ~1%
    assert mlp.per_layer[1] == pytest.approx(1e4, rel=0.02) and mlp.per_layer[2] == pytest.approx(1e3, rel=0.02)
    assert mlp.per_layer[0] < 1e2
    assert choose_layer(found, "attn", top_k=3).layer == 0
    assert choose_layer(found, "down", top_k=1).top_layers == (1,)  # a single matrix ranks on its own numbers

    first = conditions_for(loaded, ["mlp"], tmp_path)  # computed and written to DIR/conditions.csv ...
    assert {c.group for c in first} == {"mlp"}
    calls = []
    real = condition.condition_numbers
    monkeypatch.setattr("svdicl.experiments.search.condition_numbers", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    again = conditions_for(loaded, ["mlp"], tmp_path)  # ... and read back for the same weights
    assert calls == [] and [c.condition_number for c in again] == pytest.approx([c.condition_number for c in first])
    both = conditions_for(loaded, ["mlp", "attn"], tmp_path)  # only the missing group is computed
    assert calls == ["attn"] and {c.group for c in both} == {"mlp", "attn"}


def test_rate_star_is_the_validation_argmax_ties_to_the_smaller_rate():
    assert choose_rate([0, 0.1, 0.5, 0.9], [0.5, 0.7, 0.7, 0.6]) == 0.1
    assert choose_rate([0, 0.1, 0.5], [0.6, 0.6, 0.6]) == 0
    assert choose_rate([0, 0.5, 0.995], [0.5, 0.6, 0.8]) == 0.995
    assert choose_rate([0, 0.5, 0.9], [0.5, 0.7000000000000001, 0.7]) == 0.5  # a floating-point tie is a tie
    assert candidate_rates("0.9,0.5") == (0.0, 0.5, 0.9)  # 0 is always a candidate
    with pytest.raises(SvdiclError, match="one validation value per rate"):
        choose_rate([0, 0.5], [0.5])


# Planted validation accuracy per (seed, rate): each seed alone would pick another rate; the mean ties 0.9 and 0.99.
PLANTED = {0: {0: 0.50, 0.5: 0.80, 0.9: 0.60, 0.99: 0.70}, 1: {0: 0.50, 0.5: 0.40, 0.9: 0.80, 0.99: 0.70}}


def test_rate_star_is_chosen_on_the_seed_mean(toy, monkeypatch):
    requested = []

    def planted(loaded, run, edits, **options):
        for specs in edits:
            rate = specs[0].rate if specs else 0
            requested.append((run.split, run.seed, rate))
            accuracy = PLANTED[run.seed][rate] if run.split == "validation" else 0.5
            right = round(accuracy * len(run.examples))
            scores = [Scores((0.0, -1.0) if (i < right) == (g == 0) else (-1.0, 0.0), (1, 1)) for i, g in enumerate(run.gold)]
            scores += [Scores((0.0, 0.0), (1, 1))] * len(run.probe_requests)
            yield EditRecord(tuple(specs), ()), finish_run(run, scores, False, {"path": "planted", "fallback": None})

    monkeypatch.setattr(scoring_calls, "evaluate_edits", planted)
    config = SearchConfig(
        str(toy), "mlp", rates=(0.5, 0.9, 0.99), layer=1, seeds=(0, 1), limit_validation=20, limit_test=20, arms="none"
    )
    result = search(toy_loaded(), config, Store(toy.parent / "out"), data_dir=toy.parent / "data")
    assert result.rates == (0, 0.5, 0.9, 0.99)
    assert [s.validation for s in result.seeds] == [pytest.approx(list(PLANTED[s].values())) for s in (0, 1)]
    assert result.validation.values == pytest.approx([0.5, 0.6, 0.7, 0.7])
    assert result.rate_star == 0.9
    assert sorted(r for split, _, r in requested if split == "test") == [0, 0, 0.9, 0.9]  # test: unpruned and rate* only


def test_search_end_to_end_equals_a_direct_evaluation(toy, monkeypatch):
    loaded, out, data = planted_loaded(), toy.parent / "out", toy.parent / "data"
    config = SearchConfig(str(toy), "mlp", rates=(0.5, 0.9), top_k=2, limit_validation=20, limit_test=24)
    result = search(loaded, config, Store(out), data_dir=data, model_name="tiny")
    written = write_search(result, out)
    stored = read_search(written[0])  # the report's reader accepts it
    assert stored["format"] == "svdicl.search/1" and stored["config"] == "search/toy-mlp.yaml"
    assert (stored["layer"], stored["top_layers"], stored["layer_from"]) == (1, [1, 2], "condition numbers")
    assert stored["condition"]["per_layer"]["1"] == pytest.approx(1e4, rel=0.02)
    assert (stored["limit"], stored["validation"]["n"], stored["test"]["n"]) == ({"validation": 20, "test": 24}, 20, 24)
    assert stored["rate_star"] == choose_rate(stored["rates"], stored["validation"]["values"])
    assert stored["rate_star"] > 0 and stored["seeds"][0]["discordant"]["only_baseline_correct"] > 0  # the pruned model differs

    runs = {
        split: prepare_run(loaded, str(toy), split=split, limit=n, data_dir=data)
        for split, n in (("validation", 20), ("test", 24))
    }
    direct = []
    for rate in stored["rates"]:
        with pruned(loaded.model, specs=[PruneSpec("1", "mlp", rate)]):
            direct.append(evaluate_run(loaded, runs["validation"], path="plain").accuracy.value)
    assert stored["validation"]["values"] == direct
    with pruned(loaded.model, specs=[PruneSpec("1", "mlp", stored["rate_star"])]):
        pruned_test = evaluate_run(loaded, runs["test"], path="plain")
    baseline_test = evaluate_run(loaded, runs["test"], path="plain")
    for name, run in (("baseline", baseline_test), ("pruned", pruned_test)):
        entry = stored["test"][name]
        assert (entry["value"], entry["ci_low"], entry["ci_high"]) == (run.accuracy.value, run.accuracy.low, run.accuracy.high)
    ids = [e.id for e in runs["test"].examples]
    paired = compare(list(zip(ids, baseline_test.correct, strict=True)), list(zip(ids, pruned_test.correct, strict=True)))
    assert stored["test"]["p_value"] == pytest.approx(paired.p_value)  # one seed: the sign-flip test is exact McNemar
    assert stored["seeds"][0]["mcnemar_p"] == paired.p_value

    replay = yaml.safe_load((out / "search" / "toy-mlp.yaml").read_text())
    spec = [] if stored["rate_star"] == 0 else [f"1:mlp:{stored['rate_star']:g}"]
    assert (replay["task"], replay["split"], replay["limit"], replay["prune"]) == (str(toy), "test", 24, spec)

    calls = Calls(monkeypatch)
    again = search(loaded, config, Store(out), data_dir=data, model_name="tiny")
    assert calls.edits == []  # resumed entirely from the store
    for key in ("layer", "rates", "validation", "rate_star", "test", "seeds"):
        assert getattr(again, key) == getattr(result, key)


def test_several_seeds_give_mean_spread_and_an_example_level_paired_test(toy):
    loaded, out = planted_loaded(), toy.parent / "out"
    config = SearchConfig(str(toy), "mlp", rates=(0.5, 0.9), layer=-2, seeds=(0, 1, 2), limit_validation=20, limit_test=24)
    result = search(loaded, config, Store(out), data_dir=toy.parent / "data")
    assert result.layer == 1 and result.layer_from == "given" and result.top_layers == ()
    curves = [s.validation for s in result.seeds]
    assert result.validation.values == pytest.approx([statistics.fmean(v) for v in zip(*curves, strict=True)])
    assert result.rate_star > 0
    store = Store(out)
    cells = {c.id: c for c in store.cells()}
    for name in ("baseline", "pruned"):
        values = [getattr(s, name).value for s in result.seeds]
        entry = getattr(result.test, name)
        assert entry.value == pytest.approx(statistics.fmean(values))
        assert entry.std == pytest.approx(statistics.stdev(values)) and entry.std > 0
        assert entry.ci_low <= entry.value <= entry.ci_high
        one = cells[getattr(result.seeds[0], f"{name}_cell")]  # one seed's interval is that cell's own bootstrap interval
        for metric in ("macro_f1",):  # (a cell's accuracy interval is Wilson's, not a bootstrap)
            interval = samples_ci([store.samples(one)], metric, 2)
            assert (interval.value, interval.low, interval.high) == tuple(
                one.metrics[metric][k] for k in ("value", "ci_low", "ci_high")
            )
    correct = {  # examples x seeds, per arm
        name: np.array([[s["correct"] for s in store.samples(cells[getattr(seed, f"{name}_cell")])] for seed in result.seeds]).T
        for name in ("baseline", "pruned")
    }
    paired = paired_comparison(correct["baseline"], correct["pruned"])  # seeds averaged per example: n = 24, not 72
    assert result.test.paired.n == 24 and result.test.p_value == paired.p_value
    assert result.test.paired.difference == pytest.approx(np.mean(correct["pruned"]) - np.mean(correct["baseline"]))


def test_cli_search_writes_results_replays_and_exports(toy, capsys, tmp_path):
    out, export, data = tmp_path / "out", tmp_path / "export", str(toy.parent / "data")
    model = save_model(planted_loaded(), tmp_path / "planted")
    argv = ["-q", "search", "--model", str(model), "--tasks", str(toy), "--modules", "mlp,attn", "--rates", "0.5,0.9"]
    argv += ["--limit-validation", "20", "--limit-test", "24", "--data-dir", data, "--output", str(out), "--export", str(export)]
    argv += ["--format", "svg"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| toy |" in printed and "paired Δ correct" in printed and "top-3 by condition number" in printed
    assert "| unpruned + batch |" in printed and "p (Holm)" in printed
    for module in ("mlp", "attn"):
        result = json.loads((out / "search" / f"toy-{module}.json").read_text())
        edit = json.loads((export / f"toy-{module}" / "svdicl_edit.json").read_text())
        assert edit["edit"]["key"] == (
            "none" if result["rate_star"] == 0 else f"{result['layer']}:{module}:{result['rate_star']:g}"
        )
        card = (export / f"toy-{module}" / "README.md").read_text()
        assert (
            "Algorithm 1" in card
            and f"rate* = {result['rate_star']:g}" in card
            and f"p = {result['test']['p_value']:.3g}" in card
        )
        replay = tmp_path / f"replay-{module}"
        config = out / "search" / f"toy-{module}.yaml"
        assert main(["-q", "eval", "--config", str(config), "--data-dir", data, "--output", str(replay)]) == 0
        replayed = json.loads((replay / "results.json").read_text())["runs"][0]["metrics"]["accuracy"]
        assert replayed["value"] == result["test"]["pruned"]["value"]
    assert json.loads((out / "search" / "toy-mlp.json").read_text())["rate_star"] > 0  # one replay prunes
    assert (out / "report.md").is_file() and (out / "figures" / "algorithm1-validation.svg").is_file()
    assert (out / "conditions.csv").is_file()


def test_cli_search_errors_are_one_line(toy, model_folder, capsys, tmp_path):
    base = ["search", "--model", str(model_folder), "--data-dir", str(toy.parent / "data"), "--output", str(tmp_path / "o")]
    assert "layer 7 is out of range" in one_line_error(capsys, *base, "--tasks", str(toy), "--layer", "7")
    assert "one layer index" in one_line_error(capsys, *base, "--tasks", str(toy), "--layer", "first2")
    assert "outside [0, 1)" in one_line_error(capsys, *base, "--tasks", str(toy), "--rates", "0.5,2")
    assert "--top-k must be at least 1" in one_line_error(capsys, *base, "--tasks", str(toy), "--top-k", "0")
    assert "not re:" in one_line_error(capsys, *base, "--tasks", str(toy), "--modules", "re:mlp")
    assert "unknown task 'nope'" in one_line_error(capsys, *base, "--tasks", "nope")
    assert "unknown module" in one_line_error(capsys, *base, "--tasks", str(toy), "--modules", "fc_in", "--layer", "0")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    assert "not empty" in one_line_error(capsys, *base, "--tasks", str(toy), "--export", str(full))


def test_search_configs_are_one_per_task_and_module_with_the_flags_conventions(tmp_path):
    configs = search_configs(
        ["sst2", "rte"], ["mlp", "attn", "mlp"], shots=4, shots_total=True, limit=9, limit_test=5, layer="-1"
    )
    assert [(c.task, c.module) for c in configs] == [("sst2", "mlp"), ("sst2", "attn"), ("rte", "mlp"), ("rte", "attn")]
    assert {(c.shots, c.limit_validation, c.limit_test, c.layer) for c in configs} == {(2, 9, 5, -1)}  # 4 in all: 2 per class
    assert search_configs(["sst2"], ["mlp"], shots=4)[0].shots == 4 and search_configs(["sst2"], ["mlp"])[0].shots is None
    with pytest.raises(SvdiclError, match="--layer takes one layer index such as 26 or -1, not 'first2'"):
        search_configs(["sst2"], ["mlp"], layer="first2")
    assert export_folders(configs, None) == {}
    assert export_folders(configs[:1], tmp_path / "e") == {configs[0]: tmp_path / "e"}  # one search: the folder itself
    assert export_folders(configs[:2], tmp_path / "e") == {c: tmp_path / "e" / f"sst2-{c.module}" for c in configs[:2]}
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("x")
    with pytest.raises(SvdiclError, match="not empty"):
        export_folders(configs[:1], tmp_path / "e")


def test_example_algorithm1_config_is_valid():
    argv = ["search", "--config", str(EXAMPLES / "algorithm1.yaml")]
    args = parse_args(argv)
    tasks, modules = parse_list(args.tasks), parse_list(args.modules)
    assert len(tasks) == 7 and modules == ["mlp", "attn"] and args.output
    configs = [SearchConfig(t, m, rates=args.rates, top_k=args.top_k, limit_test=args.limit_test) for t in tasks for m in modules]
    assert configs[0].rates == (0.0, 0.1, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995)


def test_search_arms_equal_direct_computations_on_the_same_test_examples(toy):
    """Every arm's value, CI, paired difference and Holm p, recomputed from the stored samples; ξ* re-chosen per calibration."""
    loaded, out = planted_loaded(), toy.parent / "out"
    config = SearchConfig(str(toy), "mlp", rates=(0.5, 0.9), layer=1, seeds=(0, 1), limit_validation=20, limit_test=24)
    result = search(loaded, config, Store(out), data_dir=toy.parent / "data")
    arms = {a["name"]: a for a in result.arms}
    calibrated = [f"{base} + {m}" for base in ("unpruned", "pruned") for m in METHODS]
    assert list(arms)[:5] == ["unpruned", *calibrated[:3], "pruned"] and set(calibrated) <= set(arms)
    for method in METHODS:
        values = result.validation.calibrated[method].values
        assert arms[f"pruned + {method}"]["rate"] == choose_rate(result.rates, values)
    store = Store(out)
    cells = {c.id: c for c in store.cells()}

    def correct(arm):  # examples x seeds, this arm's per-example correctness read from the raw samples
        runs = [store.samples(cells[i]) for i in arm["cells"]]
        pick = (
            (lambda s: s["correct"]) if arm["calibration"] is None else (lambda s: s["calibrated"][arm["calibration"]]["correct"])
        )
        return np.array([[pick(s) for s in run] for run in runs], dtype=float).T

    reference = correct(arms["unpruned"])
    raw, family = [], []
    for arm in result.arms:
        table = correct(arm)
        per_seed = table.mean(axis=0)
        assert arm["value"] == pytest.approx(per_seed.mean()) and arm["std"] == pytest.approx(np.std(per_seed, ddof=1))
        assert (arm["ci_low"], arm["ci_high"]) == pytest.approx(wilson_interval(table.mean(axis=1).sum(), 24))  # n <= 100
        assert arm["ci_method"] == "wilson"
        if arm["paired"] is not None and arm["same_as"] is None:
            direct = paired_comparison(reference, table)
            assert (arm["paired"]["difference"], arm["paired"]["p_value"]) == pytest.approx((direct.difference, direct.p_value))
            raw.append(arm["paired"]["p_value"])
            family.append(arm["paired"]["p_holm"])
        calibrated = arm["calibration"] is not None and not arm["name"].startswith("unpruned")
        assert (arm["paired_calibrated"] is not None) == (calibrated and arm["same_as"] is None)
        if arm["paired_calibrated"] is not None:  # against unpruned under the same calibration: does pruning add to it?
            direct = paired_comparison(correct(arms[f"unpruned + {arm['calibration']}"]), table)
            versus = arm["paired_calibrated"]
            assert (versus["difference"], versus["p_value"]) == pytest.approx((direct.difference, direct.p_value))
            raw.append(versus["p_value"])
            family.append(versus["p_holm"])
    assert family == pytest.approx(holm(raw)) and len(family) == len(raw) >= 5  # one Holm family: every comparison
    for method in METHODS:  # rate*_method = 0: the same predictions as the unpruned model's, outside the Holm family
        arm = arms[f"pruned + {method}"]
        assert arm["same_as"] == (f"unpruned + {method}" if arm["rate"] == 0 else None)
    assert arms["unpruned + batch"]["top_answer_share"] == pytest.approx(
        statistics.fmean(max(np.bincount(correct_predictions, minlength=2)) / 24 for correct_predictions in [
            [s["calibrated"]["batch"]["prediction"] for s in store.samples(cells[i])] for i in arms["unpruned + batch"]["cells"]
        ])
    )  # fmt: skip
    write_search(result, out)
    report = build_report(out, formats=["svg"])
    with open(out / "tables" / "arms.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["arm"] for r in rows] == [a["name"] for a in result.arms]
    assert [float(r["value"]) for r in rows] == pytest.approx([a["value"] for a in result.arms])
    assert [float(r["p_holm"]) for r in rows[1:]] == pytest.approx([a["paired"]["p_holm"] for a in result.arms[1:]])
    page = report.page.read_text()
    assert "| unpruned + contextual |" in page and "Holm-adjusted" in page and "figures/arms-" in page
    assert any(p.name.startswith("arms-") and p.suffix == ".svg" for p in report.files)


def test_search_config_selects_calibrations_and_arms(toy, tmp_path, capsys):
    model, out = save_model(planted_loaded(), tmp_path / "planted"), tmp_path / "out"
    config = tmp_path / "search.yaml"
    values = {"model": str(model), "tasks": str(toy), "modules": "mlp", "layer": "1", "rates": "0.9", "limit": 12,
              "data_dir": str(toy.parent / "data"), "output": str(out), "calibration": ["batch"],
              "arms": "calibration"}  # fmt: skip
    config.write_text(yaml.safe_dump(values))
    assert main(["-q", "search", "--config", str(config), "--no-report"]) == 0
    result = json.loads((out / "search" / "toy-mlp.json").read_text())
    assert [a["name"] for a in result["arms"]] == ["unpruned", "unpruned + batch", "pruned", "pruned + batch"]
    assert result["scoring"]["options"]["calibration"] == "batch"
    capsys.readouterr()
    assert "unknown arm group 'noise'" in one_line_error(capsys, "search", "--config", str(config), "--arms", "noise")


def test_calibrated_pruned_arms_are_also_paired_with_the_unpruned_model_under_the_same_calibration():
    """Pruning + calibration against calibration alone (does pruning add to it?), in the same Holm family."""
    from types import SimpleNamespace

    from svdicl.experiments.arms import Arm, summarize

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 40)
    answers = {name: [np.where(rng.random(40) < q, gold, 1 - gold) for _ in range(2)]
               for name, q in (("u", 0.6), ("u+batch", 0.7), ("p+batch", 0.85))}  # fmt: skip

    def cell(name, seed):
        predictions = answers[name][seed]
        return SimpleNamespace(id=f"{name}/{seed}", metrics={}, value=lambda metric, p=predictions: float(np.mean(p == gold)))

    store = SimpleNamespace(samples=lambda c: [
        {"id": i, "gold": int(g), "prediction": int(p), "correct": bool(p == g),
         "calibrated": {"batch": {"prediction": int(p), "correct": bool(p == g)}}}
        for i, (g, p) in enumerate(zip(gold, answers[c.id.split("/")[0]][int(c.id.split("/")[1])], strict=True))
    ])  # fmt: skip
    arms = [
        Arm("unpruned", 0.0, (cell("u", 0), cell("u", 1))),
        Arm("unpruned + batch", 0.0, (cell("u+batch", 0), cell("u+batch", 1)), calibration="batch"),
        Arm("pruned + batch", 0.9, (cell("p+batch", 0), cell("p+batch", 1)), calibration="batch"),
    ]
    entries = summarize(store, arms, "accuracy", 2)

    def table(name):
        return np.array([answers[name][seed] == gold for seed in range(2)], dtype=float).T

    versus = entries[2]["paired_calibrated"]
    direct = paired_comparison(table("u+batch"), table("p+batch"))
    assert (versus["difference"], versus["p_value"]) == pytest.approx((direct.difference, direct.p_value))
    assert entries[1]["paired_calibrated"] is None and entries[0]["paired"] is None
    raw = [entries[1]["paired"]["p_value"], entries[2]["paired"]["p_value"], versus["p_value"]]
    adjusted = [entries[1]["paired"]["p_holm"], entries[2]["paired"]["p_holm"], versus["p_holm"]]
    assert adjusted == pytest.approx(holm(raw))


def test_the_search_progress_bar_ends_at_its_total_when_calibrated_rates_add_test_cells(toy, monkeypatch):
    """Calibrated rates* and the null controls at each pruned arm's rate are known only after validation: the bar's
    total grows by exactly what they add, so it neither stops short nor runs past 100%."""
    import svdicl.experiments.search as searching

    picks = iter([0.9, 0.5, 0.5, 0.9])  # raw rate* 0.9; contextual and domain 0.5; batch 0.9
    monkeypatch.setattr(searching, "choose_rate", lambda rates, values: next(picks))
    loaded, out = planted_loaded(), toy.parent / "out"
    config = SearchConfig(str(toy), "mlp", rates=(0.5, 0.9), layer=1, seeds=(0, 1), limit_validation=20, limit_test=24)
    splits = next(iter(load_task_splits([str(toy)], toy.parent / "data").values()))
    progress = scoring_calls.Progress(config.examples(splits), "search", enabled=False)
    result = search(loaded, config, Store(out), splits=splits, progress=progress)
    assert sorted({a["rate"] for a in result.arms}) == [0.0, 0.5, 0.9]  # three test rates, two control rates
    assert progress.done == progress.bar.total > config.examples(splits)
    assert result.cells_scored == len(Store(out))  # a fresh store: every cell in it was scored now


def test_every_test_arm_of_a_seed_is_one_line_so_the_layers_below_run_once(toy, monkeypatch):
    """The null controls join the unpruned and pruned test cells in one evaluate_edits call per seed (one layer cache)."""
    calls = Calls(monkeypatch)
    config = SearchConfig(str(toy), "mlp", rates=(0.5, 0.9), layer=1, seeds=(0, 1), limit_validation=20, limit_test=24)
    result = search(planted_loaded(), config, Store(toy.parent / "out"), data_dir=toy.parent / "data")
    assert len(calls.edits) == 4  # per seed: validation, then test
    for edits in calls.edits[2:]:
        assert "none" in edits and any("@random-subspace" in e for e in edits) and any("@matched-noise" in e for e in edits)
    controls = [a for a in result.arms if a["control"]]
    assert controls and {a["control"] for a in controls} == {"random-subspace", "matched-noise"}


def test_zero_shot_test_arms_reuse_the_first_seed_except_the_null_controls(toy, monkeypatch):
    """With no demonstrations the first seed's cells stand for every seed, but each seed draws its own null controls."""
    import svdicl.experiments.search as searching

    monkeypatch.setattr(searching, "choose_rate", lambda rates, values: max(rates))  # rate* > 0: the controls run
    calls = Calls(monkeypatch)
    config = SearchConfig(
        str(toy), "mlp", rates=(0.9,), layer=1, shots=0, seeds=(0, 1), limit_validation=20, limit_test=24, arms=("controls",)
    )
    result = search(planted_loaded(), config, Store(toy.parent / "out"), data_dir=toy.parent / "data")
    assert result.rate_star == 0.9
    seed1 = [edits for edits in calls.edits if all("@" in e for e in edits)]  # seed 1's only job: its two controls
    assert len(calls.edits) == 3 and len(seed1) == 1 and len(seed1[0]) == 2
    store = Store(toy.parent / "out")
    cells = store.cells(split="test")
    reused = [c for c in cells if c.info.get("reused_from")]
    assert {c.key.seed for c in reused} == {1} and all("@" not in c.key.edit for c in reused)
    assert {c.key.seed for c in cells if "@" in c.key.edit} == {0, 1}


def test_balanced_validation_draws_the_classes_evenly_and_never_mixes_with_the_random_subset(toy):
    source = toy.parent / "data" / "toy" / "test.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    source.write_text("".join(json.dumps({**row, "label": int(i % 5 == 0)}) + "\n" for i, row in enumerate(rows)))
    loaded, store, data = planted_loaded(), Store(toy.parent / "out"), toy.parent / "data"
    found = {}
    for sampling in ("random", "balanced"):
        config = SearchConfig(
            str(toy), "mlp", rates=(0.9,), layer=1, limit_validation=12, limit_test=10, arms="none", validation_sampling=sampling
        )
        found[sampling] = search(loaded, config, store, data_dir=data)
    cells = {c.id: c for c in store.cells()}
    golds = {name: [row["gold"] for row in store.samples(cells[r.seeds[0].validation_cells[0]])] for name, r in found.items()}
    assert sorted(golds["balanced"]) == [0] * 6 + [1] * 6  # 6 of each class, though 1 row in 5 is class 1
    assert golds["random"].count(1) < 6 and len(golds["random"]) == 12
    assert set(found["random"].seeds[0].validation_cells).isdisjoint(found["balanced"].seeds[0].validation_cells)
    assert found["random"].seeds[0].baseline_cell == found["balanced"].seeds[0].baseline_cell  # test is drawn as before
    record = found["balanced"].to_json()
    assert (record["validation_sampling"], record["validation"]["n"]) == ("balanced", 12)
    assert record["limit"] == {"validation": 12, "test": 10}
    assert found["random"].to_json()["validation_sampling"] == "random"
    with pytest.raises(SvdiclError, match="use random or balanced"):
        SearchConfig(str(toy), validation_sampling="stratified")


def test_a_search_at_5_demonstrations_on_2_classes_keys_records_and_replays_them(toy, capsys, tmp_path):
    out, data = tmp_path / "out", str(toy.parent / "data")
    model = save_model(planted_loaded(), tmp_path / "planted")
    argv = ["-q", "search", "--model", str(model), "--tasks", str(toy), "--modules", "mlp", "--rates", "0.9", "--layer", "1"]
    argv += ["--arms", "none", "--limit-validation", "12", "--limit-test", "10", "--data-dir", data, "--output", str(out)]
    records, cells = {}, {}
    for total in ("4", "5"):
        before = {c.id for c in Store(out).cells()} if out.exists() else set()
        assert main([*argv, "--num_fewshot", total, "--no-report"]) == 0
        records[total] = json.loads((out / "search" / "toy-mlp.json").read_text())
        cells[total] = [c for c in Store(out).cells() if c.id not in before]
    capsys.readouterr()
    assert [records[t]["shots_total"] for t in ("4", "5")] == [4, 5]
    assert (records["5"]["shots_per_class"], records["5"]["extra_shots"], records["4"]["extra_shots"]) == (2, 1, 0)
    assert cells["5"] and all(c.key.extra_shots == 1 and len(c.info["demonstrations"]) == 5 for c in cells["5"])
    assert all(c.key.extra_shots == 0 and c.info["shots_total"] == 4 for c in cells["4"])  # nothing of 4 was reused for 5
    replay = yaml.safe_load((out / "search" / "toy-mlp.yaml").read_text())
    assert replay["num_fewshot"] == 5 and "shots_per_class" not in replay
    again = tmp_path / "replay"
    assert main(["-q", "eval", "--config", str(out / "search" / "toy-mlp.yaml"), "--output", str(again)]) == 0
    replayed = json.loads((again / "results.json").read_text())
    assert replayed["config"]["shots_total"] == 5
    assert replayed["runs"][0]["metrics"]["accuracy"]["value"] == records["5"]["test"]["pruned"]["value"]


@pytest.mark.parametrize(
    ("arms", "control_rates"), [(("calibration", "controls"), [0.9]), ("all", [0.5, 0.9])], ids=["controls", "all"]
)
def test_null_controls_run_at_rate_star_and_at_calibrated_rates_only_with_calibrated_controls(
    toy, monkeypatch, arms, control_rates
):
    """`controls` scores the two null controls at ξ* (read raw, and under each calibration whose ξ* is the same);
    `calibrated-controls` (in `all`) adds them at every other calibrated ξ*, two more test cells per rate and seed."""
    import svdicl.experiments.search as searching

    calls = Calls(monkeypatch)
    picks = iter([0.9, 0.5, 0.5, 0.9])  # raw rate* 0.9; contextual and domain 0.5; batch 0.9
    monkeypatch.setattr(searching, "choose_rate", lambda rates, values: next(picks))
    config = SearchConfig(str(toy), "mlp", rates=(0.5, 0.9), layer=1, seeds=(0,), limit_validation=20, limit_test=24, arms=arms)
    splits = next(iter(load_task_splits([str(toy)], toy.parent / "data").values()))
    progress = scoring_calls.Progress(config.examples(splits), "search", enabled=False)
    result = search(planted_loaded(), config, Store(toy.parent / "out"), splits=splits, progress=progress)
    scored = {float(e.split(":")[2].split("@")[0]) for e in calls.edits[-1] if "@" in e}
    assert sorted(scored) == control_rates
    controls = {(a["name"], a["rate"]) for a in result.arms if a["control"]}
    expected = {("random subspace", 0.9), ("random subspace + batch", 0.9)}
    if 0.5 in control_rates:
        expected |= {("random subspace + contextual", 0.5), ("random subspace + domain", 0.5)}
    assert {c for c in controls if c[0].startswith("random subspace")} == expected
    assert len(controls) == 2 * len(expected)  # the norm-matched noise mirrors each
    assert progress.done == progress.bar.total


def test_calibrated_controls_need_calibration_and_controls():
    assert parse_arms("calibration,controls,calibrated-controls") == GROUPS
    with pytest.raises(SvdiclError, match="calibrated-controls needs calibration and controls; add them, or use --arms all"):
        parse_arms("controls,calibrated-controls")
