"""Honest inference (issue 17, item 5): simulations of type-I error and coverage, references for
the paired test, its CI and MDE, and Holm's correction."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from svdicl.errors import SvdiclError
from svdicl.stats import (
    PERCENTILE,
    bootstrap_ci,
    holm,
    mcnemar,
    paired_by_id,
    paired_comparison,
    sign_flip_test,
    wilson_interval,
)


def shared_flip_null(rng: np.random.Generator, n: int = 32, seeds: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Two equally good arms whose disagreements sit on the same examples in every seed.

    A quarter of the examples are 'fragile': one arm (a fair coin per example) gets them wrong,
    and does so in each seed with probability 0.9. Every other answer is right in both arms."""
    fragile = rng.random(n) < 0.25
    against_a = rng.random(n) < 0.5
    happens = fragile[:, None] & (rng.random((n, seeds)) < 0.9)
    return ~(happens & against_a[:, None]), ~(happens & ~against_a[:, None])


def test_example_level_test_keeps_its_level_where_pooled_mcnemar_does_not():
    rng = np.random.default_rng(17)
    datasets = [shared_flip_null(rng) for _ in range(1000)]
    pooled = np.mean([mcnemar(a.ravel(), b.ravel()).p_value <= 0.05 for a, b in datasets])
    example_level = np.mean([paired_comparison(a, b).p_value <= 0.05 for a, b in datasets])
    assert example_level <= 0.06
    assert pooled > 0.1  # measured 0.185: seeds' repeats of an example counted as independent pairs


def test_example_level_test_has_power_against_a_real_difference():
    rng = np.random.default_rng(5)
    rejected = []
    for _ in range(200):
        a = np.repeat(rng.random((32, 1)) < 0.6, 3, axis=1) & (rng.random((32, 3)) < 0.95)
        b = a | (rng.random((32, 1)) < 0.6)  # B gets 60% of A's mistakes right, in every seed
        rejected.append(paired_comparison(a, b).p_value <= 0.05)
    assert np.mean(rejected) > 0.8


def _exact_coverage(interval, n: int, p: float) -> float:
    """P(interval covers p) summed over every possible number of successes."""
    return sum(stats.binom.pmf(k, n, p) for k in range(n + 1) if interval(k)[0] <= p <= interval(k)[1])


def test_wilson_covers_at_small_n_where_the_percentile_bootstrap_does_not():
    n, p = 32, 0.9

    def percentile(k):
        gold, predicted = np.ones(n, int), (np.arange(n) < k).astype(int)
        estimate = bootstrap_ci(gold, predicted, lambda g, q: (g == q).mean(axis=1), method=PERCENTILE)
        return estimate.low, estimate.high

    assert _exact_coverage(lambda k: wilson_interval(k, n), n, p) >= 0.93
    assert _exact_coverage(percentile, n, p) < 0.9  # 0.84: the old interval


def test_wilson_coverage_by_simulation():
    rng = np.random.default_rng(3)
    successes = rng.binomial(32, 0.9, size=4000)
    bounds = np.array([wilson_interval(int(k), 32) for k in range(33)])
    covered = (bounds[successes, 0] <= 0.9) & (bounds[successes, 1] >= 0.9)
    assert covered.mean() >= 0.93


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (29, 32), (16, 32), (1, 3), (450, 500), (7, 100)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_matches_scipy(k, n, confidence):
    reference = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert wilson_interval(k, n, confidence) == pytest.approx((reference.low, reference.high), abs=1e-12)


def test_wilson_rejects_bad_counts():
    with pytest.raises(SvdiclError, match="successes"):
        wilson_interval(5, 4)
    with pytest.raises(SvdiclError, match="confidence"):
        wilson_interval(1, 4, confidence=95)


def _brute_force_sign_flip(d: np.ndarray) -> float:
    observed = abs(d.sum())
    sums = [abs(np.dot(signs, d)) for signs in itertools.product((-1, 1), repeat=len(d))]
    return float(np.mean(np.asarray(sums) >= observed - 1e-9))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=12))
def test_exact_sign_flip_matches_enumeration(values):
    d = np.asarray(values, dtype=float)
    p, method = sign_flip_test(d)
    assert method == "sign-flip permutation (exact)"
    assert p == pytest.approx(_brute_force_sign_flip(d), abs=1e-12)


def test_exact_sign_flip_matches_scipy_permutation_test():
    rng = np.random.default_rng(2)
    a = rng.random((14, 3)) < 0.6
    b = rng.random((14, 3)) < 0.8
    reference = stats.permutation_test(
        (b.mean(1), a.mean(1)), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples", n_resamples=np.inf
    )
    assert paired_comparison(a, b).p_value == pytest.approx(reference.pvalue, abs=1e-9)


def test_monte_carlo_sign_flip_for_scores_approximates_the_exact_test():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 1, 13), rng.normal(0.5, 1, 13)
    result = paired_comparison(a, b, resamples=50_000, seed=1)
    assert result.method.startswith("sign-flip permutation (Monte Carlo")
    assert result.p_value == pytest.approx(_brute_force_sign_flip(b - a), abs=0.01)
    assert paired_comparison(a, b, resamples=50_000, seed=1) == result  # seeded


