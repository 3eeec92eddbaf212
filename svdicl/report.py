"""Figures and tables from an output folder: the paper's fig 1-3 and its Algorithm 1 table (appendix C.5).

`build_report(DIR)` reads what the experiment commands left in DIR and writes

    DIR/figures/fig1-rates-<split>.{png,svg}    metric vs clipping rate, a line per layer, a panel per task x module
    DIR/figures/fig2-shots-<split>.{png,svg}    the same per shot count (when there are several)
    DIR/figures/fig3-conditions.{png,svg}       condition number vs layer, a line per matrix (log scale)
    DIR/figures/algorithm1-validation.{png,svg} Algorithm 1's validation curves with the chosen rate
    DIR/figures/evals.{png,svg}                 each `svdicl eval` folder's metric with its CI over examples
    DIR/tables/*.{md,csv}                       the numbers behind every figure, the appendix C.5 table,
                                                Algorithm 1 per demonstration seed, the evals paired with
                                                their unpruned eval
    DIR/report.md                               all of it on one page
    DIR/report-files.json                       what this report wrote: the next one replaces exactly these

`build_report([DIR, ...], output=OUT)` does the same for several folders at once (one per model, say)
into OUT: one Algorithm 1 table with a column per model x module, the sweeps of every model, and a
fig 3 per model.

Inputs: DIR/cells.jsonl (the result store of `svdicl sweep`, opened read-only), DIR/conditions.csv
(`svdicl condition`), DIR/search/*.json (`svdicl search`, schema in docs/experiments.md) and
DIR/results.json + samples.jsonl (`svdicl eval`, or one such folder per task); each is optional.
No two inputs share a table column, a figure panel or a file name: searches and models that share
a display name are told apart by what differs (`search_columns`, `model_labels`).  Several seeds
of a cell are drawn as their mean with a band of +-1 sample standard deviation; a single seed with
its 95% interval.  The plotting functions return matplotlib Figures (no pyplot state) so tests can
inspect what was drawn.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from svdicl import stats
from svdicl.errors import SvdiclError
from svdicl.experiments.compare import EvalFolder, paired_accuracy, read_eval
from svdicl.experiments.condition import CSV_FILE as CONDITIONS_CSV
from svdicl.experiments.condition import JSON_FILE as CONDITIONS_JSON
from svdicl.experiments.condition import TOL_RULE, MatrixCondition, layer_conditions, read_conditions
from svdicl.experiments.evaluate import RESULTS_FILE
from svdicl.store import CELLS_FILE, Cell, Store

SEARCH_DIR = "search"
REPORT_FILES = "report-files.json"  # what the last report wrote into its folder: the files the next one may replace
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


def current_data(cells: Iterable[Cell]) -> list[Cell]:
    """Per model and task, the cells of the data digest stored last: cells of older data or another definition of
    the task (kept apart in the store, `Store.other_data`) are never averaged with, or shown beside, the current ones."""
    cells = list(cells)
    latest = {(c.key.model, c.key.task): c.key.data for c in cells}
    return [c for c in cells if c.key.data == latest[(c.key.model, c.key.task)]]


def sweep_points(
    cells: Iterable[Cell], metric: str = TASK_METRIC, shares: Mapping[str, float | None] | None = None
) -> list[Point]:
    """Rate-curve points from stored cells, seeds averaged; cells with several edit specs are not on a curve.

    `shares` (cell id -> `answer_share`) marks the points whose every seed answered one label to all examples.
    """
    groups: dict[tuple, list[Cell]] = {}
    names: dict[str, str] = {}
    for cell in current_data(cells):
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
def plot_rates(points: Sequence[Point], *, shots: int | None = None, bands: bool = True, title: str | None = None) -> Figure:
    """Fig 1: metric vs clipping rate, a line per layer, dashed unpruned baseline, a panel per task x module.

    `points` come from one setting (model, split, limit, options); `shots` defaults to the largest present;
    `title` (default `setting_title`) names the model, split and n.
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
    fig.suptitle(setting_title(chosen) if title is None else title)
    return fig


def setting_title(points: Sequence[Point], model: str | None = None) -> str:
    """`smollm2-135m · test split · n=200`: the model (default: its name), the split and the examples per cell
    (per task where they differ), so that a figure read on its own says what it shows."""
    model = model or ", ".join(sorted({p.model_name for p in points}))
    sizes = {p.task: max(q.n for q in points if q.task == p.task) for p in points}
    tasks = sorted(sizes, key=_task_order)
    each = ", ".join(f"{_task_label(t)} {sizes[t]}" for t in tasks)
    n = f"n={sizes[tasks[0]]}" if len(set(sizes.values())) == 1 else f"n: {each}"
    return f"{model} · {' + '.join(sorted({p.split for p in points}))} split · {n}"


@_styled
def plot_shots(points: Sequence[Point], *, bands: bool = True, title: str | None = None) -> Figure:
    """Fig 2: the rate curves per shot count (rows, most shots first), a column per task x module; `title` as fig 1."""
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
    fig.suptitle(setting_title(points) if title is None else title)
    return fig


