"""Statistics against simple references: per-class loops, scipy's binomial test and bootstrap, normal-theory CIs."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest
from scipy.stats import bootstrap as scipy_bootstrap
from sklearn.metrics import f1_score

from svdicl.errors import SvdiclError
from svdicl.stats import (
    BCA,
    PERCENTILE,
    _macro_f1,
    accuracy,
    accuracy_ci,
    bootstrap_ci,
    compare,
    macro_f1,
    macro_f1_ci,
    mcnemar,
    seed_mean_ci,
    spread,
    wilson_interval,
)


def reference_macro_f1(gold, predicted, k):
    scores = []
    for c in range(k):
        tp = sum(g == c and p == c for g, p in zip(gold, predicted, strict=True))
        fp = sum(g != c and p == c for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == c and p != c for g, p in zip(gold, predicted, strict=True))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / k


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 4).flatmap(
        lambda k: st.tuples(
            st.just(k), st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=40)
        )
    )
)
def test_accuracy_and_macro_f1_match_reference(case):
    k, pairs = case
    gold, predicted = [g for g, _ in pairs], [p for _, p in pairs]
    assert accuracy(gold, predicted) == pytest.approx(sum(g == p for g, p in pairs) / len(pairs))
    assert macro_f1(gold, predicted, k) == pytest.approx(reference_macro_f1(gold, predicted, k))
    reference = f1_score(gold, predicted, labels=range(k), average="macro", zero_division=0)
    assert macro_f1(gold, predicted, k) == pytest.approx(reference)


def test_accuracy_ci_is_the_wilson_interval_and_matches_normal_theory_for_large_n():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 2, 2000)
    predicted = np.where(rng.random(2000) < 0.7, gold, 1 - gold)
    estimate = accuracy_ci(gold, predicted)
    p = estimate.value
    half = 1.96 * math.sqrt(p * (1 - p) / len(gold))
    assert estimate.low == pytest.approx(p - half, abs=0.001)
    assert estimate.high == pytest.approx(p + half, abs=0.001)
    assert (estimate.method, estimate.resamples) == ("wilson", None)
    assert (estimate.low, estimate.high) == wilson_interval(int((gold == predicted).sum()), 2000)


def test_accuracy_ci_covers_the_true_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    hits = 0
    trials = 400
    for _ in range(trials):
        correct = rng.random(150) < 0.8
        estimate = accuracy_ci(np.ones(150, int), correct.astype(int))
        hits += estimate.low <= 0.8 <= estimate.high
    assert 0.92 <= hits / trials <= 0.98


@pytest.mark.parametrize("n", [25, 200])
def test_bca_bootstrap_matches_scipy(n):
    values = np.random.default_rng(n).exponential(1.0, n)  # skewed, where BCa and percentile differ
    order = np.arange(n)
    ours = bootstrap_ci(order, order, lambda g, _: values[g].mean(axis=1), resamples=40_000, seed=3)
    reference = scipy_bootstrap((values,), np.mean, n_resamples=40_000, method="BCa", rng=np.random.default_rng(3))
    scale = values.std() / math.sqrt(n)
    assert ours.method == BCA and ours.value == pytest.approx(values.mean())
    assert ours.low == pytest.approx(reference.confidence_interval.low, abs=0.05 * scale)
    assert ours.high == pytest.approx(reference.confidence_interval.high, abs=0.05 * scale)
    percentile = bootstrap_ci(order, order, lambda g, _: values[g].mean(axis=1), resamples=40_000, seed=3, method=PERCENTILE)
    assert ours.high - percentile.high > 0.05 * scale  # right skew: BCa moves the interval up


@pytest.mark.parametrize("n", [40, 600])
def test_bca_macro_f1_interval_is_scipys_with_the_same_draws(n):
    """Ties are common in a discrete metric's draws: both count them half towards the bias z0."""
    rng = np.random.default_rng(n)
    gold = rng.integers(0, 3, n)
    predicted = np.where(rng.random(n) < 0.6, gold, rng.integers(0, 3, n))
    ours = macro_f1_ci(gold, predicted, 3, seed=5)
    reference = scipy_bootstrap(
        (gold, predicted),
        lambda g, p, axis: _macro_f1(np.atleast_2d(g), np.atleast_2d(p), 3),
        paired=True,
        vectorized=True,
        n_resamples=ours.resamples,
        method="BCa",
        rng=np.random.default_rng(5),
    )
    assert [ours.low, ours.high] == pytest.approx(np.ravel(reference.confidence_interval), abs=1e-12)


