"""Metrics, intervals, paired tests and multiplicity (definitions: docs/evaluation.md, "Statistics").

The paper reports single-seed point estimates; several of its gains are one or two test
examples.  These are the numbers that say whether a difference is real:

- `wilson_interval` / `accuracy_ci`: Wilson score interval of an accuracy (a binomial proportion);
  the percentile bootstrap covers only 0.84 at n = 32, p = 0.9 (exact), Wilson 0.96.
- `bootstrap_ci`: BCa (or percentile) bootstrap over examples for other metrics (seeded; 2,000 resamples).
- `paired_comparison`: two arms on the same examples and seeds. Seeds are averaged per example
  first, so the unit of inference is the example: an exact sign-flip permutation test, a t-interval
  of the mean paired difference and the minimum detectable effect.
- `holm`: Holm's step-down adjustment across the comparisons of one report.
- `mcnemar`: exact McNemar test for ONE seed (pooling seeds into it treats repeats of an example
  as independent pairs; its type-I error is then far above alpha).
- `spread`: mean, sample standard deviation, min and max over demonstration seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy import stats as scipy_stats
from scipy.signal import fftconvolve

from svdicl.errors import SvdiclError

RESAMPLES = 2000
CONFIDENCE = 0.95
PERMUTATIONS = 100_000  # Monte Carlo sign flips when the exact distribution is not available
POWER = 0.8
WILSON = "wilson"
BCA = "bca bootstrap"
PERCENTILE = "percentile bootstrap"
INTERVALS = {"accuracy": WILSON, "macro_f1": BCA, "resamples": RESAMPLES, "confidence": CONFIDENCE, "seed": 0}


def accuracy(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """Share of predictions equal to gold."""
    gold_a, pred_a = _arrays(gold, predicted)
    return float((gold_a == pred_a).mean())


def macro_f1(gold: Sequence[int], predicted: Sequence[int], num_classes: int) -> float:
    """Unweighted mean over classes of F1; a class never gold nor predicted scores 0."""
    gold_a, pred_a = _arrays(gold, predicted)
    return float(_macro_f1(gold_a[None], pred_a[None], num_classes)[0])


def _macro_f1(gold: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Row-wise macro-F1 of (resamples x examples) arrays."""
    total = np.zeros(gold.shape[0])
    for c in range(num_classes):
        is_gold, is_pred = gold == c, predicted == c
        tp = (is_gold & is_pred).sum(axis=1)
        denominator = is_gold.sum(axis=1) + is_pred.sum(axis=1)  # 2tp + fp + fn
        total += np.divide(2 * tp, denominator, out=np.zeros(len(tp)), where=denominator > 0)
    return total / num_classes


