"""Accuracy, macro-F1, bootstrap confidence intervals, exact McNemar, spread over seeds.

The paper reports single-seed point estimates; several of its gains are one or two test
examples.  These are the numbers that say whether a difference is real:

- `bootstrap_ci`: percentile bootstrap over examples (seeded; 2,000 resamples by default).
- `mcnemar`: exact two-sided McNemar test for two runs on the same examples (a binomial test
  on the discordant pairs), in exact integer arithmetic.
- `spread`: mean, sample standard deviation, min and max over demonstration seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from svdicl.errors import SvdiclError

RESAMPLES = 2000
CONFIDENCE = 0.95


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
    """A metric with its percentile-bootstrap confidence interval."""

    value: float
    low: float
    high: float
    confidence: float = CONFIDENCE
    resamples: int = RESAMPLES

    def to_dict(self) -> dict:
        """The estimate as results files record it."""
        return {
            "value": self.value,
            "ci_low": self.low,
            "ci_high": self.high,
            "confidence": self.confidence,
            "resamples": self.resamples,
        }


def bootstrap_ci(
    gold: Sequence[int],
    predicted: Sequence[int],
    metric: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap: resample examples with replacement, take the metric's quantiles.

    `metric` maps (resamples x n) gold and predicted arrays to one value per row.
    """
    gold_a, pred_a = _arrays(gold, predicted)
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // len(gold_a))  # resamples per step, so memory stays ~100 MB
    values = []
    for start in range(0, resamples, chunk):
        index = rng.integers(0, len(gold_a), size=(min(chunk, resamples - start), len(gold_a)))
        values.append(metric(gold_a[index], pred_a[index]))
    values = np.concatenate(values)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    point = float(metric(gold_a[None], pred_a[None])[0])
    return Estimate(point, float(low), float(high), confidence, resamples)


def accuracy_ci(gold: Sequence[int], predicted: Sequence[int], **options) -> Estimate:
    """Accuracy with its percentile-bootstrap confidence interval."""
    return bootstrap_ci(gold, predicted, lambda g, p: (g == p).mean(axis=1), **options)


def macro_f1_ci(gold: Sequence[int], predicted: Sequence[int], num_classes: int, **options) -> Estimate:
    """Macro-F1 with its percentile-bootstrap confidence interval."""
    return bootstrap_ci(gold, predicted, lambda g, p: _macro_f1(g, p, num_classes), **options)


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
    """Two-sided exact test of 'A and B are equally accurate' on paired examples.

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