@pytest.mark.parametrize("only_a,only_b", [(0, 0), (0, 5), (3, 9), (10, 10), (2, 30)])
def test_one_seed_of_correctness_is_exactly_mcnemar(only_a, only_b):
    a = np.array([1] * only_a + [0] * only_b + [1] * 20 + [0] * 3)
    b = np.array([0] * only_a + [1] * only_b + [1] * 20 + [0] * 3)
    assert paired_comparison(a, b).p_value == pytest.approx(mcnemar(a, b).p_value, rel=1e-9)


def test_paired_ci_and_means_match_a_paired_t_interval():
    rng = np.random.default_rng(9)
    a = (rng.random((40, 3)) < 0.7).astype(float)
    b = (rng.random((40, 3)) < 0.75).astype(float)
    result = paired_comparison(a, b, confidence=0.9)
    reference = stats.ttest_rel(b.mean(1), a.mean(1)).confidence_interval(confidence_level=0.9)
    assert (result.low, result.high) == pytest.approx((reference.low, reference.high), abs=1e-12)
    assert result.difference == pytest.approx(b.mean() - a.mean())
    assert (result.mean_a, result.mean_b, result.n, result.seeds) == (pytest.approx(a.mean()), pytest.approx(b.mean()), 40, 3)


def test_mde_is_the_effect_detected_with_80_percent_power():
    rng = np.random.default_rng(11)
    a, b = rng.random((32, 3)) < 0.7, rng.random((32, 3)) < 0.7
    result = paired_comparison(a, b)
    sd = np.std(b.mean(1) - a.mean(1), ddof=1)
    critical = stats.t.ppf(0.975, 31)
    noncentrality = result.mde * np.sqrt(32) / sd
    power = stats.nct.sf(critical, 31, noncentrality) + stats.nct.cdf(-critical, 31, noncentrality)
    assert power == pytest.approx(0.8, abs=0.01)
    assert result.mde == pytest.approx((critical + stats.t.ppf(0.8, 31)) * sd / np.sqrt(32))


def test_identical_arms_give_p_one_and_no_mde():
    a = np.random.default_rng(0).random((20, 2)) < 0.5
    result = paired_comparison(a, a)
    assert (result.p_value, result.difference, result.low, result.high, result.mde) == (1.0, 0.0, 0.0, 0.0, None)


def test_paired_by_id_aligns_examples_and_seeds():
    ids = [f"x:{i}" for i in range(6)]
    a_rows, b_rows = [[1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]], [[1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]]
    a = [list(zip(ids, row, strict=True)) for row in a_rows]
    b = [list(reversed(list(zip(ids, row, strict=True)))) for row in b_rows]  # order must not matter
    result = paired_by_id(a, b)
    expected = paired_comparison(np.array(a_rows).T, np.array(b_rows).T)
    assert result == expected
    with pytest.raises(SvdiclError, match="different examples"):
        paired_by_id(a, [b[0][:-1], b[1]])
    with pytest.raises(SvdiclError, match="seeds"):
        paired_by_id(a, b[:1])


def test_paired_comparison_rejects_bad_input():
    with pytest.raises(SvdiclError, match="differ in shape"):
        paired_comparison(np.ones((5, 2)), np.ones((5, 3)))
    with pytest.raises(SvdiclError, match="at least 2 examples"):
        paired_comparison([1], [0])
    with pytest.raises(SvdiclError, match="NaN"):
        paired_comparison([1.0, np.nan], [0.0, 1.0])


@pytest.mark.parametrize(
    "p,adjusted",
    [
        ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),
        ([0.5, 0.3, 0.2], [0.6, 0.6, 0.6]),
        ([0.6, 0.7], [1.0, 1.0]),
        ([0.01, 0.01, 0.2], [0.03, 0.03, 0.2]),
        ([0.04], [0.04]),
        ([], []),
    ],
)
def test_holm_matches_hand_computed_table(p, adjusted):
    assert holm(p) == pytest.approx(adjusted)


def _holm_by_definition(p: list[float]) -> list[float]:
    """Smallest α at which Holm's step-down procedure (reject p_(j) <= α / (m - j + 1) until the
    first failure) rejects each hypothesis; rejection sets only change at α = (m - j + 1) p_(j)."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    candidates = sorted({min(1.0, (m - j) * p[i]) for j, i in enumerate(order)} | {1.0})
    result = [1.0] * m
    for i in range(m):
        for alpha in candidates:
            rejected = set()
            for j, k in enumerate(order):
                if (m - j) * p[k] > alpha:  # p_(j) > α / (m - j + 1), without a rounding division
                    break
                rejected.add(k)
            if i in rejected:
                result[i] = alpha
                break
    return result


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=8))
def test_holm_matches_its_definition(p):
    adjusted = holm(p)
    assert adjusted == pytest.approx(_holm_by_definition(p), abs=1e-12)
    assert all(a >= q for a, q in zip(adjusted, p, strict=True)) and max(adjusted) <= 1
    ranked = sorted(zip(p, adjusted, strict=True))
    assert all(x[1] <= y[1] for x, y in itertools.pairwise(ranked))  # monotone in the raw p


def test_holm_rejects_values_outside_zero_one():
    with pytest.raises(SvdiclError, match="p-values"):
        holm([0.2, 1.5])
