"""Log-likelihoods of token requests (svdicl.requests) under the model's current weights.

`score_requests` runs any model over Requests built once by `build_requests`.  Execution paths,
all from the same Requests (the plain one is the reference the others are tested against):

- plain: every prompt in full, batched (`score_requests`);
- prefix: the demonstrations' keys/values once (`SharedPrefix`), then each request's own
  tokens only (`score_requests(..., prefix=...)`);
- layer: for sweeps of layers >= l, each request's hidden states entering layer l once
  (`LayerScorer`), then per edit only layers l..L.

`choose_path` picks one for a model, a run's requests and a memory budget (svdicl.memory), and
says why a faster one was not taken.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from svdicl import forward as fw
from svdicl.errors import SvdiclError
from svdicl.memory import DEFAULT_CACHE_MEMORY, cache_cost, format_size, plan_passes
from svdicl.requests import Request, Scores, SuffixPlan, pad_rows, plan_suffixes, request_rows, shared_prefix

PATHS = ("auto", "plain", "prefix", "layer")


@torch.no_grad()
def score_requests(
    model: torch.nn.Module,
    requests: Sequence[Request],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    padding_side: str = "left",
    progress=None,
    prefix: SharedPrefix | None = None,
) -> list[Scores]:
    """Summed log-probabilities of every continuation of every request.

    Without `prefix` this is the plain path, the reference: batches are padded on
    `padding_side` with an explicit attention mask and position ids; the LM head runs only at
    the positions that predict continuation tokens, and a float32 log-softmax is taken there.
    With `prefix` (a `SharedPrefix` every request starts with) only each request's own tokens
    run, right-padded, attending to the prefix's cached keys/values: the same log-probs up to
    float32 rounding.  `progress.update(n)` is called as requests finish.
    """
    if padding_side not in ("left", "right"):
        raise SvdiclError(f"padding side must be left or right, not {padding_side!r}")
    if batch_size < 1:
        raise SvdiclError(f"batch size must be >= 1, not {batch_size}")
    if prefix is not None:
        return _score_after(model, requests, prefix, batch_size, pad_id, progress)
    device = next(model.parameters()).device
    rows = sorted(request_rows(requests), key=lambda row: -len(row.tokens))
    logprobs = [[0.0] * len(r.continuations) for r in requests]
    remaining = [0] * len(requests)
    for row in rows:
        remaining[row.request] += 1
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids, mask, ends = pad_rows(batch, pad_id, padding_side)
        needed = sorted({end - k for row, end in zip(batch, ends, strict=True) for k in range(1, row.reads + 1)})
        keep = torch.tensor(needed, device=device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device))
        if keeps_logits:
            logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        else:
            logits = model(**inputs, use_cache=False).logits[:, keep]
        column = {position: i for i, position in enumerate(needed)}
        for b, (row, end) in enumerate(zip(batch, ends, strict=True)):
            reads = row.reads
            rows_logits = logits[b, [column[end - reads + j] for j in range(reads)]].float()  # reads x vocab
            normalizer = torch.logsumexp(rows_logits, dim=-1)
            for k, tokens in row.targets:
                offset = reads - len(tokens)
                for j, token in enumerate(tokens):
                    logprobs[row.request][k] += float(rows_logits[offset + j, token] - normalizer[offset + j])
        if progress is not None:
            done = 0
            for row in batch:
                remaining[row.request] -= 1
                done += remaining[row.request] == 0
            progress.update(done)
    return [Scores(tuple(lp), tuple(len(c) for c in r.continuations)) for lp, r in zip(logprobs, requests, strict=True)]


def choose(scores: Scores, length_normalize: bool = False) -> tuple[int, bool]:
    """Prediction = argmax (lowest index on an exact tie) and whether there was a tie.

    With `length_normalize` the score is the mean log-probability per token.
    """
    values = [lp / n if length_normalize else lp for lp, n in zip(scores.logprobs, scores.n_tokens, strict=True)]
    best = max(values)
    winners = [i for i, v in enumerate(values) if v == best]
    return winners[0], len(winners) > 1


class SharedPrefix:
    """A prefix's keys/values under the model's current weights, computed once for many requests.

    Using it after the weights changed is refused (the keys/values record which weights made them).
    """

    def __init__(self, model: torch.nn.Module, ids: Sequence[int]) -> None:
        self.ids = tuple(ids)
        self.kv = fw.prefix_kv(model, self.ids)


def _score_after(model, requests: Sequence[Request], prefix: SharedPrefix, batch_size: int, pad_id: int, progress):
    plan = plan_suffixes(requests, prefix.ids, batch_size=batch_size, pad_id=pad_id)
    logprobs = []
    for batch, done in zip(plan.batches, plan.finished, strict=True):
        logprobs.append(fw.suffix_logprobs(model, batch, prefix.kv))
        if progress is not None:
            progress.update(done)
    return plan.scores(logprobs)


class LayerScorer:
    """Some batches of a plan through the embeddings and layers below `start`, once; scored under each edit above.

    One instance per pass of a sweep (`memory.plan_passes` splits a plan into passes that fit the
    memory budget): it holds the hidden states entering layer `start` of its batches.  Editing
    a layer below `start` while it lives is refused.
    """

    def __init__(self, model: torch.nn.Module, plan: SuffixPlan, start: int, batches: Sequence[int]) -> None:
        self.plan, self.batches = plan, tuple(batches)
        self.cache = fw.LayerCache(model, plan.prefix, start)
        self.encoded = [self.cache.encode(plan.batches[i]) for i in self.batches]

    def logprobs(self, progress=None) -> list[torch.Tensor]:
        """Under the current weights: the prefix through layers start..L, then each batch; flat log-probs per batch."""
        upper = self.cache.prefix()
        result = []
        for i, cached in zip(self.batches, self.encoded, strict=True):
            result.append(self.cache.score(cached, upper))
            if progress is not None:
                progress.update(self.plan.finished[i])
        return result


@dataclass(frozen=True)
class ExecutionPath:
    """How a run is scored: `name` is plain, prefix or layer; `fallback` says why a faster path was not taken."""

    name: str
    fallback: str | None = None
    plan: SuffixPlan | None = None  # prefix and layer
    start: int | None = None  # layer: the lowest edited layer
    passes: tuple[range, ...] = ()  # layer: groups of batches, each cached and swept on its own

    def to_dict(self) -> dict:
        """The path taken and why a faster one was not, as results record it."""
        extra = {"start_layer": self.start, "passes": len(self.passes)} if self.name == "layer" else {}
        return {"path": self.name, "fallback": self.fallback, **extra}


def check_path(path: str) -> str:
    """`path` if it names an execution path, else a one-line error listing them."""
    if path not in PATHS:
        raise SvdiclError(f"unknown scoring path {path!r}; choose one of {', '.join(PATHS)}")
    return path


def choose_path(
    model: torch.nn.Module,
    requests: Sequence[Request],
    requested: str = "auto",
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    budget: int = DEFAULT_CACHE_MEMORY,
    start: int | str | None = None,
) -> ExecutionPath:
    """The fastest path `requested` allows that the model supports and `budget` (bytes) holds.

    `start` is the lowest layer the edits to come change (layer path), a reason why no layer
    cache can serve them, or None when no layer is edited.  auto and layer try the layer path,
    then the prefix path, then plain; prefix tries prefix, then plain.  Whatever is not taken
    is said in `fallback`; nothing ever raises for lack of memory.
    """
    check_path(requested)
    if batch_size < 1:
        raise SvdiclError(f"--batch-size must be at least 1, got {batch_size}")
    if requested == "plain":
        return ExecutionPath("plain")
    reason = fw.unsupported_reason(model)
    prefix = shared_prefix(requests)
    if reason is None and prefix is None:
        reason = "the requests do not share one demonstrations block; using the plain forward"
    if reason is not None:
        return ExecutionPath("plain", reason)
    plan = plan_suffixes(requests, prefix, batch_size=batch_size, pad_id=pad_id)
    cost = cache_cost(model, len(prefix))
    why_not_layer = None
    if requested in ("auto", "layer"):
        if isinstance(start, int):
            passes = plan_passes(model, len(prefix), plan.shapes, budget)
            if passes is not None:
                return ExecutionPath("layer", None, plan, start, tuple(passes))
            why_not_layer = f"the layer cache of one batch does not fit in --cache-memory {format_size(budget)}"
        elif isinstance(start, str):
            why_not_layer = start
        elif requested == "layer":
            why_not_layer = "no edit changes a decoder layer, so there is nothing to cache below one"
    need = cost.fixed + max((cost.working(rows, n, len(prefix)) for rows, n in plan.shapes), default=0)
    if need > budget:
        why_not_prefix = f"the shared prefix needs {format_size(need)}, more than --cache-memory {format_size(budget)}"
        return ExecutionPath("plain", "; ".join(filter(None, [why_not_layer, why_not_prefix])))
    return ExecutionPath("prefix", why_not_layer, plan)