def _arrays(gold: Sequence[int], predicted: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    gold_a, pred_a = np.asarray(gold, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if gold_a.shape != pred_a.shape or gold_a.ndim != 1:
        raise SvdiclError(f"gold and predicted labels differ in length ({len(gold_a)} vs {len(pred_a)})")
    if len(gold_a) == 0:
        raise SvdiclError("no examples to score; check --limit and the split")
    return gold_a, pred_a


@dataclass(frozen=True)
class Estimate:
    """A metric with its confidence interval over examples and the method that gave it."""

    value: float
    low: float
    high: float
    confidence: float = CONFIDENCE
    resamples: int | None = RESAMPLES  # None for a closed-form interval (Wilson)
    method: str = BCA

    def to_dict(self) -> dict:
        """The estimate as results files record it."""
        return {
            "value": self.value,
            "ci_low": self.low,
            "ci_high": self.high,
            "confidence": self.confidence,
            "resamples": self.resamples,
            "ci_method": self.method,
        }

    @classmethod
    def from_dict(cls, entry: Mapping) -> Estimate:
        """An estimate as `to_dict` wrote it (confidence, resamples and method when recorded)."""
        keys = {"confidence": "confidence", "resamples": "resamples", "method": "ci_method"}
        return cls(entry["value"], entry["ci_low"], entry["ci_high"], **{k: entry[v] for k, v in keys.items() if v in entry})


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: the p whose score test accepts successes/n.

    (p̂ + z²/2n ± z·sqrt(p̂(1-p̂)/n + z²/4n²)) / (1 + z²/n), z the two-sided normal quantile.
    Unlike p̂ ± z·se or the percentile bootstrap it does not collapse at p̂ = 0 or 1 and keeps
    close to nominal coverage for small n.
    """
    if n <= 0 or not 0 <= successes <= n:
        raise SvdiclError(f"a proportion needs 0 <= successes <= n and n > 0 (got {successes} of {n})")
    _check_confidence(confidence)
    z = float(scipy_stats.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise SvdiclError(f"confidence must lie strictly between 0 and 1 (got {confidence}); e.g. 0.95")


def bootstrap_ci(
    gold: Sequence[int],
    predicted: Sequence[int],
    metric: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    method: str = BCA,
) -> Estimate:
    """Bootstrap over examples: resample them with replacement and read the metric's quantiles.

    `metric` maps (draws x n) gold and predicted arrays to one value per row. `method` is BCA
    (bias-corrected and accelerated, Efron 1987: the quantile levels are shifted by the bias
    z0 = Φ⁻¹(share of draws below the estimate, ties counted half) and the jackknife
    acceleration a) or PERCENTILE (the plain quantiles).
    """
    if method not in (BCA, PERCENTILE):
        raise SvdiclError(f"unknown bootstrap method {method!r}; use {BCA!r} or {PERCENTILE!r}")
    _check_confidence(confidence)
    gold_a, pred_a = _arrays(gold, predicted)
    n = len(gold_a)
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // n)  # resamples per step, so memory stays ~100 MB
    values = []
    for start in range(0, resamples, chunk):
        index = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        values.append(metric(gold_a[index], pred_a[index]))
    values = np.concatenate(values)
    point = float(metric(gold_a[None], pred_a[None])[0])
    alpha = (1 - confidence) / 2
    levels = np.array([alpha, 1 - alpha])
    if method == BCA:
        levels = _bca_levels(values, point, _jackknife(gold_a, pred_a, metric), levels)
    low, high = np.quantile(values, levels)
    return Estimate(point, float(low), float(high), confidence, resamples, method)


def _jackknife(gold: np.ndarray, predicted: np.ndarray, metric: Callable) -> np.ndarray:
    """The metric with each example left out in turn (n values).

    A metric of a sample does not depend on the examples' order, so leaving out either of two
    examples with the same (gold, predicted) pair gives the same value: one is computed per
    distinct pair (at most classes² for labels), a block of rows at a time."""
    n = len(gold)
    if n < 2:
        return np.zeros(1)
    _, first, inverse = np.unique(np.stack([gold, predicted], axis=1), axis=0, return_index=True, return_inverse=True)
    chunk = max(1, 4_000_000 // n)
    values = []
    for start in range(0, len(first), chunk):
        rows = first[start : start + chunk, None]
        index = np.arange(n - 1)[None, :] + (np.arange(n - 1)[None, :] >= rows)  # row for example i: every example but i
        values.append(metric(gold[index], predicted[index]))
    return np.concatenate(values)[inverse.reshape(-1)]


def _bca_levels(values: np.ndarray, point: float, jackknife: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """BCa quantile levels Φ(z0 + (z0 + z_α) / (1 - a (z0 + z_α))); plain levels when every draw is equal."""
    if np.ptp(values) == 0:
        return levels
    below = (np.sum(values < point) + 0.5 * np.sum(values == point)) / len(values)
    below = np.clip(below, 0.5 / len(values), 1 - 0.5 / len(values))
    z0 = scipy_stats.norm.ppf(below)
    centred = jackknife.mean() - jackknife
    spread_ = np.sum(centred**2)
    a = np.sum(centred**3) / (6 * spread_**1.5) if spread_ > 0 else 0.0
    z = scipy_stats.norm.ppf(levels)
    return scipy_stats.norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))


def accuracy_ci(gold: Sequence[int], predicted: Sequence[int], *, confidence: float = CONFIDENCE) -> Estimate:
    """Accuracy with its Wilson interval (accuracy is a binomial proportion, so no resampling is needed)."""
    gold_a, pred_a = _arrays(gold, predicted)
    correct = int((gold_a == pred_a).sum())
    low, high = wilson_interval(correct, len(gold_a), confidence)
    return Estimate(correct / len(gold_a), low, high, confidence, None, WILSON)


def macro_f1_ci(gold: Sequence[int], predicted: Sequence[int], num_classes: int, **options) -> Estimate:
    """Macro-F1 with its BCa bootstrap interval (macro-F1 is not a proportion; Wilson does not apply)."""
    return bootstrap_ci(gold, predicted, lambda g, p: _macro_f1(g, p, num_classes), **options)


def seed_mean_ci(gold: Sequence[int], predicted: np.ndarray | Sequence, metric: str, num_classes: int) -> Estimate:
    """A metric averaged over seeds, with its CI over examples; `predicted` is (seeds x examples).

    One seed: exactly `accuracy_ci` / `macro_f1_ci`. Several: the seeds score the same examples,
    so one BCa bootstrap draw of examples serves every seed (the spread over seeds is reported
    separately as their standard deviation, the ±).
    """
    predicted_a = np.atleast_2d(np.asarray(predicted, dtype=np.int64))
    gold_a, _ = _arrays(gold, predicted_a[0])
    if metric not in ("accuracy", "macro_f1"):
        raise SvdiclError(f"no interval for metric {metric!r}; use accuracy or macro_f1")
    if len(predicted_a) == 1:
        return accuracy_ci(gold_a, predicted_a[0]) if metric == "accuracy" else macro_f1_ci(gold_a, predicted_a[0], num_classes)

    def mean_over_seeds(index: np.ndarray, _: np.ndarray) -> np.ndarray:  # index: draws x examples
        if metric == "accuracy":
            return np.mean([gold_a[index] == p[index] for p in predicted_a], axis=(0, 2))
        return np.mean([_macro_f1(gold_a[index], p[index], num_classes) for p in predicted_a], axis=0)

    order = np.arange(len(gold_a))
    return bootstrap_ci(order, order, mean_over_seeds)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test: `only_a` = examples A got right and B wrong, `only_b` the reverse."""

    only_a: int
    only_b: int
    p_value: float

    def to_dict(self) -> dict:
        """The discordant counts and the exact p-value as results files record them."""
        return {"only_a_correct": self.only_a, "only_b_correct": self.only_b, "p_value": self.p_value}


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> McNemar:
    """Two-sided exact test of 'A and B are equally accurate' on paired examples of ONE seed.

    Several seeds' answers on the same examples are not independent pairs: compare them with
    `paired_comparison`, which averages the seeds per example first.

    Under the null each discordant pair favours A with probability 1/2, so the p-value is
    min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c))).
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise SvdiclError(f"paired runs differ in length ({len(a)} vs {len(b)}); compare runs on the same examples")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    tail, term = 0, 1  # sum of C(n, i) for i <= k, built term by term in integers
    for i in range(k + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    p = min(Fraction(1), Fraction(2 * tail, 2**n)) if n else Fraction(1)
    return McNemar(only_a, only_b, float(p))


def spread(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (None for one value), min, max and count over seeds."""
    if not values:
        raise SvdiclError("no values to summarise")
    data = np.asarray(values, dtype=float)
    return {
        "mean": float(data.mean()),
        "std": float(data.std(ddof=1)) if len(data) > 1 else None,
        "min": float(data.min()),
        "max": float(data.max()),
        "n": len(data),
    }


def _by_id(samples: Sequence[tuple[str, bool]]) -> dict[str, bool]:
    """id -> correct, refusing duplicate ids (pairs must line up one to one)."""
    result: dict[str, bool] = {}
    for example_id, correct in samples:
        if example_id in result:
            raise SvdiclError(f"example id {example_id} appears twice; pair runs of one seed at a time")
        result[example_id] = correct
    return result


def compare(a: Sequence[tuple[str, bool]], b: Sequence[tuple[str, bool]]) -> McNemar:
    """McNemar on the examples two runs share, matched by example id."""
    left, right = _by_id(a), _by_id(b)
    shared = [i for i in left if i in right]
    if not shared:
        raise SvdiclError("the two runs share no example ids; compare runs on the same task, split and limit")
    return mcnemar([left[i] for i in shared], [right[i] for i in shared])


@dataclass(frozen=True)
class PairedComparison:
    """Arm B against arm A on the same examples and seeds; `difference` = mean_b - mean_a.

    The seeds are averaged per example before anything else, so n is the number of examples,
    never examples x seeds. `low`/`high` bound the mean paired difference (a CI over examples);
    `mde` is the smallest true difference this design detects with probability `power` at
    two-sided level 1 - confidence (None when no example differs, as the SD is then 0).
    """

    n: int
    seeds: int
    mean_a: float
    mean_b: float
    difference: float
    low: float
    high: float
    p_value: float
    mde: float | None
    method: str
    ci_method: str = "t-interval"
    confidence: float = CONFIDENCE
    power: float = POWER

    def to_dict(self) -> dict:
        """The paired comparison as results files record it."""
        return {
            "n": self.n,
            "seeds": self.seeds,
            "mean_a": self.mean_a,
            "mean_b": self.mean_b,
            "difference": self.difference,
            "ci_low": self.low,
            "ci_high": self.high,
            "p_value": self.p_value,
            "mde": self.mde,
            "method": self.method,
            "ci_method": self.ci_method,
            "confidence": self.confidence,
            "power": self.power,
        }


def paired_comparison(
    a: np.ndarray | Sequence,
    b: np.ndarray | Sequence,
    *,
    confidence: float = CONFIDENCE,
    power: float = POWER,
    resamples: int = PERMUTATIONS,
    seed: int = 0,
) -> PairedComparison:
    """Example-level paired test of arm B against arm A.

    `a` and `b` are (examples x seeds) arrays of per-example correctness (0/1) or scores; a 1-D
    array is one seed. Per example i, d_i = mean over seeds of b - mean over seeds of a.

    - p-value: two-sided sign-flip permutation test of "each d_i is symmetric about 0" (the arms
      are exchangeable within an example) with statistic |Σ d_i|. Exact when seeds x d_i are
      integers (0/1 correctness): the null distribution of Σ ±|d_i| is convolved in closed form.
      Otherwise Monte Carlo with `resamples` seeded flips, p = (1 + #{|T*| >= |T|}) / (1 + resamples).
      With one seed and 0/1 data this is exactly McNemar's test.
    - CI: t-interval d̄ ± t_{1-α/2, n-1} · s_d / √n. Chosen over the bootstrap because when few
      examples differ the bootstrap cannot put mass beyond the observed signs (all-positive d_i
      give a lower bound of exactly 0), and it is the interval the MDE below is derived from.
    - MDE: (t_{1-α/2, n-1} + t_{power, n-1}) · s_d / √n, the normal-approximation-to-noncentral-t
      effect a paired t-test detects with probability `power` given the observed SD s_d.
    """
    _check_confidence(confidence)
    _check_confidence(power)
    a_m, b_m = _per_example(a, "a"), _per_example(b, "b")
    if a_m.shape != b_m.shape:
        raise SvdiclError(f"paired arms differ in shape ({a_m.shape} vs {b_m.shape}); give both the same examples and seeds")
    n, seeds = a_m.shape
    if n < 2:
        raise SvdiclError(f"a paired comparison needs at least 2 examples (got {n}); raise --limit")
    d = b_m.mean(axis=1) - a_m.mean(axis=1)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    t_alpha = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1))
    half = t_alpha * sd / np.sqrt(n)
    mde = (t_alpha + float(scipy_stats.t.ppf(power, n - 1))) * sd / np.sqrt(n) if sd > 0 else None
    p_value, method = sign_flip_test(d * seeds, resamples=resamples, seed=seed)
    return PairedComparison(n, seeds, float(a_m.mean()), float(b_m.mean()), mean, mean - half, mean + half,
                            p_value, mde, method, "t-interval", confidence, power)  # fmt: skip


