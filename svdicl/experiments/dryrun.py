"""`--dry-run` of eval, sweep and search: the cells a command would score, their size and an estimated time.

Nothing is scored into any output and nothing is written.  Per run (task, split, shots, seed)
at most SAMPLE examples are tokenized: the token count is exact when the run has no more,
else extrapolated from them (marked ≈).  The time is an estimate from a short timing on this
machine, once per task and shot count: the unpruned model scores 1 and then 1 + batch_size
sampled examples of median length on the path `auto` (or the given --path) takes, which gives a
fixed cost per cell (the shared prefix) and a cost per example.  It leaves out the SVDs of the pruned matrices, the
condition numbers of a search, and the layer path's saving in sweeps (it runs only the layers
above the pruned one per cell), so sweeps usually finish sooner than it says.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from svdicl.experiments.run_scoring import evaluate_run
from svdicl.experiments.runs import EvalRun, limit_examples, prepare_run, scored_seeds
from svdicl.models import LoadedModel
from svdicl.prompts import shot_counts
from svdicl.requests import forwarded_tokens
from svdicl.store import CELLS_FILE, Cell, shots_label
from svdicl.tasks import TaskConfig
from svdicl.tasks.data import TaskSplits

SAMPLE = 64  # examples tokenized per run


@dataclass(frozen=True)
class PlannedCell:
    """One cell a command would evaluate: what, how big, and whether it would be scored."""

    name: str  # task, split, shots, seed and edit
    examples: int
    tokens: int  # prompt tokens (what the plain path runs), padding excluded
    exact: bool  # False: extrapolated from SAMPLE examples
    status: str  # "score", "stored" (in --output already) or "reuse seed S" (0 shots: the same prompts)
    seconds: float | None = None  # estimated, for cells to score


@dataclass(frozen=True)
class DryRun:
    """What a command would do: its cells in the order it runs them, and how the figures were obtained."""

    cells: tuple[PlannedCell, ...]
    notes: tuple[str, ...] = ()

    @property
    def to_score(self) -> list[PlannedCell]:
        """The cells that would be scored (not in the output already, not reused)."""
        return [c for c in self.cells if c.status == "score"]

    def text(self) -> str:
        """The table the CLI prints, totals and how the figures were obtained."""
        width = max([len(c.name) for c in self.cells] + [4])
        lines = [f"{'cell':<{width}}  {'examples':>8}  {'tokens':>12}  {'status':<12}  est. time"]
        for c in self.cells:
            tokens = f"{'' if c.exact else '≈'}{c.tokens:,}"
            lines.append(f"{c.name:<{width}}  {c.examples:>8,}  {tokens:>12}  {c.status:<12}  {_duration(c.seconds)}")
        todo = self.to_score
        seconds = sum(c.seconds or 0.0 for c in todo)
        tokens = sum(c.tokens for c in todo)
        approx = "" if all(c.exact for c in todo) else "≈"
        lines.append(
            f"{len(self.cells)} cells: {len(todo)} to score ({sum(c.examples for c in todo):,} examples, {approx}{tokens:,} "
            f"prompt tokens), {sum(c.status == 'stored' for c in self.cells)} already in the output, "
            f"{sum(c.status.startswith('reuse') for c in self.cells)} reused (0 shots); estimated time {_duration(seconds)}"
        )
        return "\n".join(lines + [f"- {note}" for note in self.notes])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class RunSize:
    """Examples and prompt tokens of one run (task, split, shots, seed), from a sample of it."""

    examples: int
    tokens: int
    exact: bool
    sample: EvalRun


def run_size(
    loaded: LoadedModel, task: TaskConfig, splits: TaskSplits, split: str, shots: int, seed: int, limit: int | None,
    extra_shots: int = 0,
):  # fmt: skip
    """Count a run's examples; tokenize at most SAMPLE of them and extrapolate its prompt tokens."""
    examples = limit_examples(splits.split(split), limit, task.split_seed)
    sample = limit_examples(examples, SAMPLE, task.split_seed)
    sampled = replace(splits, **{split: sample})
    run = prepare_run(loaded, task, split=split, shots=shots, seed=seed, splits=sampled, extra_shots=extra_shots)
    tokens = forwarded_tokens(run.requests)
    exact = len(sample) == len(examples)
    return RunSize(len(examples), tokens if exact else round(tokens * len(examples) / max(len(sample), 1)), exact, run)


