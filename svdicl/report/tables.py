"""Tables of sweeps, cells and condition numbers: long CSV rows for analysis, Markdown for the report page."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from svdicl.experiments.condition import TOL_RULE, MatrixCondition, layer_conditions
from svdicl.report.labels import fmt, layer_order, matrix_order, metric_label, module_label, module_order, task_label, task_order
from svdicl.report.points import Point, baseline_point, point_rates
from svdicl.store import Cell

CONSTANT_MARK = "ᶜ"  # sweep tables: the model gave one answer to every example


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table of `rows` under `headers`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


SWEEP_COLUMNS = (
    "model_name", "model", "task", "split", "shots", "extra_shots", "limit", "options", "modules", "layers", "rate",
    "metric", "value", "low", "high", "seeds", "n", "constant",
)  # fmt: skip


def sweep_rows(points: Iterable[Point]) -> list[list[Any]]:
    """Long-form rows of the rate curves (tables/sweep-*.csv); rate 0 is the unpruned row."""
    rows = []
    for p in points:
        options = json.dumps(dict(p.options), sort_keys=True) if p.options else ""
        rows.append([
            p.model_name, p.model, p.task, p.split, p.shots, p.extra_shots, p.limit, options, p.modules or "", p.layers or "",
            p.rate,
            p.metric, p.value, p.low, p.high, p.seeds, p.n, p.constant,
        ])  # fmt: skip
    return rows


def sweep_markdown(points: Sequence[Point]) -> str:
    """Wide tables per shot count: a row per task x module x layer, a column per rate (rate 0 = unpruned); row best in bold."""
    parts = []
    rates = point_rates(points)
    for shots in sorted({p.shot_count for p in points}, reverse=True):
        chosen = [p for p in points if p.shot_count == shots]
        counts = {p.seeds for p in chosen}
        note = f", mean of {max(counts)} seeds" if counts != {1} and len(counts) == 1 else ""
        parts.append(f"**{chosen[0].shots_label}-shot{note}**\n")
        rows = []
        for task in sorted({p.task for p in chosen}, key=task_order):
            baseline = baseline_point(chosen, task=task)
            lines = sorted({(p.modules, p.layers) for p in chosen if p.task == task and p.layers is not None}, key=_line_key)
            if not lines:
                lines = [(None, None)]
            for modules, layers in lines:
                line = {p.rate: p for p in chosen if p.task == task and p.modules == modules and p.layers == layers}
                if baseline is not None:
                    line[0.0] = baseline
                best = max(p.value for p in line.values()) if line else None
                cells = [_sweep_cell(line.get(r), best) for r in rates]
                metric = next(p.metric for p in chosen if p.task == task)
                label = "unpruned" if layers is None else layers
                rows.append([task_label(task), metric_label(metric), module_label(modules or "–"), label, *cells])
        headers = ["task", "metric", "module", "layer"]
        for r in rates:
            header = "ξ=0 (unpruned)" if r == 0 else f"{r:g}"
            column = {p.seeds for p in chosen if p.rate == r}
            headers.append(header if len(counts) == 1 or not column else f"{header}, {_seeds_label(column)}")
        parts.append(markdown_table(headers, rows))
    if any(p.constant for p in points):
        parts.append(f"{CONSTANT_MARK}: every example got the same answer, in every seed (a collapsed model).\n")
    return "\n".join(parts)


def _seeds_label(counts: set[int]) -> str:
    """`2 seeds`, `1 seed`, or `1-3 seeds` where the cells of a column differ (a seed-averaged value of each)."""
    low, high = min(counts), max(counts)
    if low == high:
        return f"{low} seed" + ("s" if low > 1 else "")
    return f"{low}-{high} seeds"


def _sweep_cell(point: Point | None, best: float | None) -> str:
    if point is None:
        return fmt(None)
    text = fmt(point.value) + (CONSTANT_MARK if point.constant else "")
    return f"**{text}**" if point.value == best else text


def _line_key(item: tuple[str | None, str | None]) -> tuple:
    return (module_order(item[0] or ""), layer_order(item[1]))


CELL_COLUMNS = (
    "id", "model_name", "model", "task", "split", "shots", "extra_shots", "seed", "edit", "layers", "modules", "rate", "limit",
    "options", "data", "n", "ties", "answer_share",
)  # fmt: skip


def cell_rows(cells: Sequence[Cell], shares: Mapping[str, float | None]) -> tuple[list[str], list[list[Any]]]:
    """Every stored cell flat (tables/cells.csv): key fields, the share of its most common answer, each metric."""
    metrics = sorted({name for cell in cells for name in cell.metrics})
    headers = [*CELL_COLUMNS, *(f"{m}{s}" for m in metrics for s in ("", "_ci_low", "_ci_high")), "samples", "seconds", "created"]
    rows = []
    for c in cells:
        k = c.key
        options = json.dumps(dict(k.options), sort_keys=True) if k.options else ""
        row = [c.id, c.model_name, k.model, k.task, k.split, k.shots, k.extra_shots, k.seed, k.edit, c.layers, c.modules, c.rate]
        row.append(k.limit)
        row += [options, k.data, c.n, c.ties, shares.get(c.id)]
        for m in metrics:
            entry = c.metrics.get(m, {})
            row += [entry.get("value"), entry.get("ci_low"), entry.get("ci_high")]
        rows.append([*row, c.samples, c.seconds, c.created])
    return headers, rows


def conditions_markdown(conditions: Sequence[MatrixCondition]) -> str:
    """Per layer: every matrix's condition number and each group's maximum (Algorithm 1's number); † = near-singular."""
    rows = [c for c in conditions if c.layer is not None]
    matrices = sorted({c.matrix for c in rows}, key=matrix_order)
    groups = [g for g in ("attn", "mlp") if any(c.group == g for c in rows)]
    per_group = {g: layer_conditions(rows, g) for g in groups}
    table = []
    for layer in sorted({c.layer for c in rows}):
        found = {c.matrix: c for c in rows if c.layer == layer}
        cells = [
            (_fmt_cond(found[m].condition_number) + ("†" if found[m].near_singular else "")) if m in found else "–"
            for m in matrices
        ]
        table.append([layer, *cells, *(_fmt_cond(per_group[g].get(layer)) for g in groups)])
    headers = ["layer", *matrices, *(f"{module_label(g)} (max)" for g in groups)]
    return markdown_table(headers, table) + f"\n† near-singular: {TOL_RULE}.\n"


def _fmt_cond(value: float | None) -> str:
    if value is None:
        return "–"
    return "inf" if math.isinf(value) else f"{value:.4g}"
