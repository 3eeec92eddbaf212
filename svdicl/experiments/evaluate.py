"""`svdicl eval`: one task under one edit for every seed, written through the result store.

    evaluation = evaluate(loaded, "sst2", seeds=(0, 1), specs=[PruneSpec.parse("29:mlp:0.9")], output="out/e")
    evaluation.accuracy, evaluation.runs[0].accuracy.low, evaluation.to_json()   # to_json(): results.json

With `output`, each seed scored is one cell of the store in DIR/store (svdicl.store), keyed like
a sweep's: stored the moment it is scored, its rows kept every CHUNK examples while it is
scored, so a rerun after an interruption scores only what is missing.  DIR/results.json and
DIR/samples.jsonl are views of those cells, written once every seed is there.  The layers below:
svdicl.experiments.runs (prepare_run, RunResult), run_scoring (evaluate_run) and edits
(evaluate_edits: one run under many edits, for sweeps and Algorithm 1).
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from svdicl import calibration as cal
from svdicl.errors import SvdiclError
from svdicl.experiments.cells import Scoring, run_key
from svdicl.experiments.eval_result import Evaluation
from svdicl.experiments.run_scoring import _choose, _score_run, _single
from svdicl.experiments.runs import EvalRun, RunResult, limit_examples, prepare_run, scored_seeds
from svdicl.files import replaced, write_atomic
from svdicl.models import LoadedModel, as_loaded
from svdicl.prompts import shot_counts, shots_in_all
from svdicl.prune import pruned
from svdicl.requests import Scores
from svdicl.scoring import ExecutionPath
from svdicl.stats import INTERVALS, spread
from svdicl.store import CELLS_FILE, CellKey, Result, Store
from svdicl.tasks import TaskConfig, get_task
from svdicl.tasks.data import content_digest, load_splits

RESULTS_FILE = "results.json"
RESULTS_FORMAT = "svdicl-eval/1"
SAMPLES_FILE = "samples.jsonl"
STORE_DIR = "store"  # the evaluation's cells (svdicl.store), one per seed scored
LIMIT_RULE = "the first N examples of the split after a shuffle fixed by the task's split_seed (same for every seed and edit)"

Scored = tuple[dict, list[dict]]  # one seed: its entry in results.json, its rows of samples.jsonl


def evaluate(
    loaded: LoadedModel,
    task: TaskConfig | str,
    *,
    split: str = "test",
    shots: int | None = None,
    shots_total: bool = False,
    seeds: Sequence[int] = (0,),
    limit: int | None = None,
    specs: Sequence = (),
    svd: str = "float32",
    allow_tied: bool = False,
    batch_size: int = 8,
    padding_side: str = "left",
    length_normalize: bool = False,
    data_dir: str | Path | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    path: str = "auto",
    cache_memory: int | None = None,
    calibration: str | Sequence[str] = (),
) -> Evaluation:
    """Evaluate `task` for every seed under the edit `specs`; with `output`, write and resume there.

    `shots` counts demonstrations per class (None: the task's paper setting), or in all with `shots_total`
    (lm-eval's --num_fewshot, drawn as balanced as it allows: `svdicl.prompts.shot_counts`).

    `calibration` (none, all, or methods of svdicl.calibration) adds each method's scores,
    predictions and metrics beside the uncalibrated ones.

    An unfinished output folder of the same configuration (model, task definition, data digest,
    ...) is resumed (finished seeds and examples are read back from its store); one of another
    configuration is refused; a finished one is returned without tokenizing anything.  The
    scoring path is chosen per seed before any forward pass and recorded in the config.  With 0
    shots (and no calibration) the seeds share their prompts: the first seed's run is scored once
    and reused for the others (`reused_from_seed` in their timing).
    """
    from svdicl.provenance import versions

    loaded = as_loaded(loaded, "evaluate")
    task = get_task(task) if isinstance(task, str) else task
    if not seeds or len(set(seeds)) != len(seeds):
        raise SvdiclError("give at least one --seed, each once")
    started = time.perf_counter()
    splits = load_splits(task, data_dir)
    _single(path)
    with pruned(loaded.model, specs=specs, svd=svd, allow_tied=allow_tied) as record:
        shots, extra = shot_counts(task, shots, shots_total)
        methods = cal.applicable(task, cal.parse_calibration(calibration))
        examples = limit_examples(splits.split(split), limit, task.split_seed)  # what prepare_run scores
        config = {
            "model": {
                "source": loaded.source,
                "fingerprint": loaded.fingerprint,
                "dtype": loaded.dtype,
                "model_type": loaded.model_type,
            },
            "task": task.to_dict(),
            "data": splits.origin,
            "data_digest": content_digest(task, examples, splits.demonstrations),  # what is scored, by content
            "split": split,
            "shots_per_class": shots,
            "shots_total": shots_in_all(task, shots, extra),
            **({"extra_shots": extra} if extra else {}),  # only when there are: earlier configs stay equal
            "seeds": list(seeds),
            "limit": limit,
            "limit_rule": LIMIT_RULE,
            "edit": record.to_dict(),
            "batch_size": batch_size,
            "scoring": {
                "padding_side": padding_side,
                "length_normalize": length_normalize,
                "calibration": list(methods),
            },
            "statistics": INTERVALS,
        }
        finished = _finished(output, config) if output is not None and not overwrite else None
        if finished is not None:
            return Evaluation.from_results(finished, output)  # the same evaluation, done: nothing to tokenize or score
        prepared = [
            prepare_run(
                loaded, task, split=split, shots=shots, seed=seed, limit=limit, splits=splits, calibration=methods,
                progress=not quiet, extra_shots=extra,
            )
            for seed in scored_seeds(shots, seeds, methods, extra)
        ]  # fmt: skip
        paths = [_choose(loaded, run, path, batch_size, cache_memory) for run in prepared]
        config["scoring"] = {**_paths_used(paths), **config["scoring"]}
        config = json.loads(json.dumps(config))
        store = _open_store(Path(output), config, overwrite) if output is not None else None
        options = Scoring(length_normalize=length_normalize, svd=svd, calibration=methods)
        scored = []
        for run, chosen in zip(prepared, paths, strict=True):
            key = run_key(loaded, splits, split, shots, run.seed, limit, options, config["data_digest"], extra)
            key = replace(key, edit=record.key)
            score = functools.partial(_score_run, loaded, run, chosen, batch_size, padding_side, length_normalize)
            scored.append(_score_seed(score, run, store, key, {"config": config}, model_name=loaded.source, quiet=quiet))
        scored += [_reused(scored[0], seed) for seed in seeds[len(scored) :]]  # zero-shot: the other seeds' prompts are the same
    runs = [summary for summary, _ in scored]
    results = {
        "format": RESULTS_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "versions": versions(),
        "runs": runs,
        "summary": {
            "metric": task.metric,
            "accuracy": spread([r["metrics"]["accuracy"]["value"] for r in runs]),
            "macro_f1": spread([r["metrics"]["macro_f1"]["value"] for r in runs]),
            **{
                cal.metric_key(m, name): spread([r["metrics"][cal.metric_key(m, name)]["value"] for r in runs])
                for m in methods
                for name in ("accuracy", "macro_f1")
            },
        },
        "timing": {"wall_s": round(time.perf_counter() - started, 3)},
    }
    if output is not None:
        _write_views(Path(output), results, [sample for _, samples in scored for sample in samples])
    return Evaluation.from_results(results, output)


def _score_seed(
    score: Callable[..., RunResult], run: EvalRun, store: Store | None, key: CellKey, info: dict, *, model_name: str, quiet: bool
) -> Scored:
    """One seed scored here, or read back from `store`.  Scored into a store, the seed's rows are kept there every
    CHUNK examples (an interrupted seed resumes from them) and the finished seed is stored as the cell `key`; a
    seed another process is scoring is waited for (and scored here if that process dies first)."""
    from tqdm.auto import tqdm

    def scored(known: Mapping[str, Scores] | None, keep: Callable[[list[int], list[Scores]], None] | None) -> RunResult:
        desc = f"{run.task.name} seed {run.seed}"
        with tqdm(total=len(run.scored_requests), desc=desc, unit="ex", file=sys.stderr, disable=quiet) as bar:
            return score(known, keep, bar)

    if store is None:
        result = scored(None, None)
        return result.summary(), result.samples()

    def keep(indices: list[int], scores: list[Scores]) -> None:
        rows = [
            {"id": run.examples[i].id, "logprobs": list(s.logprobs), "n_tokens": list(s.n_tokens)}
            for i, s in zip(indices, scores, strict=True)
        ]
        store.keep_unfinished(key, rows)

    try:
        while not store.has(key):
            if not store.claim(key):
                store.wait(key)
                continue
            known = {row["id"]: Scores(tuple(row["logprobs"]), tuple(row["n_tokens"])) for row in store.unfinished_rows(key)}
            started = time.perf_counter()
            result = scored(known, keep)
            cell = Result(result.metrics(), len(result.predictions), result.samples(), sum(result.ties), model_name,
                          {**info, "run": result.summary()})  # fmt: skip
            store.put(key, cell, seconds=time.perf_counter() - started)
    finally:
        store.release()  # a claim not stored (an error, an interrupt): free for the next run at once
    cell = store.get(key)
    return cell.info["run"], store.samples(cell)


def _reused(scored: Scored, seed: int) -> Scored:
    """A zero-shot seed as the run of `seed`, which has the same prompts: nothing rescored, the reuse recorded."""
    summary, samples = scored
    timing = {**summary["timing"], "wall_s": 0.0, "examples_scored": 0, "examples_reused": summary["n_examples"]}
    summary = {**summary, "seed": seed, "timing": {**timing, "reused_from_seed": summary["seed"]}}
    return summary, [{**sample, "seed": seed} for sample in samples]


def _paths_used(paths: Sequence[ExecutionPath]) -> dict:
    """The scoring path of every seed's run (one name when they agree) and why faster ones were not taken."""
    names = list(dict.fromkeys(p.name for p in paths))
    reasons = list(dict.fromkeys(p.fallback for p in paths if p.fallback))
    return {"path": names[0] if len(names) == 1 else names, "fallback": "; ".join(reasons) or None}


def _finished(output: str | Path, config: dict) -> dict | None:
    """results.json in `output` if it holds `config`'s evaluation, whichever scoring path it took (that moves
    scores by float rounding at most, and knowing it needs every prompt tokenized)."""
    results = Path(output) / RESULTS_FILE
    if not results.is_file():
        return None
    stored = _read_json(results)
    previous = dict(stored.get("config", {}))
    previous["scoring"] = {k: v for k, v in previous.get("scoring", {}).items() if k not in ("path", "fallback")}
    return stored if previous == json.loads(json.dumps(config)) else None


def _open_store(folder: Path, config: dict, overwrite: bool) -> Store:
    """The folder's store, once the folder is known to hold this evaluation or none (with `overwrite`, svdicl's
    results.json, samples.jsonl and store are removed first); a file svdicl did not write is never replaced."""
    if folder.exists() and not folder.is_dir():
        raise SvdiclError(f"output {folder} is a file; choose a folder path")
    results, samples, cells = folder / RESULTS_FILE, folder / SAMPLES_FILE, folder / STORE_DIR
    written = _read_json(results) if results.is_file() else None
    if written is not None and (not isinstance(written, dict) or written.get("format") != RESULTS_FORMAT):
        raise SvdiclError(f"{results} was not written by svdicl eval, so svdicl will not replace it; choose another --output")
    foreign = cells.exists() and not (cells / CELLS_FILE).is_file() and (not cells.is_dir() or any(cells.iterdir()))
    if foreign or (written is None and samples.is_file() and not cells.exists()):  # ours has results.json or a store
        where = cells if foreign else samples
        raise SvdiclError(f"{where} was not written by svdicl eval, so svdicl will not replace it; choose another --output")
    if written is not None:
        different = written.get("config") != config
    else:
        different = cells.is_dir() and any(cell.info.get("config") != config for cell in Store(cells).cells())
    if different and not overwrite:
        raise SvdiclError(f"output folder {folder} holds a different evaluation; choose a new --output or pass --overwrite")
    if overwrite:
        results.unlink(missing_ok=True)
        samples.unlink(missing_ok=True)
        if cells.exists():
            shutil.rmtree(cells)
    return Store(cells)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise SvdiclError(f"{path} is damaged; pass --overwrite to start again") from None


def _write_views(folder: Path, results: dict, samples: Sequence[dict]) -> None:
    """samples.jsonl (one line per example and seed), then results.json, each written atomically."""
    with replaced(folder / SAMPLES_FILE) as partial, open(partial, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)
    write_atomic(folder / RESULTS_FILE, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
