"""ICL evaluation: build a run's requests once, score them under the current weights, report.

Sweeps and Algorithm 1 evaluate the same examples under many edits of one loaded model, so
the work is split in two:

    run = prepare_run(loaded, task, split="validation", shots=5, seed=0)   # data, prompts, token ids
    with svdicl.pruned(loaded.model, layers=26, modules="mlp", rate=0.95):
        result = evaluate_run(loaded, run)                                  # forward passes + metrics
    result.accuracy.value, result.accuracy.low, result.accuracy.high

`evaluate` does both for the CLI (several seeds, an optional edit, resumable output) and
`write_results` writes `results.json` + `samples.jsonl`.  `evaluate_edits` scores one run
under many edits (sweeps, Algorithm 1) and is where the layer cache pays: everything below
the lowest edited layer runs once per call.

Every entry point takes `path` (auto, plain, prefix; `evaluate_edits` also layer) and
`cache_memory` (bytes the caches may hold); the path taken and why a faster one was not
are in each result's `timing` (`path`, `fallback`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from svdicl import calibration as cal
from svdicl import precision as px
from svdicl.bias import bias_metrics
from svdicl.errors import SvdiclError
from svdicl.memory import DEFAULT_CACHE_MEMORY
from svdicl.models import LoadedModel, as_loaded
from svdicl.prompts import Prompt, build_prompt, demonstrations_text, sample_demonstrations
from svdicl.prune import EditRecord, pruned
from svdicl.requests import Request, Scores, build_requests, context_length, forwarded_tokens
from svdicl.scoring import ExecutionPath, LayerScorer, SharedPrefix, check_path, choose, choose_path, score_requests
from svdicl.specs import PruneSpec
from svdicl.stats import INTERVALS, Estimate, accuracy_ci, macro_f1_ci, spread
from svdicl.targets import resolve
from svdicl.tasks import TaskConfig, get_task
from svdicl.tasks.data import Example, TaskSplits, content_digest, load_splits

RESULTS_FILE = "results.json"
RESULTS_FORMAT = "svdicl-eval/1"
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
    calibration: tuple[str, ...] = ()  # methods applied to this run's scores (svdicl.calibration)
    probes: tuple[tuple[str, str], ...] = ()  # (method, query) of every content-free / domain query
    probe_requests: tuple[Request, ...] = ()  # scored after the examples, on the same path

    @property
    def gold(self) -> tuple[int, ...]:
        """The gold class index of every example, in order."""
        return tuple(e.label for e in self.examples)

    @property
    def scored_requests(self) -> tuple[Request, ...]:
        """What the model scores: the examples' requests, then the calibration queries'."""
        return self.requests + self.probe_requests


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
    calibration: Sequence[str] = (),
    progress: bool = False,
) -> EvalRun:
    """Draw the demonstrations for `seed`, render every prompt and tokenize it into Requests.

    `shots` counts demonstrations per class (default: the paper's, `task.shots`).  Pass
    `splits` to reuse data already loaded for another seed.  `calibration` names methods of
    svdicl.calibration (those that apply to the task): their queries become extra requests
    after the same demonstrations.  Only the `limit` examples are tokenized;
    `progress` shows a bar on stderr while they are (a whole split takes a while).
    """
    from tqdm.auto import tqdm

    loaded = as_loaded(loaded, "prepare_run")
    task = get_task(task) if isinstance(task, str) else task
    splits = splits if splits is not None else load_splits(task, data_dir)
    shots = task.shots if shots is None else shots
    examples = limit_examples(splits.split(split), limit, task.split_seed)
    demonstrations = sample_demonstrations(task, splits.demonstrations, shots, seed)
    block = demonstrations_text(task, demonstrations)
    prompts = tuple(build_prompt(task, block, e) for e in examples)
    desc = f"tokenizing {task.name} {split} seed {seed}"
    with tqdm(total=len(prompts), desc=desc, unit="ex", file=sys.stderr, disable=not progress, leave=False) as bar:
        requests = build_requests(
            loaded.tokenizer,
            block,
            [p.query for p in prompts],
            [p.candidates for p in prompts],
            ids=[e.id for e in examples],
            max_length=context_length(loaded.model, loaded.tokenizer),
            progress=bar,
        )
    methods = cal.applicable(task, cal.parse_calibration(calibration))
    probes = tuple((m, q) for m in methods for q in cal.probe_queries(task, m, splits.demonstrations, seed))
    probe_requests = build_requests(
        loaded.tokenizer,
        block,
        [q for _, q in probes],
        [tuple(task.answer_delimiter + w for w in task.labels)] * len(probes),
        ids=[f"{m} calibration query {q!r}" for m, q in probes],
        max_length=context_length(loaded.model, loaded.tokenizer),
    )
    return EvalRun(
        task, split, shots, seed, limit, examples, demonstrations, prompts, tuple(requests), splits.origin,
        methods, probes, tuple(probe_requests),
    )  # fmt: skip


@dataclass(frozen=True)
class CalibratedRun:
    """A run's predictions under one calibration method, with their metrics."""

    calibrated: cal.Calibrated
    accuracy: Estimate
    macro_f1: Estimate


def scored_seeds(shots: int, seeds: Sequence[int], calibration: Sequence[str] = ()) -> tuple[int, ...]:
    """The seeds whose runs are scored: with no demonstrations every seed has the same prompts, so the first stands
    for all; calibration (its domain queries are drawn per seed) keeps every seed."""
    return tuple(seeds[:1]) if shots == 0 and not calibration else tuple(seeds)


@dataclass(frozen=True)
class RunResult:
    """One run scored under one set of weights: per-example scores, predictions and metrics with CIs."""

    run: EvalRun
    scores: tuple[Scores, ...]
    predictions: tuple[int, ...]
    ties: tuple[bool, ...]
    accuracy: Estimate
    macro_f1: Estimate
    timing: dict
    length_normalize: bool
    calibrated: tuple[CalibratedRun, ...] = ()
    probe_scores: tuple[Scores, ...] = ()  # of run.probes, in order

    @property
    def correct(self) -> tuple[bool, ...]:
        """Whether each example's prediction equals its gold class."""
        return tuple(p == g for p, g in zip(self.predictions, self.run.gold, strict=True))

    @functools.cached_property
    def bias(self) -> dict:
        """Bias-aware metrics of the uncalibrated predictions, then of each calibration's (by method); computed once,
        though results, metrics and the calibration summary all read them."""
        k, gold = self.run.task.num_classes, self.run.gold
        found = {None: bias_metrics(gold, self.predictions, ranking_scores(self.scores, self.length_normalize), k)}
        for c in self.calibrated:
            found[c.calibrated.method] = bias_metrics(gold, c.calibrated.predictions, c.calibrated.scores, k)
        return found

    def metrics(self) -> dict:
        """Every metric as {"value", ...}: accuracy and macro-F1 with CIs, the bias-aware ones, each
        again per calibration method as `<method>:<metric>`."""
        bias = self.bias
        found = {}
        for method, accuracy, macro in [(None, self.accuracy, self.macro_f1)] + [
            (c.calibrated.method, c.accuracy, c.macro_f1) for c in self.calibrated
        ]:
            prefix = f"{method}:" if method else ""
            found[prefix + "accuracy"] = accuracy.to_dict()
            found[prefix + "macro_f1"] = macro.to_dict()
            for name in BIAS_METRICS:
                found[prefix + name] = {"value": bias[method][name]}
        return found

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
            "metrics": self.metrics(),
            "prediction_counts": self.bias[None]["prediction_counts"],
            "confusion": {"labels": list(self.run.task.labels), "rows_gold_columns_predicted": confusion},
            "calibration": self.calibration_summary(),
            "timing": self.timing,
        }

    def calibration_summary(self) -> dict:
        """Per method: its prior p_cf, its prediction counts and (contextual, domain) the queries with their raw scores."""
        bias = self.bias
        found = {}
        for c in self.calibrated:
            method = c.calibrated.method
            queries = [
                {"query": q, "logprobs": list(s.logprobs), "n_tokens": list(s.n_tokens)}
                for (m, q), s in zip(self.run.probes, self.probe_scores, strict=True)
                if m == method
            ]
            found[method] = {"prior": list(c.calibrated.prior), "prediction_counts": bias[method]["prediction_counts"],
                             **({"queries": queries} if method in cal.PROBES else {})}  # fmt: skip
        return found

    def samples(self) -> list[dict]:
        """The run's samples.jsonl rows: prompt, per-candidate scores, prediction, correctness (and calibrated ones)."""
        return [
            _sample(self.run, i, s, self.length_normalize, {c.calibrated.method: c.calibrated for c in self.calibrated})
            for i, s in enumerate(self.scores)
        ]

    def reused_for(self, seed: int) -> RunResult:
        """This zero-shot result as the run of `seed`, which has the same prompts: nothing rescored, the reuse recorded."""
        if self.run.demonstrations:
            raise SvdiclError("only a run without demonstrations is the same for every seed")
        timing = {**self.timing, "wall_s": 0.0, "examples_scored": 0, "examples_reused": len(self.scores)}
        return replace(self, run=replace(self.run, seed=seed), timing={**timing, "reused_from_seed": self.run.seed})


