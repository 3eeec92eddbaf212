"""docs/STUDY.md's results section from the study's stores: `python studies/study.py report` calls `write_report`.

The section is Markdown between `<!-- results:start -->` and `<!-- results:end -->` (the rest of the page, the
pre-registered design, is never touched); its tables are also CSV files under studies/tables/ and its figure a PNG
under docs/figures/study/.  The same stores give the same bytes: nothing in it depends on the clock or the machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from analysis import CpuTime, Study, analyse
from family import HOLDS, MISSING, NOT_APPLICABLE, NOT_HOLD, OPEN, ZERO, ClaimVerdict, Comparison
from findings import MAIN, VARIANTS, Row, planned
from render import FIGURE, comparison_table, forest_plot, missing_comparisons, write_tables

from svdicl.report.files import save_figure
from svdicl.report.labels import fmt, fmt_p, module_label, task_label

START, END = "<!-- results:start -->", "<!-- results:end -->"
PRE_REGISTERED_SEEDS = 5


def write_report(studies_dir: Path, doc: Path) -> None:
    """Rewrite `doc`'s results section, the CSV tables under `studies_dir`/tables and the figure beside `doc`."""
    import study  # studies/study.py: the parts, in their pre-registered order

    text = doc.read_text(encoding="utf-8")
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"report: {doc} needs one {START} line and one {END} line after it; restore them")
    parts = study.parts()
    result = analyse(Path(studies_dir), planned(parts), [p.name for p in parts], {p.name for p in parts if p.cut})
    write_tables(result, Path(studies_dir) / "tables")
    drawn = forest_plot(result.family)
    if drawn is not None:
        save_figure(drawn, (doc.parent / FIGURE).with_suffix(""), formats=("png",))
    head, rest = text.split(START)
    section = results_section(result, FIGURE.as_posix() if drawn is not None else None)
    doc.write_text(head + START + "\n" + section + END + rest.split(END, 1)[1], encoding="utf-8")


def results_section(study: Study, figure: str | None) -> str:
    """The Markdown between the markers."""
    parts = [
        _status(study),
        "### Verdicts per claim\n\n" + _claims(study.claims, study.family),
        _main(study, figure),
        _layers(study),
        _comparability(study),
        "### CPU time per part\n\n" + _cpu(study.cpu),
        "### What is missing\n\n" + _missing(study),
    ]
    return "\n\n".join(parts) + "\n"


