"""One prepared run under many edits: the unit of work of sweeps and Algorithm 1.

`evaluate_edits` scores the same requests under each edit in turn, each undone before the next,
and is where the layer cache pays: on the layer path everything below the lowest edited layer
runs once per call, and per edit only the layers above.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from svdicl import precision as px
from svdicl.experiments.run_scoring import _choose, _exact, _low, _pad_id, _score_run, _timing
from svdicl.experiments.runs import EvalRun, RunResult, finish_run
from svdicl.models import LoadedModel
from svdicl.prune import EditRecord, pruned
from svdicl.requests import forwarded_tokens
from svdicl.scoring import ExecutionPath, LayerScorer, check_path
from svdicl.specs import PruneSpec
from svdicl.targets import resolve


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
                    timing = {**_timing(walls[e], len(run.examples), tokens, prompt_tokens, 0, model), **chosen.to_dict()}
                    timing["shared_s"] = round(shared, 3)
                    yield record, finish_run(run, plan.scores(logprobs[e]), length_normalize, timing)
        del scorer