BIAS_METRICS = ("balanced_accuracy", "top_answer_share", "auc")


def ranking_scores(scores: Sequence[Scores], length_normalize: bool) -> list[list[float]]:
    """The values candidates are ranked by: summed log-probs, or the mean per token with length normalisation."""
    return [[lp / n if length_normalize else lp for lp, n in zip(s.logprobs, s.n_tokens, strict=True)] for s in scores]


def _sample(run: EvalRun, index: int, scores: Scores, length_normalize: bool, calibrated: Mapping | None = None) -> dict:
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
        **({"calibrated": {
            method: {"scores": list(c.scores[index]), "prediction": c.predictions[index], "correct": c.predictions[index] == gold}
            for method, c in calibrated.items()
        }} if calibrated else {}),
    }  # fmt: skip


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
    path: str = "auto",
    cache_memory: int | None = None,
    precision: str = "float32",
) -> RunResult:
    """Score `run` under the model's current weights and compute its metrics.

    `known` maps example ids to scores from an interrupted earlier attempt (they are not
    rescored); `on_scored(indices, scores)` is called after every chunk of new scores.
    `path` auto takes the shared-prefix path where the model has one and `cache_memory`
    (bytes; None: 4 GiB) holds it, else the plain path.  `precision` mixed scores in bfloat16 and
    re-scores in float32 every example whose decision could differ (svdicl.precision).
    """
    loaded = as_loaded(loaded, "evaluate_run")
    chosen = _choose(loaded, run, _single(path), batch_size, cache_memory)
    low, record = _low(loaded, precision)
    result = _score_run(loaded, run, chosen, batch_size, padding_side, length_normalize, known, on_scored, progress, low)
    return _exact(loaded, run, chosen, batch_size, length_normalize, result, low, record, px.Bound())


