"""The results section's pieces that are not prose: the comparison tables (Markdown and CSV) and the forest plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from analysis import Study
from family import CONFIRMATORY_LABELS, DESCRIPTIVE, MISSING, TESTED, ZERO, Comparison
from findings import MAIN, VARIANTS
from matplotlib.figure import Figure

from svdicl.report.files import write_csv
from svdicl.report.labels import fmt_p, module_label, task_label
from svdicl.style import BASELINE_COLOR, COLORS, MARKERS, styled

FIGURE = Path("figures/study/c1-c5.png")  # relative to docs/STUDY.md
COMPARISON_FIELDS = ("family", "label", "model", "design", "task", "module", "a", "b", "status", "n", "runs", "mean_a",
                     "mean_b", "difference", "ci_low", "ci_high", "p_value", "p_holm", "mde", "verdict", "runs_over",
                     "note")  # fmt: skip
SEARCH_FIELDS = ("model", "design", "task", "module", "layer", "rate_star", "best_calibration", "n_validation", "n_test",
                 "seeds", "accuracy_unpruned", "accuracy_pruned")  # fmt: skip
CLAIM_FIELDS = ("claim", "labels", "total", "holds", "does_not_hold", "zero_by_construction", "inconclusive", "missing",
                "verdict", "so_far")  # fmt: skip


def comparison_table(comparisons: Sequence[Comparison], holm: str) -> str:
    """One line per comparison: b − a with its 95% CI, raw and Holm-adjusted p, the MDE at 80% power, the verdict.
    The "n × runs" column names what each example's correctness is averaged over (seeds, or finding 2's layers)."""
    runs = " or ".join(sorted({c.runs for c in comparisons})) or "seeds"
    lines = [
        f"| model | task | module | comparison | b − a | n × {runs} | difference [95% CI] | p | p (Holm) | MDE | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        p = c.paired
        if c.status == ZERO:
            numbers = ["–", "0 by construction", "–", "–", "–", f"{c.verdict} ({c.note})"]
        elif p is None:
            numbers = ["–", c.status, "–", "–", "–", c.note or "–"]
        else:
            verdict = "–" if c.status == DESCRIPTIVE else c.verdict or "–"
            verdict += f" ({c.note})" if c.note else ""
            mde = "–" if p.mde is None else f"{p.mde:.3f}"
            numbers = [f"{p.n} × {p.seeds}", f"{p.difference:+.3f} [{p.low:+.3f}, {p.high:+.3f}]", fmt_p(p.p_value),
                       fmt_p(c.p_holm), mde, verdict]  # fmt: skip
        lines.append(f"| {c.model} | {task_label(c.task)} | {module_label(c.module)} | {c.label} | {_arm(c.b)} − {_arm(c.a)} | "
                     + " | ".join(numbers) + " |")  # fmt: skip
    return "\n".join(lines) + f"\n\np (Holm): {holm}. MDE: the smallest true difference detected with 80% power at α = 0.05."


def _arm(name: str) -> str:
    """`unpruned + batch` in parentheses, so that `pruned − (unpruned + batch)` reads as meant."""
    return f"({name})" if " + " in name else name


def comparison_rows(comparisons: Sequence[Comparison]) -> list[list]:
    """`COMPARISON_FIELDS` per comparison, for the CSV (numbers at full precision, None as empty)."""
    found = []
    for c in comparisons:
        p = c.paired
        stats = [p.n, p.seeds, p.mean_a, p.mean_b, p.difference, p.low, p.high, p.p_value] if p else [None] * 8
        found.append([c.family, c.label, c.model, c.design, c.task, c.module, c.a, c.b, c.status, *stats, c.p_holm,
                      p.mde if p else None, c.verdict, c.runs, c.note])  # fmt: skip
    return found


def missing_comparisons(study: Study) -> list[Comparison]:
    """Every comparison of the design without data yet, in every family and the comparability table (whose main-design
    twins are the family's own C1)."""
    variants = [c for c in study.variants if c.design in VARIANTS]
    return [c for c in (*study.family, *study.layers, *study.collapse, *study.shots, *variants) if c.status == MISSING]


def tables(study: Study) -> dict[str, tuple[list[str], list[list]]]:
    """Every table of the section as (header, rows), by CSV file name."""
    keys = sorted(study.rows[0].bias) if study.rows else []
    searches = [
        [r.model, r.design, r.task, r.module, r.layer, r.rate_star, r.best_calibration, r.n_validation, r.n_test,
         " ".join(map(str, r.seeds)), r.unpruned, r.pruned, *(x for k in keys for x in r.bias[k])]
        for r in study.rows
    ]  # fmt: skip
    claims = [[c.claim, " ".join(c.labels), c.total, c.holds, c.not_hold, c.zero, c.inconclusive, c.missing, c.verdict,
               c.so_far] for c in study.claims]  # fmt: skip
    missing = [["part", p, "", "", "", "", ""] for p in study.missing_parts]
    missing += [["cut part", p, "", "", "", "", ""] for p in study.cut_parts]
    missing += [["comparison", c.label, c.family, c.model, c.design, c.task, c.module] for c in missing_comparisons(study)]
    missing += [["comparison", "Spearman ρ", "finding 4", t.model, MAIN, "", t.module] for t in study.trends if t.verdict is None]
    return {
        "searches.csv": ([*SEARCH_FIELDS, *(f"{k}_{arm}" for k in keys for arm in ("unpruned", "pruned"))], searches),
        "comparisons.csv": (
            list(COMPARISON_FIELDS),
            comparison_rows((*study.family, *study.layers, *study.collapse, *study.shots, *study.variants)),
        ),
        "claims.csv": (list(CLAIM_FIELDS), claims),
        "condition-trends.csv": (
            ["model", "module", "layers", "spearman_rho", "p_value", "verdict"],
            [[t.model, t.module, t.layers, t.rho, t.p_value, t.verdict] for t in study.trends],
        ),
        "cpu-time.csv": (
            ["part", "done", "invocations", "cpu_s", "wall_s"],
            [[c.part, c.done, c.invocations, round(c.cpu_s, 1), round(c.wall_s, 1)] for c in study.cpu],
        ),
        "missing.csv": (["kind", "what", "family", "model", "design", "task", "module"], missing),
    }


def write_tables(study: Study, folder: Path) -> list[Path]:
    """Every table of the section as CSV under `folder` (studies/tables/)."""
    return [write_csv(folder / name, header, rows) for name, (header, rows) in tables(study).items()]


@styled
def forest_plot(family: Sequence[Comparison]) -> Figure | None:
    """C1-C5 per model x task x module: each difference with its 95% CI (filled), 0 by construction (hollow, at 0);
    None when nothing is in yet.  Colours and markers: svdicl.style, one per comparison."""
    shown = [c for c in family if c.status in (TESTED, ZERO)]
    if not shown:
        return None
    groups = list(dict.fromkeys((c.model, c.task, c.module) for c in shown))
    labels = [label for label in CONFIRMATORY_LABELS if any(c.label == label for c in shown)]
    fig = Figure(figsize=(6.0, 1.0 + 0.45 * len(groups)), layout="constrained")
    ax = fig.subplots()
    step = 0.8 / len(CONFIRMATORY_LABELS)
    for i, label in enumerate(CONFIRMATORY_LABELS):
        color, marker = COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]
        if label not in labels:
            continue
        for c in (c for c in shown if c.label == label):
            y = groups.index((c.model, c.task, c.module)) - 0.4 + (i + 0.5) * step
            if c.status == ZERO:
                ax.plot([0], [y], marker=marker, color=color, markerfacecolor="none", ls="none")
                continue
            p = c.paired
            ax.errorbar([p.difference], [y], xerr=[[p.difference - p.low], [p.high - p.difference]], fmt=marker,
                        color=color, capsize=1.5, elinewidth=0.8, ls="none")  # fmt: skip
        ax.plot([], [], marker=marker, color=color, ls="none", label=label)
    ax.axvline(0, color=BASELINE_COLOR, lw=0.8)
    ax.axvline(0.03, color=BASELINE_COLOR, lw=0.8, ls=":")
    ax.set_yticks(range(len(groups)), [f"{m} {task_label(t)} {module_label(mod)}" for m, t, mod in groups])
    ax.set_ylim(len(groups) - 0.5, -0.5)
    ax.set_xlabel("paired difference in accuracy with its 95% CI (hollow: 0 by construction; dotted: +0.03)")
    fig.legend(loc="outside upper center", ncols=len(labels), frameon=False)
    return fig