def _per_example(values: np.ndarray | Sequence, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.size == 0:
        raise SvdiclError(f"arm {name} must be an (examples x seeds) array of correctness or scores (got shape {array.shape})")
    if not np.isfinite(array).all():
        raise SvdiclError(f"arm {name} holds NaN or infinite values; score every example before comparing")
    return array


def sign_flip_test(d: np.ndarray, *, resamples: int = PERMUTATIONS, seed: int = 0) -> tuple[float, str]:
    """Two-sided sign-flip test of Σ d_i (p-value, method name); exact when every d_i is an integer."""
    d = np.asarray(d, dtype=float)
    k = np.rint(d)
    if np.allclose(d, k, rtol=0, atol=1e-9):
        return _exact_sign_flip(np.abs(k).astype(np.int64)[k != 0], int(abs(k.sum()))), "sign-flip permutation (exact)"
    observed = abs(d.sum())
    rng = np.random.default_rng(seed)
    magnitude = np.abs(d)
    chunk = max(1, 4_000_000 // len(d))
    extreme = 0
    for start in range(0, resamples, chunk):
        signs = rng.integers(0, 2, size=(min(chunk, resamples - start), len(d))) * 2 - 1
        extreme += int(np.sum(np.abs(signs @ magnitude) >= observed * (1 - 1e-12)))
    return (1 + extreme) / (1 + resamples), f"sign-flip permutation (Monte Carlo, {resamples} flips, seed {seed})"


def _exact_sign_flip(magnitudes: np.ndarray, observed: int) -> float:
    """P(|Σ ±m_i| >= observed) for independent fair signs: per distinct magnitude v with count c,
    Σ = v (2 Binomial(c, 1/2) - c); the total's distribution is their convolution."""
    total = np.ones(1)  # distribution over sums -K..K, index = sum + K
    for v in np.unique(magnitudes):
        c = int(np.sum(magnitudes == v))
        part = np.zeros(2 * v * c + 1)
        part[:: 2 * v] = scipy_stats.binom.pmf(np.arange(c + 1), c, 0.5)  # sums -vc, -vc + 2v, ..., vc
        direct = len(total) * len(part) < 50_000_000  # beyond that (thousands of examples) the FFT is much faster
        total = np.convolve(total, part) if direct else np.clip(fftconvolve(total, part), 0, None)
    sums = np.arange(len(total)) - (len(total) - 1) // 2
    return float(min(1.0, total[np.abs(sums) >= observed].sum()))


Runs = Sequence[Sequence[tuple[str, float]]]  # per seed: (example id, correct or score)


def paired_by_id(a: Runs, b: Runs, **options) -> PairedComparison:
    """`paired_comparison` of two arms given per seed as (example id, correct or score) lists.

    Seed j of arm A is paired with seed j of arm B (the same demonstrations); every run must hold
    the same example ids."""
    if len(a) != len(b) or not a:
        raise SvdiclError(f"the arms have {len(a)} and {len(b)} seeds; compare arms run with the same --seeds")
    runs = [_by_id(run) for run in (*a, *b)]
    ids = list(runs[0])
    if any(set(run) != set(ids) for run in runs):
        raise SvdiclError("the runs hold different examples; compare runs on the same task, split and --limit")
    table = np.array([[run[i] for run in runs] for i in ids], dtype=float)  # examples x (seeds of A, seeds of B)
    return paired_comparison(table[:, : len(a)], table[:, len(a) :], **options)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    With p sorted ascending, p̃_(i) = min(1, max_{j <= i} (m - j + 1) p_(j)): rejecting every
    p̃ <= α controls the family-wise error rate at α for any dependence between the tests."""
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise SvdiclError("Holm's correction needs a list of p-values in [0, 1]")
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    result = np.empty(m)
    result[order] = adjusted
    return [float(x) for x in result]
