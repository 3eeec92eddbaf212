"""Clipping-rate sweeps (the paper's fig 1-2): tasks x shots x seeds x layers x modules x rates, resumable.

A sweep is a grid of cells (svdicl.store): one evaluation of one task, split, shot count and
demonstration seed under one edit.  The work is grouped so that nothing is done twice:

    for each (task, shots, seed):             prepare_run once (prompts and token ids)
        for each (layers, modules) line:      one evaluate_edits call over all its missing rates
                                              (the call that shares the prefix and layer caches)

The unpruned model (rate 0) is one cell per (task, split, shots, seed), shared by every line:
the rate-0 point of every curve.  Each cell is stored the moment it is scored, so a sweep
killed at any point resumes where it stopped and ends with the same store as one that ran
through (experiments/calls.py).  The grid is experiments/grid.py, the cells' keys experiments/cells.py.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from svdicl.experiments.calls import Call, Progress, evaluate_calls
from svdicl.experiments.cells import Scoring, data_digest, edit_cell, note_other_data, reuse_cells, run_key
from svdicl.experiments.executors import Executor
from svdicl.experiments.grid import SweepGrid, layer_sets, module_sets
from svdicl.experiments.runs import balance_split, limit_examples, prepare_run, scored_seeds
from svdicl.models import LoadedModel
from svdicl.prompts import sample_demonstrations, shot_counts
from svdicl.specs import PruneSpec
from svdicl.store import Cell, CellKey, Store
from svdicl.targets import layer_stack, resolve
from svdicl.tasks import TaskConfig, get_task
from svdicl.tasks.data import TaskSplits, load_splits


@dataclass(frozen=True)
class RunCells:
    """The cells of one prepared run (task, shots, seed), grouped into evaluate_edits calls."""

    task: TaskConfig
    shots: int
    seed: int
    examples: int  # examples per cell
    calls: tuple[tuple[tuple[CellKey, tuple[PruneSpec, ...]], ...], ...]
    reuse_from: int | None = None  # 0 shots: the seed whose cells these copy (same prompts), else None
    extra_shots: int = 0  # beyond `shots` per class (a total the classes do not divide)

    @property
    def cells(self) -> list[tuple[CellKey, tuple[PruneSpec, ...]]]:
        """Every (key, edit) cell of the run, across its calls."""
        return [cell for call in self.calls for cell in call]


def plan_sweep(
    loaded: LoadedModel,
    grid: SweepGrid,
    splits: dict[str, TaskSplits],
    scoring: Scoring | None = None,
) -> list[RunCells]:
    """Every cell of the grid, grouped per prepared run and per evaluate_edits call, in the order they run.

    Bad layers, modules or shot counts are refused here, before any scoring.
    """
    scoring = scoring or Scoring()
    num_layers = len(layer_stack(loaded.model)[1])
    lines = [(layers, modules) for layers in layer_sets(grid.layers, num_layers) for modules in module_sets(grid.modules)]
    for layers, modules in lines:
        resolve(loaded.model, layers, modules, allow_tied=scoring.allow_tied)
    plan = []
    for task_splits in splits.values():
        task = task_splits.task
        examples = len(limit_examples(task_splits.split(grid.split), grid.run_limit, task.split_seed))
        data = data_digest(task_splits, grid.split, grid.run_limit)
        for shots, extra in dict.fromkeys(shot_counts(task, s, grid.shots_total) for s in grid.shots):
            sample_demonstrations(task, task_splits.demonstrations, shots, 0, extra)  # refuses impossible shot counts now
            scored = scored_seeds(shots, grid.seeds, scoring.calibration, extra)
            for seed in grid.seeds:
                base = run_key(loaded, task_splits, grid.split, shots, seed, grid.run_limit, scoring, data, extra)
                calls = []
                for index, (layers, modules) in enumerate(lines):
                    rates = [r for r in grid.rates if r > 0]
                    if index == 0:
                        rates.insert(0, 0.0)  # the unpruned cell rides along with the first line's call
                    calls.append(tuple(edit_cell(base, layers, modules, rate) for rate in rates))
                reuse = None if seed in scored else scored[0]
                plan.append(RunCells(task, shots, seed, examples, tuple(calls), reuse, extra))
    return plan


def load_task_splits(tasks: Iterable[str | TaskConfig], data_dir: str | Path | None = None) -> dict[str, TaskSplits]:
    """Each task's splits, read once, by task name (in the order given)."""
    found: dict[str, TaskSplits] = {}
    for task in tasks:
        config = get_task(task) if isinstance(task, str) else task
        if config.name not in found:
            found[config.name] = load_splits(config, data_dir)
    return found


def grid_splits(grid: SweepGrid, data_dir: str | Path | None = None) -> dict[str, TaskSplits]:
    """Each task's splits as the grid scores them: with sampling "balanced", the scored split is cut to its
    class-balanced subset of --limit examples and then scored whole (`SweepGrid.run_limit`)."""
    splits = load_task_splits(grid.tasks, data_dir)
    if grid.sampling == "balanced":
        splits = {name: balance_split(found, grid.split, grid.limit) for name, found in splits.items()}
    return splits


@dataclass(frozen=True)
class SweepResult:
    """What `sweep` returns: the grid's cells in plan order and how many this call scored."""

    cells: tuple[Cell, ...]  # every cell of the grid, in plan order
    computed: int  # cells scored by this call (the rest were in the store)
    wall_s: float


def sweep(
    loaded: LoadedModel,
    grid: SweepGrid,
    store: Store,
    *,
    scoring: Scoring | None = None,
    data_dir: str | Path | None = None,
    model_name: str = "",
    progress: bool = True,
    executor: Executor | None = None,
) -> SweepResult:
    """Evaluate every cell of `grid` not already in `store`, line by line on `executor` (default: this
    process); one progress bar over the grid, in examples."""
    started = time.perf_counter()
    scoring = scoring or Scoring()
    splits = grid_splits(grid, data_dir)
    plan = plan_sweep(loaded, grid, splits, scoring)
    note_other_data(store, [key for group in plan for key, _ in group.cells])
    scored = [group for group in plan if group.reuse_from is None]
    bar = Progress(sum(group.examples * len(group.cells) for group in scored), "sweep", enabled=progress)

    def calls() -> Iterator[Call]:  # a run is kept only while its jobs are in flight
        for group in scored:
            prepare = functools.cache(
                lambda group=group: prepare_run(
                    loaded, group.task, split=grid.split, shots=group.shots, seed=group.seed, limit=grid.run_limit,
                    splits=splits[group.task.name], calibration=scoring.calibration, progress=progress,
                    extra_shots=group.extra_shots,
                )
            )  # fmt: skip
            for call in group.calls:
                yield prepare, call

    try:
        computed = evaluate_calls(loaded, calls(), store, scoring=scoring, model_name=model_name, progress=bar, executor=executor)
    finally:
        bar.close()
    for group in plan:
        if group.reuse_from is not None:
            reuse_cells(store, [key for key, _ in group.cells], group.reuse_from)
    cells = tuple(store.get(key) for group in plan for key, _ in group.cells)
    return SweepResult(cells=cells, computed=computed, wall_s=time.perf_counter() - started)
