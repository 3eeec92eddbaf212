"""Prompts -> token requests: what to score, as token ids, before any model runs.

`build_requests` turns each prompt and its candidates into a `Request` once; every execution
path of svdicl.scoring consumes the same ids, so two paths (or an edited and an unedited
model) see exactly the same inputs.  A request becomes rows (sequences to run, `request_rows`),
padded into batches for the plain path (`pad_rows`) or cut after the shared demonstrations
into suffix batches for the fast paths (`plan_suffixes`).

Tokenization: the full string demonstrations + query + candidate is tokenized in one piece
(no special tokens) and cut at the characters where the query and the candidate begin, so a
label word gets exactly the tokens it has in context.  A cut that falls inside a token, or a
demonstration block that tokenizes differently for different examples, is an error, never a
silent misalignment.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from svdicl import forward as fw
from svdicl.errors import SvdiclError


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
class Row:
    """One sequence to run: its tokens and which continuation tokens its last positions predict."""

    request: int
    tokens: tuple[int, ...]
    targets: tuple[tuple[int, tuple[int, ...]], ...]  # (continuation index, its token ids), read at the end

    @property
    def reads(self) -> int:
        """How many final positions of the row predict continuation tokens."""
        return max(len(tokens) for _, tokens in self.targets)


def request_rows(requests: Sequence[Request]) -> list[Row]:
    """Single-token continuations share one sequence (prefix + context); longer ones get their own."""
    rows = []
    for index, r in enumerate(requests):
        head = r.prefix + r.context
        if all(len(c) == 1 for c in r.continuations):
            rows.append(Row(index, head, tuple(enumerate(r.continuations))))
        else:
            rows += [Row(index, head + c[:-1], ((k, c),)) for k, c in enumerate(r.continuations)]
    return rows


def forwarded_tokens(requests: Sequence[Request], shared: int | None = None) -> int:
    """Tokens the plain path runs through the model for `requests` (padding excluded).

    With `shared` (the length of a prefix computed once), those the prefix path runs: the
    prefix once, then each row's own tokens.
    """
    rows = request_rows(requests)
    total = sum(len(row.tokens) for row in rows)
    return total if shared is None else total - shared * len(rows) + shared * bool(rows)


def pad_rows(batch: Sequence[Row], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
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
        """(rows, padded length) of every batch, for `memory.plan_passes`."""
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
    rows = sorted(request_rows(requests), key=lambda row: -len(row.tokens))
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
