"""Score one prepared run under the model's current weights: choose the execution path, score on the plain or
the shared-prefix path, and (precision mixed) re-score in float32 what bfloat16 leaves uncertain.

Every entry point takes `path` (auto, plain, prefix; svdicl.experiments.edits also layer) and
`cache_memory` (bytes the caches may hold); the path taken and why a faster one was not are in
each result's `timing` (`path`, `fallback`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping

from torch import nn

from svdicl import precision as px
from svdicl.errors import SvdiclError
from svdicl.experiments.runs import EvalRun, RunResult, finish_run
from svdicl.memory import DEFAULT_CACHE_MEMORY
from svdicl.models import LoadedModel, as_loaded
from svdicl.provenance import machine
from svdicl.requests import Scores, forwarded_tokens
from svdicl.scoring import ExecutionPath, SharedPrefix, check_path, choose_path, score_requests

CHUNK = 64  # requests scored between two calls of `on_scored` (what an interrupted evaluation keeps)


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
    timing = _timing(wall, len(pending), tokens, forwarded_tokens(requests), len(scores) - len(pending), model)
    return finish_run(run, scores, length_normalize, {**timing, **chosen.to_dict()})


def _timing(wall: float, examples: int, tokens: int, prompt_tokens: int, reused: int, model: nn.Module) -> dict:
    """tokens: what the path ran through the model (layer path: through the layers above the cache);
    prompt_tokens: the full prompts, what the plain path runs; both without padding; then the machine it ran on."""
    return {
        "wall_s": round(wall, 3),
        "examples_scored": examples,
        "examples_reused": reused,
        "examples_per_s": round(examples / wall, 3) if wall > 0 else None,
        "tokens_forwarded": tokens,
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_per_s": round(prompt_tokens / wall, 1) if wall > 0 else None,
        **machine(model.get_input_embeddings().weight.device),
    }
