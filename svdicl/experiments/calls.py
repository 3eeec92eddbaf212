"""Scoring calls of cells into the store: a call is the cells of one prepared run that one
evaluate_edits call scores (sharing its prefix and layer caches), run as one job on an executor.

`evaluate_calls` serves sweeps and Algorithm 1's searches alike: a run is prepared only when one
of its cells is missing, each cell is stored the moment it arrives (so a killed run resumes where
it stopped), and the driver alone writes the store, whatever the executor (experiments/executors.py:
this process, worker processes or Ray actors that hold the model).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from svdicl.experiments.cells import Scoring, cell_result
from svdicl.experiments.edits import evaluate_edits
from svdicl.experiments.executors import Executor, Job, LocalExecutor
from svdicl.experiments.runs import EvalRun
from svdicl.models import LoadedModel
from svdicl.specs import PruneSpec
from svdicl.store import CellKey, Result, Store, shots_label


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
                    label = shots_label(run.shots, run.extra_shots)
                    progress.describe(f"{run.task.name} {run.split} {label}-shot seed {run.seed} {_edit_label(todo)}")
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


def _edit_label(cells: Sequence[tuple[CellKey, tuple[PruneSpec, ...]]]) -> str:
    """`29:mlp` for the cells of one line, `unpruned` when only the baseline is left."""
    specs = [specs[0] for _, specs in cells if specs]
    return f"{specs[0].layers}:{specs[0].modules}" if specs else "unpruned"
