"""Run a causal LM in pieces: a shared prefix once, suffixes against its keys/values, layers l..L alone.

Every example of an ICL run sits behind the same demonstrations, and a clipping-rate sweep of
layer l changes nothing below l.  These primitives exploit both without re-implementing
attention: they drive the model's own embeddings, rotary embeddings, decoder layers, final
norm and head, with transformers' own mask functions and a `Cache` that serves the prefix.

- `run_prefix`: a prefix (batch 1) through layers [start, stop), keeping its keys/values.
- `run_suffixes`: right-padded suffixes through [start, stop) after a prefix; the prefix's
  keys/values are stored once (batch 1) and expanded over the batch, so only the layer being
  run briefly holds them per row (concatenated with the rows' own).
- `target_logprobs`: final norm and head only where a token is scored; exact log-probabilities
  (log-softmax over the whole vocabulary).
- `LayerCache`: a sweep of layer l.  Once: the prefix's and every suffix's hidden states
  entering layer l.  Per weight edit: layers l..L for the prefix, then for the suffixes.

Suffix positions continue the prefix's (P, P+1, ...), so a row scores exactly as the plain
forward of prefix + suffix does.  What differs between families (final norm, cache keyword,
rotary embedding, layer types) is read from their row of svdicl.targets' table; families
without a fast path there (outside `SUPPORTED`) are reported by `unsupported_reason`, and
callers then use the plain batched forward and record why.  How much memory the caches take
is planned in svdicl.memory.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from svdicl.errors import SvdiclError
from svdicl.targets import FAMILIES, Family, family_of, layer_stack

SUPPORTED = frozenset(name for name, family in FAMILIES.items() if family.fast_path)
_MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
_ATTENTION = ("eager", "sdpa")
HEAD_ROWS = 256  # scored positions per head matmul: bounds the (rows x vocab) logits in memory


def unsupported_reason(model: nn.Module) -> str | None:
    """None when the fast path runs `model`; otherwise why not (for results.json and the fallback)."""
    family = family_of(model)
    name = family.name if family is not None else getattr(model.config, "model_type", "?")
    if name not in SUPPORTED:
        return f"model family {name!r} has no fast path (it has {', '.join(sorted(SUPPORTED))}); using the plain forward"
    implementation = model.config._attn_implementation
    if implementation not in _ATTENTION:
        return f"attention implementation {implementation!r} has no fast path (it has {', '.join(_ATTENTION)})"
    devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    if len(devices) > 1 or devices & {"disk", "meta"}:
        return "a model spread over devices by --device-map has no fast path; using the plain forward"
    if getattr(model.config, "use_bidirectional_attention", False):
        return "bidirectional attention has no fast path; using the plain forward"
    unknown = set(_layer_types(model.config, family)) - set(_MASKS)
    if unknown:
        return f"layer types {', '.join(sorted(unknown))} have no fast path; using the plain forward"
    return None


def fast_family(model: nn.Module) -> Family:
    """The model's family, whose columns the layer loop reads; a one-line error when it has no fast path."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise SvdiclError(reason)
    return family_of(model)


def _cache_keyword(function, legacy: str) -> str:
    """`cache`, where this transformers takes it; else the old name (`past_key_values`, removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(function).parameters else legacy


_MASK_CACHE = _cache_keyword(create_causal_mask, "past_key_values")


def _rotary(base: nn.Module, family: Family) -> str:
    if family.rotary == "inside" and hasattr(base, "rotary_emb"):
        return "shared"
    return family.rotary


def _layer_types(config, family: Family) -> list[str]:
    count = config.num_hidden_layers
    if family.layer_types == "config":
        return list(config.layer_types[:count])
    window = family.layer_types == "window" and getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if window else "full_attention"] * count


def _stamp(modules: Sequence[nn.Module]) -> tuple:
    """Identity of the modules' current weights: any `pruned` swap or in-place edit changes it."""
    return tuple((p.data_ptr(), p._version) for module in modules for p in module.parameters())


