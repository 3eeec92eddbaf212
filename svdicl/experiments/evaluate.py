"""ICL evaluation: build a run's requests once, score them under the current weights, report.

Sweeps and Algorithm 1 evaluate the same examples under many edits of one loaded model, so
the work is split in two:

    run = prepare_run(loaded, task, split="validation", shots=5, seed=0)   # data, prompts, token ids
    with svdicl.pruned(loaded.model, layers=26, modules="mlp", rate=0.95):
        result = evaluate_run(loaded, run)                                  # forward passes + metrics
    result.accuracy.value, result.accuracy.low, result.accuracy.high

`evaluate` does both for the CLI (several seeds, an optional edit, resumable output) and
`write_results` writes `results.json` + `samples.jsonl`.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from svdicl.errors import SvdiclError
from svdicl.models import LoadedModel
from svdicl.prompts import Prompt, build_prompt, demonstrations_text, sample_demonstrations
from svdicl.scoring import Request, Scores, build_requests, choose, context_length, forwarded_tokens, score
from svdicl.stats import CONFIDENCE, RESAMPLES, Estimate, accuracy_ci, macro_f1_ci, spread
from svdicl.tasks import TaskConfig, get_task
from svdicl.tasks.data import Example, TaskSplits, load_splits

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
PROGRESS_FILE = "progress.json"  # present only while a run is unfinished; holds its config
LIMIT_RULE = "the first N examples of the split after a shuffle fixed by the task's split_seed (same for every seed and edit)"
CHUNK = 64  # requests scored between two writes of samples.jsonl (the unit of resumption)


@dataclass(frozen=True)
class EvalRun:
    """Everything fixed before any forward pass: examples, demonstrations, prompts, token ids."""

    task: TaskConfig
    split: str
    shots: int  # per class
    seed: int
    limit: int | None
    examples: tuple[Example, ...]
    demonstrations: tuple[Example, ...]
    prompts: tuple[Prompt, ...]
    requests: tuple[Request, ...]
    data: str  # where the rows came from

    @property
    def gold(self) -> tuple[int, ...]:
        return tuple(e.label for e in self.examples)


def limit_examples(examples: Sequence[Example], limit: int | None, split_seed: int) -> tuple[Example, ...]:
    """The --limit subset: the first `limit` of a seeded shuffle, returned in file order."""
    if limit is None or limit >= len(examples):
        return tuple(examples)
    if limit < 1:
        raise SvdiclError(f"--limit must be >= 1, not {limit}")
    order = list(range(len(examples)))
    random.Random(f"limit:{split_seed}").shuffle(order)
    return tuple(examples[i] for i in sorted(order[:limit]))


def prepare_run(
    loaded: LoadedModel,
    task: TaskConfig | str,
    *,
    split: str = "test",
    shots: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    splits: TaskSplits | None = None,
) -> EvalRun:
    """Draw the demonstrations for `seed`, render every prompt and tokenize it into Requests.

    `shots` counts demonstrations per class (default: the paper's, `task.shots`).  Pass
    `splits` to reuse data already loaded for another seed.
    """
    task = get_task(task) if isinstance(task, str) else task
    splits = splits if splits is not None else load_splits(task, data_dir)
    shots = task.shots if shots is None else shots
    examples = limit_examples(splits.split(split), limit, task.split_seed)
    demonstrations = sample_demonstrations(task, splits.demonstrations, shots, seed)
    block = demonstrations_text(task, demonstrations)
    prompts = tuple(build_prompt(task, block, e) for e in examples)
    requests = build_requests(
        loaded.tokenizer,
        block,
        [p.query for p in prompts],
        [p.candidates for p in prompts],
        ids=[e.id for e in examples],
        max_length=context_length(loaded.model, loaded.tokenizer),
    )
    return EvalRun(task, split, shots, seed, limit, examples, demonstrations, prompts, tuple(requests), splits.origin)


@dataclass(frozen=True)
class RunResult:
    run: EvalRun
    scores: tuple[Scores, ...]
    predictions: tuple[int, ...]
    ties: tuple[bool, ...]
    accuracy: Estimate
    macro_f1: Estimate
    timing: dict
    length_normalize: bool

    @property
    def correct(self) -> tuple[bool, ...]:
        return tuple(p == g for p, g in zip(self.predictions, self.run.gold, strict=True))

    def summary(self) -> dict:
        """The run's entry in results.json."""
        k = self.run.task.num_classes
        confusion = [[0] * k for _ in range(k)]
        for g, p in zip(self.run.gold, self.predictions, strict=True):
            confusion[g][p] += 1
        return {
            "seed": self.run.seed,
            "demonstrations": [e.id for e in self.run.demonstrations],
            "n_examples": len(self.predictions),
            "n_ties": sum(self.ties),
            "metrics": {"accuracy": self.accuracy.to_dict(), "macro_f1": self.macro_f1.to_dict()},
            "confusion": {"labels": list(self.run.task.labels), "rows_gold_columns_predicted": confusion},
            "timing": self.timing,
        }

    def samples(self) -> list[dict]:
        return [_sample(self.run, i, s, self.length_normalize) for i, s in enumerate(self.scores)]


def _sample(run: EvalRun, index: int, scores: Scores, length_normalize: bool) -> dict:
    prediction, tie = choose(scores, length_normalize)
    prompt, gold = run.prompts[index], run.examples[index].label
    return {
        "seed": run.seed,
        "id": run.examples[index].id,
        "prompt": prompt.text,
        "candidates": list(prompt.candidates),
        "gold": gold,
        "logprobs": list(scores.logprobs),
        "n_tokens": list(scores.n_tokens),
        "prediction": prediction,
        "correct": prediction == gold,
        "tie": tie,
    }


def evaluate_run(
    loaded: LoadedModel,
    run: EvalRun,
    *,
    batch_size: int = 8,
    padding_side: str = "left",
    length_normalize: bool = False,
    known: Mapping[str, Scores] | None = None,
    on_scored: Callable[[list[int], list[Scores]], None] | None = None,
    progress=None,
) -> RunResult:
    """Score `run` under the model's current weights and compute its metrics.

    `known` maps example ids to scores from an interrupted earlier attempt (they are not
    rescored); `on_scored(indices, scores)` is called after every chunk of new scores.
    """
    known = known or {}
    scores: list[Scores | None] = [known.get(e.id) for e in run.examples]
    pending = [i for i, s in enumerate(scores) if s is None]
    if progress is not None:
        progress.update(len(run.examples) - len(pending))
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    started = time.perf_counter()
    for start in range(0, len(pending), CHUNK):
        chunk = pending[start : start + CHUNK]
        new = score(
            loaded.model,
            [run.requests[i] for i in chunk],
            batch_size=batch_size,
            pad_id=pad_id,
            padding_side=padding_side,
            progress=progress,
        )
        for i, s in zip(chunk, new, strict=True):
            scores[i] = s
        if on_scored is not None:
            on_scored(chunk, new)
    wall = time.perf_counter() - started
    tokens = forwarded_tokens([run.requests[i] for i in pending])
    return finish_run(run, scores, length_normalize, _timing(wall, len(pending), tokens, len(run.examples) - len(pending)))


def finish_run(run: EvalRun, scores: Sequence[Scores], length_normalize: bool, timing: dict) -> RunResult:
    """Predictions, ties and metrics with bootstrap CIs from a run's scores."""
    chosen = [choose(s, length_normalize) for s in scores]
    predictions = tuple(p for p, _ in chosen)
    gold = run.gold
    return RunResult(
        run=run,
        scores=tuple(scores),
        predictions=predictions,
        ties=tuple(t for _, t in chosen),
        accuracy=accuracy_ci(gold, predictions),
        macro_f1=macro_f1_ci(gold, predictions, run.task.num_classes),
        timing=timing,
        length_normalize=length_normalize,
    )


def _timing(wall: float, examples: int, tokens: int, reused: int) -> dict:
    return {
        "wall_s": round(wall, 3),
        "examples_scored": examples,
        "examples_reused": reused,
        "examples_per_s": round(examples / wall, 3) if wall > 0 else None,
        "tokens_forwarded": tokens,
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
    }


def evaluate(
    loaded: LoadedModel,
    task: TaskConfig | str,
    *,
    split: str = "test",
    shots: int | None = None,
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
) -> dict:
    """Evaluate `task` for every seed under the edit `specs`; with `output`, write and resume there.

    Returns the content of results.json.  An unfinished output folder of the same
    configuration is resumed (finished examples are read back from samples.jsonl).
    """
    from tqdm.auto import tqdm

    from svdicl.provenance import versions
    from svdicl.prune import pruned

    task = get_task(task) if isinstance(task, str) else task
    if not seeds or len(set(seeds)) != len(seeds):
        raise SvdiclError("give at least one --seed, each once")
    started = time.perf_counter()
    splits = load_splits(task, data_dir)
    with pruned(loaded.model, specs=specs, svd=svd, allow_tied=allow_tied) as record:
        shots = task.shots if shots is None else shots
        config = {
            "model": {
                "source": loaded.source,
                "fingerprint": loaded.fingerprint,
                "dtype": loaded.dtype,
                "model_type": loaded.model_type,
            },
            "task": task.to_dict(),
            "data": splits.origin,
            "split": split,
            "shots_per_class": shots,
            "shots_total": shots * task.num_classes,
            "seeds": list(seeds),
            "limit": limit,
            "limit_rule": LIMIT_RULE,
            "edit": record.to_dict(),
            "batch_size": batch_size,
            "scoring": {"path": "plain", "padding_side": padding_side, "length_normalize": length_normalize},
            "statistics": {"bootstrap": "percentile", "resamples": RESAMPLES, "confidence": CONFIDENCE, "seed": 0},
        }
        config = json.loads(json.dumps(config))
        folder, known = _open_output(output, config, overwrite) if output is not None else (None, {})
        if folder is not None and (folder / RESULTS_FILE).is_file():
            return json.loads((folder / RESULTS_FILE).read_text())
        runs = []
        for seed in seeds:
            run = prepare_run(loaded, task, split=split, shots=shots, seed=seed, limit=limit, splits=splits)
            write = _appender(folder, run, length_normalize) if folder is not None else None
            with tqdm(total=len(run.examples), desc=f"{task.name} seed {seed}", unit="ex", file=sys.stderr, disable=quiet) as bar:
                runs.append(
                    evaluate_run(
                        loaded,
                        run,
                        batch_size=batch_size,
                        padding_side=padding_side,
                        length_normalize=length_normalize,
                        known=known.get(seed),
                        on_scored=write,
                        progress=bar,
                    )
                )
    results = {
        "format": "svdicl-eval/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "versions": versions(),
        "runs": [r.summary() for r in runs],
        "summary": {
            "metric": task.metric,
            "accuracy": spread([r.accuracy.value for r in runs]),
            "macro_f1": spread([r.macro_f1.value for r in runs]),
        },
        "timing": {"wall_s": round(time.perf_counter() - started, 3)},
    }
    if folder is not None:
        write_results(folder, results, [s for r in runs for s in r.samples()])
    return results


def _open_output(output: str | Path, config: dict, overwrite: bool) -> tuple[Path, dict[int, dict[str, Scores]]]:
    """Create or reopen the output folder; return finished scores of an interrupted run, by seed and id."""
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise SvdiclError(f"output {folder} is a file; choose a folder path")
    folder.mkdir(parents=True, exist_ok=True)
    results, progress, samples = folder / RESULTS_FILE, folder / PROGRESS_FILE, folder / SAMPLES_FILE
    previous = _read_json(results).get("config") if results.is_file() else _read_json(progress) if progress.is_file() else None
    if previous is not None and previous != config and not overwrite:
        raise SvdiclError(f"output folder {folder} holds a different evaluation; choose a new --output or pass --overwrite")
    if previous != config or overwrite:
        for path in (results, samples, progress):
            path.unlink(missing_ok=True)
    if results.is_file():
        return folder, {}
    _write_json(progress, config)
    lines = samples.read_text(encoding="utf-8").splitlines() if samples.is_file() else []
    known: dict[int, dict[str, Scores]] = {}
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            known.setdefault(row["seed"], {})[row["id"]] = Scores(tuple(row["logprobs"]), tuple(row["n_tokens"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            if number < len(lines):
                raise SvdiclError(f"{samples}, line {number} is damaged; pass --overwrite to start again") from None
            samples.write_text("".join(kept + "\n" for kept in lines[:-1]), encoding="utf-8")  # torn by an interruption
    return folder, known


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise SvdiclError(f"{path} is damaged; pass --overwrite to start again") from None


def _appender(folder: Path, run: EvalRun, length_normalize: bool) -> Callable[[list[int], list[Scores]], None]:
    def append(indices: list[int], scores: list[Scores]) -> None:
        with open(folder / SAMPLES_FILE, "a", encoding="utf-8") as handle:
            for i, s in zip(indices, scores, strict=True):
                handle.write(json.dumps(_sample(run, i, s, length_normalize), ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    return append


def write_results(folder: str | Path, results: dict, samples: Sequence[dict]) -> Path:
    """results.json and samples.jsonl (one line per example and seed), each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (SAMPLES_FILE + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
    partial.replace(folder / SAMPLES_FILE)
    _write_json(folder / RESULTS_FILE, results)
    (folder / PROGRESS_FILE).unlink(missing_ok=True)
    return folder


def _write_json(path: Path, value: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    partial.replace(path)
