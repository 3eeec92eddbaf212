"""The report's figures: fig 1 (metric vs clipping rate), fig 2 (per shot count), fig 3 (condition numbers),
Algorithm 1's validation curves, each search's arms and the evals.  Each returns a matplotlib Figure (no pyplot
state) drawn in svdicl's style, so tests can inspect what was drawn; files.save_figure writes it."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from svdicl.errors import SvdiclError
from svdicl.experiments.condition import MatrixCondition
from svdicl.report.algorithm1 import search_columns
from svdicl.report.evals import EvalRow
from svdicl.report.labels import (
    fmt,
    layer_label,
    layer_order,
    matrix_order,
    metric_label,
    module_label,
    module_order,
    task_label,
    task_order,
)
from svdicl.report.points import Point, baseline_point, line_order, point_rates, setting_title
from svdicl.store import shots_label
from svdicl.style import BASELINE_COLOR, COLORS, MARKERS, styled


def _styles(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """(colour, marker) per line name, the same in every panel of a figure."""
    return {name: (COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]) for i, name in enumerate(names)}


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


def _rate_panel(ax, points: Sequence[Point], baseline: Point | None, rates: Sequence[float], styles, bands: bool) -> None:
    """Lines per layer over ordinal rate positions; each line starts at the unpruned value; dashed baseline."""
    position = {rate: i for i, rate in enumerate(rates)}
    for layers in sorted({p.layers for p in points}, key=layer_order):
        line = sorted((p for p in points if p.layers == layers), key=lambda p: p.rate)
        if baseline is not None:
            line = [baseline, *line]
        x = [position[p.rate] for p in line]
        color, marker = styles[layers]
        ax.plot(x, [p.value for p in line], color=color, marker=marker, label=layer_label(layers), zorder=3)
        if bands:
            ax.fill_between(x, [p.low for p in line], [p.high for p in line], color=color, alpha=0.12, lw=0, zorder=2)
    if baseline is not None:
        ax.axhline(baseline.value, color=BASELINE_COLOR, ls="--", lw=1.0, label="unpruned", zorder=1)
        if bands:
            ax.axhspan(baseline.low, baseline.high, color=BASELINE_COLOR, alpha=0.08, lw=0, zorder=0)
    ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
    ax.set_xlim(-0.4, len(rates) - 0.6)
    ax.set_xlabel("clipping rate ξ")


@styled
def plot_rates(
    points: Sequence[Point], *, shots: int | tuple[int, int] | None = None, bands: bool = True, title: str | None = None
) -> Figure:
    """Fig 1: metric vs clipping rate, a line per layer, dashed unpruned baseline, a panel per task x module.

    `points` come from one setting (model, split, limit, options); `shots` (per class, or a `Point.shot_count`)
    defaults to the largest present; `title` (default `setting_title`) names the model, split and n.
    """
    shots = max(p.shot_count for p in points) if shots is None else shots
    shots = (shots, 0) if isinstance(shots, int) else tuple(shots)
    chosen = [p for p in points if p.shot_count == shots]
    tasks = sorted({p.task for p in chosen}, key=task_order)
    modules = sorted({p.modules for p in chosen if p.modules is not None}, key=module_order)
    if not modules:
        raise SvdiclError("no pruned cells to plot against the clipping rate; run a sweep first")
    rates, layers = point_rates(chosen), line_order(chosen)
    styles = _styles(layers)
    fig, axes = _figure(len(tasks), len(modules), sharey="row")
    for i, task in enumerate(tasks):
        baseline = baseline_point(chosen, task=task)
        for j, module in enumerate(modules):
            ax = axes[i][j]
            _rate_panel(ax, [p for p in chosen if p.task == task and p.modules == module], baseline, rates, styles, bands)
            ax.set_title(f"{task_label(task)} · {module_label(module)}")
            task_points = [p for p in chosen if p.task == task]
            ax.set_ylabel(metric_label(task_points[0].metric) if j == 0 else "")
    _legend(fig, axes, [*(layer_label(x) for x in layers), "unpruned"])
    fig.suptitle(setting_title(chosen) if title is None else title)
    return fig


@styled
def plot_shots(points: Sequence[Point], *, bands: bool = True, title: str | None = None) -> Figure:
    """Fig 2: the rate curves per shot count (rows, most shots first), a column per task x module; `title` as fig 1."""
    shots = sorted({p.shot_count for p in points}, reverse=True)
    panels = sorted(
        {(p.task, p.modules) for p in points if p.modules is not None}, key=lambda x: (task_order(x[0]), module_order(x[1]))
    )
    if not panels:
        raise SvdiclError("no pruned cells to plot against the clipping rate; run a sweep first")
    rates, layers = point_rates(points), line_order(points)
    styles = _styles(layers)
    fig, axes = _figure(len(shots), len(panels))
    for i, k in enumerate(shots):
        for j, (task, module) in enumerate(panels):
            ax = axes[i][j]
            chosen = [p for p in points if p.shot_count == k and p.task == task]
            _rate_panel(ax, [p for p in chosen if p.modules == module], baseline_point(chosen), rates, styles, bands)
            ax.set_title(f"{task_label(task)} · {module_label(module)} · {shots_label(*k)}-shot")
            ax.set_ylabel(metric_label(chosen[0].metric) if chosen else "")  # columns are different tasks
    _legend(fig, axes, [*(layer_label(x) for x in layers), "unpruned"])
    fig.suptitle(setting_title(points) if title is None else title)
    return fig


@styled
def plot_conditions(conditions: Sequence[MatrixCondition], title: str | None = None) -> Figure:
    """Fig 3: condition number vs layer, a line per matrix, a panel per module group, log scale; `title`: the model.

    Near-singular matrices (see TOL_RULE) get an open ring; an exactly singular one (inf) is left out of its line.
    """
    rows = [c for c in conditions if c.layer is not None]
    if not rows:
        raise SvdiclError("no per-layer condition numbers to plot")
    groups = sorted({c.group or "other" for c in rows}, key=lambda g: ["attn", "mlp", g].index(g))
    matrices = sorted({c.matrix for c in rows}, key=matrix_order)
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
        ax.set_title(module_label(group))
        ax.set_xlabel("layer")
        ax.set_ylabel(r"condition number $\sigma_{\max} / \sigma_{\min}$" if ax is axes[0][0] else "")
    _legend(fig, axes, [*matrices, "near-singular"])
    if title:
        fig.suptitle(title)
    return fig


@styled
def plot_search(results: Sequence[Mapping[str, Any]]) -> Figure:
    """Algorithm 1's validation curves: metric vs rate per task x module, star at ξ*, dashed at ξ=0; thin lines per seed."""
    tasks = sorted({r["task"] for r in results}, key=task_order)
    of = search_columns(results)
    columns = sorted(set(of), key=lambda c: (c[0], module_order(c[1])))
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
            where = f"{task_label(task)} · {column[0]} L{r['layer']} {module_label(column[1])}"
            ax.set_title(where + ("" if n is None else f"\nvalidation n={n}"))
            ax.set_xlabel("clipping rate ξ")
            ax.set_ylabel(f"validation {metric_label(r.get('metric', ''))}" if j == 0 else "")
    _legend(fig, axes, ["validation", "ξ=0", "ξ*"])
    return fig


