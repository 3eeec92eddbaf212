"""Figures of the theory checks; each function returns a matplotlib Figure (no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from svdicl.style import COLORS, STYLE
from svdicl.theory.lemma1 import PERTURBED, Draw
from svdicl.theory.linreg import Curve, PruneResult
from svdicl.theory.norms import EXAMPLES, NormRow

EXAMPLE_TITLES = {"v": "Example 1: truncate $W_V$", "k": "Example 2: truncate $W_K$", "q": "Example 3: truncate $W_Q$"}
EXAMPLE_TITLES["mlp"] = "Example 4: truncate the MLP"
BASELINE_STYLE = {
    "least_squares": ("0.1", "--"),
    "ridge": ("#009E73", ":"),
    "averaging": ("#CC79A7", "-."),
    "zero": ("0.55", (0, (1, 3))),
}
NUMERICAL_ZERO = 1e-9  # squared errors below this are float64 rounding of an exact fit
BASELINE_LABELS = {"least_squares": "least squares", "ridge": "ridge", "averaging": "averaging", "zero": "zero predictor"}


def lemma1_figure(draws: Sequence[Draw], dim: int, tolerance: float) -> Figure:
    """(a) relative errors of the true and perturbed dual forms; (b) rank(dW) against the number of demonstrations."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(7.0, 2.6), layout="constrained")
        ax_err, ax_rank = fig.subplots(1, 2)
        series = {
            "Lemma 1": [d.lemma1_error for d in draws],
            "Theorem 1": [d.theorem1_error for d in draws],
            **{
                f"perturbed: {name}": [e for d in draws for e in (d.perturbed_lemma1[name], d.perturbed_theorem1[name])]
                for name in PERTURBED
            },
        }
        floor = 1e-18
        top = max(6, int(np.ceil(np.log10(max(max(v) for v in series.values())))) + 1)
        bins = np.logspace(-18, top, 2 * (top + 18) + 1)
        for (label, values), color in zip(series.items(), COLORS, strict=False):
            ax_err.hist(np.maximum(values, floor), bins=bins, histtype="step", color=color, label=label, linewidth=1.2)
        ax_err.axvline(tolerance, color="0.3", linestyle="--", linewidth=0.8, label=f"tolerance {tolerance:g}")
        ax_err.set_xscale("log")
        ax_err.set_xlabel("relative error, direct vs dual form")
        ax_err.set_ylabel("count")
        ax_err.set_title(f"(a) {len(draws)} random draws, float64")
        ax_err.legend(loc="upper right", frameon=False)
        demos = np.array([d.n_demos for d in draws for _ in d.ranks])
        ranks = np.array([r for d in draws for r in d.ranks])
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, size=len(demos))
        ax_rank.scatter(demos + jitter, ranks, s=8, alpha=0.5, color=COLORS[0], label="rank($\\Delta W^l$), every layer")
        grid = np.arange(1, demos.max() + 1)
        ax_rank.plot(grid, np.minimum(grid, dim), color="0.2", linestyle="--", label=f"min(n, d), d = {dim}")
        ax_rank.set_xlabel("number of demonstrations n")
        ax_rank.set_ylabel("numerical rank")
        ax_rank.set_title("(b) rank of the implicit update")
        ax_rank.legend(loc="lower right", frameon=False)
    return fig


def norms_figure(rows: Sequence[NormRow], rates: Sequence[float]) -> Figure:
    """Bound (top) and exact norm (bottom), after / before truncation, against the rate; a panel per example."""
    sources = sorted({r.source for r in rows if r.source != "random"})
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(9.0, 4.4), layout="constrained")
        axes = fig.subplots(2, len(EXAMPLES), sharex=True, sharey="row")
        positions = np.arange(len(rates))
        layers = sorted({r.layer for r in rows if r.source in sources})
        cmap = matplotlib.colormaps["viridis"]
        for col, example in enumerate(EXAMPLES):
            for row, field in enumerate(("bound_ratio", "exact_ratio")):
                ax = axes[row][col]
                for layer in layers:
                    values = _by_rate(
                        [r for r in rows if r.source in sources and r.example == example and r.layer == layer], field, rates
                    )
                    colour = cmap(layer / max(1, max(layers)))
                    ax.plot(positions, values, color=colour, linewidth=0.8, alpha=0.9)
                random = [r for r in rows if r.source == "random" and r.example == example]
                if random:
                    draws = sorted({r.layer for r in random})
                    curves = np.array([_by_rate([r for r in random if r.layer == d], field, rates) for d in draws])
                    ax.plot(positions, curves.mean(axis=0), color="black", linestyle="--", linewidth=1.4, label="random (mean)")
                    ax.fill_between(
                        positions, curves.min(axis=0), curves.max(axis=0), color="0.5", alpha=0.2, label="random (range)"
                    )
                ax.set_yscale("log")
                ax.axhline(1.0, color="0.4", linewidth=0.6)
                if row == 0:
                    ax.set_title(EXAMPLE_TITLES[example])
                if col == 0:
                    ax.set_ylabel("bound after / before" if field == "bound_ratio" else "exact $\\|\\cdot\\|_F$ after / before")
                if row == 1:
                    ax.set_xticks(positions, [f"{r:g}" for r in rates], rotation=60)
                    ax.set_xlabel("clipping rate ξ")
        if layers:
            mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, max(layers)), cmap=cmap)
            fig.colorbar(mappable, ax=axes, label=f"layer of {', '.join(sources)}", shrink=0.8)
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            axes[0][0].legend(handles, labels, loc="lower left", frameon=False)
    return fig


