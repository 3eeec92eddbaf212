"""The paper's finding 3, fewer shots slow the collapse after heavy shallow pruning (docs/STUDY.md amendment
"Finding 3"): an example's retention at k demonstrations is its correctness averaged over the first two layers, the
rates > 0 and the seeds, minus its unpruned correctness averaged over the seeds; retention with 0 and with 4
demonstrations − with 10, paired by example, Holm over the four (two per module).  Beside them, descriptive: the
unpruned accuracy with 4 and with 10 demonstrations − with none (the paper's "baseline accuracy grows with shots")."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from family import DESCRIPTIVE, MISSING, TESTED, Comparison
from findings import SHOTS, Planned, cell_answers

from svdicl.experiments.grid import PAPER_RATES
from svdicl.stats import paired_by_id
from svdicl.store import CELLS_FILE, Store

LAYERS = (0, 1)  # finding 2's shallow layers
IN_ALL = {0: 0, 2: 4, 5: 10}  # --shots per class -> demonstrations in all (SST-2 has two classes)
FEWER = (0, 2)  # each against 5 per class (10 in all)
MOST = 5
SEEDS = (0, 1, 2)
RUNS = "layers × rates × seeds"

Runs = list[list[tuple[str, float]]]


def fewer_shots(studies: Path, plans: Sequence[Planned]) -> list[Comparison]:
    """Per planned shots sweep: retention with 0 and with 4 demonstrations − with 10 (TESTED, or MISSING until every
    cell is in), then once per model x task the descriptive unpruned differences."""
    found: list[Comparison] = []
    baselines: set[tuple[str, str]] = set()
    for plan in (p for p in plans if p.design == SHOTS):
        folder = studies / plan.model / SHOTS
        runs = _runs(Store(folder, readonly=True), plan) if (folder / CELLS_FILE).is_file() else None
        for fewer in FEWER:
            base = Comparison("finding 3", f"retention, {IN_ALL[fewer]} − {IN_ALL[MOST]} demonstrations", plan.model,
                              plan.design, plan.task, plan.module, _name(MOST), _name(fewer), MISSING, runs=RUNS)  # fmt: skip
            if runs is None:
                found.append(dataclasses.replace(base, note="sweep cells missing"))
                continue
            paired = paired_by_id(runs["retention"][MOST], runs["retention"][fewer])
            found.append(dataclasses.replace(base, status=TESTED, paired=paired))
        if runs is not None and (plan.model, plan.task) not in baselines:
            baselines.add((plan.model, plan.task))
            for more in (2, MOST):
                found.append(Comparison("finding 3", f"unpruned, {IN_ALL[more]} − 0 demonstrations", plan.model,
                                        plan.design, plan.task, "–", "unpruned, 0", f"unpruned, {IN_ALL[more]}",
                                        DESCRIPTIVE, paired_by_id(runs["unpruned"][0], runs["unpruned"][more])))  # fmt: skip
    return found


def _name(shots: int) -> str:
    return f"retention at {IN_ALL[shots]}"


def _runs(store: Store, plan: Planned) -> dict[str, dict[int, Runs]] | None:
    """Per shots setting, the unpruned runs (one per seed) and the retention runs: one per layer x rate x seed, each
    example's pruned correctness − its unpruned correctness under the same seed (their mean is the retention).
    None unless every cell of the grid is in with its samples."""
    found = store.cells(task=plan.task, split="validation", modules=plan.module)
    if not found:
        return None
    key = found[0].key  # the others differ from it only in shots, seed and edit: the same data, limit and options
    unpruned: dict[int, Runs] = {}
    retention: dict[int, Runs] = {}
    for shots in IN_ALL:
        unpruned[shots], retention[shots] = [], []
        for seed in SEEDS:
            answers = cell_answers(store, dataclasses.replace(key, shots=shots, seed=seed, edit="none"))
            if answers is None:
                return None
            unpruned[shots].append(answers)
            base = dict(answers)
            for layer in LAYERS:
                for rate in (r for r in PAPER_RATES if r > 0):
                    edit = f"{layer}:{plan.module}:{rate:g}"
                    pruned = cell_answers(store, dataclasses.replace(key, shots=shots, seed=seed, edit=edit))
                    if pruned is None:
                        return None
                    retention[shots].append([(i, c - base[i]) for i, c in pruned])
    return {"unpruned": unpruned, "retention": retention}