@_styled
def plot_conditions(conditions: Sequence[MatrixCondition], title: str | None = None) -> Figure:
    """Fig 3: condition number vs layer, a line per matrix, a panel per module group, log scale; `title`: the model.

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
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig: Figure, stem: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write `stem.png` (200 dpi) and `stem.svg` (text as text, no timestamp: reruns give identical files)."""
    stem = Path(stem)
    with _writing(stem.parent):
        stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    with matplotlib.rc_context(STYLE):
        for fmt in formats:
            if fmt not in ("png", "svg", "pdf"):
                raise SvdiclError(f"figure format {fmt!r} is not supported; use png, svg or pdf")
            path = stem.with_name(f"{stem.name}.{fmt}")
            metadata = {"Date": None} if fmt == "svg" else {"CreationDate": None} if fmt == "pdf" else {}
            with _writing(path):
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
    with _writing(path):
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
        counts = {p.seeds for p in chosen}
        note = f", mean of {max(counts)} seeds" if counts != {1} and len(counts) == 1 else ""
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
        return _fmt(None)
    text = _fmt(point.value) + (CONSTANT_MARK if point.constant else "")
    return f"**{text}**" if point.value == best else text


def _line_key(item: tuple[str | None, str | None]) -> tuple:
    return (_module_order(item[0] or ""), _layer_order(item[1]))


CELL_COLUMNS = (
    "id", "model_name", "model", "task", "split", "shots", "seed", "edit", "layers", "modules", "rate", "limit",
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
        row = [c.id, c.model_name, k.model, k.task, k.split, k.shots, k.seed, k.edit, c.layers, c.modules, c.rate, k.limit]
        row += [options, k.data, c.n, c.ties, shares.get(c.id)]
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


def _estimate_text(entry: Mapping[str, Any], seeds: int) -> str:
    value = _fmt(entry.get("value"))
    if seeds > 1 and entry.get("std") is not None:
        value += f"±{_fmt(entry['std'])}"
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        value += f" [{_fmt(entry['ci_low'], 3)}, {_fmt(entry['ci_high'], 3)}]"
    return value


def _search_column(result: Mapping[str, Any]) -> tuple[str, str]:
    model = result.get("model", {})
    return (model.get("name") or model.get("fingerprint", "")[:10] or "model", result["module"])


def _limits_label(limit: Any) -> str:
    if not isinstance(limit, Mapping):
        return "all examples" if limit is None else f"limit {limit}"
    return " ".join(f"{split[:4]} {'all' if n is None else n}" for split, n in limit.items())


def _options_label(options: Any) -> str:
    return "opts-" + hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:6]


# What tells two searches of one task, model name and module apart, in the order a column label adds them,
# each with its short label.  Searches differing in none of these are the same search.
SEARCH_SETUP: tuple[tuple[str, Callable[[Mapping[str, Any]], Any], Callable[[Any], str]], ...] = (
    ("dtype", lambda r: r.get("model", {}).get("dtype"), str),
    ("fingerprint", lambda r: r.get("model", {}).get("fingerprint"), lambda v: f"fp {str(v)[:8]}"),
    ("shots", lambda r: r.get("shots"), lambda v: f"{v}-shot"),
    ("limit", lambda r: r.get("limit"), _limits_label),
    ("seeds", lambda r: [s.get("seed") for s in r.get("seeds", [])], lambda v: "seeds " + ",".join(map(str, v))),
    ("metric", lambda r: r.get("metric"), lambda v: _metric_label(str(v))),
    ("rates", lambda r: r.get("rates"), lambda v: f"{len(v or [])} rates"),
    ("layer", lambda r: r["layer"] if r.get("layer_from") == "given" else None, lambda v: f"layer {v} given"),
    ("scoring", lambda r: (r.get("scoring") or {}).get("options"), _options_label),
    ("data", lambda r: r.get("data"), lambda v: f"data {Path(str(v)).name}"),
    ("task_source", lambda r: r.get("task_source"), lambda v: f"task {Path(str(v)).name}"),
)


def search_columns(results: Sequence[Mapping[str, Any]], sources: Sequence[Any] | None = None) -> list[tuple[str, str]]:
    """The Algorithm 1 column (model label, module) of each result, so that no two results of one task share one.

    A column is the model's name and the module; where two results of one task share those (the same alias
    in float32 and bfloat16, other shots or limits), the label adds the first setup fields that tell them
    apart (SEARCH_SETUP order).  Two results of one task differing in none are the same search, refused in
    one line naming both (`sources`: where each result came from).
    """
    columns = [_search_column(r) for r in results]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, column in enumerate(columns):
        groups.setdefault(column, []).append(i)
    for (name, module), members in groups.items():
        keys = {i: [results[i]["task"]] for i in members}
        labels = {i: [name] for i in members}
        for _, value, label in SEARCH_SETUP:
            if not _collisions(keys):
                break
            texts = {i: json.dumps(value(results[i]), sort_keys=True, default=str) for i in members}
            if any(len({texts[i] for i in group}) > 1 for group in _collisions(keys)):
                for i in members:
                    keys[i].append(texts[i])
                    labels[i].append(label(value(results[i])))
        for group in _collisions(keys):
            first, second = (str(sources[i]) if sources else f"result {i + 1}" for i in group[:2])
            raise SvdiclError(
                f"{first} and {second} are the same search ({results[group[0]]['task']}, {module} of {name}: same weights, "
                "dtype, shots, limits, seeds, scoring and data); report only one of them"
            )
        for i in members:
            columns[i] = (" ".join(labels[i]), module)
    return columns


