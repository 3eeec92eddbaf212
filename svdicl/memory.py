"""How much memory the fast paths' caches take, planned before any is built (--cache-memory).

`cache_cost` counts what a shared prefix or a layer cache (svdicl.forward) holds for a model and
prefix length, `plan_passes` groups a sweep's batches into passes whose cache fits the budget,
and `parse_memory` reads the budget as the flag gives it.  Sizes follow accelerate (and lm-eval's
--max_memory_per_gpu, which hands them to accelerate): GiB/MiB/KiB are powers of 2, GB/MB/KB
powers of 10.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from accelerate.utils import convert_file_size_to_int
from torch import nn

from svdicl.errors import SvdiclError
from svdicl.forward import HEAD_ROWS, fast_family
from svdicl.targets import layer_stack

DEFAULT_CACHE_MEMORY = 4 << 30  # bytes (4 GiB): leaves room for a 7B float16 model on a 24 GiB machine
_UNITS = {"": "", "kib": "KiB", "mib": "MiB", "gib": "GiB", "kb": "KB", "mb": "MB", "gb": "GB"}  # lower case -> accelerate's


def parse_memory(text: str | int) -> int:
    """Bytes from `4GiB` (4 x 2^30), `4GB` (4 x 10^9), `512MiB`, `1.5gb` or a plain number of bytes.

    The units are accelerate's (`convert_file_size_to_int` computes them), read case-insensitively:
    a memory budget is never in bits, which accelerate reads a lower-case `b` as.  A bare `G` is
    refused rather than guessed (2^30 or 10^9).
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(text), flags=re.IGNORECASE)
    unit = match.group(2).lower() if match is not None else None
    if unit not in _UNITS:
        raise SvdiclError(
            f"cannot read memory size {text!r}; write e.g. 4GiB (4 x 2^30 bytes), 4GB (4 x 10^9 bytes) or a number of bytes"
        )
    if not unit:
        return int(float(match.group(1)))
    return convert_file_size_to_int(match.group(1) + _UNITS[unit])


def format_size(n: int) -> str:
    """`1.50 GiB` or `512.0 MiB`: a byte count as messages about --cache-memory print it."""
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class CacheCost:
    """Bytes a `LayerCache` (or a shared prefix) needs, to check against --cache-memory before building it."""

    fixed: int  # the prefix: its hidden states entering the start layer and its keys/values in every layer
    per_token: int  # one cached suffix token, padding included: its hidden state entering the start layer
    attention_per_token: int  # one layer's keys/values per token, stored and repeated to every query head
    heads: int
    intermediate: int
    vocab: int
    itemsize: int

    def working(self, rows: int, length: int, prefix_length: int) -> int:
        """Transient bytes of one batch's forward (one layer at a time): keys/values, attention scores, MLP, head."""
        keys = rows * (prefix_length + length) * self.attention_per_token
        scores = rows * self.heads * length * (prefix_length + length) * 4
        mlp = 3 * rows * length * self.intermediate * self.itemsize
        head = 2 * min(rows * length, HEAD_ROWS) * self.vocab * 4
        return keys + scores + mlp + head


def cache_cost(model: nn.Module, prefix_length: int) -> CacheCost:
    """What a layer cache for a prefix of `prefix_length` tokens holds, whatever its start layer.

    Below the start layer it keeps the prefix's keys/values (to encode suffixes), above it the
    keys/values of the current edit: every layer once, plus the prefix's hidden states.
    """
    family = fast_family(model)
    _, layers = layer_stack(model)
    itemsize = model.get_input_embeddings().weight.element_size()
    kv = [2 * _outputs(layer.get_submodule(family.matrices["k"])) * itemsize for layer in layers]
    queries = [2 * _outputs(layer.get_submodule(family.matrices["q"])) * itemsize for layer in layers]
    hidden = model.get_input_embeddings().weight.shape[1] * itemsize
    first = layers[0].get_submodule(family.matrices["up" if "up" in family.matrices else "fc_in"])
    return CacheCost(
        fixed=prefix_length * (hidden + sum(kv)),
        per_token=hidden,
        attention_per_token=max(k + q for k, q in zip(kv, queries, strict=True)),
        heads=model.config.num_attention_heads,
        intermediate=_outputs(first),
        vocab=_outputs(model.get_output_embeddings()),
        itemsize=itemsize,
    )


def _outputs(module: nn.Module) -> int:
    """A linear map's output size, whether dense (weight out x in) or factorised (a loaded factorized export)."""
    return getattr(module, "out_features", None) or module.weight.shape[0]


def plan_passes(model: nn.Module, prefix_length: int, shapes: Sequence[tuple[int, int]], budget: int) -> list[range] | None:
    """Group consecutive batches, given as (rows, padded length), into passes whose cache fits `budget`.

    Each pass is encoded and swept on its own (the prefix's layers start..L then run once per
    pass and edit).  None when not even one batch fits: the caller falls back to the plain path.
    """
    cost = cache_cost(model, prefix_length)
    room = budget - cost.fixed - max((cost.working(r, n, prefix_length) for r, n in shapes), default=0)
    passes: list[range] = []
    first, used = 0, 0
    for i, (rows, length) in enumerate(shapes):
        size = rows * length * cost.per_token
        if size > room:
            return None
        if used + size > room:
            passes.append(range(first, i))
            first, used = i, 0
        used += size
    if first < len(shapes):
        passes.append(range(first, len(shapes)))
    return passes