def _covered(model: nn.Module, layers: nn.ModuleList, start: int, stop: int) -> list[nn.Module]:
    """What keys/values of layers [start, stop) are computed from: those layers, and the embeddings from layer 0."""
    return [model.get_input_embeddings()] * (start == 0) + list(layers[start:stop])


@dataclass(frozen=True)
class PrefixKV:
    """A prefix's keys/values (batch 1) for layers [start, stop), and the identity of the weights they came from."""

    start: int
    length: int
    keys: tuple[torch.Tensor, ...]  # per layer: (1, kv_heads, length, head_dim)
    values: tuple[torch.Tensor, ...]
    weights: tuple

    @property
    def stop(self) -> int:
        """The layer after the last one cached."""
        return self.start + len(self.keys)

    @property
    def nbytes(self) -> int:
        """Bytes the cached keys and values hold."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass(frozen=True)
class Suffix:
    """One example's tokens after the shared prefix, and the tokens to score.

    A target (p, t) asks for log p(t | prefix + ids[: p + 1]): the hidden state at suffix
    position p predicts the next token.
    """

    ids: tuple[int, ...]
    targets: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.ids:
            raise SvdiclError("a suffix needs at least one token (the query); got an empty one")
        bad = [p for p, _ in self.targets if not 0 <= p < len(self.ids)]
        if bad:
            raise SvdiclError(f"target position {bad[0]} is outside a suffix of {len(self.ids)} tokens")


@dataclass(frozen=True)
class SuffixBatch:
    """Suffixes right-padded into one tensor, with every target flattened (rows, positions, tokens)."""

    ids: torch.Tensor  # (B, S)
    mask: torch.Tensor  # (B, S) bool, False on padding
    rows: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    tokens: torch.Tensor  # (N,)
    counts: tuple[int, ...]  # targets per suffix

    @classmethod
    def of(cls, suffixes: Sequence[Suffix], pad_id: int = 0) -> SuffixBatch:
        """Pad `suffixes` into one batch (right padding, with a mask of real tokens)."""
        if not suffixes:
            raise SvdiclError("a batch needs at least one suffix")
        width = max(len(s.ids) for s in suffixes)
        ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(suffixes), width), dtype=torch.bool)
        for row, suffix in enumerate(suffixes):
            ids[row, : len(suffix.ids)] = torch.tensor(suffix.ids)
            mask[row, : len(suffix.ids)] = True
        flat = torch.tensor([(row, p, t) for row, s in enumerate(suffixes) for p, t in s.targets], dtype=torch.long)
        rows, positions, tokens = flat.reshape(-1, 3).unbind(dim=1)
        return cls(ids, mask, rows, positions, tokens, tuple(len(s.targets) for s in suffixes))

    def split(self, logprobs: torch.Tensor) -> list[torch.Tensor]:
        """Per-suffix log-probs, in target order, from the flat (N,) result."""
        return list(torch.split(logprobs, list(self.counts)))


def _base(model: nn.Module, family: Family) -> nn.Module:
    return model.get_submodule(family.base)


@torch.no_grad()
def embed(model: nn.Module, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """The hidden states entering layer 0, (B, S, H) from (B, S) or (1, P, H) from (P,) ids (Gemma's scale included)."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.get_input_embeddings().weight.device)
    return model.get_input_embeddings()(ids if ids.dim() == 2 else ids.unsqueeze(0))


def _run(model: nn.Module, family: Family, hidden: torch.Tensor, span: range, cache: Cache, attention_mask, offset: int):
    """Decoder layers `span` on `hidden`, whose first token sits at position `offset`, as the model's forward runs them."""
    config = model.config
    base = _base(model, family)
    _, layers = layer_stack(model)
    types = _layer_types(config, family)
    positions = torch.arange(offset, offset + hidden.shape[1], device=hidden.device).unsqueeze(0)
    wanted = sorted({types[i] for i in span})
    inputs = {"inputs_embeds": hidden, "attention_mask": attention_mask, _MASK_CACHE: cache, "position_ids": positions}
    masks = {kind: _MASKS[kind](config=config, **inputs) for kind in wanted}
    rotary_kind = _rotary(base, family)
    if rotary_kind == "shared" and wanted:
        rotary = dict.fromkeys(wanted, base.rotary_emb(hidden, positions))
    elif rotary_kind == "per_type":
        rotary = {kind: base.rotary_emb(hidden, positions, kind) for kind in wanted}
    else:
        rotary = {}
    for i in span:
        extra = {"position_embeddings": rotary[types[i]]} if rotary else {}
        extra[_cache_keyword(type(layers[i]).forward, family.cache_arg)] = cache
        out = layers[i](hidden, attention_mask=masks[types[i]], position_ids=positions, **extra)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@torch.no_grad()
def run_prefix(model: nn.Module, hidden: torch.Tensor, start: int = 0, stop: int | None = None) -> tuple[PrefixKV, torch.Tensor]:
    """Run a prefix's hidden states entering layer `start` (1, P, H) through [start, stop): its keys/values and output."""
    family = fast_family(model)
    _, layers = layer_stack(model)
    span = range(start, len(layers) if stop is None else stop)
    if hidden.shape[0] != 1:
        raise SvdiclError(f"a prefix is one sequence (batch 1); got a batch of {hidden.shape[0]}")
    weights = _stamp(_covered(model, layers, span.start, span.stop))
    if hidden.shape[1] == 0 or not span:
        return PrefixKV(span.start, hidden.shape[1], (), (), weights), hidden
    cache = DynamicCache()
    hidden = _run(model, family, hidden, span, cache, None, 0)
    keys = tuple(cache.layers[i].keys for i in span)
    values = tuple(cache.layers[i].values for i in span)
    return PrefixKV(span.start, hidden.shape[1], keys, values, weights), hidden


class _ServedLayer(DynamicLayer):
    """One layer's prefix keys/values, served to every row of a batch; a suffix's own are not kept."""

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None, length: int) -> None:
        super().__init__()
        self.keys, self.values, self.length = keys, values, length
        self.is_initialized = keys is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.keys is None:
            return key_states, value_states
        rows = key_states.shape[0]  # expand is a view: the prefix is stored once for the whole batch
        keys = torch.cat([self.keys.expand(rows, -1, -1, -1), key_states], dim=-2)
        values = torch.cat([self.values.expand(rows, -1, -1, -1), value_states], dim=-2)
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0