def _collisions(keys: Mapping[int, list[str]]) -> list[list[int]]:
    """Groups of more than one index with equal keys."""
    found: dict[str, list[int]] = {}
    for i, key in keys.items():
        found.setdefault(json.dumps(key), []).append(i)
    return [group for group in found.values() if len(group) > 1]


ALGORITHM1_COLUMNS = (
    "model_name", "column", "model", "dtype", "task", "module", "layer", "top_k", "top_layers", "metric", "shots", "rate_star",
    "baseline", "baseline_ci_low", "baseline_ci_high", "baseline_std", "pruned", "pruned_ci_low", "pruned_ci_high",
    "pruned_std", "mcnemar_p", "seeds", "n_test",
)  # fmt: skip


def algorithm1_rows(results: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Long-form rows of the Algorithm 1 table (tables/algorithm1.csv)."""
    rows = []
    for r, (label, _) in zip(results, search_columns(results), strict=True):
        test, base, pruned = r["test"], r["test"]["baseline"], r["test"]["pruned"]
        name, _ = _search_column(r)
        model = r.get("model", {})
        seeds = [s.get("seed") for s in r.get("seeds", [])]
        rows.append([
            name, label, model.get("fingerprint", ""), model.get("dtype", ""), r["task"], r["module"], r["layer"], r.get("top_k"),
            " ".join(map(str, r.get("top_layers", []))), r.get("metric", ""), r.get("shots"), r["rate_star"],
            base["value"], base.get("ci_low"), base.get("ci_high"), base.get("std"),
            pruned["value"], pruned.get("ci_low"), pruned.get("ci_high"), pruned.get("std"),
            test.get("p_value", test.get("mcnemar_p")), " ".join(map(str, seeds)), test.get("n"),
        ])  # fmt: skip
    return rows


def algorithm1_markdown(results: Sequence[Mapping[str, Any]]) -> str:
    """Appendix C.5 layout: rows = tasks, columns = model x layer x module, "baseline -> pruned (ξ*=...)" with CIs and p."""
    of = search_columns(results)
    columns = sorted(set(of), key=lambda c: (c[0], _module_order(c[1])))
    tasks = sorted({r["task"] for r in results}, key=_task_order)
    by_cell = {(r["task"], column): r for r, column in zip(results, of, strict=True)}
    headers = ["task"]
    for column in columns:
        layers = {r["layer"] for r, c in zip(results, of, strict=True) if c == column}
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
            layers = {x["layer"] for x, c in zip(results, of, strict=True) if c == column}
            where = f"L{r['layer']}: " if len(layers) > 1 else ""
            text = f"{where}{_estimate_text(r['test']['baseline'], seeds)} → {_estimate_text(r['test']['pruned'], seeds)}"
            text += f" (ξ*={r['rate_star']:g}, p={_fmt_p(r['test'].get('p_value', r['test'].get('mcnemar_p')))}"
            text += f", {seeds} seeds)" if seeds > 1 else ")"
            row.append(text)
        rows.append(row)
    note = (
        "\nCells: test metric of the unpruned → the ξ*-pruned model, [95% CI]; ξ* is the validation argmax "
        "(ties to the smaller rate, ξ=0 included); p: example-level paired sign-flip test (each example's correctness "
        "averaged over seeds; exact McNemar for one seed), unpruned vs pruned on the same test examples."
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
    labelled = zip(search_columns(results), results, strict=True)
    for (label, _), r in sorted(labelled, key=lambda x: (x[0][0], _task_order(x[1]["task"]), _module_order(x[1]["module"]))):
        star = r["rates"].index(r["rate_star"])
        for seed in r.get("seeds", []):
            base, pruned = seed["baseline"]["value"], seed["pruned"]["value"]
            discordant, cells = seed.get("discordant", {}), seed.get("cells", {})
            rows.append([
                label, r["task"], r["module"], r["layer"], r["rate_star"], seed["seed"],
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
    of = search_columns(results)
    columns = sorted(set(of), key=lambda c: (c[0], _module_order(c[1])))
    fig, axes = _figure(len(tasks), len(columns), height=2.4)
    for i, task in enumerate(tasks):
        for j, column in enumerate(columns):
            ax = axes[i][j]
            found = [r for r, c in zip(results, of, strict=True) if r["task"] == task and c == column]
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
            n = r.get("validation", {}).get("n")
            where = f"{_task_label(task)} · {column[0]} L{r['layer']} {_module_label(column[1])}"
            ax.set_title(where + ("" if n is None else f"\nvalidation n={n}"))
            ax.set_xlabel("clipping rate ξ")
            ax.set_ylabel(f"validation {_metric_label(r.get('metric', ''))}" if j == 0 else "")
    _legend(fig, axes, ["validation", "ξ=0", "ξ*"])
    return fig


# ----- Algorithm 1 side by side (experiments/arms.py) -----

ARMS_COLUMNS = (
    "model_name", "task", "module", "layer", "arm", "rate", "calibration", "control", "metric", "n", "seeds", "value",
    "std_over_seeds", "ci_low", "ci_high", "ci_method", "difference", "difference_ci_low", "difference_ci_high", "p",
    "p_holm", "mde", "top_answer_share", "balanced_accuracy", "auc", "difference_vs_calibrated",
    "difference_vs_calibrated_ci_low", "difference_vs_calibrated_ci_high", "p_vs_calibrated", "p_holm_vs_calibrated",
)  # fmt: skip


def arms_rows(results: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Long-form rows of every search's arms (tables/arms.csv)."""
    rows = []
    for r in results:
        for arm in r.get("arms", []):
            paired = arm.get("paired") or {}
            versus = arm.get("paired_calibrated") or {}
            rows.append([
                _search_column(r)[0], r["task"], r["module"], r["layer"], arm["name"], arm["rate"], arm.get("calibration"),
                arm.get("control"), r.get("metric"), arm["n"], arm["seeds"], arm["value"], arm.get("std"), arm.get("ci_low"),
                arm.get("ci_high"), arm.get("ci_method"), paired.get("difference"), paired.get("ci_low"),
                paired.get("ci_high"), paired.get("p_value"), paired.get("p_holm"), paired.get("mde"),
                arm.get("top_answer_share"), arm.get("balanced_accuracy"), arm.get("auc"), versus.get("difference"),
                versus.get("ci_low"), versus.get("ci_high"), versus.get("p_value"), versus.get("p_holm"),
            ])  # fmt: skip
    return rows


def arms_markdown(result: Mapping[str, Any]) -> str:
    """One search's arms on the same test examples: metric, paired difference against the unpruned model, p, bias."""
    arms = result.get("arms", [])
    seeds = arms[0]["seeds"] if arms else 1
    metric = _metric_label(result.get("metric", ""))
    rows = []
    for arm in arms:
        value = _fmt(arm["value"], 3) + (f" ± {_fmt(arm['std'], 3)}" if arm.get("std") is not None else "")
        value += f" [{_fmt(arm.get('ci_low'), 3)}, {_fmt(arm.get('ci_high'), 3)}]"
        paired = arm.get("paired")
        if arm.get("same_as"):
            delta, p, p_holm = f"= {arm['same_as']}", "", ""
        elif paired is None:
            delta, p, p_holm = "reference", "", ""
        else:
            delta = f"{paired['difference']:+.3f} [{paired['ci_low']:+.3f}, {paired['ci_high']:+.3f}]"
            p, p_holm = _fmt_p(paired["p_value"]), _fmt_p(paired.get("p_holm"))
        versus = arm.get("paired_calibrated")
        against_calibrated = "" if arm.get("same_as") or not versus else (
            f"{versus['difference']:+.3f} [{versus['ci_low']:+.3f}, {versus['ci_high']:+.3f}], p {_fmt_p(versus['p_value'])} "
            f"(Holm {_fmt_p(versus.get('p_holm'))})"
        )  # fmt: skip
        rows.append([arm["name"], f"{arm['rate']:g}", value, delta, p, p_holm, against_calibrated,
                     _fmt(arm.get("top_answer_share"), 2), _fmt(arm.get("balanced_accuracy"), 3),
                     _fmt(arm.get("auc"), 3)])  # fmt: skip
    headers = ["arm", "ξ", f"test {metric}", "Δ correct vs unpruned", "p", "p (Holm)", "Δ vs unpruned + same calibration",
               "top answer", "balanced acc.", "AUC"]  # fmt: skip
    methods = sorted({a.get("ci_method") for a in arms if a.get("ci_method")})
    spread = f"± SD over the {seeds} demonstration seeds; " if seeds > 1 else ""
    note = (
        f"\n{_task_label(result['task'])}, {_module_label(result['module'])} of layer {result['layer']}, n = "
        f"{arms[0]['n'] if arms else '–'} test examples, {seeds} seed(s). {spread}[ ] 95% CI over test examples "
        f"({', '.join(methods)}). Δ: paired difference in per-example correctness against the unpruned model (each "
        "example's correctness averaged over seeds) with its 95% CI over examples; p: sign-flip permutation test on those "
        "differences, raw and Holm-adjusted across all comparisons of this table. Δ vs unpruned + same calibration: a "
        "calibrated pruned or control arm against the unpruned model under the same calibration (does pruning add to "
        "the calibration?). ξ of a calibrated pruned arm: the rate chosen "
        "on validation under that calibration; null controls at the rate of the pruned arm they mirror. top answer: share "
        "of examples given the most common answer; AUC: ranking AUC of the label margin (binary tasks); '= arm': the same "
        "predictions as that arm, left out of "
        "the Holm family.\n"
    )
    return markdown_table(headers, rows) + note


@_styled
def plot_arms(result: Mapping[str, Any]) -> Figure:
    """Two panels per search: each arm's test metric with its CI, and its paired difference against the unpruned model."""
    arms = result.get("arms", [])
    fig, axes = _figure(1, 2, width=3.6, height=0.35 * len(arms) + 1.2)
    left, right = axes[0]
    y = list(range(len(arms)))[::-1]
    for row, arm in zip(y, arms, strict=True):
        color = COLORS[1] if arm.get("control") else COLORS[2] if arm.get("calibration") else COLORS[0]
        low, high = arm.get("ci_low"), arm.get("ci_high")
        if low is not None and high is not None:
            left.plot([low, high], [row, row], color=color, lw=1.5)
        left.plot([arm["value"]], [row], marker="o", color=color)
        paired = arm.get("paired")
        if paired is not None:
            right.plot([paired["ci_low"], paired["ci_high"]], [row, row], color=color, lw=1.5)
            right.plot([paired["difference"]], [row], marker="o", color=color)
            if paired.get("p_holm") is not None and paired["p_holm"] < 0.05:
                right.annotate("*", (paired["difference"], row + 0.15), ha="center", fontsize=9)
    right.axvline(0, color=BASELINE_COLOR, ls="--", lw=1.0)
    if arms:
        left.axvline(arms[0]["value"], color=BASELINE_COLOR, ls="--", lw=1.0)
    left.set_yticks(y, [f"{a['name']} (ξ={a['rate']:g}, top answer {_fmt(a.get('top_answer_share'), 2)})" for a in arms])
    right.set_yticks(y, [""] * len(arms))
    left.set_xlabel(f"test {_metric_label(result.get('metric', ''))} [95% CI]")
    right.set_xlabel("Δ correct vs unpruned [95% CI]")
    right.set_title("* Holm-adjusted p < 0.05", fontsize=8)
    right.xaxis.set_major_locator(MaxNLocator(4))
    left.set_title(f"{_task_label(result['task'])} · L{result['layer']} {_module_label(result['module'])}")
    return fig


def _arms_section(results, figures: Path, tables: Path, formats, written: list[Path]) -> list[str]:
    """The arms of every search that has them: tables/arms.csv, a table and a figure per search."""
    with_arms = [r for r in results if r.get("arms")]
    if not with_arms:
        return []
    written.append(write_csv(tables / "arms.csv", ARMS_COLUMNS, arms_rows(with_arms)))
    page = ["## Algorithm 1 side by side: calibration and null controls on the same test examples", ""]
    for r in with_arms:
        stem = f"arms-{_slug(_search_column(r)[0])}-{_slug(r['task'])}-{_slug(r['module'])}"
        text = arms_markdown(r)
        written.append(_write_text(tables / f"{stem}.md", text))
        written.extend(save_figure(plot_arms(r), figures / stem, formats))
        page += [text, f"![arms](figures/{stem}.png)", ""]
    return page


# ----- eval folders (`svdicl eval --output`) -----


@dataclass(frozen=True)
class EvalRow:
    """One eval folder in the report: its setting, each metric as the seed mean with its CI over examples and
    its spread over seeds, the share of the most common answer, and the paired comparison with the unpruned
    model's eval of the same examples (when the report has one; `adjusted_p`: Holm over the report's comparisons)."""

    folder: str
    model: str
    fingerprint: str
    dtype: str
    task: str
    split: str
    shots: int | None
    edit: str
    seeds: tuple[int, ...]
    n: int
    metric: str
    accuracy: stats.Estimate
    accuracy_std: float | None
    macro_f1: stats.Estimate
    macro_f1_std: float | None
    answer_share: float | None
    versus: stats.PairedComparison | None = None
    adjusted_p: float | None = None

    def value(self, metric: str) -> stats.Estimate:
        """The estimate of `metric` (accuracy or macro_f1)."""
        return self.accuracy if metric == "accuracy" else self.macro_f1


def find_evals(folder: Path) -> list[EvalFolder]:
    """The eval outputs in a folder: the folder itself, or one subfolder per task (a multi-task eval)."""
    if (folder / RESULTS_FILE).is_file():
        return [read_eval(folder)]
    return [read_eval(path.parent) for path in sorted(folder.glob(f"*/{RESULTS_FILE}"))]


def eval_rows(evals: Sequence[EvalFolder]) -> list[EvalRow]:
    """A row per eval folder, each pruned one paired with the unpruned eval of the same weights and examples."""
    labels = model_labels((e.fingerprint, e.model_name) for e in evals)
    rows = []
    for e in evals:
        versus = None
        base = next((b for b in evals if b.edit == "none" and e.edit != "none" and _same_setting(b, e)), None)
        if base is not None:
            versus = paired_accuracy(base, e)
        rows.append(_eval_row(e, labels[e.fingerprint], versus))
    tested = [i for i, row in enumerate(rows) if row.versus is not None]
    adjusted = stats.holm([rows[i].versus.p_value for i in tested]) if tested else []
    for i, p in zip(tested, adjusted, strict=True):
        rows[i] = dataclasses.replace(rows[i], adjusted_p=p)
    return sorted(rows, key=lambda r: (r.model, _task_order(r.task), r.split, r.edit != "none", r.edit))


def _same_setting(a: EvalFolder, b: EvalFolder) -> bool:
    """Same weights, task, split, shots and examples: the pair `svdicl compare` would accept."""
    same = (a.fingerprint, a.task, a.split, a.config.get("shots_per_class")) == (
        b.fingerprint, b.task, b.split, b.config.get("shots_per_class"))  # fmt: skip
    return same and set(a.ids) == set(b.ids)


def _eval_row(e: EvalFolder, model: str, versus: stats.PairedComparison | None) -> EvalRow:
    ids = e.ids
    gold_by_id, predicted_by_id = e.table("gold"), e.table("prediction")
    gold = [gold_by_id[i][0] for i in ids]
    predicted = np.array([predicted_by_id[i] for i in ids], dtype=np.int64).T  # seeds x examples
    classes = len(e.config["task"].get("labels") or []) or int(max(gold + predicted.ravel().tolist())) + 1
    per_seed = {
        name: [stats.accuracy(gold, p) if name == "accuracy" else stats.macro_f1(gold, p, classes) for p in predicted]
        for name in ("accuracy", "macro_f1")
    }
    shares = [answer_share([{"prediction": x} for x in p]) for p in predicted]
    return EvalRow(
        folder=str(e.folder), model=model, fingerprint=e.fingerprint, dtype=e.dtype, task=e.task, split=e.split,
        shots=e.config.get("shots_per_class"), edit=e.edit, seeds=e.seeds, n=len(ids), metric=e.metric,
        accuracy=stats.seed_mean_ci(gold, predicted, "accuracy", classes),
        accuracy_std=statistics.stdev(per_seed["accuracy"]) if len(predicted) > 1 else None,
        macro_f1=stats.seed_mean_ci(gold, predicted, "macro_f1", classes),
        macro_f1_std=statistics.stdev(per_seed["macro_f1"]) if len(predicted) > 1 else None,
        answer_share=statistics.fmean(shares), versus=versus,
    )  # fmt: skip


EVAL_COLUMNS = (
    "model_name", "model", "dtype", "task", "split", "shots", "edit", "seeds", "n", "metric",
    "accuracy", "accuracy_ci_low", "accuracy_ci_high", "accuracy_ci_method", "accuracy_std",
    "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "macro_f1_ci_method", "macro_f1_std", "answer_share",
    "delta_accuracy", "delta_ci_low", "delta_ci_high", "p_value", "p_holm", "p_method", "mde", "folder",
)  # fmt: skip


def eval_table_rows(rows: Sequence[EvalRow]) -> list[list[Any]]:
    """Long-form rows of tables/evals.csv."""
    out = []
    for r in rows:
        v = r.versus
        out.append([
            r.model, r.fingerprint, r.dtype, r.task, r.split, r.shots, r.edit, " ".join(map(str, r.seeds)), r.n, r.metric,
            r.accuracy.value, r.accuracy.low, r.accuracy.high, r.accuracy.method, r.accuracy_std,
            r.macro_f1.value, r.macro_f1.low, r.macro_f1.high, r.macro_f1.method, r.macro_f1_std, r.answer_share,
            *((v.difference, v.low, v.high, v.p_value, r.adjusted_p, v.method, v.mde) if v else (None,) * 7), r.folder,
        ])  # fmt: skip
    return out


def eval_markdown(rows: Sequence[EvalRow]) -> str:
    """A row per eval: seed mean ± sd over seeds [95% CI over examples], top-answer share, and B - unpruned."""
    table = []
    for r in rows:
        v = r.versus
        delta = "–" if v is None else f"{v.difference:+.4f} [{v.low:+.3f}, {v.high:+.3f}]"
        table.append([
            r.model, _task_label(r.task), r.split, _fmt(r.shots, 0) if r.shots is not None else "–", r.edit,
            len(r.seeds), r.n, _eval_estimate(r.accuracy, r.accuracy_std), _eval_estimate(r.macro_f1, r.macro_f1_std),
            _fmt(r.answer_share, 2), delta, _fmt_p(v.p_value if v else None), _fmt_p(r.adjusted_p),
        ])  # fmt: skip
    headers = ["model", "task", "split", "shots/class", "edit", "seeds", "n", "accuracy", "macro-F1", "top answer",
               "Δ accuracy vs unpruned", "p", "p (Holm)"]  # fmt: skip
    note = (
        "\nValues: mean over seeds ±sd over seeds [95% CI over examples: Wilson for one seed's accuracy, else a BCa "
        "bootstrap]. n: examples. top answer: share of examples given the most common answer (1.00 = one answer to "
        "all). Δ: accuracy of the row minus the unpruned eval of the same weights and examples, each example averaged "
        "over its seeds first [95% t-interval over examples]; p: exact sign-flip test on those per-example "
        "differences (`svdicl compare`); p (Holm): adjusted over this table's comparisons.\n"
    )
    return markdown_table(headers, table) + note


def _eval_estimate(estimate: stats.Estimate, std: float | None) -> str:
    text = _fmt(estimate.value) + ("" if std is None else f"±{_fmt(std)}")
    return f"{text} [{_fmt(estimate.low, 3)}, {_fmt(estimate.high, 3)}]"


@_styled
def plot_evals(rows: Sequence[EvalRow]) -> Figure:
    """Each eval's headline metric with its 95% CI over examples, a panel per task x split, titled with the model(s) and n."""
    panels = sorted({(r.task, r.split) for r in rows}, key=lambda x: (_task_order(x[0]), x[1]))
    fig, axes = _figure(1, len(panels), width=max(2.9, 0.9 * max(Counter((r.task, r.split) for r in rows).values())))
    for ax, (task, split) in zip(axes[0], panels, strict=True):
        chosen = [r for r in rows if (r.task, r.split) == (task, split)]
        metric = chosen[0].metric
        for x, r in enumerate(chosen):
            e = r.value(metric)
            color = BASELINE_COLOR if r.edit == "none" else COLORS[0]
            ax.errorbar([x], [e.value], yerr=[[e.value - e.low], [e.high - e.value]], fmt="o", color=color, capsize=3)
        ax.set_xticks(range(len(chosen)), [f"{r.model}\n{'unpruned' if r.edit == 'none' else r.edit}" for r in chosen])
        ax.set_xlim(-0.6, len(chosen) - 0.4)
        sizes = sorted({r.n for r in chosen})
        ax.set_title(f"{_task_label(task)} · {split} · n={'/'.join(map(str, sizes))}")
        ax.set_ylabel(_metric_label(metric) if ax is axes[0][0] else "")
    fig.suptitle(", ".join(sorted({r.model for r in rows})) + " · mean over seeds, 95% CI over examples")
    return fig


# ----- the whole report -----


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def model_labels(models: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Fingerprint -> display label: the model's name, plus the fingerprint's first 8 digits where two weights share
    a name (one alias loaded in float32 and in bfloat16), so that no two models share a heading or a file name."""
    names = dict(models)
    count: dict[str, int] = {}
    for name in names.values():
        count[name] = count.get(name, 0) + 1
    return {fp: name if count[name] == 1 else f"{name} {fp[:8]}" for fp, name in names.items()}


def _setting_tags(points: Sequence[Point]) -> dict[tuple, str]:
    """A file-name tag per setting: the split, plus whatever else differs between settings."""
    settings = {p.setting: p for p in points}
    models = {p.model for p in settings.values()}
    labels = model_labels((p.model, p.model_name) for p in settings.values())
    limits = {p.limit for p in settings.values()}
    options = {p.options for p in settings.values()}
    tags = {}
    for setting, p in settings.items():
        parts = [p.split]
        if len(models) > 1:
            parts.insert(0, labels[p.model])
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
    folders = _unique_folders(folders)
    for folder in folders:
        if not folder.is_dir():
            raise SvdiclError(
                f"report folder {folder} does not exist; give the --output folder of a sweep, condition or search run"
            )
    if output is None and len(folders) != 1:
        raise SvdiclError(f"{len(folders)} report folders need --output, the folder to write the combined report to")
    target = Path(output) if output is not None else folders[0]
    figures, tables = target / "figures", target / "tables"
    previous = _report_files(target)
    written: list[Path] = []
    page = ["# svdicl report", "", "Folders: " + ", ".join(f"`{f}`" for f in folders) + ".", ""]
    found_any = False

    stored = [(store, store.cells()) for store in (Store(f, readonly=True) for f in folders if (f / CELLS_FILE).is_file())]
    shares = {cell.id: answer_share(store.samples(cell)) for store, cells in stored for cell in cells}
    if stored:
        found_any = True
        # one cell per key: two folders holding the same cell (a sweep's and a search's unpruned cells) must not
        # count it twice in a seed mean or spread
        unique: dict[str, Cell] = {}
        for _, found in stored:
            for cell in found:
                unique.setdefault(cell.id, cell)
        cells = list(unique.values())
        headers, rows = cell_rows(cells, shares)
        written.append(write_csv(tables / "cells.csv", headers, rows))
        points = sweep_points(cells, metric, shares)
        if cells and not points:
            have = sorted({m for c in cells for m in c.metrics})
            raise SvdiclError(f"no stored cell has metric {metric!r}; use --metric with one of {', '.join(have)} or task")
        page += _sweep_section(points, figures, tables, formats, bands, written)
        page.append(_baseline_note({p.model_name for p in points}))

    with_conditions = _condition_folders([folder for folder in folders if (folder / CONDITIONS_CSV).is_file()])
    for folder, name in with_conditions:
        found_any = True
        conditions = read_conditions(folder / CONDITIONS_CSV)
        tag = "" if len(with_conditions) == 1 else f"-{_slug(name)}"
        figure = plot_conditions(conditions, title=f"{name} · condition numbers per layer")
        written += save_figure(figure, figures / f"fig3-conditions{tag}", formats)
        text = conditions_markdown(conditions)
        written.append(_write_text(tables / f"conditions{tag}.md", text))
        title = "## Condition numbers (fig 3)" + ("" if len(with_conditions) == 1 else f": {name}")
        page += [title, "", f"![fig 3](figures/fig3-conditions{tag}.png)", "", text]

    searches = [path for folder in folders for path in sorted((folder / SEARCH_DIR).glob("*.json"))]
    if searches:
        found_any = True
        results = [read_search(path) for path in searches]
        search_columns(results, searches)  # refuses the same search twice, naming both files
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
        page += _arms_section(results, figures, tables, formats, written)

    evals = [found for folder in folders for found in find_evals(folder)]
    if evals:
        found_any = True
        rows = eval_rows(evals)
        written.append(write_csv(tables / "evals.csv", EVAL_COLUMNS, eval_table_rows(rows)))
        text = eval_markdown(rows)
        written.append(_write_text(tables / "evals.md", text))
        written += save_figure(plot_evals(rows), figures / "evals", formats)
        page += ["## Evaluations (svdicl eval)", "", "![evaluations](figures/evals.png)", "", text]

    if not found_any:
        where = ", ".join(str(f) for f in folders)
        raise SvdiclError(
            f"nothing to report in {where}: no {CELLS_FILE}, {CONDITIONS_CSV}, {SEARCH_DIR}/*.json or {RESULTS_FILE}; "
            "run svdicl sweep, condition, search or eval with --output there first"
        )
    page_path = _write_text(target / "report.md", "\n".join(page) + "\n")
    _replace_report_files(target, [*written, page_path], previous)
    return Report(files=tuple(written), page=page_path)


def _unique_folders(folders: Sequence[Path]) -> list[Path]:
    """The folders in order, a folder given twice (under any spelling) once."""
    unique: dict[Path, Path] = {}
    for folder in folders:
        unique.setdefault(folder.resolve(), folder)
    return list(unique.values())


def _report_files(target: Path) -> list[str]:
    """The files an earlier report wrote into `target` (relative paths from its manifest; none if there is none)."""
    try:
        data = json.loads((target / REPORT_FILES).read_text(encoding="utf-8"))
        return [str(name) for name in data["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _replace_report_files(target: Path, written: Sequence[Path], previous: Sequence[str]) -> None:
    """Delete what the earlier report wrote and this one did not (stale figures and tables), then record this one's
    files.  Only paths the manifest lists, inside `target`, are ever deleted: never a file report did not write."""
    names = [path.relative_to(target).as_posix() for path in written]
    root = target.resolve()
    for name in set(previous) - set(names):
        path = (target / name).resolve()
        if path.is_relative_to(root) and path != root / REPORT_FILES and path.is_file():
            with _writing(path):
                path.unlink()
    _write_text(target / REPORT_FILES, json.dumps({"format": "svdicl.report-files/1", "files": names}, indent=1) + "\n")


def _conditions_model(folder: Path) -> tuple[str, str]:
    """(name, fingerprint) of the model in the folder's conditions.json (`svdicl condition` writes it); the folder's
    name and no fingerprint where it says nothing."""
    try:
        model = json.loads((folder / CONDITIONS_JSON).read_text(encoding="utf-8"))["model"]
        return str(model["name"] or folder.name), str(model.get("fingerprint") or "")
    except (OSError, ValueError, KeyError, TypeError):
        return folder.name, ""


def _condition_folders(folders: Sequence[Path]) -> list[tuple[Path, str]]:
    """(folder, model label) per folder with condition numbers: one per weights (the same fingerprint twice is one
    model's numbers twice), labels unique (fingerprint digits where names are shared, else the folder's name)."""
    found: dict[str, tuple[Path, str]] = {}
    for folder in folders:
        name, fp = _conditions_model(folder)
        found.setdefault(fp or f"folder:{folder}", (folder, name))
    labels = model_labels((key, name) for key, (_, name) in found.items())
    chosen = [(folder, labels[key] if not key.startswith("folder:") else name) for key, (folder, name) in found.items()]
    names = [label for _, label in chosen]
    return [(folder, label if names.count(label) == 1 else f"{label} ({folder})") for folder, label in chosen]


def _sweep_section(points, figures: Path, tables: Path, formats, bands: bool, written: list[Path]) -> list[str]:
    page = []
    tags = _setting_tags(points)
    labels = model_labels((p.model, p.model_name) for p in points)
    for setting, tag in tags.items():
        chosen = [p for p in points if p.setting == setting]
        written.append(write_csv(tables / f"sweep-{tag}.csv", SWEEP_COLUMNS, sweep_rows(chosen)))
        text = sweep_markdown(chosen)
        written.append(_write_text(tables / f"sweep-{tag}.md", text))
        first = chosen[0]
        limit = "all examples" if first.limit is None else f"first {first.limit} examples"
        page += [f"## Sweep: {labels[first.model]}, {first.split} split, {limit}", ""]
        title = setting_title(chosen, labels[first.model])
        if any(p.layers is not None for p in chosen):
            written += save_figure(plot_rates(chosen, bands=bands, title=title), figures / f"fig1-rates-{tag}", formats)
            page += [f"![fig 1](figures/fig1-rates-{tag}.png)", ""]
            if len({p.shots for p in chosen}) > 1:
                figure = plot_shots(chosen, bands=bands, title=title)
                written += save_figure(figure, figures / f"fig2-shots-{tag}", formats)
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
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A report that cannot be written (a read-only folder, a full disk) is one line naming the file and the fix."""
    try:
        yield
    except OSError as exc:
        raise SvdiclError(f"cannot write report file {path} ({exc.strerror or exc}); give --output a writable folder") from None