def _low(loaded: LoadedModel, precision: str) -> tuple[px.LowPrecision | None, px.PrecisionRecord]:
    """The bfloat16 copy for the mixed path, or None and why float32 runs alone."""
    if px.check_precision(precision) == "float32":
        return None, px.PrecisionRecord("float32")
    reason = px.unsupported_reason(loaded.model)
    if reason is not None:
        return None, px.PrecisionRecord("float32", fallback=reason)
    return px.low_precision(loaded.model), px.PrecisionRecord("mixed")


def _exact(loaded, run, chosen, batch_size, length_normalize, result, low, record, bound, offset=0, rows=None) -> RunResult:
    """On the mixed path, `result` (bfloat16) with every example whose decision could differ re-scored in float32."""
    if low is None:
        return dataclasses.replace(result, timing={**result.timing, **record.to_dict()})
    started = time.perf_counter()
    requests = run.scored_requests
    cached: list[SharedPrefix] = []

    def exact(indices: list[int]) -> list[Scores]:
        if rows is not None:
            return rows(indices)
        if chosen.plan is not None and not cached:
            cached.append(SharedPrefix(loaded.model, chosen.plan.prefix))
        chunk = [requests[i] for i in indices]
        return score_requests(loaded.model, chunk, batch_size=batch_size, pad_id=_pad_id(loaded), prefix=(cached or [None])[0])

    scores, record = px.resolve(
        result.scores + result.probe_scores,
        exact,
        bound,
        examples=len(run.examples),
        probe_methods=[method for method, _ in run.probes],
        methods=run.calibration,
        length_normalize=length_normalize,
        offset=offset,
    )
    timing = {**result.timing, **record.to_dict(), "rescore_s": round(time.perf_counter() - started, 3)}
    return finish_run(run, scores, length_normalize, timing)