@torch.no_grad()
def run_suffixes(
    model: nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    prefix: PrefixKV,
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """Run right-padded suffixes entering layer `start` (B, S, H; mask B x S) after `prefix` through [start, stop)."""
    family = fast_family(model)
    _, layers = layer_stack(model)
    span = range(start, len(layers) if stop is None else stop)
    if prefix.length and span and not (prefix.start <= span.start and span.stop <= prefix.stop):
        raise SvdiclError(f"prefix keys/values cover layers {prefix.start}..{prefix.stop - 1}, not {span.start}..{span.stop - 1}")
    if prefix.length and prefix.weights != _stamp(_covered(model, layers, prefix.start, prefix.stop)):
        raise SvdiclError("the prefix keys/values were computed with other weights; recompute them after every edit")
    served = [
        _ServedLayer(prefix.keys[i - prefix.start], prefix.values[i - prefix.start], prefix.length)
        if prefix.start <= i < prefix.stop
        else _ServedLayer(None, None, prefix.length)
        for i in range(len(layers))
    ]
    attention = torch.cat([mask.new_ones(mask.shape[0], prefix.length), mask], dim=1).bool()
    return _run(model, family, hidden, span, Cache(layers=served), attention, prefix.length)


@torch.no_grad()
def target_logprobs(model: nn.Module, hidden: torch.Tensor, batch: SuffixBatch) -> torch.Tensor:
    """Final norm and head only at the scored positions of the last layer's output: (N,) log-probs, float32 or wider.

    Each log-prob is exact (the log-softmax runs over the whole vocabulary), and a position scored
    for several tokens (several label words) goes through the head once.
    """
    family = fast_family(model)
    norm = _base(model, family).get_submodule(family.norm)
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    width = hidden.shape[1]
    places, inverse = torch.unique(batch.rows * width + batch.positions, return_inverse=True)
    flat = hidden.reshape(-1, hidden.shape[-1])
    picked = []
    for chunk in torch.split(places.to(hidden.device), HEAD_ROWS):
        logits = head(norm(flat[chunk]))
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        picked.append(logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=-1))
    if not picked:
        return torch.empty(0)
    logprobs = torch.cat(picked)
    return logprobs[inverse.to(logprobs.device), batch.tokens.to(logprobs.device)].cpu()