def _by_rate(rows: Sequence[NormRow], field: str, rates: Sequence[float]) -> list[float]:
    found = {r.rate: getattr(r, field) for r in rows}
    return [found.get(rate, np.nan) for rate in rates]


def _curve(ax, curve: Curve, label: str, color, linestyle="-", marker="o") -> None:
    shots = np.arange(len(curve.mean))
    mean, err = np.array(curve.mean), 1.96 * np.array(curve.stderr)
    ax.plot(shots, mean, color=color, linestyle=linestyle, marker=marker, label=label)
    ax.fill_between(shots, np.maximum(mean - err, 1e-12), mean + err, color=color, alpha=0.15, linewidth=0)


def linreg_figure(final: Curve, checkpoints: Sequence[tuple[int, Curve]], baselines: Sequence[Curve], loss, dim: int) -> Figure:
    """(a) the trained model vs the baselines (fig 5a); (b) the model at several checkpoints (fig 5b); (c) training loss."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(9.0, 2.8), layout="constrained")
        ax_a, ax_b, ax_c = fig.subplots(1, 3)
        floor = _floor([final, *(c for _, c in checkpoints), *baselines])
        for ax in (ax_a, ax_b):
            for base in baselines:
                if ax is ax_b and base.name not in ("least_squares", "zero"):
                    continue
                color, style = BASELINE_STYLE.get(base.name, ("0.5", ":"))
                _curve(ax, base, BASELINE_LABELS.get(base.name, base.name), color, style, marker="")
            ax.axvline(dim, color="0.6", linewidth=0.7, linestyle=":")
            ax.set_yscale("log")
            ax.set_ylim(bottom=floor)
            ax.set_xlabel("number of shots k (in-context examples)")
            ax.set_ylabel("squared error / d")
        _curve(ax_a, final, "transformer", COLORS[0])
        ax_a.set_title(f"(a) trained transformer, d = {dim}")
        ax_a.text(dim + 0.2, floor * 1.6, "least squares: 0 from k = d", fontsize=6.5, color="0.2")
        ax_a.legend(frameon=False, loc="lower left")
        cmap = matplotlib.colormaps["plasma"]
        for i, (step, curve) in enumerate(checkpoints):
            _curve(ax_b, curve, f"step {step:,}", cmap(0.85 * i / max(1, len(checkpoints) - 1)), marker=".")
        ax_b.set_title("(b) during training")
        ax_b.legend(frameon=False, loc="lower left", ncol=2, fontsize=6.5)
        steps, values = zip(*loss, strict=True) if loss else ((), ())
        ax_c.plot(steps, values, color=COLORS[1], marker=".")
        ax_c.set_yscale("log")
        ax_c.set_xlabel("training step")
        ax_c.set_ylabel("training loss / d (all shots)")
        ax_c.set_title("(c) training loss")
    return fig


def _floor(curves: Sequence[Curve]) -> float:
    """Bottom of a log axis: half the smallest error above rounding noise (least squares is ~1e-14 from k = d)."""
    values = [v for c in curves for v in c.mean if v > NUMERICAL_ZERO]
    return 0.5 * min(values) if values else NUMERICAL_ZERO


def pruning_figure(
    results: Sequence[PruneResult], unpruned: Curve, least_squares: Curve, shots: int, rates: Sequence[float]
) -> Figure:
    """Error at `shots` shots against the clipping rate, a line per layer; a panel per module."""
    modules = list(dict.fromkeys(r.module for r in results))
    layers = sorted({r.layer for r in results})
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(3.3 * len(modules), 2.8), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(modules), sharey=True))
        positions = np.arange(len(rates))
        for ax, module in zip(axes, modules, strict=True):
            for i, layer in enumerate(layers):
                found = {r.rate: r.curve for r in results if r.layer == layer and r.module == module}
                mean = np.array([found[rate].mean[shots] if rate in found else np.nan for rate in rates])
                err = 1.96 * np.array([found[rate].stderr[shots] if rate in found else np.nan for rate in rates])
                depth = next(r.depth for r in results if r.layer == layer)
                style = "-" if depth == "deep" else "--"
                ax.errorbar(
                    positions,
                    mean,
                    yerr=err,
                    color=COLORS[i % len(COLORS)],
                    linestyle=style,
                    marker="o",
                    capsize=2,
                    label=f"layer {layer} ({depth})",
                )
            ax.axhline(unpruned.mean[shots], color="0.2", linewidth=0.8, label="unpruned")
            if least_squares.mean[shots] > NUMERICAL_ZERO:
                ax.axhline(least_squares.mean[shots], color="0.1", linestyle="--", linewidth=0.8, label="least squares")
            else:
                ax.text(0.02, 0.02, f"least squares: 0 at k = {shots}", transform=ax.transAxes, fontsize=6.5, color="0.2")
            ax.axhline(1.0, color="0.55", linestyle=(0, (1, 3)), linewidth=0.8, label="zero predictor")
            ax.set_yscale("log")
            ax.set_xticks(positions, [f"{r:g}" for r in rates], rotation=60)
            ax.set_xlabel("clipping rate ξ")
            ax.set_title(f"{module.upper()} pruned, error at k = {shots} shots")
        axes[0].set_ylabel("squared error / d")
        axes[-1].legend(frameon=False, loc="upper left", fontsize=6.5)
    return fig