def _single(path: str) -> str:
    if check_path(path) == "layer":
        raise SvdiclError("the layer path serves sweeps of one run under many edits (evaluate_edits); use auto, plain or prefix")
    return path


def _budget(cache_memory: int | None) -> int:
    if cache_memory is None:
        return DEFAULT_CACHE_MEMORY
    if cache_memory < 0:
        raise SvdiclError(f"--cache-memory must be >= 0 bytes, not {cache_memory}")
    return cache_memory


def _pad_id(loaded: LoadedModel) -> int:
    return loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0


def _choose(loaded: LoadedModel, run: EvalRun, path: str, batch_size: int, cache_memory: int | None, start=None) -> ExecutionPath:
    budget = _budget(cache_memory)
    return choose_path(
        loaded.model, run.scored_requests, path, batch_size=batch_size, pad_id=_pad_id(loaded), budget=budget, start=start
    )


def _score_run(
    loaded: LoadedModel,
    run: EvalRun,
    chosen: ExecutionPath,
    batch_size: int,
    padding_side: str,
    length_normalize: bool,
    known: Mapping[str, Scores] | None = None,
    on_scored: Callable[[list[int], list[Scores]], None] | None = None,
    progress=None,
    low: px.LowPrecision | None = None,
) -> RunResult:
    """`run` on the plain or the prefix path (the prefix's keys/values computed once, under the current weights);
    with `low`, on its bfloat16 copy of the weights."""
    model = loaded.model if low is None else low.sync()
    known = known or {}
    scores: list[Scores | None] = [known.get(e.id) for e in run.examples] + [None] * len(run.probe_requests)
    pending = [i for i, s in enumerate(scores) if s is None]
    requests, n = run.scored_requests, len(run.examples)
    if progress is not None:
        progress.update(len(scores) - len(pending))
    started = time.perf_counter()
    prefix = SharedPrefix(model, chosen.plan.prefix) if chosen.name == "prefix" and pending else None
    for start in range(0, len(pending), CHUNK):
        chunk = pending[start : start + CHUNK]
        new = score_requests(
            model,
            [requests[i] for i in chunk],
            batch_size=batch_size,
            pad_id=_pad_id(loaded),
            padding_side=padding_side,
            progress=progress,
            prefix=prefix,
        )
        for i, s in zip(chunk, new, strict=True):
            scores[i] = s
        if on_scored is not None:
            on_scored([i for i in chunk if i < n], [s for i, s in zip(chunk, new, strict=True) if i < n])
    wall = time.perf_counter() - started
    requests = [requests[i] for i in pending]
    tokens = forwarded_tokens(requests, None if prefix is None else len(prefix.ids))
    timing = _timing(wall, len(pending), tokens, forwarded_tokens(requests), len(scores) - len(pending))
    return finish_run(run, scores, length_normalize, {**timing, **chosen.to_dict()})


