"""Bias-aware metrics: what accuracy hides when a model (or an edit) shifts its label prior.

A model that answers "positive" to every SST-2 example scores the positive share of the data;
an edit that flips it to "negative" can look like a large gain or loss while the model
discriminates no better.  Beside accuracy and macro-F1 every run therefore reports:

- balanced accuracy: the mean over classes (with gold examples) of that class's recall;
- prediction counts per class and the top-answer share (the most frequent answer's share);
- for binary tasks, the ranking AUC of the label margin score(class 1) - score(class 0): the
  probability that a random class-1 example gets a larger margin than a random class-0 one (ties
  count 1/2).  A label prior shifts every margin by the same constant, so the AUC is free of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import mannwhitneyu


def prediction_counts(predicted: Sequence[int], num_classes: int) -> list[int]:
    """How often each class was answered: the answer distribution a label-bias shift shows up in."""
    return np.bincount(np.asarray(predicted, dtype=np.int64), minlength=num_classes).tolist()


def top_answer_share(predicted: Sequence[int], num_classes: int) -> float:
    """The share of examples given the most common answer (1.0: the model answers one label to everything)."""
    return max(prediction_counts(predicted, num_classes)) / len(predicted)


def balanced_accuracy(gold: Sequence[int], predicted: Sequence[int], num_classes: int) -> float:
    """Mean recall over the classes that have gold examples."""
    gold_a, pred_a = np.asarray(gold), np.asarray(predicted)
    recalls = [float((pred_a[gold_a == c] == c).mean()) for c in range(num_classes) if (gold_a == c).any()]
    return float(np.mean(recalls))


def margin_auc(gold: Sequence[int], margin: Sequence[float]) -> float | None:
    """Ranking AUC of `margin` for gold class 1 against class 0 (Mann-Whitney U / n1 n0, ties 1/2); None if a class is absent."""
    gold_a, margin_a = np.asarray(gold), np.asarray(margin, dtype=np.float64)
    positive, negative = margin_a[gold_a == 1], margin_a[gold_a == 0]
    if len(positive) == 0 or len(negative) == 0:
        return None
    return float(mannwhitneyu(positive, negative).statistic / (len(positive) * len(negative)))


def bias_metrics(gold: Sequence[int], predicted: Sequence[int], scores: Sequence[Sequence[float]], num_classes: int) -> dict:
    """Balanced accuracy, prediction counts, top-answer share and (binary) margin AUC of one run."""
    margin = [row[1] - row[0] for row in scores] if num_classes == 2 else None
    return {
        "balanced_accuracy": balanced_accuracy(gold, predicted, num_classes),
        "prediction_counts": prediction_counts(predicted, num_classes),
        "top_answer_share": top_answer_share(predicted, num_classes),
        "auc": margin_auc(gold, margin) if margin is not None else None,
    }