def _status(study: Study) -> str:
    main = [p for p in study.plans if p.design == MAIN]
    rows = [r for r in study.rows if r.design == MAIN]
    done = sum(c.done for c in study.cpu)
    seeds = sorted({s for r in study.rows for s in r.seeds})
    tested = [c.paired.mde for c in study.family if c.status == "tested" and c.paired is not None and c.paired.mde is not None]
    cut = f" and {len(study.cut_parts)} cut (below)" if study.cut_parts else ""
    open_claims = (
        " A claim whose comparisons are not all in has the verdict **open** (Holm's family is incomplete too); beside "
        "it, *so far*: the rule applied to the comparisons in hand."
        if any(c.missing for c in study.claims)
        else ""
    )
    lines = [
        f"*Written by `python studies/study.py report` from the result stores under `studies/`: {done} of "
        f"{len(study.cpu)} parts finished{cut}, {len(rows)} of the main design's {len(main)} searches in.{open_claims} "
        "Every table is also a CSV file under `studies/tables/`.*",
        "",
    ]
    if rows:
        n_test = ", ".join(f"{task_label(t)} {n}" for t, n in dict.fromkeys((r.task, r.n_test) for r in rows))
        n_val = sorted({r.n_validation for r in rows})
        lines.append(
            f"**Samples.** Test examples per task: {n_test}; validation: {', '.join(map(str, n_val))} (class-balanced). "
            f"Seeds {', '.join(map(str, seeds))}: {len(seeds)} of the {PRE_REGISTERED_SEEDS} pre-registered "
            f"({'the others cut, below' if any('/seeds-' in p for p in study.cut_parts) else 'seeds 3 and 4 run last'}"
            "). Each comparison pairs the same test examples, each example's correctness averaged over the seeds "
            "first (n = test examples)."
        )
    if tested:
        ordered = sorted(tested)
        lines.append(
            f"**Minimum detectable effect** (80% power, α = 0.05, from the observed SD of the paired differences) of "
            f"the {len(ordered)} tested comparisons: median {ordered[len(ordered) // 2]:.3f}, from {ordered[0]:.3f} to "
            f"{ordered[-1]:.3f} (accuracy, 0-1)."
        )
    cut = (
        '; when CPU time could not buy them, in the pre-registered order (the amendment "Cut, 2026-12-05" under '
        f"What CPU time buys), {len(study.cut_parts)} of {len(study.cpu)} parts: "
        f"{', '.join(f'`{p}`' for p in study.cut_parts)}. "
        "Their searches are left out of every family and claim (Holm runs over the comparisons that were made); "
        "finding 4 keeps their models, whose condition numbers need no scoring"
        if study.cut_parts
        else ""
    )
    unfinished = (
        f' {len(study.missing_parts)} of {len(study.cpu)} parts are not finished yet (listed under "What is missing"):'
        " their comparisons are missing, never counted as either verdict."
        if study.missing_parts
        else ""
    )
    start = "Nothing from the start" if study.shots else "Finding 3 (fewer shots slow the collapse) from the start"
    lines.append(f"**Cut.** {start}{cut}.{unfinished}")
    return "\n\n".join(line for line in lines if line)


def _claims(claims: Sequence[ClaimVerdict], family: Sequence[Comparison]) -> str:
    head = "| claim | comparisons | holds | does not hold (0 by construction) | inconclusive | missing | verdict | so far |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        verdict = f"**{c.verdict}**"
        lines.append(f"| {c.claim} ({', '.join(c.labels)}) | {c.total} | {c.holds} | {c.not_hold} ({c.zero}) | "
                     f"{c.inconclusive} | {c.missing} | {verdict} | {c.so_far if c.verdict == OPEN else ''} |")  # fmt: skip
    rule = (
        "Per comparison: *holds* = Holm-adjusted p < 0.05 and a gain; *does not hold* = the 95% CI lies below "
        "+0.03 or a significant loss (a comparison 0 by construction, ξ* = 0, counts here without a test); "
        "*inconclusive* otherwise. Per claim: holds if at least half of its comparisons hold, does not hold if at "
        "least half do not, inconclusive otherwise. Finding 2: the rule applied to `last two − first two`; "
        "finding 4: holds where Spearman's ρ > 0 with p < 0.05, does not hold where ρ ≤ 0."
    )
    return "\n\n".join(["\n".join(lines), rule, *_c2_without_gain(family)])


def _c2_without_gain(family: Sequence[Comparison]) -> list[str]:
    """The C2 comparisons that hold where the same search's C1 does not: pruning gains under 3 points (or loses) over
    the unpruned model, so its edge over the best calibration is the calibration losing on test, not pruning helping
    (at ξ* = 0 the pruned arm is the unpruned model itself).  The pre-registered rule counts them; the reader is told
    which they are and what they show."""
    c1 = {(c.model, c.design, c.task, c.module): c.verdict for c in family if c.label == "C1"}
    held = [c for c in family if c.label == "C2" and c.verdict == HOLDS]
    found = [c for c in held if c1.get((c.model, c.design, c.task, c.module)) == NOT_HOLD]
    if not found:
        return []
    named = "; ".join(f"{c.model} {task_label(c.task)} {module_label(c.module)}{' at ξ* = 0' if c.note else ''}" for c in found)
    return [
        f"{len(found)} of the {len(held)} C2 comparisons that hold come with a C1 that does not hold ({named}): "
        "there pruning does not raise accuracy by 3 points (at ξ* = 0 the pruned arm is the unpruned model), so its "
        "edge over the best calibration (chosen on class-balanced validation) is that calibration losing accuracy "
        "on the test set, not pruning helping. The rule counts them as it was registered; the table below marks "
        "the ones at ξ* = 0."
    ]