def evaluate_edits(
    loaded: LoadedModel,
    run: EvalRun,
    edits: Sequence[Sequence[PruneSpec]],
    *,
    svd: str = "float32",
    allow_tied: bool = False,
    batch_size: int = 8,
    length_normalize: bool = False,
    progress=None,
    cache_memory: int | None = None,
    path: str = "auto",
    precision: str = "float32",
) -> Iterator[tuple[EditRecord, RunResult]]:
    """Score one prepared run under each edit in turn (an empty edit = the unpruned model).

    This is the unit of work of sweeps and Algorithm 1: the same requests under many clipping
    rates of the same loaded model, each edit undone before the next, each result yielded
    while its edit is applied.  On the layer path (auto's choice when every edit changes only
    decoder layers) the layers below the lowest edited one run once for the whole call, and
    per edit only the layers above; when that cache would exceed `cache_memory` the examples
    are cached and swept in several passes, and the results come after the last pass.
    `precision` mixed scores on a bfloat16 copy that follows each edit, then re-scores in
    float32 every example whose decision could differ (svdicl.precision), under the edit.
    """
    edits = [tuple(specs) for specs in edits]
    start = _lowest_layer(loaded, edits, allow_tied) if check_path(path) in ("auto", "layer") else None
    chosen = _choose(loaded, run, path, batch_size, cache_memory, start)
    low, record = _low(loaded, precision)
    rows = None
    if chosen.name == "layer" and low is not None:
        rows = px.ExactRows(loaded.model, run.scored_requests, chosen.plan.prefix, chosen.start, _pad_id(loaded), batch_size)
    if chosen.name == "layer":
        results = _sweep_layers(loaded, run, edits, chosen, svd, allow_tied, length_normalize, progress, low)
    else:
        results = _each_edit(loaded, run, edits, chosen, svd, allow_tied, batch_size, length_normalize, progress, low)
    for e, (edit, result) in enumerate(results):  # the edit is still applied here: the float32 re-scores see it
        bound = px.Bound()  # per edit: the error depends on it (SmolLM2's last MLP at rate 0.995: 4x that of the others)
        yield edit, _exact(loaded, run, chosen, batch_size, length_normalize, result, low, record, bound, e * px.SAMPLE, rows)


def _each_edit(loaded, run, edits, chosen, svd, allow_tied, batch_size, length_normalize, progress, low):
    for specs in edits:
        with pruned(loaded.model, specs=specs, svd=svd, allow_tied=allow_tied) as record:
            yield record, _score_run(loaded, run, chosen, batch_size, "left", length_normalize, progress=progress, low=low)


def _lowest_layer(loaded: LoadedModel, edits: Sequence[Sequence[PruneSpec]], allow_tied: bool) -> int | str | None:
    """The lowest decoder layer any edit changes; None if none does; a reason if an edit changes a weight outside the layers."""
    lowest = None
    for specs in edits:
        for spec in specs:
            if spec.rate == 0:
                continue
            for target in resolve(loaded.model, spec.layers, spec.modules, allow_tied=allow_tied):
                if target.layer is None:
                    return f"edit {spec} changes {target.module_name}, outside the decoder layers, so no layer cache can serve it"
                lowest = target.layer if lowest is None else min(lowest, target.layer)
    return lowest


