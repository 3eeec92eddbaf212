"""Which layer: the layer-choice family (Algorithm 1's κ-chosen layer against L−2 and the oracle layer), the paper's
finding 2 (deep layers tolerate ξ = 0.995, shallow ones collapse) from the layer sweeps' validation cells, and its
finding 4 (condition numbers grow with depth) from the per-layer condition numbers in each model's main store."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from family import DESCRIPTIVE, HOLDS, INCONCLUSIVE, MISSING, NOT_HOLD, TESTED, ZERO, Comparison
from findings import DEEP_RATE, LAYER_DESIGNS, MAIN, SWEEPS, Planned, Search, cell_answers
from scipy import stats as scipy_stats

from svdicl.experiments.condition import CSV_FILE, layer_conditions, read_conditions
from svdicl.stats import paired_by_id
from svdicl.store import CELLS_FILE, Store

ORACLE_STORE = "layer-oracle"  # the sweeps write their cells where the oracle searches read them
COLLAPSE = ("first two − unpruned", "last two − unpruned", "last two − first two")


def layer_choice(plans: Sequence[Planned], searches: Sequence[Search]) -> list[Comparison]:
    """Pruned test accuracy at Algorithm 1's layer − at the other design's layer, per planned layer-fixed or
    layer-oracle search: paired on the same test examples, over the seeds the two records share.  ZERO when both
    pruned the same way (the same edit: the same layer and ξ*, or ξ* = 0 at both)."""
    index = {s.key: s for s in searches}
    found = []
    for plan in plans:
        if plan.design not in LAYER_DESIGNS:
            continue
        mine = index.get((plan.model, MAIN, plan.task, plan.module))
        other = index.get((plan.model, plan.design, plan.task, plan.module))
        base = Comparison("layer choice", LAYER_DESIGNS[plan.design], plan.model, plan.design, plan.task, plan.module,
                          f"pruned at the {plan.design} layer", "pruned at Algorithm 1's layer", MISSING)  # fmt: skip
        if mine is None or other is None:
            found.append(dataclasses.replace(base, note="no Algorithm 1 record" if mine is None else f"no {plan.design} record"))
            continue
        a, b = other.arm("pruned"), mine.arm("pruned")
        shared = [seed for seed in mine.seeds if seed in other.seeds]
        base = dataclasses.replace(base, a=f"pruned at layer {other.record['layer']} (ξ* {other.record['rate_star']:g})",
                                   b=f"pruned at layer {mine.record['layer']} (ξ* {mine.record['rate_star']:g})",
                                   note=f"seeds {','.join(map(str, shared))}")  # fmt: skip
        if not shared:
            found.append(dataclasses.replace(base, note="the two records share no seed"))
        elif other.edit(a) == mine.edit(b):
            found.append(dataclasses.replace(base, status=ZERO, note=f"the same edit ({mine.edit(b)})"))
        else:
            paired = paired_by_id(other.runs(a, shared), mine.runs(b, shared))
            found.append(dataclasses.replace(base, status=TESTED, paired=paired))
    return found


def layer_count(searches: Sequence[Search], model: str, module: str) -> int | None:
    """The model's number of layers: the per-layer condition numbers of a search, or a layer-fixed search's L−2 + 2."""
    for search in searches:
        if search.model == model and search.record["module"] == module:
            per_layer = (search.record.get("condition") or {}).get("per_layer")
            if per_layer:
                return len(per_layer)
            if search.design == "layer-fixed":
                return search.record["layer"] + 2
    return None


def collapse(studies: Path, plans: Sequence[Planned], searches: Sequence[Search]) -> list[Comparison]:
    """Finding 2 per planned layer sweep: validation accuracy at ξ = 0.995, the first two layers and the last two
    (each example's correctness averaged over the two layers) against the unpruned model and against each other
    (seed 0, the sweep's balanced validation subset).  Only `last two − first two` is tested by the verdict rule."""
    found = []
    for plan in (p for p in plans if p.design == SWEEPS):
        folder = studies / plan.model / ORACLE_STORE
        count = layer_count(searches, plan.model, plan.module)
        runs = _sweep_runs(folder, plan, count) if count and (folder / CELLS_FILE).is_file() else None
        for label in COLLAPSE:
            base = Comparison("finding 2", label, plan.model, plan.design, plan.task, plan.module,
                              *reversed(label.split(" − ")), MISSING, runs="layers")  # fmt: skip
            if runs is None:
                note = "number of layers unknown: no search record of this model" if not count else "sweep cells missing"
                found.append(dataclasses.replace(base, note=note))
                continue
            a, b = (runs[name] for name in reversed(label.split(" − ")))
            status = TESTED if label == COLLAPSE[-1] else DESCRIPTIVE
            found.append(dataclasses.replace(base, status=status, paired=paired_by_id(a, b), note=f"{count} layers"))
    return found


def _sweep_runs(folder: Path, plan: Planned, layers: int) -> dict[str, list] | None:
    """Per arm of finding 2, two runs of (id, correct): the two layers, or the unpruned cell twice (the pairing of
    `paired_by_id` averages the two columns of each arm per example)."""
    store = Store(folder, readonly=True)
    found = store.cells(task=plan.task, split="validation", seed=0, modules=plan.module, rate=DEEP_RATE)
    if not found:
        return None
    key = found[0].key  # the other cells differ from it only in the edit: the same data, limit and options
    edits = {layer: f"{layer}:{plan.module}:{DEEP_RATE:g}" for layer in (0, 1, layers - 2, layers - 1)}
    runs = {layer: cell_answers(store, dataclasses.replace(key, edit=edit)) for layer, edit in edits.items()}
    unpruned = cell_answers(store, dataclasses.replace(key, edit="none"))
    if unpruned is None or any(run is None for run in runs.values()):
        return None
    return {
        "unpruned": [unpruned] * 2,
        "first two": [runs[0], runs[1]],
        "last two": [runs[layers - 2], runs[layers - 1]],
    }


@dataclass(frozen=True)
class Trend:
    """Finding 4 for one model x module: Spearman's ρ of the per-layer condition number with the layer index."""

    model: str
    module: str
    layers: int
    rho: float | None
    p_value: float | None

    @property
    def verdict(self) -> str | None:
        """Holds: ρ > 0 with p < 0.05; does not hold: ρ ≤ 0; inconclusive: a positive ρ that is not significant."""
        if self.rho is None or self.p_value is None:
            return None
        if self.rho > 0 and self.p_value < 0.05:
            return HOLDS
        return NOT_HOLD if self.rho <= 0 else INCONCLUSIVE


def trends(studies: Path, plans: Sequence[Planned]) -> list[Trend]:
    """Finding 4 per model x module of the main design, from the conditions.csv that the model's first search wrote
    to its store before scoring (the numbers its records copy; exact, so a model whose searches were cut has them)."""
    found = []
    for model, module in dict.fromkeys((p.model, p.module) for p in plans if p.design == MAIN):
        rows = studies / model / MAIN / CSV_FILE
        found_rows = read_conditions(rows) if rows.is_file() else []
        per_layer = layer_conditions(found_rows, module) if any(r.group == module for r in found_rows) else {}
        if not per_layer:
            found.append(Trend(model, module, 0, None, None))
            continue
        result = scipy_stats.spearmanr(list(per_layer), list(per_layer.values()))  # by layer; inf: a singular matrix
        found.append(Trend(model, module, len(per_layer), float(result.statistic), float(result.pvalue)))
    return found
