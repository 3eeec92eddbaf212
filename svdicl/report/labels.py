"""Names, orders and number formats every table and figure of the report shares: one SST-2, one MLP, one "–"."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

TASK_LABELS = {"sst2": "SST-2", "agnews": "AGNews", "emoc": "EmoC", "mrpc": "MRPC", "rte": "RTE", "cb": "CB", "copa": "COPA"}
MODULE_LABELS = {"mlp": "MLP", "attn": "ATTN", "all": "ALL"}
METRIC_LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
MATRIX_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down", "fc_in", "fc_out")


def task_order(task: str) -> tuple:
    """The paper's task order; tasks it does not know after them, by name."""
    known = list(TASK_LABELS)
    return (known.index(task), "") if task in known else (len(known), task)


def module_order(module: str) -> tuple:
    """Groups (mlp, attn, all) first, then matrices in the order of a layer's forward pass."""
    known = ["mlp", "attn", "all", *MATRIX_ORDER]
    return (known.index(module), "") if module in known else (len(known), module)


def matrix_order(matrix: str) -> tuple:
    """Matrices in the order of a layer's forward pass; unknown ones after them, by name."""
    return (MATRIX_ORDER.index(matrix), "") if matrix in MATRIX_ORDER else (99, matrix)


def layer_order(layers: str | None) -> tuple:
    """The unpruned model (None) first, then single layers by index, then layer ranges by text."""
    if layers is None:
        return (-1, 0, "")
    return (0, int(layers), "") if re.fullmatch(r"\d+", layers) else (1, 0, layers)


def task_label(task: str) -> str:
    """The paper's spelling of a task (SST-2); a task it does not know as named."""
    return TASK_LABELS.get(task, task)


def module_label(module: str) -> str:
    """MLP, ATTN, ALL; a matrix as named."""
    return MODULE_LABELS.get(module, module)


def metric_label(metric: str) -> str:
    """macro-F1 for macro_f1; other metrics as named."""
    return METRIC_LABELS.get(metric, metric)


def layer_label(layers: str) -> str:
    """`layer 29` for one layer, `layers 0-3` for a range: a line's legend entry."""
    return f"layer {layers}" if re.fullmatch(r"\d+", layers) else f"layers {layers}"


def fmt(value: float | None, digits: int = 4) -> str:
    """A number with `digits` decimals; "–" for a missing value."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_p(p: float | None) -> str:
    """A p-value to three decimals, "<0.001" below that."""
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def slug(text: str) -> str:
    """`text` safe in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def model_labels(models: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Fingerprint -> display label: the model's name, plus the fingerprint's first 8 digits where two weights share
    a name (one alias loaded in float32 and in bfloat16), so that no two models share a heading or a file name."""
    names = dict(models)
    count: dict[str, int] = {}
    for name in names.values():
        count[name] = count.get(name, 0) + 1
    return {fp: name if count[name] == 1 else f"{name} {fp[:8]}" for fp, name in names.items()}
