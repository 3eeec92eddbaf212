"""Label-word and choice log-likelihoods: prompts -> `Request`s (token ids) -> scores.

Tokenizing and executing are separate steps.  `build_requests` turns each prompt and its
candidates into token ids once; `score` runs any model over them.  Every execution path
consumes the same ids, so two paths (or an edited and an unedited model) see exactly the same
inputs.

Execution paths, all from the same Requests (the plain one is the reference the others are
tested against):

- plain: every prompt in full, batched (`score`);
- prefix: the demonstrations' keys/values once (`SharedPrefix`), then each request's own
  tokens only (`score(..., prefix=...)`);
- layer: for sweeps of layers >= l, each request's hidden states entering layer l once
  (`LayerScorer`), then per edit only layers l..L.

`choose_path` picks one for a model, a run's requests and a memory budget, and says why a
faster one was not taken.

Tokenization: the full string demonstrations + query + candidate is tokenized in one piece
(no special tokens) and cut at the characters where the query and the candidate begin, so a
label word gets exactly the tokens it has in context.  A cut that falls inside a token, or a
demonstration block that tokenizes differently for different examples, is an error, never a
silent misalignment.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from svdicl import forward as fw
from svdicl.errors import SvdiclError

PATHS = ("auto", "plain", "prefix", "layer")


@dataclass(frozen=True)
class Request:
    """Score each continuation after prefix + context.

    `prefix` is the demonstrations block with the tokenizer's special tokens (BOS), the same
    tuple for every request of a run; `context` is this example's query.
    """

    prefix: tuple[int, ...]
    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Scores:
    """Per continuation: summed log-probability of its tokens and how many tokens it has."""

    logprobs: tuple[float, ...]
    n_tokens: tuple[int, ...]


def build_requests(
    tokenizer,
    demonstrations: str,
    queries: Sequence[str],
    candidates: Sequence[Sequence[str]],
    *,
    ids: Sequence[str] | None = None,
    max_length: int | None = None,
    chunk: int = 256,
    progress=None,
) -> list[Request]:
    """Tokenize prompts into Requests; `ids` name examples in error messages.

    `progress.update(n)` is called as examples are tokenized (a whole split takes a while).
    """
    prefix, plain = _prefix_ids(tokenizer, demonstrations)
    names = list(ids) if ids is not None else [f"#{i}" for i in range(len(queries))]
    flat = [(q, i, c) for i, (q, cands) in enumerate(zip(queries, candidates, strict=True)) for c in cands]
    requests: list[Request] = []
    pending: dict[int, list] = {}
    for start in range(0, len(flat), chunk):
        part = flat[start : start + chunk]
        texts = [demonstrations + q + c for q, _, c in part]
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for (query, index, _), tokens, offsets in zip(part, encoded["input_ids"], encoded["offset_mapping"], strict=True):
            cuts = (len(demonstrations), len(demonstrations) + len(query))
            head, context, continuation = _cut(tokens, offsets, cuts, names[index])
            if tuple(head) != plain:
                raise SvdiclError(
                    f"example {names[index]}: the demonstrations tokenize differently in front of this query; "
                    f"end the template's demonstrations differently"
                )
            pending.setdefault(index, []).append((tuple(context), tuple(continuation)))
            if len(pending[index]) == len(candidates[index]):
                requests.append(_request(prefix, pending.pop(index), names[index]))
                if progress is not None:
                    progress.update(1)
    if max_length is not None:
        _check_length(requests, max_length, names, len(prefix) - len(plain))
    return requests


def _prefix_ids(tokenizer, demonstrations: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The demonstrations with special tokens, and without; specials may only lead."""
    plain = tuple(tokenizer(demonstrations, add_special_tokens=False)["input_ids"])
    full = tuple(tokenizer(demonstrations, add_special_tokens=True)["input_ids"])
    if full[len(full) - len(plain) :] != plain:
        raise SvdiclError("the tokenizer adds special tokens after the text; svdicl needs a causal LM tokenizer (BOS only)")
    return full, plain


