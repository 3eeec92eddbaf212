"""The whole analysis of docs/STUDY.md at any stage of completion: what the stores hold, set against what the design
plans, every comparison tested, missing or 0 by construction, each family Holm-adjusted, each claim counted."""

from __future__ import annotations

import csv
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from family import HOLDS, INCONCLUSIVE, NOT_HOLD, ClaimVerdict, Comparison, adjust, claim_verdict
from findings import MAIN, VARIANTS, Planned, Row, confirmatory, load_searches, row
from layers import COLLAPSE, LAYER_DESIGNS, Trend, collapse, layer_choice, trends
from shots import FEWER, IN_ALL, MOST, fewer_shots

CLAIMS = (
    ("pruning raises ICL accuracy (paper finding 1)", ("C1",)),
    ("pruning beats the best calibration", ("C2",)),
    ("pruning adds to calibration", ("C3",)),
    ("the effect is specific to the smallest singular directions", ("C4", "C5")),
)
LAYER_CLAIM = ("the condition number picks a good layer", tuple(LAYER_DESIGNS.values()))
COLLAPSE_CLAIM = ("deep layers tolerate ξ = 0.995, shallow ones collapse (paper finding 2)", (COLLAPSE[-1],))
SHOTS_CLAIM = ("fewer shots slow the collapse after heavy shallow pruning (paper finding 3)",
               tuple(f"retention, {IN_ALL[k]} − {IN_ALL[MOST]} demonstrations" for k in FEWER))  # fmt: skip
TREND_CLAIM = "condition numbers grow with depth (paper finding 4)"


@dataclass(frozen=True)
class CpuTime:
    """One part's CPU time (user + system) over all its invocations in studies/cpu-time.tsv."""

    part: str
    invocations: int
    cpu_s: float
    wall_s: float
    done: bool
    cut: bool  # docs/STUDY.md "Cut": CPU time could not buy it


def cpu_times(log: Path, parts: Sequence[str], cut: Collection[str] = ()) -> list[CpuTime]:
    """Per part, in the design's order: every invocation logged (a part stopped at --until resumes in the next)."""
    rows = []
    if log.is_file():
        with log.open(encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    found = []
    for part in parts:
        mine = [r for r in rows if r["part"] == part]
        cpu = sum(float(r["user_s"]) + float(r["sys_s"]) for r in mine)
        wall = sum(float(r["wall_s"]) for r in mine)
        found.append(CpuTime(part, len(mine), cpu, wall, any(r["exit"] == "0" for r in mine), part in cut))
    return found


@dataclass(frozen=True)
class Study:
    """Everything the results section shows; every comparison of the design is in one of the lists, even when missing."""

    plans: tuple[Planned, ...]  # those of the parts not cut
    rows: tuple[Row, ...]  # one per search record of a planned search, in the design's order
    family: tuple[Comparison, ...]  # C1-C5, Holm over all of it
    layers: tuple[Comparison, ...]  # the layer-choice family, Holm over it
    collapse: tuple[Comparison, ...]  # finding 2 (its tested comparisons Holm-adjusted together)
    shots: tuple[Comparison, ...]  # finding 3 (its tested comparisons Holm-adjusted together)
    trends: tuple[Trend, ...]  # finding 4
    variants: tuple[Comparison, ...]  # C1 of the comparability designs and of their main-design rows, not adjusted
    claims: tuple[ClaimVerdict, ...]
    cpu: tuple[CpuTime, ...]

    @property
    def missing_parts(self) -> list[str]:
        """The parts not cut that studies/cpu-time.tsv does not log as finished."""
        return [c.part for c in self.cpu if not c.done and not c.cut]

    @property
    def cut_parts(self) -> list[str]:
        """The parts cut unfinished (docs/STUDY.md "Cut")."""
        return [c.part for c in self.cpu if not c.done and c.cut]


def analyse(studies: Path, plans: Sequence[Planned], parts: Sequence[str], cut: Collection[str] = ()) -> Study:
    """The study as its stores under `studies` hold it, against the planned searches and the parts that run them.
    The searches of `cut` parts leave every family (Holm runs over the rest); finding 4 keeps their models, whose
    condition numbers were computed before any scoring."""
    shown = trends(studies, plans)
    plans = [p for p in plans if p.part not in cut]
    searches = load_searches(studies)
    index = {s.key: s for s in searches}
    searched = [p for p in plans if (p.model, p.design, p.task, p.module) in index]
    rows = tuple(row(index[(p.model, p.design, p.task, p.module)]) for p in searched)
    main = [p for p in plans if p.design == MAIN]
    family = adjust([c for p in main for c in confirmatory(p, index.get((p.model, p.design, p.task, p.module)))])
    layers = adjust(layer_choice(plans, searches))
    found = adjust(collapse(studies, plans, searches))
    fewer = adjust(fewer_shots(studies, plans))
    variants = []
    for plan in (p for p in plans if p.design in VARIANTS):
        twin = Planned(plan.model, MAIN, plan.task.removesuffix("-authors"), plan.module, "")
        for p in (plan, twin):
            variants += confirmatory(p, index.get((p.model, p.design, p.task, p.module)), ("C1",), "comparability")
    claims = [claim_verdict(name, labels, family) for name, labels in CLAIMS]
    claims += [claim_verdict(*LAYER_CLAIM, layers), claim_verdict(*COLLAPSE_CLAIM, found),
               claim_verdict(*SHOTS_CLAIM, fewer), trend_verdict(shown)]  # fmt: skip
    return Study(
        plans=tuple(plans),
        rows=rows,
        family=tuple(family),
        layers=tuple(layers),
        collapse=tuple(found),
        shots=tuple(fewer),
        trends=tuple(shown),
        variants=tuple(variants),
        claims=tuple(claims),
        cpu=tuple(cpu_times(studies / "cpu-time.tsv", parts, cut)),
    )


def trend_verdict(found: Sequence[Trend]) -> ClaimVerdict:
    """Finding 4 counted like a claim: one verdict per model x module."""
    verdicts = [t.verdict for t in found]
    return ClaimVerdict(TREND_CLAIM, ("Spearman ρ",), len(found), verdicts.count(HOLDS), verdicts.count(NOT_HOLD),
                        verdicts.count(INCONCLUSIVE), 0, verdicts.count(None))  # fmt: skip
