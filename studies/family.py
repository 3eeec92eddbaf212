"""The rules of docs/STUDY.md "Analysis (pre-registered)": a comparison's verdict, Holm over a family, a claim's verdict.

Pure functions of numbers svdicl.stats computed (no file is read here), so each rule is tested at its boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from svdicl.stats import PairedComparison, holm

ALPHA = 0.05
MARGIN = 0.03  # a gain smaller than 3 points counts as none (the study was sized for 3-5 point effects)
HOLDS, NOT_HOLD, INCONCLUSIVE, OPEN = "holds", "does not hold", "inconclusive", "open"
TESTED, ZERO, MISSING, NOT_APPLICABLE = "tested", "0 by construction", "missing", "n/a"
DESCRIPTIVE = "descriptive"  # computed and shown, outside any family and verdict
CONFIRMATORY_LABELS = ("C1", "C2", "C3", "C4", "C5")


@dataclass(frozen=True)
class Comparison:
    """One comparison of a family: arm `b` − arm `a` on the same examples, each example's correctness averaged over
    its `runs` first (the seeds; finding 2's two layers per arm).  `status`: TESTED (with `paired`), ZERO (the two
    arms give the same answers by construction: counted as "no gain" without a test, outside Holm), MISSING (no data
    yet), NOT_APPLICABLE (not in the design) or DESCRIPTIVE (computed, never judged)."""

    family: str
    label: str  # C1..C5, "vs L−2", "vs oracle", "last two − first two"
    model: str
    design: str
    task: str
    module: str
    a: str
    b: str
    status: str
    paired: PairedComparison | None = None
    p_holm: float | None = None
    note: str = ""
    runs: str = "seeds"  # what `paired`'s per-example correctness is averaged over, for the tables' "n × runs"

    @property
    def verdict(self) -> str | None:
        """The rule's verdict: ZERO comparisons do not hold; None while missing, untested or not yet Holm-adjusted."""
        if self.status == ZERO:
            return NOT_HOLD
        if self.status != TESTED or self.paired is None or self.p_holm is None:
            return None
        return verdict(self.paired.difference, self.paired.high, self.p_holm)


def verdict(difference: float, ci_high: float, p_holm: float) -> str:
    """Holds: Holm-adjusted p < 0.05 and a gain.  Does not hold: the 95% CI lies below +0.03, or a significant loss.
    Inconclusive: anything else (the CI still holds gains of 3 points or more and the test is not significant)."""
    if p_holm < ALPHA and difference > 0:
        return HOLDS
    if ci_high < MARGIN or (p_holm < ALPHA and difference < 0):
        return NOT_HOLD
    return INCONCLUSIVE


def adjust(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """Holm over every tested comparison of the list at once; the others keep p_holm None."""
    tested = [i for i, c in enumerate(comparisons) if c.status == TESTED and c.paired is not None]
    adjusted = holm([comparisons[i].paired.p_value for i in tested]) if tested else []
    found = list(comparisons)
    for i, p in zip(tested, adjusted, strict=True):
        found[i] = replace(found[i], p_holm=p)
    return found


@dataclass(frozen=True)
class ClaimVerdict:
    """A claim's comparisons counted by verdict.  `not_hold` includes the `zero` ones (no gain by construction)."""

    claim: str
    labels: tuple[str, ...]
    total: int
    holds: int
    not_hold: int
    inconclusive: int
    zero: int
    missing: int

    @property
    def so_far(self) -> str:
        """The rule on the comparisons in hand: holds if at least half hold, does not hold if at least half do not."""
        return claim_rule(self.holds, self.not_hold, self.total - self.missing)

    @property
    def verdict(self) -> str:
        """The rule over the whole design; OPEN while any comparison is missing (Holm's family is then incomplete too)."""
        return OPEN if self.missing else claim_rule(self.holds, self.not_hold, self.total)


def claim_rule(holds: int, not_hold: int, total: int) -> str:
    """Holds if at least half hold; does not hold if at least half do not; inconclusive otherwise (and with none)."""
    if total and 2 * holds >= total:
        return HOLDS
    if total and 2 * not_hold >= total:
        return NOT_HOLD
    return INCONCLUSIVE


def claim_verdict(claim: str, labels: Sequence[str], comparisons: Sequence[Comparison]) -> ClaimVerdict:
    """Count the comparisons whose label is one of `labels` (those not in the design left out)."""
    mine = [c for c in comparisons if c.label in labels and c.status != NOT_APPLICABLE]
    verdicts = [c.verdict for c in mine]
    return ClaimVerdict(
        claim=claim,
        labels=tuple(labels),
        total=len(mine),
        holds=verdicts.count(HOLDS),
        not_hold=verdicts.count(NOT_HOLD),
        inconclusive=verdicts.count(INCONCLUSIVE),
        zero=sum(c.status == ZERO for c in mine),
        missing=sum(c.status == MISSING for c in mine),
    )
