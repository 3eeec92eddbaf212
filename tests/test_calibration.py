"""Calibration (contextual, domain, batch) against direct hand computations, bias-aware metrics against
scikit-learn, and calibration through eval: probes on the same fast path, samples and metrics written."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
from conftest import save_model, toy_loaded
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from svdicl import calibration as cal
from svdicl.bias import balanced_accuracy, bias_metrics, margin_auc, prediction_counts, top_answer_share
from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.experiments.cells import Scoring
from svdicl.experiments.edits import evaluate_edits
from svdicl.experiments.evaluate import evaluate
from svdicl.experiments.grid import SweepGrid
from svdicl.experiments.run_scoring import evaluate_run
from svdicl.experiments.runs import prepare_run
from svdicl.experiments.sweep import sweep
from svdicl.prune import pruned
from svdicl.scoring import score_requests
from svdicl.specs import PruneSpec
from svdicl.store import Store
from svdicl.tasks import get_task
from svdicl.tasks.data import load_splits

pytestmark = pytest.mark.usefixtures("one_thread")

# three examples x two labels: summed log-probs of " negative", " positive"
SCORES = np.log(np.array([[0.3, 0.6], [0.1, 0.1], [0.5, 0.3]]))
PROBES = np.log(np.array([[0.3, 0.6], [0.05, 0.2]]))  # content-free rows, not normalised


def by_hand(scores, prior_rows):
    """p(y|x) = exp(s) / sum exp(s); p_cf = mean of the prior rows normalised the same way; argmax p / p_cf."""
    probs = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in scores]
    rows = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in prior_rows]
    p_cf = [sum(r[k] for r in rows) / len(rows) for k in range(len(rows[0]))]
    ratios = [[p / q for p, q in zip(row, p_cf, strict=True)] for row in probs]
    return p_cf, ratios, [max(range(len(r)), key=lambda k: (r[k], -k)) for r in ratios]


def test_contextual_and_domain_calibration_equal_a_direct_computation():
    p_cf, ratios, predictions = by_hand(SCORES, PROBES)
    # (0.3, 0.6) -> (1/3, 2/3); (0.05, 0.2) -> (0.2, 0.8); mean (0.2667, 0.7333)
    assert p_cf == pytest.approx([(1 / 3 + 0.2) / 2, (2 / 3 + 0.8) / 2])
    result = cal.apply("contextual", SCORES, PROBES)
    assert result.prior == pytest.approx(p_cf)
    assert np.exp(np.array(result.scores)) == pytest.approx(np.array(ratios))
    assert result.predictions == tuple(predictions) == (0, 0, 0)  # uncalibrated: 1, 0 (tie), 0
    assert cal.apply("domain", SCORES, PROBES) == cal.Calibrated("domain", result.prior, result.scores, result.predictions)


def test_batch_calibration_takes_its_prior_from_the_examples():
    p_cf, ratios, predictions = by_hand(SCORES, SCORES)
    result = cal.apply("batch", SCORES)
    assert result.prior == pytest.approx(p_cf)
    assert np.exp(np.array(result.scores)) == pytest.approx(np.array(ratios))
    assert result.predictions == tuple(predictions)


def test_calibration_is_invariant_to_a_constant_per_row_and_needs_its_probes():
    shifted = SCORES + np.array([[3.0], [-2.0], [0.5]])  # e.g. a different prompt log-likelihood: labels' ratios unchanged
    assert cal.apply("batch", shifted).predictions == cal.apply("batch", SCORES).predictions
    with pytest.raises(SvdiclError, match="content-free"):
        cal.apply("contextual", SCORES)


def test_parse_calibration():
    assert cal.parse_calibration("none") == () and cal.parse_calibration(None) == ()
    assert cal.parse_calibration("all") == cal.METHODS
    assert cal.parse_calibration("batch, contextual") == ("contextual", "batch")
    assert cal.parse_calibration(["domain"]) == ("domain",)
    with pytest.raises(SvdiclError, match="unknown calibration 'platt'"):
        cal.parse_calibration("platt")


def test_probe_queries_fill_every_field(data_dir):
    rte = get_task("rte")
    assert cal.probe_queries(rte, "contextual", (), 0)[0] == "N/A Does this mean that N/A is true? select Yes or No?"
    assert len(cal.probe_queries(rte, "contextual", (), 0)) == 3 and cal.probe_queries(rte, "batch", (), 0) == ()
    pool = load_splits(rte, data_dir).demonstrations
    queries = cal.probe_queries(rte, "domain", pool, 3)
    assert len(queries) == cal.DOMAIN_QUERIES and queries == cal.probe_queries(rte, "domain", pool, 3)
    assert queries != cal.probe_queries(rte, "domain", pool, 4)
    words = {w for e in pool for f in e.fields.values() for w in f.split()}
    premise = queries[0].split(" Does this mean that ")[0].split()
    mean_premise = sum(len(e.fields["premise"].split()) for e in pool) / len(pool)
    assert len(premise) == round(mean_premise) and set(premise) <= words


def test_bias_metrics_match_scikit_learn():
    rng = random.Random(0)
    for _ in range(50):
        k = rng.choice([2, 3, 4])
        gold = [rng.randrange(k) for _ in range(rng.randint(2, 30))]
        predicted = [rng.randrange(k) if rng.random() < 0.6 else 0 for _ in gold]
        assert balanced_accuracy(gold, predicted, k) == pytest.approx(
            balanced_accuracy_score(gold, predicted) if set(predicted) <= set(gold) else _balanced(gold, predicted)
        )
        assert prediction_counts(predicted, k) == [predicted.count(c) for c in range(k)]
        assert top_answer_share(predicted, k) == max(predicted.count(c) for c in range(k)) / len(predicted)
        binary = [g % 2 for g in gold]
        margin = [rng.choice([-1.0, 0.0, 0.5, 2.0]) for _ in gold]  # many ties
        expected = roc_auc_score(binary, margin) if len(set(binary)) == 2 else None
        assert margin_auc(binary, margin) == (pytest.approx(expected) if expected is not None else None)
        if expected is not None:
            assert margin_auc(binary, margin) == pytest.approx(_pairwise_auc(binary, margin))


def _balanced(gold, predicted):
    """Mean recall over gold classes (scikit-learn also averages over predicted-only classes, with a warning)."""
    classes = sorted(set(gold))
    recalls = [sum(p == c for g, p in zip(gold, predicted, strict=True) if g == c) / gold.count(c) for c in classes]
    return sum(recalls) / len(classes)


def _pairwise_auc(gold, margin):
    pairs = [(a, b) for a, b in itertools.product(range(len(gold)), repeat=2) if gold[a] == 1 and gold[b] == 0]
    return sum(1.0 if margin[a] > margin[b] else 0.5 if margin[a] == margin[b] else 0.0 for a, b in pairs) / len(pairs)


def test_auc_of_a_constant_answer_model_is_its_ranking_not_its_accuracy():
    scores = [[0.0, 1.0 + i / 10] for i in range(6)]  # always "positive", margins rising with i
    gold = [0, 0, 0, 1, 1, 1]
    found = bias_metrics(gold, [1] * 6, scores, 2)
    assert found == {"balanced_accuracy": 0.5, "prediction_counts": [0, 6], "top_answer_share": 1.0, "auc": 1.0}


def test_eval_with_calibration_scores_probes_on_the_same_path_and_writes_them(toy, tmp_path):
    loaded = toy_loaded()
    data = toy.parent / "data"
    run = prepare_run(loaded, str(toy), split="test", shots=2, seed=1, limit=16, data_dir=data, calibration="all")
    assert [m for m, _ in run.probes] == ["contextual"] * 3 + ["domain"] * cal.DOMAIN_QUERIES
    assert run.probes[1][1] == "q:  a:"
    prefix = evaluate_run(loaded, run, path="prefix")
    plain = evaluate_run(loaded, run, path="plain")
    assert prefix.timing["path"] == "prefix" and plain.timing["path"] == "plain"
    reference = score_requests(loaded.model, run.probe_requests)  # the probes alone, on the plain path
    for a, b, c in zip(prefix.probe_scores, plain.probe_scores, reference, strict=True):
        assert a.logprobs == pytest.approx(c.logprobs, abs=1e-4) and b.logprobs == pytest.approx(c.logprobs, abs=1e-4)
    values = np.array([s.logprobs for s in plain.scores])
    for c in plain.calibrated:
        method = c.calibrated.method
        probes = [s.logprobs for (m, _), s in zip(run.probes, reference, strict=True) if m == method]
        rows = values if method == "batch" else np.array(probes)
        _, _, expected = by_hand(values, rows)
        assert list(c.calibrated.predictions) == expected
        assert c.accuracy.value == pytest.approx(np.mean(np.array(expected) == np.array(run.gold)))
    results = evaluate(
        loaded, str(toy), shots=2, seeds=(1,), limit=16, data_dir=data, output=tmp_path / "e", calibration="all"
    ).to_json()
    metrics = results["runs"][0]["metrics"]
    for c in plain.calibrated:
        assert metrics[f"{c.calibrated.method}:accuracy"]["value"] == c.accuracy.value
    assert set(results["runs"][0]["calibration"]) == set(cal.METHODS)
    assert len(results["runs"][0]["calibration"]["domain"]["queries"]) == cal.DOMAIN_QUERIES
    samples = [json.loads(line) for line in (tmp_path / "e" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and set(samples[0]["calibrated"]) == set(cal.METHODS)
    assert [s["calibrated"]["batch"]["prediction"] for s in samples] == [
        p for c in plain.calibrated if c.calibrated.method == "batch" for p in c.calibrated.predictions
    ]


def test_multiple_choice_tasks_have_no_calibration():
    assert cal.applicable(get_task("copa"), cal.METHODS) == ()
    assert cal.applicable(get_task("sst2"), ("batch",)) == ("batch",)


def test_sweep_cells_carry_calibration_in_their_key_and_metrics(toy):
    loaded, out = toy_loaded(), toy.parent / "out"
    grid = SweepGrid(tasks=(str(toy),), layers=("0",), modules=("mlp",), rates=(0, 0.5), shots=(1,), limit=12)
    plain = sweep(loaded, grid, Store(out), data_dir=toy.parent / "data", progress=False)
    calibrated = sweep(
        loaded, grid, Store(out), scoring=Scoring(calibration="batch"), data_dir=toy.parent / "data", progress=False
    )
    assert calibrated.computed == 2  # a different option: new cells, never the uncalibrated ones read back
    for before, after in zip(plain.cells, calibrated.cells, strict=True):
        assert dict(after.key.options)["calibration"] == "batch" and "calibration" not in dict(before.key.options)
        assert after.metrics["accuracy"] == before.metrics["accuracy"]  # the raw predictions do not change
        samples = Store(out).samples(after)
        values = np.array([s["logprobs"] for s in samples])
        _, _, expected = by_hand(values, values)
        assert [s["calibrated"]["batch"]["prediction"] for s in samples] == expected
        assert after.metrics["batch:accuracy"]["value"] == pytest.approx(
            np.mean(np.array(expected) == [s["gold"] for s in samples])
        )


def test_cli_calibration_flag_and_its_error(toy, tmp_path, capsys):
    model = save_model(toy_loaded(), tmp_path / "model")
    argv = ["-q", "eval", "--model", str(model), "--task", str(toy), "--data-dir", str(toy.parent / "data"), "--limit", "8"]
    assert main([*argv, "--calibration", "batch,contextual", "--output", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out
    assert "contextual: accuracy" in printed and "batch: accuracy" in printed and "top-answer share" in printed
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["config"]["scoring"]["calibration"] == ["contextual", "batch"]
    assert main([*argv, "--calibration", "platt", "--output", str(tmp_path / "f")]) == 2
    assert "unknown calibration 'platt'" in capsys.readouterr().err


def test_calibration_queries_ride_the_layer_path_under_an_edit(toy):
    loaded = toy_loaded()
    run = prepare_run(loaded, str(toy), split="test", shots=1, seed=0, limit=10, data_dir=toy.parent / "data", calibration="all")
    edit = [PruneSpec("1", "mlp", 0.5)]
    ((_, layer),) = evaluate_edits(loaded, run, [edit], path="layer")
    assert layer.timing["path"] == "layer"
    with pruned(loaded.model, specs=edit):
        reference = score_requests(loaded.model, run.probe_requests)  # plain path, the same edit
        direct = evaluate_run(loaded, run, path="plain")
    for a, b in zip(layer.probe_scores, reference, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert [c.calibrated.predictions for c in layer.calibrated] == [c.calibrated.predictions for c in direct.calibrated]
