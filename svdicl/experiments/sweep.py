"""Clipping-rate sweeps (the paper's fig 1-2): tasks x shots x seeds x layers x modules x rates, resumable.

A sweep is a grid of cells (svdicl.store): one evaluation of one task, split, shot count and
demonstration seed under one edit.  The work is grouped so that nothing is done twice:

    for each (task, shots, seed):             prepare_run once (prompts and token ids)
        for each (layers, modules) line:      one evaluate_edits call over all its missing rates
                                              (the call that shares the prefix and layer caches)

The unpruned model (rate 0) is one cell per (task, split, shots, seed), shared by every line:
the rate-0 point of every curve.  Each cell is stored the moment it is scored, so a sweep
killed at any point resumes where it stopped and ends with the same store as one that ran
through.  `evaluate_calls` does this for any calls (Algorithm 1 in experiments/search.py uses it
too), each call's missing cells as one job on an executor (svdicl.experiments.executors: this process, or
Ray workers that hold the model); the driver alone writes the store, whatever the executor.
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from svdicl.calibration import parse_calibration
from svdicl.errors import SvdiclError
from svdicl.experiments.edits import evaluate_edits
from svdicl.experiments.executors import Executor, Job, LocalExecutor
from svdicl.experiments.runs import EvalRun, RunResult, limit_examples, prepare_run, scored_seeds
from svdicl.models import LoadedModel
from svdicl.precision import check_precision
from svdicl.prompts import sample_demonstrations, shots_per_class
from svdicl.prune import EditRecord
from svdicl.scoring import check_path
from svdicl.specs import PruneSpec, check_rate
from svdicl.store import UNPRUNED, Cell, CellKey, Result, Store
from svdicl.targets import layer_stack, parse_layers, resolve
from svdicl.tasks import TaskConfig, get_task
from svdicl.tasks.data import TaskSplits, content_digest, load_splits

PAPER_RATES = (0.0, 0.1, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995)
SPLITS = ("validation", "test")
TOGETHER = "+"  # `0+1` in --layers, `q+k` in --modules: one line pruned together
SAMPLE_FIELDS = ("seed", "id", "gold", "prediction", "correct", "tie", "logprobs", "n_tokens", "calibrated")


@dataclass(frozen=True)
class Scoring:
    """How cells are scored.  Only `key_options` change answers, so only they enter cell keys;
    the rest (batch size, execution path, cache budget) move scores by float rounding at most, and
    `precision` mixed moves the scores of examples far from a decision by at most its recorded bound
    but never a decision (svdicl.precision; each cell's timing records which precision ran)."""

    batch_size: int = 8
    length_normalize: bool = False
    svd: str = "float32"
    allow_tied: bool = False
    path: str = "auto"
    cache_memory: int | None = None
    precision: str = "float32"
    calibration: tuple[str, ...] = ()  # methods of svdicl.calibration, each cell scored under every one

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise SvdiclError(f"--batch-size must be at least 1, got {self.batch_size}")
        check_path(self.path)
        check_precision(self.precision)
        object.__setattr__(self, "calibration", parse_calibration(self.calibration))

    def key_options(self) -> dict[str, object]:
        """The options that change answers, and so enter every cell key (calibration only when asked for)."""
        calibration = {"calibration": ",".join(self.calibration)} if self.calibration else {}
        return {"length_normalize": self.length_normalize, "svd": self.svd, **calibration}

    def edit_options(self) -> dict[str, object]:
        """Keyword arguments of evaluate_edits."""
        return {
            "svd": self.svd,
            "allow_tied": self.allow_tied,
            "batch_size": self.batch_size,
            "length_normalize": self.length_normalize,
            "path": self.path,
            "cache_memory": self.cache_memory,
            "precision": self.precision,
        }


def parse_list(value: str | int | float | Iterable[str | int | float] | None) -> list[str]:
    """`"a,b"`, `["a", "b"]` or a scalar as a list of stripped, non-empty strings."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int | float) else list(value)
    return [str(item).strip() for item in items if str(item).strip()]


def parse_rates(value: str | Iterable[float | str]) -> tuple[float, ...]:
    """Clipping rates from `0,0.5,0.9` (or a list), each in [0, 1); sorted, without repeats."""
    rates = [check_rate(text) for text in parse_list(value)]
    if not rates:
        raise SvdiclError("no clipping rates given; use e.g. --rates 0,0.1,0.5,0.75,0.9,0.95,0.99,0.995")
    return tuple(sorted(set(rates)))


def parse_ints(value: str | Iterable[int | str], name: str, minimum: int = 0) -> tuple[int, ...]:
    """Integers from `0,4,10` (or a list), each >= minimum, in the order given, without repeats."""
    numbers = []
    for text in parse_list(value):
        try:
            number = int(text)
        except ValueError:
            raise SvdiclError(f"{name} {text!r} is not an integer; write e.g. {name} 0,1,2") from None
        if number < minimum:
            raise SvdiclError(f"{name} must be at least {minimum}, got {number}")
        numbers.append(number)
    if not numbers:
        raise SvdiclError(f"no values given for {name}")
    return tuple(dict.fromkeys(numbers))


def layer_sets(specs: str | Iterable[str], num_layers: int) -> list[str]:
    """The layer sets a sweep draws one line each for, as non-negative indices.

    `first2,last2` on 30 layers is four lines (0, 1, 28, 29), each layer pruned alone; `+` joins
    specs into one set pruned together: `0+1` or `first2+last2` is one line.
    """
    sets: list[str] = []
    for item in parse_list(specs):
        if TOGETHER in item:
            layers = sorted({i for part in item.split(TOGETHER) if part.strip() for i in parse_layers(part.strip(), num_layers)})
            sets.append(",".join(map(str, layers)))
        else:
            sets += [str(i) for i in parse_layers(item, num_layers)]
    if not sets:
        raise SvdiclError("no layers given; use e.g. --layers first2,last2 (each swept alone) or 0+1 (pruned together)")
    return list(dict.fromkeys(sets))


def module_sets(specs: str | Iterable[str]) -> list[str]:
    """Module specs swept one at a time: `mlp,attn` is two lines, `q+k` one line with both matrices."""
    sets = [item.replace(TOGETHER, ",") for item in parse_list(specs)]
    if not sets:
        raise SvdiclError("no modules given; use e.g. --modules mlp,attn (each alone) or q+k (pruned together)")
    if any(spec.startswith("re:") and "," in spec for spec in sets):
        raise SvdiclError("a re:<regex> module spec cannot be joined with +; write one regex that matches everything")
    return list(dict.fromkeys(sets))


@dataclass(frozen=True)
class SweepGrid:
    """What a sweep evaluates.  `shots` counts demonstrations per class (None: the task's paper default), or
    in all with `shots_total` (lm-eval's --num_fewshot; each task divides them by its classes)."""

    tasks: tuple[str, ...]
    layers: tuple[str, ...] = ("first2", "last2")
    modules: tuple[str, ...] = ("mlp", "attn")
    rates: tuple[float, ...] = PAPER_RATES
    shots: tuple[int | None, ...] = (None,)
    seeds: tuple[int, ...] = (0,)
    split: str = "test"
    limit: int | None = None
    shots_total: bool = False

    def __post_init__(self) -> None:
        if not self.tasks:
            raise SvdiclError("no tasks given; use e.g. --tasks sst2,rte,copa")
        if self.split not in SPLITS:
            raise SvdiclError(f"unknown split {self.split!r}; use validation or test")
        if self.limit is not None and self.limit < 1:
            raise SvdiclError(f"--limit must be at least 1, got {self.limit}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise SvdiclError("give at least one seed, each once")
        object.__setattr__(self, "rates", parse_rates(self.rates))
        if any(s is not None and s < 0 for s in self.shots):
            raise SvdiclError("shots must be >= 0 (demonstrations per class)")


@dataclass(frozen=True)
class RunCells:
    """The cells of one prepared run (task, shots, seed), grouped into evaluate_edits calls."""

    task: TaskConfig
    shots: int
    seed: int
    examples: int  # examples per cell
    calls: tuple[tuple[tuple[CellKey, tuple[PruneSpec, ...]], ...], ...]
    reuse_from: int | None = None  # 0 shots: the seed whose cells these copy (same prompts), else None

    @property
    def cells(self) -> list[tuple[CellKey, tuple[PruneSpec, ...]]]:
        """Every (key, edit) cell of the run, across its calls."""
        return [cell for call in self.calls for cell in call]


def cell_limit(limit: int | None, size: int) -> int | None:
    """The limit as cell keys record it: None when it covers the whole split, so equal work gets equal keys."""
    return None if limit is None or limit >= size else limit


def data_digest(splits: TaskSplits, split: str, limit: int | None) -> str:
    """The digest of what a run scores: the task definition, the examples of `split` under `limit` and the
    demonstration pool the seeds draw from (content, not paths: a rewritten data file gets new keys)."""
    task = splits.task
    return content_digest(task, limit_examples(splits.split(split), limit, task.split_seed), splits.demonstrations)


def run_key(
    loaded: LoadedModel,
    splits: TaskSplits,
    split: str,
    shots: int,
    seed: int,
    limit: int | None,
    scoring: Scoring,
    data: str | None = None,
) -> CellKey:
    """The unpruned cell of one run (`edit_cell` derives its edited cells): the one place where what identifies
    a result is gathered -- weights, task name, data digest, split, shots, seed, limit, `Scoring.key_options`.
    `data` is `data_digest(splits, split, limit)`, passed when already computed."""
    data = data_digest(splits, split, limit) if data is None else data
    limit = cell_limit(limit, len(splits.split(split)))
    options = scoring.key_options()
    return CellKey(loaded.fingerprint, splits.task.name, split, shots, seed, limit=limit, options=options, data=data)


def note_other_data(store: Store, keys: Iterable[CellKey]) -> int:
    """Warn (once per call) when `store` holds cells of these keys scored on other data or another task definition."""
    others = store.other_data(keys)
    if others:
        tasks = ", ".join(sorted({c.key.task for c in others}))
        why = (
            "written before svdicl keyed cells on their data"
            if all(not c.key.data for c in others)
            else "scored on other data or under another definition of the task (another data digest)"
        )
        warnings.warn(
            f"{store.root} holds {len(others)} cell(s) of task {tasks} {why}; they are kept apart and not reused, "
            "so these cells are scored anew",
            stacklevel=2,
        )
    return len(others)


def edit_cell(key: CellKey, layers: str, modules: str, rate: float) -> tuple[CellKey, tuple[PruneSpec, ...]]:
    """A cell key and the edit it names; rate 0 is the shared unpruned cell."""
    if rate == 0:
        return replace(key, edit=UNPRUNED), ()
    spec = PruneSpec(layers, modules, rate)
    return replace(key, edit=str(spec)), (spec,)


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
        examples = len(limit_examples(task_splits.split(grid.split), grid.limit, task.split_seed))
        data = data_digest(task_splits, grid.split, grid.limit)
        for shots in dict.fromkeys(task_shots(task, s, grid.shots_total) for s in grid.shots):
            sample_demonstrations(task, task_splits.demonstrations, shots, 0)  # refuses impossible shot counts now
            scored = scored_seeds(shots, grid.seeds, scoring.calibration)
            for seed in grid.seeds:
                base = run_key(loaded, task_splits, grid.split, shots, seed, grid.limit, scoring, data)
                calls = []
                for index, (layers, modules) in enumerate(lines):
                    rates = [r for r in grid.rates if r > 0]
                    if index == 0:
                        rates.insert(0, 0.0)  # the unpruned cell rides along with the first line's call
                    calls.append(tuple(edit_cell(base, layers, modules, rate) for rate in rates))
                reuse = None if seed in scored else scored[0]
                plan.append(RunCells(task, shots, seed, examples, tuple(calls), reuse))
    return plan


def task_shots(task: TaskConfig, shots: int | None, total: bool) -> int:
    """Shots per class of `task`: its paper setting for None, `shots` itself, or `shots` in all divided by its classes."""
    if shots is None:
        return task.shots
    return shots_per_class(task, shots) if total else shots


def load_task_splits(tasks: Iterable[str | TaskConfig], data_dir: str | Path | None = None) -> dict[str, TaskSplits]:
    """Each task's splits, read once, by task name (in the order given)."""
    found: dict[str, TaskSplits] = {}
    for task in tasks:
        config = get_task(task) if isinstance(task, str) else task
        if config.name not in found:
            found[config.name] = load_splits(config, data_dir)
    return found


def compact_samples(result: RunResult) -> list[dict]:
    """Per-example records for the store, without the prompt text (the demonstrations are in the cell's info)."""
    return [{name: sample[name] for name in SAMPLE_FIELDS if name in sample} for sample in result.samples()]


def cell_result(record: EditRecord, result: RunResult, model_name: str, scoring: Scoring) -> Result:
    """What the store keeps of one scored cell: metrics with CIs, compact samples, and how it was made."""
    run = result.run
    return Result(
        metrics=result.metrics(),
        n=len(result.predictions),
        samples=compact_samples(result),
        ties=sum(result.ties),
        model_name=model_name,
        info={
            "shots_total": run.shots * run.task.num_classes,
            "demonstrations": [e.id for e in run.demonstrations],
            "data": run.data,
            "prediction_counts": result.bias[None]["prediction_counts"],
            "calibration": result.calibration_summary(),
            "matrices": [
                {"name": m.name, "kept_rank": m.kept_rank, "rank": m.rank, "relative_error": m.relative_error}
                for m in record.matrices
            ],
            "scoring": {
                "path": result.timing.get("path"),  # the execution path evaluate_edits took ...
                "fallback": result.timing.get("fallback"),  # ... and why a faster one was not
                "requested_path": scoring.path,
                "batch_size": scoring.batch_size,
            },
            "timing": result.timing,
        },
    )


class Progress:
    """One bar over the examples of many cells, with ETA.  It moves while the scorer works and is
    set exact after every cell, whatever the scorer reported meanwhile; stored cells count at once."""

    def __init__(self, total: int, desc: str, *, done: int = 0, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, desc=desc, unit="ex", file=sys.stderr, disable=not enabled, smoothing=0.1)
        self.done = done

    def grow(self, examples: int) -> None:
        """Count `examples` more to do: work that is known only once earlier cells are scored (a search's test arms)."""
        self.bar.total += examples
        self.bar.refresh()

    def add(self, examples: int) -> None:
        """Count `examples` more as done."""
        self.done += examples
        self.bar.n = self.done
        self.bar.refresh()

    def describe(self, text: str) -> None:
        """Show `text` (the cell being scored) beside the bar."""
        self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


Call = tuple[Callable[[], EvalRun], Sequence[tuple[CellKey, Sequence[PruneSpec]]]]  # prepare the run, its cells


def score_job(
    loaded: LoadedModel, job: Job, progress=None, *, scoring: Scoring, model_name: str = ""
) -> Iterator[tuple[CellKey, Result, float]]:
    """The cells of one job scored in one evaluate_edits call: each cell's key, stored result and seconds.

    The work function of every executor (svdicl.experiments.executors): it runs wherever the model is."""
    started = time.perf_counter()
    scored = evaluate_edits(loaded, job.run, [specs for _, specs in job.cells], **scoring.edit_options(), progress=progress)
    for (key, _), (record, result) in zip(job.cells, scored, strict=True):
        yield key, cell_result(record, result, model_name, scoring), time.perf_counter() - started
        started = time.perf_counter()


def evaluate_calls(
    loaded: LoadedModel,
    calls: Iterable[Call],
    store: Store,
    *,
    scoring: Scoring | None = None,
    model_name: str = "",
    progress: Progress | None = None,
    executor: Executor | None = None,
) -> int:
    """Score the cells of `calls` missing from `store`, each call's as one job on `executor` (default:
    this process), and store every cell the moment it arrives.  A call's run is prepared only when
    one of its cells is missing, and only when an executor asks for the job.  A cell another
    process is computing (it holds the cell's claim, `Store.claim`) is not scored here: it is
    waited for after the rest, and scored here only if that process died before storing it.
    Returns the number of cells scored here."""
    scoring = scoring or Scoring()
    deferred: list[Call] = []
    scored = 0

    def jobs() -> Iterator[Job]:
        for prepare, cells in calls:
            cells = dict(cells)
            todo, waiting = [], []
            for key, specs in cells.items():
                if store.has(key):
                    continue
                if store.claim(key):
                    todo.append((key, tuple(specs)))
                elif not store.has(key):
                    waiting.append((key, specs))
            if waiting:
                deferred.append((prepare, waiting))
            if progress is not None:
                progress.add(sum(store.get(key).n for key in cells if store.has(key)))
            if todo:
                run = prepare()
                if progress is not None:
                    progress.describe(f"{run.task.name} {run.split} {run.shots}-shot seed {run.seed} {_edit_label(todo)}")
                yield Job(run, tuple(todo))

    work = functools.partial(score_job, scoring=scoring, model_name=model_name)
    bar = progress.bar if progress is not None else None
    try:
        for key, result, seconds in (executor or LocalExecutor(loaded)).map(work, jobs(), bar):
            store.put(key, result, seconds=seconds)
            scored += 1
            if progress is not None:
                progress.add(result.n)
    finally:
        store.release()  # claims of cells not stored (an error, an interrupt): free for the next run at once
    for _, cells in deferred:
        for key, _ in cells:
            store.wait(key)
    if deferred:
        scored += evaluate_calls(
            loaded, deferred, store, scoring=scoring, model_name=model_name, progress=progress, executor=executor
        )  # fmt: skip
    return scored


def reuse_cells(store: Store, keys: Iterable[CellKey], seed: int) -> None:
    """Store each missing zero-shot cell of `keys` as a copy of the same cell of `seed`: with no demonstrations
    the seed changes no prompt, so the scores are the same.  The copy records `reused_from` (that cell's id)."""
    for key in keys:
        source = store.get(replace(key, seed=seed))
        if store.has(key) or source is None:
            continue
        samples = [{**sample, "seed": key.seed} for sample in store.samples(source)]
        copy = Result(
            metrics=source.metrics,
            n=source.n,
            samples=samples,
            ties=source.ties,
            model_name=source.model_name,
            info={**source.info, "reused_from": source.id},
        )
        store.put(key, copy, seconds=0.0)


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
    splits = load_task_splits(grid.tasks, data_dir)
    plan = plan_sweep(loaded, grid, splits, scoring)
    note_other_data(store, [key for group in plan for key, _ in group.cells])
    scored = [group for group in plan if group.reuse_from is None]
    bar = Progress(sum(group.examples * len(group.cells) for group in scored), "sweep", enabled=progress)

    def calls() -> Iterator[Call]:  # a run is kept only while its jobs are in flight
        for group in scored:
            prepare = functools.cache(
                lambda group=group: prepare_run(
                    loaded, group.task, split=grid.split, shots=group.shots, seed=group.seed, limit=grid.limit,
                    splits=splits[group.task.name], calibration=scoring.calibration, progress=progress,
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


def _edit_label(cells: Sequence[tuple[CellKey, tuple[PruneSpec, ...]]]) -> str:
    """`29:mlp` for the cells of one line, `unpruned` when only the baseline is left."""
    specs = [specs[0] for _, specs in cells if specs]
    return f"{specs[0].layers}:{specs[0].modules}" if specs else "unpruned"
