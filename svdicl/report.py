"""Figures and tables from an output folder: the paper's fig 1-3 and its Algorithm 1 table (appendix C.5).

`build_report(DIR)` reads what the experiment commands left in DIR and writes

    DIR/figures/fig1-rates-<split>.{png,svg}    metric vs clipping rate, a line per layer, a panel per task x module
    DIR/figures/fig2-shots-<split>.{png,svg}    the same per shot count (when there are several)
    DIR/figures/fig3-conditions.{png,svg}       condition number vs layer, a line per matrix (log scale)
    DIR/figures/algorithm1-validation.{png,svg} Algorithm 1's validation curves with the chosen rate
    DIR/tables/*.{md,csv}                       the numbers behind every figure, the appendix C.5 table and
                                                Algorithm 1 per demonstration seed
    DIR/report.md                               all of it on one page

`build_report([DIR, ...], output=OUT)` does the same for several folders at once (one per model, say)
into OUT: one Algorithm 1 table with a column per model x module, the sweeps of every model, and a
fig 3 per model.

Inputs: DIR/cells.jsonl (the result store of `svdicl sweep`), DIR/conditions.csv (`svdicl
condition`) and DIR/search/*.json (`svdicl search`, schema in docs/experiments.md); each is
optional.  Several seeds of a cell are drawn as their mean with a band of +-1 sample standard
deviation; a single seed with its 95% bootstrap interval.  The plotting functions return
matplotlib Figures (no pyplot state) so tests can inspect what was drawn.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from svdicl.errors import SvdiclError
from svdicl.experiments.condition import CSV_FILE as CONDITIONS_CSV
from svdicl.experiments.condition import JSON_FILE as CONDITIONS_JSON
from svdicl.experiments.condition import TOL_RULE, MatrixCondition, layer_conditions, read_conditions
from svdicl.store import CELLS_FILE, Cell, Store

SEARCH_DIR = "search"
SEARCH_FORMAT = "svdicl.search/1"
FORMATS = ("png", "svg")
TASK_METRIC = "task"  # --metric value: each task's own headline metric (accuracy; macro-F1 for COPA)
CONSTANT_MARK = "ᶜ"  # sweep tables: the model gave one answer to every example

TASK_LABELS = {"sst2": "SST-2", "agnews": "AGNews", "emoc": "EmoC", "mrpc": "MRPC", "rte": "RTE", "cb": "CB", "copa": "COPA"}
MODULE_LABELS = {"mlp": "MLP", "attn": "ATTN", "all": "ALL"}
METRIC_LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
MATRIX_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down", "fc_in", "fc_out")
# Okabe-Ito (without yellow and black, which are kept for highlights), then two of Tol's: colour-blind safe, paired with markers.
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#44AA99")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
BASELINE_COLOR = "0.25"
STYLE = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 7.5,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.3,
    "lines.markersize": 3.5,
    "svg.fonttype": "none",  # text stays text in SVG, editable for a paper
    "svg.hashsalt": "svdicl",  # stable element ids: rerunning gives the same SVG
}


@dataclass(frozen=True)
class Point:
    """One point of a rate curve: a metric of a (task, module, layers, rate) cell, over its seeds.

    `layers`/`modules` are None for the unpruned model (rate 0).  `low`/`high` are the cell's
    95% bootstrap interval for one seed, mean ± one sample standard deviation for several.
    `constant`: every seed gave one and the same answer to every example (a collapsed model).
    """

    model: str
    model_name: str
    task: str
    split: str
    shots: int
    limit: int | None
    options: tuple[tuple[str, Any], ...]
    layers: str | None
    modules: str | None
    rate: float
    metric: str
    value: float
    low: float
    high: float
    seeds: int
    n: int
    constant: bool = False

    @property
    def setting(self) -> tuple:
        """What must match for two points to share a figure."""
        return (self.model, self.split, self.limit, self.options)


def headline_metric(task: str, metric: str = TASK_METRIC) -> str:
    """`metric`, or for "task" the task's own metric from its config (accuracy when the task is unknown)."""
    if metric != TASK_METRIC:
        return metric
    from svdicl.tasks import get_task

    try:
        return get_task(task).metric
    except SvdiclError:
        return "accuracy"


def answer_share(samples: Sequence[Mapping[str, Any]]) -> float | None:
    """Share of the examples that got the cell's most common answer: 1.0 means the model answers one label to all."""
    if not samples:
        return None
    counts: dict[Any, int] = {}
    for sample in samples:
        counts[sample["prediction"]] = counts.get(sample["prediction"], 0) + 1
    return max(counts.values()) / len(samples)