def test_bootstrap_of_a_constant_metric_is_a_point():
    estimate = bootstrap_ci([0, 1, 1, 0], [0, 1, 1, 0], lambda g, p: (g == p).mean(axis=1))  # every draw: 1.0
    assert (estimate.value, estimate.low, estimate.high) == (1.0, 1.0, 1.0)


def test_macro_f1_ci_brackets_its_value_and_narrows_with_more_examples():
    rng = np.random.default_rng(3)

    def width(n):
        gold = rng.integers(0, 3, n)
        predicted = np.where(rng.random(n) < 0.6, gold, rng.integers(0, 3, n))
        estimate = macro_f1_ci(gold, predicted, 3)
        assert estimate.low <= estimate.value <= estimate.high
        return estimate.high - estimate.low

    assert width(2000) < width(100) / 2


@pytest.mark.parametrize("only_a,only_b", [(0, 0), (0, 5), (3, 9), (10, 10), (1, 30), (47, 80), (300, 251)])
def test_mcnemar_equals_exact_binomial_test(only_a, only_b):
    both, neither = 17, 4
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    result = mcnemar(a, b)
    assert (result.only_a, result.only_b) == (only_a, only_b)
    expected = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert result.p_value == pytest.approx(expected, rel=1e-9)


def test_mcnemar_hand_computed_case():
    # 0 vs 5 discordant pairs: p = 2 * (1/2)^5
    assert mcnemar([False] * 5, [True] * 5).p_value == pytest.approx(0.0625)


def test_compare_pairs_runs_by_example_id():
    a = [("x:1", True), ("x:2", True), ("x:3", False), ("x:9", True)]
    b = [("x:3", True), ("x:2", False), ("x:1", True), ("x:7", False)]
    result = compare(a, b)
    assert (result.only_a, result.only_b) == (1, 1)
    with pytest.raises(SvdiclError, match="twice"):
        compare([*a, ("x:1", False)], b)
    with pytest.raises(SvdiclError, match="share no example"):
        compare([("a:1", True)], [("b:1", True)])


def test_spread_matches_statistics_module():
    values = [0.61, 0.7, 0.655, 0.58]
    result = spread(values)
    assert result["mean"] == pytest.approx(statistics.mean(values))
    assert result["std"] == pytest.approx(statistics.stdev(values))
    assert (result["min"], result["max"], result["n"]) == (0.58, 0.7, 4)
    assert spread([0.5])["std"] is None


def test_bad_input_is_one_line_error():
    with pytest.raises(SvdiclError, match="differ in length"):
        accuracy([0, 1], [0])
    with pytest.raises(SvdiclError, match="no examples"):
        accuracy([], [])


def test_seed_mean_ci_is_the_single_seed_interval_for_one_seed_and_the_seed_mean_for_several():
    rng = np.random.default_rng(8)
    gold = rng.integers(0, 3, 60)
    predicted = np.where(rng.random((3, 60)) < 0.7, gold, rng.integers(0, 3, (3, 60)))
    assert seed_mean_ci(gold, predicted[:1], "accuracy", 3) == accuracy_ci(gold, predicted[0])
    assert seed_mean_ci(gold, predicted[:1], "macro_f1", 3) == macro_f1_ci(gold, predicted[0], 3)
    for metric, one in (("accuracy", accuracy), ("macro_f1", lambda g, p: macro_f1(g, p, 3))):
        estimate = seed_mean_ci(gold, predicted, metric, 3)
        assert estimate.value == pytest.approx(np.mean([one(gold, p) for p in predicted]))
        assert estimate.low < estimate.value < estimate.high and estimate.method == BCA
    with pytest.raises(SvdiclError, match="no interval"):
        seed_mean_ci(gold, predicted, "auc", 3)


def test_jackknife_of_bca_matches_leaving_each_example_out():
    from svdicl.stats import _jackknife

    rng = np.random.default_rng(12)
    gold, predicted = rng.integers(0, 3, 30), rng.integers(0, 3, 30)  # many repeated (gold, predicted) pairs
    expected = [macro_f1(np.delete(gold, i), np.delete(predicted, i), 3) for i in range(30)]
    assert _jackknife(gold, predicted, lambda g, p: _macro_f1(g, p, 3)) == pytest.approx(expected)
    values, order = rng.normal(size=30), np.arange(30)
    expected = [np.delete(values, i).mean() for i in range(30)]
    assert _jackknife(order, order, lambda g, _: values[g].mean(axis=1)) == pytest.approx(expected)