class Timer:
    """Seconds per cell, fixed and per example, measured once per task and shot count on this machine."""

    def __init__(self, loaded: LoadedModel, *, batch_size: int = 8, path: str = "auto", cache_memory: int | None = None):
        self.loaded, self.batch_size, self.path, self.cache_memory = loaded, batch_size, path, cache_memory
        self.measured: dict[tuple[str, int], tuple[float, float]] = {}

    def seconds(self, size: RunSize) -> float:
        """Estimated seconds to score one cell of the run `size` describes (timing its task and shots once)."""
        run = size.sample
        key = (run.task.name, run.shots_total)
        if key not in self.measured:
            self.measured[key] = self._measure(run)
        fixed, per_example = self.measured[key]
        return fixed + per_example * size.examples

    def _measure(self, run: EvalRun) -> tuple[float, float]:
        """Score 1 and then 1 + batch_size examples of median length (after one warm-up per Timer): fixed and
        per-example cost.  Median lengths: the real run batches examples of similar length, with little padding."""
        path = "prefix" if self.path == "layer" else self.path
        more = min(1 + self.batch_size, len(run.examples))
        order = sorted(range(len(run.requests)), key=lambda i: len(run.requests[i].context))
        middle = order[(len(order) - more) // 2 :][:more]

        def wall(n: int) -> float:
            chosen = middle[:n]
            part = replace(
                run,
                examples=tuple(run.examples[i] for i in chosen),
                prompts=tuple(run.prompts[i] for i in chosen),
                requests=tuple(run.requests[i] for i in chosen),
            )
            started = time.perf_counter()
            evaluate_run(self.loaded, part, batch_size=self.batch_size, path=path, cache_memory=self.cache_memory)
            return time.perf_counter() - started

        if not self.measured:
            wall(1)  # the first forward pays one-off costs
        one, several = wall(1), wall(more)
        if more > 1 and several > one:
            per_example = (several - one) / (more - 1)
            return max(one - per_example, 0.0), per_example
        return 0.0, several / more


def stored_ids(folder: str | Path | None) -> set[str]:
    """Ids of the cells in a result store, read without opening (or creating, or repairing) it."""
    file = Path(folder) / CELLS_FILE if folder is not None else None
    if file is None or not file.is_file():
        return set()
    found = set()
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            found.add(Cell.from_record(json.loads(line)).id)
        except (ValueError, KeyError, TypeError):
            continue  # a torn line: the real run repairs it
    return found


def plan_run(
    loaded: LoadedModel,
    timer: Timer,
    splits: TaskSplits,
    split: str,
    shots: int,
    seed: int,
    limit: int | None,
    cells: Sequence[tuple[str, str | None]],
    *,
    reuse_from: int | None = None,
    stored: set[str] = frozenset(),
    extra_shots: int = 0,
) -> list[PlannedCell]:
    """The cells of one run, each given as (edit name, store id or None): in the store, reused (0 shots) or to score."""
    size = run_size(loaded, splits.task, splits, split, shots, seed, limit, extra_shots)
    planned = []
    for name, cell_id in cells:
        label = f"{splits.task.name} {split} {shots_label(shots, extra_shots)}-shot seed {seed} {name}"
        if cell_id is not None and cell_id in stored:
            planned.append(PlannedCell(label, size.examples, size.tokens, size.exact, "stored"))
        elif reuse_from is not None:
            planned.append(PlannedCell(label, size.examples, size.tokens, size.exact, f"reuse seed {reuse_from}"))
        else:
            planned.append(PlannedCell(label, size.examples, size.tokens, size.exact, "score", timer.seconds(size)))
    return planned


TIME_NOTE = (
    "tokens: prompt tokens, padding excluded (≈: extrapolated from {sample} tokenized examples of the run); est. time: an "
    "estimate from timing the unpruned model on this machine on 1 and {more} examples of median length per task "
    "and shot count (a fixed cost per cell plus a cost per example); SVDs{search} are not included, and the layer path of sweeps "
    "(layers below the pruned one run once per line) usually makes them faster"
)


def time_note(timer: Timer, search: bool = False) -> str:
    """How the dry run's token counts and times were obtained, for the printed notes."""
    return TIME_NOTE.format(sample=SAMPLE, more=1 + timer.batch_size, search=" and condition numbers" if search else "")


def dry_run_eval(
    loaded: LoadedModel,
    tasks: Sequence[TaskConfig],
    *,
    split: str = "test",
    shots: int | Mapping[str, int | None] | None = None,
    shots_total: bool = False,
    seeds: Sequence[int] = (0,),
    limit: int | None = None,
    edit: str = "unpruned",
    data_dir: str | Path | None = None,
    outputs: Sequence[Path | None] = (),
    batch_size: int = 8,
    path: str = "auto",
    cache_memory: int | None = None,
    calibration: str | Sequence[str] = (),
) -> DryRun:
    """What `svdicl eval` would score: one cell per task and seed (0 shots: one per task), under `edit`.

    `shots` per class (in all with `shots_total`), for every task or by task name (None: the task's own)."""
    from svdicl import calibration as cal
    from svdicl.experiments.evaluate import RESULTS_FILE
    from svdicl.tasks.data import load_splits

    timer = Timer(loaded, batch_size=batch_size, path=path, cache_memory=cache_memory)
    cells, notes = [], []
    for task, output in zip(tasks, list(outputs) or [None] * len(tasks), strict=True):
        splits = load_splits(task, data_dir)
        given = shots.get(task.name) if isinstance(shots, Mapping) else shots
        count, extra = shot_counts(task, given, shots_total)
        scored = scored_seeds(count, seeds, cal.applicable(task, cal.parse_calibration(calibration)), extra)
        for seed in seeds:
            reuse = None if seed in scored else scored[0]
            cells += plan_run(
                loaded, timer, splits, split, count, seed, limit, [(edit, None)], reuse_from=reuse, extra_shots=extra
            )
        if output is not None and (Path(output) / RESULTS_FILE).is_file():
            notes.append(f"{Path(output) / RESULTS_FILE} exists: the real run returns it unscored if it is the same evaluation")
    return DryRun(tuple(cells), (*notes, time_note(timer)))


def dry_run_sweep(loaded: LoadedModel, grid, scoring, *, data_dir: str | Path | None = None, output=None) -> DryRun:
    """What `svdicl sweep` would score: every cell of the grid, those already in `output`'s store marked."""
    from svdicl.experiments.sweep import grid_splits, plan_sweep

    splits = grid_splits(grid, data_dir)
    stored = stored_ids(output)
    timer = Timer(loaded, batch_size=scoring.batch_size, path=scoring.path, cache_memory=scoring.cache_memory)
    cells = []
    for group in plan_sweep(loaded, grid, splits, scoring):
        named = [(key.edit, key.id) for key, _ in group.cells]
        task_splits = splits[group.task.name]
        cells += plan_run(
            loaded, timer, task_splits, grid.split, group.shots, group.seed, grid.run_limit, named,
            reuse_from=group.reuse_from, stored=stored, extra_shots=group.extra_shots,
        )  # fmt: skip
    return DryRun(tuple(cells), (time_note(timer),))


def dry_run_search(loaded: LoadedModel, configs: Sequence, scoring, splits: dict[str, TaskSplits], *, output=None) -> DryRun:
    """What `svdicl search` would score per search: every candidate rate on validation, unpruned and rate* on test."""
    from svdicl import calibration as cal
    from svdicl.experiments.arms import calibration_methods
    from svdicl.experiments.cells import edit_cell, run_key
    from svdicl.targets import layer_stack, parse_layers
    from svdicl.tasks import get_task

    stored = stored_ids(output)
    timer = Timer(loaded, batch_size=scoring.batch_size, path=scoring.path, cache_memory=scoring.cache_memory)
    cells, notes = [], []
    for config in configs:
        task = get_task(config.task)
        task_splits, limits = config.scored_splits(splits[task.name])
        methods = cal.applicable(task, calibration_methods(scoring.calibration, config.arms))  # as search() does
        keyed = replace(scoring, calibration=methods)
        shots, extra = (task.shots if config.shots is None else config.shots), config.extra_shots
        layer = None
        if config.layer is not None:
            (layer,) = parse_layers(str(config.layer), len(layer_stack(loaded.model)[1]))
        else:
            notes.append(f"{task.name} {config.module}: the layer comes from condition numbers (L? below), computed first")
        scored = scored_seeds(shots, config.seeds, methods, extra)
        for split, rates in (("validation", config.rates), ("test", (0.0, None))):
            for seed in config.seeds:
                base = run_key(loaded, task_splits, split, shots, seed, limits[split], keyed, extra_shots=extra)
                named = []
                for rate in rates:
                    if rate is None:
                        named.append((f"{'L?' if layer is None else layer}:{config.module}:rate*", None))
                    elif rate == 0 or layer is not None:
                        key, _ = edit_cell(base, str(layer), config.module, rate)
                        named.append((key.edit, key.id))
                    else:
                        named.append((f"L?:{config.module}:{rate:g}", None))
                reuse = None if seed in scored else scored[0]
                cells += plan_run(
                    loaded, timer, task_splits, split, shots, seed, limits[split], named, reuse_from=reuse, stored=stored,
                    extra_shots=extra,
                )  # fmt: skip
        if "controls" in config.arms:
            notes.append(f"{task.name} {config.module}: null-control test cells (2 per seed and pruned rate*) are not listed")
    notes.append("the test cell at rate* is counted, though when rate* = 0 it is the unpruned one and is not scored")
    return DryRun(tuple(cells), (*notes, time_note(timer, search=True)))
