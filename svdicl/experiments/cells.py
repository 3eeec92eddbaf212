"""One cell of a sweep or a search: the key that identifies it, the edit it names, what the store
keeps of it once scored, and the zero-shot copies that need no scoring.

`run_key` is the one place where what identifies a result is gathered (weights, task, data
digest, split, shots, seed, limit and the `Scoring` options that change answers); `edit_cell`
adds the edit.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace

from svdicl.calibration import parse_calibration
from svdicl.errors import SvdiclError
from svdicl.experiments.runs import RunResult, limit_examples
from svdicl.models import LoadedModel
from svdicl.precision import check_precision
from svdicl.prune import EditRecord
from svdicl.scoring import check_path
from svdicl.specs import PruneSpec
from svdicl.store import UNPRUNED, CellKey, Result, Store
from svdicl.tasks.data import TaskSplits, content_digest

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
    extra_shots: int = 0,
) -> CellKey:
    """The unpruned cell of one run (`edit_cell` derives its edited cells): the one place where what identifies
    a result is gathered -- weights, task name, data digest, split, shots (per class and any extra), seed, limit,
    `Scoring.key_options`.  `data` is `data_digest(splits, split, limit)`, passed when already computed."""
    data = data_digest(splits, split, limit) if data is None else data
    limit = cell_limit(limit, len(splits.split(split)))
    options = scoring.key_options()
    return CellKey(
        loaded.fingerprint, splits.task.name, split, shots, seed, limit=limit, options=options, data=data, extra_shots=extra_shots
    )


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
            "shots_total": run.shots_total,
            "demonstrations": [e.id for e in run.demonstrations],
            "demonstrations_per_class": run.demonstrations_per_class,
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