def sweep_points(
    cells: Iterable[Cell], metric: str = TASK_METRIC, shares: Mapping[str, float | None] | None = None
) -> list[Point]:
    """Rate-curve points from stored cells, seeds averaged; cells with several edit specs are not on a curve.

    `shares` (cell id -> `answer_share`) marks the points whose every seed answered one label to all examples.
    """
    groups: dict[tuple, list[Cell]] = {}
    names: dict[str, str] = {}
    for cell in cells:
        if cell.rate is None:
            continue
        if cell.key.task not in names:
            names[cell.key.task] = headline_metric(cell.key.task, metric)
        name = names[cell.key.task]
        if cell.metrics.get(name, {}).get("value") is None:
            continue
        key = cell.key
        groups.setdefault((key.model, key.task, key.split, key.shots, key.limit, key.options, key.edit, name), []).append(cell)
    points = []
    for (model, task, split, shots, limit, options, _, name), group in groups.items():
        values = [c.metrics[name]["value"] for c in group]
        mean = statistics.fmean(values)
        if len(values) > 1:
            spread = statistics.stdev(values)
            low, high = mean - spread, mean + spread
        else:
            entry = group[0].metrics[name]
            low = entry.get("ci_low") if entry.get("ci_low") is not None else mean
            high = entry.get("ci_high") if entry.get("ci_high") is not None else mean
        first = group[0]
        points.append(
            Point(
                model=model,
                model_name=first.model_name or model[:10],
                task=task,
                split=split,
                shots=shots,
                limit=limit,
                options=options,
                layers=first.layers,
                modules=first.modules,
                rate=first.rate,
                metric=name,
                value=mean,
                low=low,
                high=high,
                seeds=len({c.key.seed for c in group}),
                n=max(c.n for c in group),
                constant=shares is not None and all(shares.get(c.id) == 1.0 for c in group),
            )
        )
    return sorted(points, key=_point_order)


def _point_order(p: Point) -> tuple:
    return (p.model_name, p.split, _task_order(p.task), -p.shots, _module_order(p.modules or ""), _layer_order(p.layers), p.rate)


def _task_order(task: str) -> tuple:
    known = list(TASK_LABELS)
    return (known.index(task), "") if task in known else (len(known), task)


def _module_order(module: str) -> tuple:
    known = ["mlp", "attn", "all", *MATRIX_ORDER]
    return (known.index(module), "") if module in known else (len(known), module)


def _layer_order(layers: str | None) -> tuple:
    if layers is None:
        return (-1, 0, "")
    return (0, int(layers), "") if re.fullmatch(r"\d+", layers) else (1, 0, layers)


def _task_label(task: str) -> str:
    return TASK_LABELS.get(task, task)


def _module_label(module: str) -> str:
    return MODULE_LABELS.get(module, module)


def _metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _layer_label(layers: str) -> str:
    return f"layer {layers}" if re.fullmatch(r"\d+", layers) else f"layers {layers}"


def _styles(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """(colour, marker) per line name, the same in every panel of a figure."""
    return {name: (COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]) for i, name in enumerate(names)}


