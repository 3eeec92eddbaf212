"""Algorithm 1 side by side: pruning against the fixes that change no weight, on the same test examples.

A pruning "gain" can be a shift of the model's label prior, which calibration gets for free,
or the effect of any perturbation of that size, which a null control reproduces.  `svdicl
search` therefore scores these arms on the same test examples and seeds:

    unpruned                      the reference of every paired comparison
    unpruned + <method>           each calibration of svdicl.calibration, on the unpruned model
    pruned                        the ξ*-pruned model (Algorithm 1)
    pruned + <method>             that calibration on the model pruned at ξ*_method, the rate
                                  chosen on validation under the same calibration
    random subspace [+ <method>]  the null controls (svdicl.prune) at ξ*, read raw and under each
    norm-matched noise [+ ...]    calibration whose ξ*_method is ξ*: the same rank from random
                                  singular directions; a perturbation of the same norm.  With the
                                  group calibrated-controls also at every other ξ*_method > 0 (two
                                  more test cells per distinct rate: the question of C4/C5 asked
                                  again under each calibration)

Every arm gives its metric (mean over seeds, ± their SD), a CI over examples [Wilson where the
test has at most 100 examples and the metric is accuracy, else the bootstrap], the paired
difference in per-example correctness against the unpruned arm (seeds averaged per example,
svdicl.stats.paired_comparison: its CI and sign-flip p), for a calibrated pruned or control arm
also the paired difference against the unpruned model under the same calibration (does pruning
add to the calibration?), all p-values of one search Holm-adjusted as one family, and the
bias-aware metrics (svdicl.bias).  An arm that reads the same cells
the same way as an earlier one (`pruned` when ξ* = 0) says so (`same_as`) and is left out of
the Holm family, so duplicates do not weaken the correction.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from svdicl.calibration import METHODS
from svdicl.errors import SvdiclError
from svdicl.stats import Estimate, holm, paired_by_id, seed_mean_ci, wilson_interval
from svdicl.store import Cell, Store

GROUPS = ("calibration", "controls", "calibrated-controls")  # optional arm groups; unpruned and pruned are always there
WILSON_MAX_N = 100
BIAS = ("balanced_accuracy", "top_answer_share", "auc")


def parse_arms(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """`all` (the default), `none`, or a comma list of calibration, controls, calibrated-controls (which needs both
    others: the controls at each calibrated arm's own rate)."""
    if value is None:
        return GROUPS
    items = value.split(",") if isinstance(value, str) else list(value)
    names = {str(item).strip().lower() for item in items if str(item).strip()}
    if names <= {"none"}:
        return ()
    if "all" in names:
        return GROUPS
    unknown = sorted(names - set(GROUPS))
    if unknown:
        raise SvdiclError(f"unknown arm group {unknown[0]!r}; use all, none or a comma list of {', '.join(GROUPS)}")
    if "calibrated-controls" in names and not {"calibration", "controls"} <= names:
        raise SvdiclError("arm group calibrated-controls needs calibration and controls; add them, or use --arms all")
    return tuple(g for g in GROUPS if g in names)


@dataclass(frozen=True)
class Arm:
    """One way of answering the test examples: an edit's cells (one per seed), read raw or calibrated."""

    name: str
    rate: float
    cells: tuple[Cell, ...]
    calibration: str | None = None
    control: str | None = None

    def samples(self, store: Store) -> list[list[dict]]:
        """Per seed, every example's id, gold, prediction and correctness under this arm."""
        runs = []
        for cell in self.cells:
            rows = []
            for s in store.samples(cell):
                answer = s if self.calibration is None else s["calibrated"][self.calibration]
                rows.append({"id": s["id"], "gold": s["gold"], "prediction": answer["prediction"], "correct": answer["correct"]})
            runs.append(rows)
        return runs

    def metric(self, name: str) -> str:
        """The cell metric this arm reads: `name`, or `<calibration>:name` for a calibrated arm."""
        return name if self.calibration is None else f"{self.calibration}:{name}"


def arm_name(calibration: str | None = None, control: str | None = None, pruned: bool = False) -> str:
    """The arm's display name, e.g. `pruned + batch` or `random subspace + contextual`."""
    base = control or ("pruned" if pruned else "unpruned")
    return base if calibration is None else f"{base} + {calibration}"


def summarize(store: Store, arms: Sequence[Arm], metric: str, num_classes: int) -> list[dict]:
    """One entry per arm, the first (the unpruned model) the reference of every paired difference."""
    reference = [[(s["id"], float(s["correct"])) for s in run] for run in arms[0].samples(store)]
    calibrated: dict[str, list] = {}  # per calibration method, the unpruned + method arm's per-seed correctness
    entries: list[dict] = []
    seen: dict[tuple, dict] = {}
    for arm in arms:
        same = seen.get((tuple(c.id for c in arm.cells), arm.calibration))
        if same is not None:
            entries.append({**same, "name": arm.name, "rate": arm.rate, "control": arm.control, "same_as": same["name"]})
            continue
        runs = arm.samples(store)
        values = [cell.value(arm.metric(metric)) for cell in arm.cells]
        n = len(runs[0])
        if metric == "accuracy" and n <= WILSON_MAX_N:
            correct = statistics.fmean(sum(s["correct"] for s in run) for run in runs)
            low, high = wilson_interval(correct, n)
            method = "wilson"
        elif len(runs) == 1:
            stored = arm.cells[0].metrics[arm.metric(metric)]
            low, high, method = stored.get("ci_low"), stored.get("ci_high"), stored.get("ci_method", "bootstrap")
        else:
            interval = samples_ci(runs, metric, num_classes)
            low, high, method = interval.low, interval.high, interval.method
        entry = {
            "name": arm.name,
            "rate": arm.rate,
            "calibration": arm.calibration,
            "control": arm.control,
            "cells": [c.id for c in arm.cells],
            "n": n,
            "seeds": len(runs),
            "value": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,  # ± : spread over seeds
            "ci_low": low,  # [ ] : CI over examples
            "ci_high": high,
            "ci_method": method,
            **{name: _mean([c.metrics.get(arm.metric(name), {}).get("value") for c in arm.cells]) for name in BIAS},
            "prediction_counts": [_counts(run, num_classes) for run in runs],
            "paired": None,
            "paired_calibrated": None,  # a calibrated pruned or control arm against unpruned + the same calibration
            "same_as": None,
        }
        mine = [[(s["id"], float(s["correct"])) for s in run] for run in runs]
        if arm is not arms[0]:
            entry["paired"] = paired_by_id(reference, mine).to_dict()
        if arm.calibration is not None and arm.name == arm_name(arm.calibration):
            calibrated[arm.calibration] = mine
        elif arm.calibration in calibrated:  # does pruning add to the calibration, or only redo what it does?
            entry["paired_calibrated"] = paired_by_id(calibrated[arm.calibration], mine).to_dict()
        seen[(tuple(c.id for c in arm.cells), arm.calibration)] = entry
        entries.append(entry)
    compared = [e[k] for e in entries if e["same_as"] is None for k in ("paired", "paired_calibrated") if e.get(k)]
    for paired, adjusted in zip(compared, holm([c["p_value"] for c in compared]) if compared else [], strict=True):
        paired["p_holm"] = adjusted  # duplicates share the dicts, so they show the same adjusted p
    return entries


def _mean(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.fmean(found) if len(found) == len(values) and found else None


def _counts(run: Sequence[dict], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for s in run:
        counts[s["prediction"]] += 1
    return counts


def calibration_methods(requested: Sequence[str], groups: Sequence[str]) -> tuple[str, ...]:
    """The calibrations a search scores: those asked for with --calibration, else every method when the
    calibration arms are on."""
    return tuple(requested) or (METHODS if "calibration" in groups else ())


def samples_ci(samples: Sequence[Sequence[dict]], metric: str, num_classes: int) -> Estimate:
    """`stats.seed_mean_ci` of stored sample rows, one list per seed, aligned by example id.

    The seeds score the same examples, so one bootstrap draw of examples serves every seed: the
    interval is the uncertainty from the finite test set of the seed-averaged value (the spread
    over seeds is reported separately as their standard deviation).
    """
    ids = [s["id"] for s in samples[0]]
    rows = [{s["id"]: s for s in seed} for seed in samples]
    if any(set(row) != set(ids) for row in rows):
        raise SvdiclError("the seeds' test cells hold different examples; use the same --limit for every seed")
    predicted = [[row[i]["prediction"] for i in ids] for row in rows]
    return seed_mean_ci([rows[0][i]["gold"] for i in ids], predicted, metric, num_classes)