def _cut(tokens: Sequence[int], offsets, cuts: tuple[int, int], name: str) -> list[list[int]]:
    """Split token ids at the characters where the query and the candidate begin.

    Token t goes to part p = how many cuts lie before its end; a cut inside a token, or a
    token whose part is lower than an earlier token's, is an error.  Vectorised: this runs
    for every token of every prompt (tests/test_scoring.py holds the per-token loop it replaces).
    """
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # tokens x (start, end)
    bounds = np.asarray(cuts, dtype=np.int64)
    part = (spans[:, 1:] > bounds).sum(axis=1)
    inside = (spans[:, :1] < bounds) & (bounds < spans[:, 1:])  # tokens x cuts
    bad = inside.any(axis=1) | (part < np.maximum.accumulate(part))
    if bad.any():
        t = int(bad.argmax())
        which = int(inside[t].argmax()) if inside[t].any() else int(part[t]) - 1
        where = ("the demonstrations and the query", "the query and a candidate answer")[which > 0]
        raise SvdiclError(
            f"example {name}: {where} share a token, so they cannot be told apart; "
            f"change the template, the label words or the answer delimiter"
        )
    first, second = int((part == 0).sum()), int((part <= 1).sum())
    tokens = list(tokens)
    return [tokens[:first], tokens[first:second], tokens[second:]]


def _request(prefix: tuple[int, ...], pieces: list[tuple[tuple[int, ...], tuple[int, ...]]], name: str) -> Request:
    contexts = {context for context, _ in pieces}
    continuations = tuple(c for _, c in pieces)
    if len(contexts) != 1:
        raise SvdiclError(
            f"example {name}: the query tokenizes differently before different candidates; "
            f"change the label words or the answer delimiter"
        )
    if any(not c for c in continuations):
        raise SvdiclError(f"example {name}: a candidate answer is empty; every label word / choice needs text")
    if len(set(continuations)) != len(continuations):
        raise SvdiclError(f"example {name}: two candidates have identical tokens, so they cannot be told apart")
    context = contexts.pop()
    if not prefix and not context:
        raise SvdiclError(f"example {name}: the prompt is empty, so nothing predicts the answer's first token")
    return Request(prefix=prefix, context=context, continuations=continuations)


def _check_length(requests: Sequence[Request], max_length: int, names: Sequence[str], specials: int) -> None:
    """Every prompt fits the model; the fix named depends on whether the example alone (with `specials`) fits."""
    for request, name in zip(requests, names, strict=True):
        own = specials + len(request.context) + max(len(c) for c in request.continuations) - 1
        length = own + len(request.prefix) - specials
        if own > max_length:
            raise SvdiclError(
                f"example {name}: the example alone has {own} tokens but the model reads at most {max_length}, even "
                "without demonstrations; shorten or remove it in the data, or use a model with a longer context"
            )
        if length > max_length:
            raise SvdiclError(
                f"example {name}: the prompt has {length} tokens but the model reads at most {max_length}; use fewer --shots"
            )