def _sweep_layers(
    loaded: LoadedModel,
    run: EvalRun,
    edits: Sequence[tuple[PruneSpec, ...]],
    chosen: ExecutionPath,
    svd: str,
    allow_tied: bool,
    length_normalize: bool,
    progress,
    low: px.LowPrecision | None = None,
) -> Iterator[tuple[EditRecord, RunResult]]:
    """The layer path: per pass, cache the inputs of layer `start` once, then run layers start..L under each edit
    (with `low`, on its bfloat16 copy, synced after each edit)."""
    model = loaded.model if low is None else low.sync()
    plan = chosen.plan
    logprobs: list[list] = [[None] * len(plan.batches) for _ in edits]
    walls = [0.0] * len(edits)
    shared = 0.0
    prompt_tokens = forwarded_tokens(run.scored_requests)
    tokens = forwarded_tokens(run.scored_requests, len(plan.prefix))
    for number, batches in enumerate(chosen.passes):
        started = time.perf_counter()
        scorer = LayerScorer(model, plan, chosen.start, batches)
        shared += time.perf_counter() - started
        for e, specs in enumerate(edits):
            with pruned(loaded.model, specs=specs, svd=svd, allow_tied=allow_tied) as record:
                started = time.perf_counter()
                if low is not None:
                    low.sync()
                for i, values in zip(batches, scorer.logprobs(progress), strict=True):
                    logprobs[e][i] = values
                walls[e] += time.perf_counter() - started
                if number == len(chosen.passes) - 1:
                    timing = {**_timing(walls[e], len(run.examples), tokens, prompt_tokens, 0), **chosen.to_dict()}
                    timing["shared_s"] = round(shared, 3)
                    yield record, finish_run(run, plan.scores(logprobs[e]), length_normalize, timing)
        del scorer


def finish_run(run: EvalRun, scores: Sequence[Scores], length_normalize: bool, timing: dict) -> RunResult:
    """Predictions, ties and metrics with their CIs (Wilson for accuracy, BCa bootstrap for macro-F1) from a run's
    scores (the examples', then any calibration queries'), and the same under each of the run's calibration methods."""
    n = len(run.examples)
    scores, probe_scores = tuple(scores[:n]), tuple(scores[n:])
    chosen = [choose(s, length_normalize) for s in scores]
    predictions = tuple(p for p, _ in chosen)
    gold = run.gold
    calibrated = []
    values = np.array(ranking_scores(scores, length_normalize))
    for method in run.calibration:
        probes = [s for (m, _), s in zip(run.probes, probe_scores, strict=True) if m == method]
        result = cal.apply(method, values, np.array(ranking_scores(probes, length_normalize)) if probes else None)
        calibrated.append(
            CalibratedRun(
                result,
                accuracy_ci(gold, result.predictions),
                macro_f1_ci(gold, result.predictions, run.task.num_classes),
            )
        )
    return RunResult(
        run=run,
        scores=tuple(scores),
        predictions=predictions,
        ties=tuple(t for _, t in chosen),
        accuracy=accuracy_ci(gold, predictions),
        macro_f1=macro_f1_ci(gold, predictions, run.task.num_classes),
        timing=timing,
        length_normalize=length_normalize,
        calibrated=tuple(calibrated),
        probe_scores=probe_scores,
    )