def prefix_kv(model: nn.Module, ids: torch.Tensor | Sequence[int]) -> PrefixKV:
    """The prefix's keys/values in every layer, for `suffix_logprobs`."""
    return run_prefix(model, embed(model, ids))[0]


def suffix_logprobs(model: nn.Module, batch: SuffixBatch, prefix: PrefixKV) -> torch.Tensor:
    """The shared-prefix path: each suffix runs only its own tokens, attending to `prefix` (from `prefix_kv`)."""
    hidden = embed(model, batch.ids)
    return target_logprobs(model, run_suffixes(model, hidden, batch.mask.to(hidden.device), prefix), batch)


@dataclass(frozen=True)
class CachedBatch:
    """A suffix batch's hidden states entering the cache's start layer."""

    batch: SuffixBatch
    hidden: torch.Tensor  # (B, S, H)


class LayerCache:
    """Inputs of layer `start`, computed once; layers start..L re-run for each edit of layers >= start.

    Build it before pruning, `encode` each suffix batch once, then per clipping rate (inside
    `svdicl.pruned`): `upper = cache.prefix()` and `cache.score(batch, upper)` for every batch.
    The embeddings and layers below `start` must stay as they were: every call checks that and
    refuses stale inputs rather than return wrong log-probs.
    """

    def __init__(self, model: nn.Module, prefix_ids: torch.Tensor | Sequence[int], start: int) -> None:
        fast_family(model)
        _, layers = layer_stack(model)
        if not 0 <= start < len(layers):
            raise SvdiclError(f"start layer {start} is outside the model's {len(layers)} layers (0..{len(layers) - 1})")
        self.model, self.start, self.stop = model, start, len(layers)
        self._lower_modules = [model.get_input_embeddings(), *layers[:start]]
        self._lower_weights = _stamp(self._lower_modules)
        self.lower, self.prefix_hidden = run_prefix(model, embed(model, prefix_ids), 0, start)

    def _check(self) -> None:
        if _stamp(self._lower_modules) != self._lower_weights:
            raise SvdiclError(
                f"weights below layer {self.start} (or the embeddings) changed since the layer cache was built; "
                "only layers >= the start layer may be edited during a cached sweep"
            )

    def encode(self, batch: SuffixBatch) -> CachedBatch:
        """Run a batch through the embeddings and layers < start, once for the whole sweep."""
        self._check()
        device = self.prefix_hidden.device
        hidden = run_suffixes(self.model, embed(self.model, batch.ids), batch.mask.to(device), self.lower, 0, self.start)
        return CachedBatch(batch, hidden)

    def prefix(self) -> PrefixKV:
        """The prefix's keys/values in layers start..L under the current weights (once per edit)."""
        self._check()
        return run_prefix(self.model, self.prefix_hidden, self.start, self.stop)[0]

    def score(self, cached: CachedBatch, upper: PrefixKV) -> torch.Tensor:
        """Log-probs of the batch's targets: layers start..L, final norm and head at the scored positions."""
        self._check()
        mask = cached.batch.mask.to(cached.hidden.device)
        hidden = run_suffixes(self.model, cached.hidden, mask, upper, self.start, self.stop)
        return target_logprobs(self.model, hidden, cached.batch)