def context_length(model, tokenizer) -> int | None:
    """How many positions the model can read: from its config, else a meaningful tokenizer limit."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**8 else None


@dataclass(frozen=True)
class _Row:
    """One sequence to run: its tokens and which continuation tokens its last positions predict."""

    request: int
    tokens: tuple[int, ...]
    targets: tuple[tuple[int, tuple[int, ...]], ...]  # (continuation index, its token ids), read at the end


def _rows(requests: Sequence[Request]) -> list[_Row]:
    """Single-token continuations share one sequence (prefix + context); longer ones get their own."""
    rows = []
    for index, r in enumerate(requests):
        head = r.prefix + r.context
        if all(len(c) == 1 for c in r.continuations):
            rows.append(_Row(index, head, tuple(enumerate(r.continuations))))
        else:
            rows += [_Row(index, head + c[:-1], ((k, c),)) for k, c in enumerate(r.continuations)]
    return rows


def forwarded_tokens(requests: Sequence[Request], shared: int | None = None) -> int:
    """Tokens the plain path runs through the model for `requests` (padding excluded).

    With `shared` (the length of a prefix computed once), those the prefix path runs: the
    prefix once, then each row's own tokens.
    """
    rows = _rows(requests)
    total = sum(len(row.tokens) for row in rows)
    return total if shared is None else total - shared * len(rows) + shared * bool(rows)


@torch.no_grad()
def score(
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
    rows = sorted(_rows(requests), key=lambda row: -len(row.tokens))
    logprobs = [[0.0] * len(r.continuations) for r in requests]
    remaining = [0] * len(requests)
    for row in rows:
        remaining[row.request] += 1
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids, mask, ends = _pad(batch, pad_id, padding_side)
        needed = sorted({end - k for row, end in zip(batch, ends, strict=True) for k in range(1, _reads(row) + 1)})
        keep = torch.tensor(needed, device=device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device))
        if keeps_logits:
            logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        else:
            logits = model(**inputs, use_cache=False).logits[:, keep]
        column = {position: i for i, position in enumerate(needed)}
        for b, (row, end) in enumerate(zip(batch, ends, strict=True)):
            reads = _reads(row)
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


def _reads(row: _Row) -> int:
    """How many final positions of the row predict continuation tokens."""
    return max(len(tokens) for _, tokens in row.targets)


def _pad(batch: Sequence[_Row], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Token ids and attention mask (batch x longest); `ends[b]` = one past row b's last real token."""
    width = max(len(row.tokens) for row in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    ends = []
    for b, row in enumerate(batch):
        n = len(row.tokens)
        lo = width - n if side == "left" else 0
        ids[b, lo : lo + n] = torch.tensor(row.tokens)
        mask[b, lo : lo + n] = 1
        ends.append(lo + n)
    return ids, mask, ends


def choose(scores: Scores, length_normalize: bool = False) -> tuple[int, bool]:
    """Prediction = argmax (lowest index on an exact tie) and whether there was a tie.

    With `length_normalize` the score is the mean log-probability per token.
    """
    values = [lp / n if length_normalize else lp for lp, n in zip(scores.logprobs, scores.n_tokens, strict=True)]
    best = max(values)
    winners = [i for i, v in enumerate(values) if v == best]
    return winners[0], len(winners) > 1


def shared_prefix(requests: Sequence[Request]) -> tuple[int, ...] | None:
    """The tokens every request starts with, to run once: the demonstrations block (None if they differ) and the
    template tokens every context opens with (a query's "Review:"), about a tenth of SST-2's suffix tokens.

    Every request keeps at least its context's last token, which predicts its first continuation
    token; a request with an empty context has it predicted by the prefix's last token, so then
    that token stays in every request's own part.
    """
    prefixes = {r.prefix for r in requests}
    if len(prefixes) > 1:
        return None
    prefix = prefixes.pop() if prefixes else ()
    if any(not r.context for r in requests):
        return prefix[:-1]
    contexts = [r.context for r in requests]
    most = min(map(len, contexts), default=1) - 1
    common = next((i for i in range(most) if len({c[i] for c in contexts}) > 1), most)
    return prefix + tuple(contexts[0][:common]) if contexts else prefix


@dataclass(frozen=True)
class SuffixPlan:
    """Requests cut after a shared prefix into right-padded suffix batches: what the fast paths run.

    Rows are the plain path's (one per request when every continuation is one token, else one
    per continuation), in the plain path's order (longest first), `batch_size` to a batch.
    """

    prefix: tuple[int, ...]
    batches: tuple[fw.SuffixBatch, ...]
    owners: tuple[tuple[tuple[int, int], ...], ...]  # per batch, per target: (request, continuation)
    finished: tuple[int, ...]  # per batch: requests whose last row it holds (for progress bars)
    n_tokens: tuple[tuple[int, ...], ...]  # per request: tokens of each continuation

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(rows, padded length) of every batch, for `fw.plan_passes`."""
        return [(b.ids.shape[0], b.ids.shape[1]) for b in self.batches]

    @property
    def tokens(self) -> int:
        """Suffix tokens, padding excluded."""
        return sum(int(b.mask.sum()) for b in self.batches)

    def scores(self, logprobs: Sequence[torch.Tensor]) -> list[Scores]:
        """Per-request Scores from each batch's flat target log-probs."""
        totals = [[0.0] * len(n) for n in self.n_tokens]
        for owners, values in zip(self.owners, logprobs, strict=True):
            for (request, k), value in zip(owners, values.tolist(), strict=True):
                totals[request][k] += value
        return [Scores(tuple(t), n) for t, n in zip(totals, self.n_tokens, strict=True)]


def plan_suffixes(requests: Sequence[Request], prefix: Sequence[int], *, batch_size: int = 8, pad_id: int = 0) -> SuffixPlan:
    """Cut every request's rows after `prefix` (which each must start with) and batch them."""
    prefix = tuple(prefix)
    rows = sorted(_rows(requests), key=lambda row: -len(row.tokens))
    remaining = Counter(row.request for row in rows)
    batches, owners, finished = [], [], []
    for start in range(0, len(rows), batch_size):
        suffixes, owner, done = [], [], 0
        for row in rows[start : start + batch_size]:
            if row.tokens[: len(prefix)] != prefix:
                raise SvdiclError("a request does not start with the shared prefix; score requests of one run together")
            ids = row.tokens[len(prefix) :]
            targets = []
            for k, tokens in row.targets:
                targets += [(len(ids) - len(tokens) + j, token) for j, token in enumerate(tokens)]
                owner += [(row.request, k)] * len(tokens)
            suffixes.append(fw.Suffix(ids, tuple(targets)))
            remaining[row.request] -= 1
            done += remaining[row.request] == 0
        batches.append(fw.SuffixBatch.of(suffixes, pad_id))
        owners.append(tuple(owner))
        finished.append(done)
    n_tokens = tuple(tuple(len(c) for c in r.continuations) for r in requests)
    return SuffixPlan(prefix, tuple(batches), tuple(owners), tuple(finished), n_tokens)


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
        logprobs.append(fw.score(model, batch, prefix.kv))
        if progress is not None:
            progress.update(done)
    return plan.scores(logprobs)


class LayerScorer:
    """Some batches of a plan through the embeddings and layers below `start`, once; scored under each edit above.

    One instance per pass of a sweep (`fw.plan_passes` splits a plan into passes that fit the
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
    budget: int = fw.DEFAULT_CACHE_MEMORY,
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
    cost = fw.cache_cost(model, len(prefix))
    why_not_layer = None
    if requested in ("auto", "layer"):
        if isinstance(start, int):
            passes = fw.plan_passes(model, len(prefix), plan.shapes, budget)
            if passes is not None:
                return ExecutionPath("layer", None, plan, start, tuple(passes))
            why_not_layer = f"the layer cache of one batch does not fit in --cache-memory {_size(budget)}"
        elif isinstance(start, str):
            why_not_layer = start
        elif requested == "layer":
            why_not_layer = "no edit changes a decoder layer, so there is nothing to cache below one"
    need = cost.fixed + max((cost.working(rows, n, len(prefix)) for rows, n in plan.shapes), default=0)
    if need > budget:
        why_not_prefix = f"the shared prefix needs {_size(need)}, more than --cache-memory {_size(budget)}"
        return ExecutionPath("plain", "; ".join(filter(None, [why_not_layer, why_not_prefix])))
    return ExecutionPath("prefix", why_not_layer, plan)


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"