def _styled(plot: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw under the report's style (rcParams are read when artists are created)."""

    @functools.wraps(plot)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with matplotlib.rc_context(STYLE):
            return plot(*args, **kwargs)

    return wrapper


def _figure(rows: int, cols: int, width: float = 2.9, height: float = 2.2, sharey: str | bool = False):
    fig = Figure(figsize=(width * cols, height * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey)
    return fig, [list(row) for row in axes]


def _legend(fig: Figure, axes: Sequence[Sequence[Any]], order: Sequence[str]) -> None:
    """One legend for the figure, below the panels, entries in `order`."""
    handles: dict[str, Any] = {}
    for ax in (ax for row in axes for ax in row):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    labels = [label for label in order if label in handles]
    if labels:
        fig.legend([handles[x] for x in labels], labels, loc="outside lower center", ncols=min(len(labels), 6), frameon=False)


def _rates(points: Iterable[Point]) -> list[float]:
    """The x categories: every rate present (0 = the unpruned model); unevenly spaced, so ordinal."""
    return sorted({p.rate for p in points})


def _rate_panel(ax, points: Sequence[Point], baseline: Point | None, rates: Sequence[float], styles, bands: bool) -> None:
    """Lines per layer over ordinal rate positions; each line starts at the unpruned value; dashed baseline."""
    position = {rate: i for i, rate in enumerate(rates)}
    for layers in sorted({p.layers for p in points}, key=_layer_order):
        line = sorted((p for p in points if p.layers == layers), key=lambda p: p.rate)
        if baseline is not None:
            line = [baseline, *line]
        x = [position[p.rate] for p in line]
        color, marker = styles[layers]
        ax.plot(x, [p.value for p in line], color=color, marker=marker, label=_layer_label(layers), zorder=3)
        if bands:
            ax.fill_between(x, [p.low for p in line], [p.high for p in line], color=color, alpha=0.12, lw=0, zorder=2)
    if baseline is not None:
        ax.axhline(baseline.value, color=BASELINE_COLOR, ls="--", lw=1.0, label="unpruned", zorder=1)
        if bands:
            ax.axhspan(baseline.low, baseline.high, color=BASELINE_COLOR, alpha=0.08, lw=0, zorder=0)
    ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
    ax.set_xlim(-0.4, len(rates) - 0.6)
    ax.set_xlabel("clipping rate ξ")


def _baseline(points: Iterable[Point], **match: Any) -> Point | None:
    found = [p for p in points if p.layers is None and all(getattr(p, k) == v for k, v in match.items())]
    return found[0] if found else None


def _line_order(points: Iterable[Point]) -> list[str]:
    return sorted({p.layers for p in points if p.layers is not None}, key=_layer_order)


@_styled
def plot_rates(points: Sequence[Point], *, shots: int | None = None, bands: bool = True) -> Figure:
    """Fig 1: metric vs clipping rate, a line per layer, dashed unpruned baseline, a panel per task x module.

    `points` come from one setting (model, split, limit, options); `shots` defaults to the largest present.
    """
    shots = max(p.shots for p in points) if shots is None else shots
    chosen = [p for p in points if p.shots == shots]
    tasks = sorted({p.task for p in chosen}, key=_task_order)
    modules = sorted({p.modules for p in chosen if p.modules is not None}, key=_module_order)
    if not modules:
        raise SvdiclError("no pruned cells to plot against the clipping rate; run a sweep first")
    rates, layers = _rates(chosen), _line_order(chosen)
    styles = _styles(layers)
    fig, axes = _figure(len(tasks), len(modules), sharey="row")
    for i, task in enumerate(tasks):
        baseline = _baseline(chosen, task=task)
        for j, module in enumerate(modules):
            ax = axes[i][j]
            _rate_panel(ax, [p for p in chosen if p.task == task and p.modules == module], baseline, rates, styles, bands)
            ax.set_title(f"{_task_label(task)} · {_module_label(module)}")
            task_points = [p for p in chosen if p.task == task]
            ax.set_ylabel(_metric_label(task_points[0].metric) if j == 0 else "")
    _legend(fig, axes, [*(_layer_label(x) for x in layers), "unpruned"])
    return fig


@_styled
def plot_shots(points: Sequence[Point], *, bands: bool = True) -> Figure:
    """Fig 2: the rate curves per shot count (rows, most shots first), a column per task x module."""
    shots = sorted({p.shots for p in points}, reverse=True)
    panels = sorted(
        {(p.task, p.modules) for p in points if p.modules is not None}, key=lambda x: (_task_order(x[0]), _module_order(x[1]))
    )
    if not panels:
        raise SvdiclError("no pruned cells to plot against the clipping rate; run a sweep first")
    rates, layers = _rates(points), _line_order(points)
    styles = _styles(layers)
    fig, axes = _figure(len(shots), len(panels))
    for i, k in enumerate(shots):
        for j, (task, module) in enumerate(panels):
            ax = axes[i][j]
            chosen = [p for p in points if p.shots == k and p.task == task]
            _rate_panel(ax, [p for p in chosen if p.modules == module], _baseline(chosen), rates, styles, bands)
            ax.set_title(f"{_task_label(task)} · {_module_label(module)} · {k}-shot")
            ax.set_ylabel(_metric_label(chosen[0].metric) if chosen else "")  # columns are different tasks
    _legend(fig, axes, [*(_layer_label(x) for x in layers), "unpruned"])
    return fig


@_styled
def plot_conditions(conditions: Sequence[MatrixCondition]) -> Figure:
    """Fig 3: condition number vs layer, a line per matrix, a panel per module group, log scale.

    Near-singular matrices (see TOL_RULE) get an open ring; an exactly singular one (inf) is left out of its line.
    """
    rows = [c for c in conditions if c.layer is not None]
    if not rows:
        raise SvdiclError("no per-layer condition numbers to plot")
    groups = sorted({c.group or "other" for c in rows}, key=lambda g: ["attn", "mlp", g].index(g))
    matrices = sorted({c.matrix for c in rows}, key=lambda m: (MATRIX_ORDER.index(m), "") if m in MATRIX_ORDER else (99, m))
    styles = _styles(matrices)
    fig, axes = _figure(1, len(groups), width=3.4, height=2.6)
    for ax, group in zip(axes[0], groups, strict=True):
        members = [c for c in rows if (c.group or "other") == group]
        for matrix in [m for m in matrices if any(c.matrix == m for c in members)]:
            line = sorted((c for c in members if c.matrix == matrix), key=lambda c: c.layer)
            values = [c.condition_number if math.isfinite(c.condition_number) else math.nan for c in line]
            color, marker = styles[matrix]
            ax.plot([c.layer for c in line], values, color=color, marker=marker, label=matrix)
        flagged = [c for c in members if c.near_singular and math.isfinite(c.condition_number)]
        if flagged:
            ax.scatter(
                [c.layer for c in flagged],
                [c.condition_number for c in flagged],
                s=55,
                facecolors="none",
                edgecolors="black",
                linewidths=1.0,
                label="near-singular",
                zorder=4,
            )
        ax.set_yscale("log")
        ax.set_title(_module_label(group))
        ax.set_xlabel("layer")
        ax.set_ylabel(r"condition number $\sigma_{\max} / \sigma_{\min}$" if ax is axes[0][0] else "")
    _legend(fig, axes, [*matrices, "near-singular"])
    return fig


def save_figure(fig: Figure, stem: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write `stem.png` (200 dpi) and `stem.svg` (text as text, no timestamp: reruns give identical files)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    with matplotlib.rc_context(STYLE):
        for fmt in formats:
            if fmt not in ("png", "svg", "pdf"):
                raise SvdiclError(f"figure format {fmt!r} is not supported; use png, svg or pdf")
            path = stem.with_name(f"{stem.name}.{fmt}")
            metadata = {"Date": None} if fmt == "svg" else {"CreationDate": None} if fmt == "pdf" else {}
            fig.savefig(path, dpi=200, bbox_inches="tight", metadata=metadata)
            written.append(path)
    return written


# ----- tables -----


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table of `rows` under `headers`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write `rows` under `headers` to a CSV file (None as empty), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(headers)
        writer.writerows(["" if x is None else x for x in row] for row in rows)
    return path


SWEEP_COLUMNS = (
    "model_name", "model", "task", "split", "shots", "limit", "options", "modules", "layers", "rate",
    "metric", "value", "low", "high", "seeds", "n", "constant",
)  # fmt: skip


def sweep_rows(points: Iterable[Point]) -> list[list[Any]]:
    """Long-form rows of the rate curves (tables/sweep-*.csv); rate 0 is the unpruned row."""
    rows = []
    for p in points:
        options = json.dumps(dict(p.options), sort_keys=True) if p.options else ""
        rows.append([
            p.model_name, p.model, p.task, p.split, p.shots, p.limit, options, p.modules or "", p.layers or "", p.rate,
            p.metric, p.value, p.low, p.high, p.seeds, p.n, p.constant,
        ])  # fmt: skip
    return rows


def sweep_markdown(points: Sequence[Point]) -> str:
    """Wide tables per shot count: a row per task x module x layer, a column per rate (rate 0 = unpruned); row best in bold."""
    parts = []
    rates = _rates(points)
    for shots in sorted({p.shots for p in points}, reverse=True):
        chosen = [p for p in points if p.shots == shots]
        seeds = max(p.seeds for p in chosen)
        note = f", mean of {seeds} seeds" if seeds > 1 else ""
        parts.append(f"**{shots}-shot{note}**\n")
        rows = []
        for task in sorted({p.task for p in chosen}, key=_task_order):
            baseline = _baseline(chosen, task=task)
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
                rows.append([_task_label(task), _metric_label(metric), _module_label(modules or "–"), label, *cells])
        headers = ["task", "metric", "module", "layer", *(("ξ=0 (unpruned)" if r == 0 else f"{r:g}") for r in rates)]
        parts.append(markdown_table(headers, rows))
    if any(p.constant for p in points):
        parts.append(f"{CONSTANT_MARK}: every example got the same answer, in every seed (a collapsed model).\n")
    return "\n".join(parts)


def _sweep_cell(point: Point | None, best: float | None) -> str:
    if point is None:
        return _fmt(None)
    text = _fmt(point.value) + (CONSTANT_MARK if point.constant else "")
    return f"**{text}**" if point.value == best else text


def _line_key(item: tuple[str | None, str | None]) -> tuple:
    return (_module_order(item[0] or ""), _layer_order(item[1]))


CELL_COLUMNS = (
    "id", "model_name", "model", "task", "split", "shots", "seed", "edit", "layers", "modules", "rate", "limit",
    "options", "n", "ties", "answer_share",
)  # fmt: skip


def cell_rows(cells: Sequence[Cell], shares: Mapping[str, float | None]) -> tuple[list[str], list[list[Any]]]:
    """Every stored cell flat (tables/cells.csv): key fields, the share of its most common answer, each metric."""
    metrics = sorted({name for cell in cells for name in cell.metrics})
    headers = [*CELL_COLUMNS, *(f"{m}{s}" for m in metrics for s in ("", "_ci_low", "_ci_high")), "samples", "seconds", "created"]
    rows = []
    for c in cells:
        k = c.key
        options = json.dumps(dict(k.options), sort_keys=True) if k.options else ""
        row = [c.id, c.model_name, k.model, k.task, k.split, k.shots, k.seed, k.edit, c.layers, c.modules, c.rate, k.limit]
        row += [options, c.n, c.ties, shares.get(c.id)]
        for m in metrics:
            entry = c.metrics.get(m, {})
            row += [entry.get("value"), entry.get("ci_low"), entry.get("ci_high")]
        rows.append([*row, c.samples, c.seconds, c.created])
    return headers, rows


def conditions_markdown(conditions: Sequence[MatrixCondition]) -> str:
    """Per layer: every matrix's condition number and each group's maximum (Algorithm 1's number); † = near-singular."""
    rows = [c for c in conditions if c.layer is not None]
    matrices = sorted({c.matrix for c in rows}, key=lambda m: (MATRIX_ORDER.index(m), "") if m in MATRIX_ORDER else (99, m))
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
    headers = ["layer", *matrices, *(f"{_module_label(g)} (max)" for g in groups)]
    return markdown_table(headers, table) + f"\n† near-singular: {TOL_RULE}.\n"


def _fmt_cond(value: float | None) -> str:
    if value is None:
        return "–"
    return "inf" if math.isinf(value) else f"{value:.4g}"


# ----- Algorithm 1 results -----


def read_search(path: str | Path) -> dict[str, Any]:
    """One search result (schema `svdicl.search/1`, docs/experiments.md), checked for the fields the report needs."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SvdiclError(f"cannot read search result {file} ({exc}); rerun svdicl search") from None
    fmt = data.get("format", "") if isinstance(data, dict) else ""
    if not fmt.startswith("svdicl.search/"):
        raise SvdiclError(f"{file} is not an svdicl search result (format {fmt!r}); expected {SEARCH_FORMAT}")
    if int(fmt.rpartition("/")[2] or 0) > int(SEARCH_FORMAT.rpartition("/")[2]):
        raise SvdiclError(f"{file} has format {fmt}, newer than this svdicl reads; upgrade svdicl")
    required = ("task", "module", "layer", "rates", "rate_star", "validation.values", "test.baseline.value", "test.pruned.value")
    for dotted in required:
        node: Any = data
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise SvdiclError(f"search result {file} has no {dotted!r}; it does not follow {SEARCH_FORMAT}")
            node = node[part]
    values, rates = data["validation"]["values"], data["rates"]
    if len(values) != len(rates) or data["rate_star"] not in rates:
        raise SvdiclError(f"search result {file}: needs one validation value per rate and rate_star among the rates")
    return data


def _estimate(entry: Mapping[str, Any], seeds: int) -> str:
    value = _fmt(entry.get("value"))
    if seeds > 1 and entry.get("std") is not None:
        value += f"±{_fmt(entry['std'])}"
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        value += f" [{_fmt(entry['ci_low'], 3)}, {_fmt(entry['ci_high'], 3)}]"
    return value


def _search_column(result: Mapping[str, Any]) -> tuple[str, str]:
    model = result.get("model", {})
    return (model.get("name") or model.get("fingerprint", "")[:10] or "model", result["module"])


ALGORITHM1_COLUMNS = (
    "model_name", "model", "task", "module", "layer", "top_k", "top_layers", "metric", "shots", "rate_star",
    "baseline", "baseline_ci_low", "baseline_ci_high", "baseline_std", "pruned", "pruned_ci_low", "pruned_ci_high",
    "pruned_std", "mcnemar_p", "seeds", "n_test",
)  # fmt: skip


def algorithm1_rows(results: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Long-form rows of the Algorithm 1 table (tables/algorithm1.csv)."""
    rows = []
    for r in results:
        test, base, pruned = r["test"], r["test"]["baseline"], r["test"]["pruned"]
        name, _ = _search_column(r)
        seeds = [s.get("seed") for s in r.get("seeds", [])]
        rows.append([
            name, r.get("model", {}).get("fingerprint", ""), r["task"], r["module"], r["layer"], r.get("top_k"),
            " ".join(map(str, r.get("top_layers", []))), r.get("metric", ""), r.get("shots"), r["rate_star"],
            base["value"], base.get("ci_low"), base.get("ci_high"), base.get("std"),
            pruned["value"], pruned.get("ci_low"), pruned.get("ci_high"), pruned.get("std"),
            test.get("mcnemar_p"), " ".join(map(str, seeds)), test.get("n"),
        ])  # fmt: skip
    return rows


def algorithm1_markdown(results: Sequence[Mapping[str, Any]]) -> str:
    """Appendix C.5 layout: rows = tasks, columns = model x layer x module, "baseline -> pruned (ξ*=...)" with CIs and p."""
    columns = sorted({_search_column(r) for r in results}, key=lambda c: (c[0], _module_order(c[1])))
    tasks = sorted({r["task"] for r in results}, key=_task_order)
    by_cell = {(r["task"], _search_column(r)): r for r in results}
    headers = ["task"]
    for column in columns:
        layers = {r["layer"] for r in results if _search_column(r) == column}
        where = f"L{next(iter(layers))} " if len(layers) == 1 else ""
        headers.append(f"{column[0]} {where}{_module_label(column[1])}")
    rows = []
    for task in tasks:
        metrics = {by_cell[(task, c)].get("metric", "") for c in columns if (task, c) in by_cell}
        label = _task_label(task) + (f" ({_metric_label(next(iter(metrics)))})" if metrics - {"accuracy", ""} else "")
        row = [label]
        for column in columns:
            r = by_cell.get((task, column))
            if r is None:
                row.append("–")
                continue
            seeds = len(r.get("seeds", [])) or 1
            layers = {x["layer"] for x in results if _search_column(x) == column}
            where = f"L{r['layer']}: " if len(layers) > 1 else ""
            text = f"{where}{_estimate(r['test']['baseline'], seeds)} → {_estimate(r['test']['pruned'], seeds)}"
            text += f" (ξ*={r['rate_star']:g}, p={_fmt_p(r['test'].get('mcnemar_p'))}"
            text += f", {seeds} seeds)" if seeds > 1 else ")"
            row.append(text)
        rows.append(row)
    note = (
        "\nCells: test metric of the unpruned → the ξ*-pruned model, [95% CI]; ξ* is the validation argmax "
        "(ties to the smaller rate, ξ=0 included); p: exact McNemar test, unpruned vs pruned on the same test examples."
    )
    return markdown_table(headers, rows) + note + "\n"


ALGORITHM1_SEED_COLUMNS = (
    "model_name", "task", "module", "layer", "rate_star", "seed", "validation_unpruned", "validation_at_rate_star",
    "baseline", "pruned", "delta", "mcnemar_p", "only_baseline_correct", "only_pruned_correct", "n_test",
    "baseline_answer_share", "pruned_answer_share",
)  # fmt: skip


def algorithm1_seed_rows(
    results: Sequence[Mapping[str, Any]], shares: Mapping[str, float | None] | None = None
) -> list[list[Any]]:
    """One row per search x demonstration seed: that seed's validation and test at the shared ξ*.

    `shares` (cell id -> `answer_share`) adds how much of each test cell is its most common answer.
    """
    shares = shares or {}
    rows = []
    for r in sorted(results, key=lambda r: (_search_column(r)[0], _task_order(r["task"]), _module_order(r["module"]))):
        star = r["rates"].index(r["rate_star"])
        for seed in r.get("seeds", []):
            base, pruned = seed["baseline"]["value"], seed["pruned"]["value"]
            discordant, cells = seed.get("discordant", {}), seed.get("cells", {})
            rows.append([
                _search_column(r)[0], r["task"], r["module"], r["layer"], r["rate_star"], seed["seed"],
                seed["validation"][0], seed["validation"][star], base, pruned, pruned - base, seed.get("mcnemar_p"),
                discordant.get("only_baseline_correct"), discordant.get("only_pruned_correct"), r["test"].get("n"),
                shares.get(cells.get("baseline")), shares.get(cells.get("pruned")),
            ])  # fmt: skip
    return rows


def algorithm1_seed_markdown(seed_rows: Sequence[Sequence[Any]]) -> str:
    """Algorithm 1 per seed (rows of `algorithm1_seed_rows`): does a gain at the shared ξ* hold for every seed?"""
    rows = [
        [name, _task_label(task), _module_label(module), layer, f"{star:g}", seed, f"{_fmt(v0, 3)} → {_fmt(vs, 3)}",
         f"{_fmt(b, 3)} → {_fmt(p, 3)}", f"{d:+.3f}", _fmt_p(mp), f"{_fmt(sb, 2)} → {_fmt(sp, 2)}"]
        for name, task, module, layer, star, seed, v0, vs, b, p, d, mp, _, _, _, sb, sp in seed_rows
    ]  # fmt: skip
    headers = ["model", "task", "module", "layer", "ξ*", "seed", "validation ξ=0 → ξ*", "test ξ=0 → ξ*", "Δ test", "p",
               "top answer ξ=0 → ξ*"]  # fmt: skip
    note = (
        "\nξ* is shared by the seeds (chosen on their mean); p: exact McNemar, that seed alone; top answer: the share of "
        "test examples given the most common answer (1.00 = one answer to all).\n"
    )
    return markdown_table(headers, rows) + note


@_styled
def plot_search(results: Sequence[Mapping[str, Any]]) -> Figure:
    """Algorithm 1's validation curves: metric vs rate per task x module, star at ξ*, dashed at ξ=0; thin lines per seed."""
    tasks = sorted({r["task"] for r in results}, key=_task_order)
    columns = sorted({_search_column(r) for r in results}, key=lambda c: (c[0], _module_order(c[1])))
    fig, axes = _figure(len(tasks), len(columns))
    for i, task in enumerate(tasks):
        for j, column in enumerate(columns):
            ax = axes[i][j]
            found = [r for r in results if r["task"] == task and _search_column(r) == column]
            if not found:
                ax.set_axis_off()
                continue
            r = found[0]
            rates, values = r["rates"], r["validation"]["values"]
            x = range(len(rates))
            for seed in r.get("seeds", []) if len(r.get("seeds", [])) > 1 else []:
                ax.plot(x, seed["validation"], color=COLORS[0], alpha=0.25, lw=0.7)
            ax.plot(x, values, color=COLORS[0], marker=MARKERS[0], label="validation")
            ax.axhline(values[rates.index(0)] if 0 in rates else values[0], color=BASELINE_COLOR, ls="--", lw=1.0, label="ξ=0")
            star = rates.index(r["rate_star"])
            ax.plot([star], [values[star]], marker="*", ms=11, color=COLORS[1], ls="none", label="ξ*", zorder=4)
            ax.set_xticks(list(x), [f"{rate:g}" for rate in rates])
            ax.set_title(f"{_task_label(task)} · {column[0]} L{r['layer']} {_module_label(column[1])}")
            ax.set_xlabel("clipping rate ξ")
            ax.set_ylabel(f"validation {_metric_label(r.get('metric', ''))}" if j == 0 else "")
    _legend(fig, axes, ["validation", "ξ=0", "ξ*"])
    return fig


# ----- the whole report -----


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def _setting_tags(points: Sequence[Point]) -> dict[tuple, str]:
    """A file-name tag per setting: the split, plus whatever else differs between settings."""
    settings = {p.setting: p for p in points}
    models = {p.model for p in settings.values()}
    limits = {p.limit for p in settings.values()}
    options = {p.options for p in settings.values()}
    tags = {}
    for setting, p in settings.items():
        parts = [p.split]
        if len(models) > 1:
            parts.insert(0, p.model_name)
        if len(limits) > 1:
            parts.append("full" if p.limit is None else f"limit{p.limit}")
        if len(options) > 1:
            parts.append("opts-" + hashlib.sha256(json.dumps(dict(p.options), sort_keys=True).encode()).hexdigest()[:6])
        tags[setting] = "-".join(_slug(x) for x in parts)
    return tags


@dataclass(frozen=True)
class Report:
    """What build_report wrote: every file, and the page that shows them."""

    files: tuple[Path, ...]
    page: Path


def build_report(
    directories: str | Path | Sequence[str | Path],
    *,
    output: str | Path | None = None,
    metric: str = TASK_METRIC,
    formats: Sequence[str] = FORMATS,
    bands: bool = True,
) -> Report:
    """Figures, tables and report.md for everything found in one folder (written there) or several (into `output`)."""
    folders = [Path(directories)] if isinstance(directories, (str, Path)) else [Path(d) for d in directories]
    for folder in folders:
        if not folder.is_dir():
            raise SvdiclError(
                f"report folder {folder} does not exist; give the --output folder of a sweep, condition or search run"
            )
    if output is None and len(folders) != 1:
        raise SvdiclError(f"{len(folders)} report folders need --output, the folder to write the combined report to")
    target = Path(output) if output is not None else folders[0]
    figures, tables = target / "figures", target / "tables"
    written: list[Path] = []
    page = ["# svdicl report", "", "Folders: " + ", ".join(f"`{f}`" for f in folders) + ".", ""]
    found_any = False

    stored = [(store, store.cells()) for store in (Store(f) for f in folders if (f / CELLS_FILE).is_file())]
    shares = {cell.id: answer_share(store.samples(cell)) for store, cells in stored for cell in cells}
    if stored:
        found_any = True
        cells = [cell for _, found in stored for cell in found]
        headers, rows = cell_rows(cells, shares)
        written.append(write_csv(tables / "cells.csv", headers, rows))
        points = sweep_points(cells, metric, shares)
        if cells and not points:
            have = sorted({m for c in cells for m in c.metrics})
            raise SvdiclError(f"no stored cell has metric {metric!r}; use --metric with one of {', '.join(have)} or task")
        page += _sweep_section(points, figures, tables, formats, bands, written)
        page.append(_baseline_note({p.model_name for p in points}))

    with_conditions = [folder for folder in folders if (folder / CONDITIONS_CSV).is_file()]
    for folder in with_conditions:
        found_any = True
        conditions = read_conditions(folder / CONDITIONS_CSV)
        name = _conditions_model(folder)
        tag = "" if len(with_conditions) == 1 else f"-{_slug(name)}"
        written += save_figure(plot_conditions(conditions), figures / f"fig3-conditions{tag}", formats)
        text = conditions_markdown(conditions)
        written.append(_write_text(tables / f"conditions{tag}.md", text))
        title = "## Condition numbers (fig 3)" + ("" if len(with_conditions) == 1 else f": {name}")
        page += [title, "", f"![fig 3](figures/fig3-conditions{tag}.png)", "", text]

    searches = [path for folder in folders for path in sorted((folder / SEARCH_DIR).glob("*.json"))]
    if searches:
        found_any = True
        results = [read_search(path) for path in searches]
        written.append(write_csv(tables / "algorithm1.csv", ALGORITHM1_COLUMNS, algorithm1_rows(results)))
        text = algorithm1_markdown(results)
        written.append(_write_text(tables / "algorithm1.md", text))
        seed_rows = algorithm1_seed_rows(results, shares)
        written.append(write_csv(tables / "algorithm1-seeds.csv", ALGORITHM1_SEED_COLUMNS, seed_rows))
        per_seed = algorithm1_seed_markdown(seed_rows)
        written.append(_write_text(tables / "algorithm1-seeds.md", per_seed))
        written += save_figure(plot_search(results), figures / "algorithm1-validation", formats)
        page += [
            "## Algorithm 1 (appendix C.5 layout)",
            "",
            text,
            "![Algorithm 1 validation](figures/algorithm1-validation.png)",
            "",
            "### Per demonstration seed",
            "",
            per_seed,
        ]

    if not found_any:
        where = ", ".join(str(f) for f in folders)
        raise SvdiclError(
            f"nothing to report in {where}: no {CELLS_FILE}, {CONDITIONS_CSV} or {SEARCH_DIR}/*.json; "
            "run svdicl sweep, condition or search with --output there first"
        )
    page_path = _write_text(target / "report.md", "\n".join(page) + "\n")
    return Report(files=tuple(written), page=page_path)


def _conditions_model(folder: Path) -> str:
    """The model named in the folder's conditions.json (`svdicl condition` writes it), else the folder's name."""
    try:
        return json.loads((folder / CONDITIONS_JSON).read_text(encoding="utf-8"))["model"]["name"] or folder.name
    except (OSError, ValueError, KeyError, TypeError):
        return folder.name


def _sweep_section(points, figures: Path, tables: Path, formats, bands: bool, written: list[Path]) -> list[str]:
    page = []
    tags = _setting_tags(points)
    for setting, tag in tags.items():
        chosen = [p for p in points if p.setting == setting]
        written.append(write_csv(tables / f"sweep-{tag}.csv", SWEEP_COLUMNS, sweep_rows(chosen)))
        text = sweep_markdown(chosen)
        written.append(_write_text(tables / f"sweep-{tag}.md", text))
        first = chosen[0]
        limit = "all examples" if first.limit is None else f"first {first.limit} examples"
        page += [f"## Sweep: {first.model_name}, {first.split} split, {limit}", ""]
        if any(p.layers is not None for p in chosen):
            written += save_figure(plot_rates(chosen, bands=bands), figures / f"fig1-rates-{tag}", formats)
            page += [f"![fig 1](figures/fig1-rates-{tag}.png)", ""]
            if len({p.shots for p in chosen}) > 1:
                written += save_figure(plot_shots(chosen, bands=bands), figures / f"fig2-shots-{tag}", formats)
                page += [f"![fig 2](figures/fig2-shots-{tag}.png)", ""]
        page += [text, ""]
    if points:
        page.append(
            "Bands: 95% bootstrap interval of the metric for a single seed; mean ± one sample standard deviation "
            "over demonstration seeds for several. Dashed line: the unpruned model."
        )
    return page


def _baseline_note(model_names: set[str]) -> str:
    from svdicl.models import ALIASES

    quantised = sorted(n for n in model_names if n in ALIASES or n.endswith(".gguf"))
    if not quantised:
        return ""
    return (
        f"\nNote: {', '.join(quantised)} is a GGUF model dequantised from 4-8-bit weights; its baseline and its spectra "
        "include quantisation noise, so pruning results are relative to that quantised baseline.\n"
    )


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
