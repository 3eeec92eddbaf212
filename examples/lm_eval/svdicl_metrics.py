"""Aggregations for the svdicl_* lm-eval tasks: macro-F1 as svdicl computes it (svdicl.stats.macro_f1)."""


def macro_f1(items: list[tuple[int, int]]) -> float:
    """Unweighted mean over classes of F1, from lm-eval's (gold, prediction) pairs; classes are those seen in either."""
    classes = {label for pair in items for label in pair}
    total = 0.0
    for c in classes:
        tp = sum(gold == c and pred == c for gold, pred in items)
        denominator = sum(gold == c for gold, _ in items) + sum(pred == c for _, pred in items)  # 2tp + fp + fn
        total += 2 * tp / denominator
    return total / len(classes)