def _rows_table(rows: Sequence[Row]) -> str:
    head = ("| model | task | module | layer | ξ* | n val / test / seeds | accuracy unpruned → pruned | best calibration "
            "| top-answer share | balanced accuracy | AUC |")  # fmt: skip
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bias = [f"{fmt(r.bias[k][0], 3)} → {fmt(r.bias[k][1], 3)}" for k in ("top_answer_share", "balanced_accuracy", "auc")]
        lines.append(
            f"| {r.model} | {task_label(r.task)} | {module_label(r.module)} | {r.layer} | {r.rate_star:g} | "
            f"{r.n_validation} / {r.n_test} / {len(r.seeds)} | {r.unpruned:.3f} → {r.pruned:.3f} | {r.best_calibration or '–'} "
            f"| {' | '.join(bias)} |"
        )
    return "\n".join(lines)


def _main(study: Study, figure: str | None) -> str:
    rows = [r for r in study.rows if r.design == MAIN]
    if not rows:
        return "### Main design: Algorithm 1 against calibration and the null controls\n\nNo search of the main design is in yet."
    shown = [c for c in study.family if c.status not in (MISSING, NOT_APPLICABLE)]
    text = [
        "### Main design: Algorithm 1 against calibration and the null controls",
        _rows_table(rows),
        "Accuracy: correctness averaged over test examples and seeds; best calibration: the highest validation "
        "accuracy on the unpruned model (C2, C3); top-answer share, balanced accuracy and AUC (binary tasks): "
        "means over seeds, unpruned → pruned.",
        comparison_table(shown, holm="Holm over the whole C1-C5 family"),
    ]
    if figure is not None:
        text.append(f"![C1-C5: paired differences with 95% CIs]({figure})")
    return "\n\n".join(text)


def _layers(study: Study) -> str:
    text = ["### Layer choice, and the paper's findings 2 to 4"]
    layers = [c for c in study.layers if c.status != MISSING]
    text.append(
        "Pruned test accuracy at Algorithm 1's layer − at L−2 and − at the oracle layer (paired over the seeds both "
        "records share), Holm over this family:\n\n" + (comparison_table(layers, holm="Holm over the layer-choice family")
                                                           if layers else "No pair of records is in yet.")
    )  # fmt: skip
    collapse = [c for c in study.collapse if c.status != MISSING]
    shots = [c for c in study.shots if c.status != MISSING]
    text.append(
        "Finding 2: validation accuracy at ξ = 0.995 (seed 0, the sweeps' balanced validation subset), each example "
        "averaged over the first two or the last two layers; only `last two − first two` is judged (Holm over those):"
        "\n\n" + (comparison_table(collapse, holm="Holm over finding 2") if collapse else "No layer sweep is in yet.")
    )
    if study.shots:
        text.append(
            'Finding 3 (amendment "Finding 3"): an example\'s retention at k demonstrations is its validation '
            "correctness averaged over layers 0 and 1, the 7 rates > 0 and the seeds, minus its unpruned correctness "
            "(averaged over the seeds); retention with fewer demonstrations − with 10 is judged (Holm over those), the "
            "unpruned differences are descriptive:\n\n"
            + (comparison_table(shots, holm="Holm over finding 3") if shots else "No shots sweep is complete yet.")
        )
    trend_rows = ["| model | module | layers | Spearman ρ | p | verdict |", "|---|---|---|---|---|---|"]
    trend_rows += [f"| {t.model} | {module_label(t.module)} | {t.layers or '–'} | {fmt(t.rho, 3)} | {fmt_p(t.p_value)} | "
                   f"{t.verdict or 'missing'} |" for t in study.trends]  # fmt: skip
    text.append("Finding 4: Spearman's ρ of the per-layer condition number with the layer index (exact numbers, no "
                "sampling: p only says how unlikely such an order is for random ranks):\n\n" + "\n".join(trend_rows))  # fmt: skip
    return "\n\n".join(text)