@styled
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
    left.set_yticks(y, [f"{a['name']} (ξ={a['rate']:g}, top answer {fmt(a.get('top_answer_share'), 2)})" for a in arms])
    right.set_yticks(y, [""] * len(arms))
    left.set_xlabel(f"test {metric_label(result.get('metric', ''))} [95% CI]")
    right.set_xlabel("Δ correct vs unpruned [95% CI]")
    right.set_title("* Holm-adjusted p < 0.05", fontsize=8)
    right.xaxis.set_major_locator(MaxNLocator(4))
    left.set_title(f"{task_label(result['task'])} · L{result['layer']} {module_label(result['module'])}")
    return fig


@styled
def plot_evals(rows: Sequence[EvalRow]) -> Figure:
    """Each eval's headline metric with its 95% CI over examples, a panel per task x split, titled with the model(s) and n."""
    panels = sorted({(r.task, r.split) for r in rows}, key=lambda x: (task_order(x[0]), x[1]))
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
        ax.set_title(f"{task_label(task)} · {split} · n={'/'.join(map(str, sizes))}")
        ax.set_ylabel(metric_label(metric) if ax is axes[0][0] else "")
    fig.suptitle(", ".join(sorted({r.model for r in rows})) + " · mean over seeds, 95% CI over examples")
    return fig