def _timing(wall: float, examples: int, tokens: int, prompt_tokens: int, reused: int) -> dict:
    """tokens: what the path ran through the model (layer path: through the layers above the cache);
    prompt_tokens: the full prompts, what the plain path runs; both without padding."""
    return {
        "wall_s": round(wall, 3),
        "examples_scored": examples,
        "examples_reused": reused,
        "examples_per_s": round(examples / wall, 3) if wall > 0 else None,
        "tokens_forwarded": tokens,
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_per_s": round(prompt_tokens / wall, 1) if wall > 0 else None,
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
    path: str = "auto",
    cache_memory: int | None = None,
    calibration: str | Sequence[str] = (),
) -> dict:
    """Evaluate `task` for every seed under the edit `specs`; with `output`, write and resume there.

    `calibration` (none, all, or methods of svdicl.calibration) adds each method's scores,
    predictions and metrics beside the uncalibrated ones.

    Returns the content of results.json.  An unfinished output folder of the same
    configuration (model, task definition, data digest, ...) is resumed (finished examples
    are read back from samples.jsonl); one of another configuration is refused; a finished
    one is returned without tokenizing anything.  The scoring path is chosen per seed before
    any forward pass and recorded in the config.  With 0 shots (and no calibration) the seeds
    share their prompts: the first seed's run is scored once and reused for the others
    (`reused_from_seed` in their timing).
    """
    from tqdm.auto import tqdm

    from svdicl.provenance import versions

    loaded = as_loaded(loaded, "evaluate")
    task = get_task(task) if isinstance(task, str) else task
    if not seeds or len(set(seeds)) != len(seeds):
        raise SvdiclError("give at least one --seed, each once")
    started = time.perf_counter()
    splits = load_splits(task, data_dir)
    _single(path)
    with pruned(loaded.model, specs=specs, svd=svd, allow_tied=allow_tied) as record:
        shots = task.shots if shots is None else shots
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
            "shots_total": shots * task.num_classes,
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
            return finished  # the same evaluation, done: nothing to tokenize or score
        prepared = [
            prepare_run(
                loaded, task, split=split, shots=shots, seed=seed, limit=limit, splits=splits, calibration=methods,
                progress=not quiet,
            )
            for seed in scored_seeds(shots, seeds, methods)
        ]  # fmt: skip
        paths = [_choose(loaded, run, path, batch_size, cache_memory) for run in prepared]
        config["scoring"] = {**_paths_used(paths), **config["scoring"]}
        config = json.loads(json.dumps(config))
        folder, known = _open_output(output, config, overwrite) if output is not None else (None, {})
        if folder is not None and (folder / RESULTS_FILE).is_file():
            return json.loads((folder / RESULTS_FILE).read_text())
        runs = []
        for run, chosen in zip(prepared, paths, strict=True):
            write = _appender(folder, run, length_normalize) if folder is not None else None
            desc = f"{task.name} seed {run.seed}"
            with tqdm(total=len(run.scored_requests), desc=desc, unit="ex", file=sys.stderr, disable=quiet) as bar:
                runs.append(
                    _score_run(loaded, run, chosen, batch_size, padding_side, length_normalize, known.get(run.seed), write, bar)
                )
        runs += [runs[0].reused_for(seed) for seed in seeds[len(runs) :]]  # zero-shot: the other seeds' prompts are the same
    results = {
        "format": RESULTS_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "versions": versions(),
        "runs": [r.summary() for r in runs],
        "summary": {
            "metric": task.metric,
            "accuracy": spread([r.accuracy.value for r in runs]),
            "macro_f1": spread([r.macro_f1.value for r in runs]),
            **{
                cal.metric_key(m, name): spread([r.metrics()[cal.metric_key(m, name)]["value"] for r in runs])
                for m in methods
                for name in ("accuracy", "macro_f1")
            },
        },
        "timing": {"wall_s": round(time.perf_counter() - started, 3)},
    }
    if folder is not None:
        write_results(folder, results, [s for r in runs for s in r.samples()])
    return results


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


def _open_output(output: str | Path, config: dict, overwrite: bool) -> tuple[Path, dict[int, dict[str, Scores]]]:
    """Create or reopen the output folder; return finished scores of an interrupted run, by seed and id."""
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise SvdiclError(f"output {folder} is a file; choose a folder path")
    folder.mkdir(parents=True, exist_ok=True)
    results, progress, samples = folder / RESULTS_FILE, folder / PROGRESS_FILE, folder / SAMPLES_FILE
    written = _read_json(results) if results.is_file() else None
    if written is not None and (not isinstance(written, dict) or written.get("format") != RESULTS_FORMAT):
        raise SvdiclError(f"{results} was not written by svdicl eval, so svdicl will not replace it; choose another --output")
    previous = written.get("config") if written is not None else _read_json(progress) if progress.is_file() else None
    if previous is None and samples.is_file():  # ours always has results.json or progress.json beside it
        raise SvdiclError(f"{samples} was not written by svdicl eval, so svdicl will not replace it; choose another --output")
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