def _comparability(study: Study) -> str:
    rows = {(r.model, r.design, r.task, r.module): r for r in study.rows}
    head = "| design | model | task | module | layer | ξ* | accuracy unpruned → pruned | pruned − unpruned [95% CI] | p |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for c in study.variants:
        r = rows.get((c.model, c.design, c.task, c.module))
        where = f"| {c.design} | {c.model} | {task_label(c.task)} | {module_label(c.module)} |"
        if r is None:
            lines.append(f"{where} – | – | – | missing | – |")
            continue
        delta = "0 (ξ* = 0)" if c.status == ZERO else _delta(c)
        p = fmt_p(c.paired.p_value) if c.paired else "–"
        lines.append(f"{where} {r.layer} | {r.rate_star:g} | {r.unpruned:.3f} → {r.pruned:.3f} | {delta} | {p} |")
    return (
        "### Comparability with the paper (descriptive, outside the family)\n\n"
        f"Each variant ({', '.join(VARIANTS)}) beside the main-design search of the same task and module; raw p, "
        "no verdict.\n\n" + "\n".join(lines)
    )


def _delta(c: Comparison) -> str:
    p = c.paired
    return "–" if p is None else f"{p.difference:+.3f} [{p.low:+.3f}, {p.high:+.3f}]"


def _cpu(cpu: Sequence[CpuTime]) -> str:
    lines = ["| part | status | invocations | CPU hours (user + sys) | wall hours |", "|---|---|---|---|---|"]
    for c in cpu:
        status = "done" if c.done else "cut" if c.cut else "stopped, resumes" if c.invocations else "running or to come"
        lines.append(f"| {c.part} | {status} | {c.invocations} | {c.cpu_s / 3600:.2f} | {c.wall_s / 3600:.2f} |")
    total = sum(c.cpu_s for c in cpu) / 3600
    return "\n".join(lines) + f"\n\nIn all: {total:.2f} CPU hours (studies/cpu-time.tsv, one row per invocation)."


def _missing(study: Study) -> str:
    cut = f" ({len(study.cut_parts)} cut: the paragraph **Cut** at the top)" if study.cut_parts else ""
    text = [f"Parts not finished: {', '.join(f'`{p}`' for p in study.missing_parts) or 'none'}{cut}."]
    gaps: dict[tuple[str, str, str, str], list[str]] = {}
    for c in missing_comparisons(study):
        gaps.setdefault((c.family, c.model, c.design, c.module), []).append(f"{c.task} {c.label}")
    if gaps:
        bullets = [f"- {family}, {model} {design} {module_label(module)}: {_grouped(items)}"
                   for (family, model, design, module), items in gaps.items()]  # fmt: skip
        text.append("Comparisons without data (each a line of `studies/tables/missing.csv`):\n\n" + "\n".join(bullets))
    absent = [f"{t.model} {module_label(t.module)}" for t in study.trends if t.verdict is None]
    if absent:
        text.append(f"Finding 4 without condition numbers (no search of the model started): {', '.join(absent)}.")
    return "\n\n".join(text)


def _grouped(items: Sequence[str]) -> str:
    """`sst2 C1, sst2 C2, rte C1` -> `SST-2 (C1, C2); RTE (C1)`."""
    by_task: dict[str, list[str]] = {}
    for item in items:
        task, label = item.split(" ", 1)
        by_task.setdefault(task, []).append(label)
    return "; ".join(f"{task_label(t)} ({', '.join(labels)})" for t, labels in by_task.items())
