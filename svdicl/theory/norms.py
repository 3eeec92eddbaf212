"""Examples 1-4: truncating W_V, W_K, W_Q or the MLP lowers a bound on the implicit gradient's norm.

With demonstrations X' (n x d, rows) the implicit update of one attention layer is, per query
head h and its key/value group g (GQA: several query heads share one K/V head),

    dW_h = (W_V^g X'^T)(W_K^g X'^T)^T W_Q^h,        dW = [dW_1; ...; dW_H]   (heads stacked).

Submultiplicativity of the Frobenius norm, summed over heads, bounds every such dW by

    ||dW||_F  <=  B_attn = ||W_V X'^T||_F * ||W_K X'^T||_F * ||W_Q||_F          (Examples 1-3),

and a relaxed block whose MLP is linear, y = h + W_out W_in h (activation, gate and norm taken
as identity), passes the update on as (I + W_out W_in) W_O dW, bounded by

    B_mlp = ||W_O dW||_F * (1 + ||W_out||_F * ||W_in||_F)                          (Example 4).

A rank-k truncation is an orthogonal projection, W_k = U_k U_k^T W = W V_k V_k^T, so it never
raises ||W X'^T||_F or ||W||_F: each bound is non-increasing in the clipping rate, for every rate.
The exact norm also cannot rise when W_Q is truncated (dW_k = dW V_k V_k^T, per head) or, for a
single head, W_V (dW_k = U_k U_k^T dW); for W_K and the MLP the projection sits in the middle of
the product and the exact norm may rise: only the bound is guaranteed.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from svdicl.errors import SvdiclError
from svdicl.prune import logical_matrix, pruned
from svdicl.svd import kept_rank, svd_factors
from svdicl.targets import family_of, resolve

RATES = (0.0, 0.1, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995)
EXAMPLES = {"v": ("w_v",), "k": ("w_k",), "q": ("w_q",), "mlp": ("w_in", "w_out")}  # matrices each example truncates


@dataclass(frozen=True)
class Block:
    """The matrices of one layer in logical (out, in) orientation, float64, and its head layout."""

    w_q: torch.Tensor  # (heads * head_dim, d)
    w_k: torch.Tensor  # (kv_heads * head_dim, d)
    w_v: torch.Tensor  # (kv_heads * value_dim, d)
    w_o: torch.Tensor  # (d, heads * value_dim)
    w_in: torch.Tensor  # (hidden, d)
    w_out: torch.Tensor  # (d, hidden)
    heads: int = 1
    kv_heads: int = 1


def implicit_gradient(block: Block, demos: torch.Tensor) -> torch.Tensor:
    """dW with heads stacked: (heads * value_dim, d)."""
    if block.heads % block.kv_heads:
        raise SvdiclError(f"{block.heads} query heads cannot share {block.kv_heads} key/value heads evenly")
    values = (block.w_v @ demos.T).reshape(block.kv_heads, -1, demos.shape[0])  # (G, value_dim, n)
    keys = (block.w_k @ demos.T).reshape(block.kv_heads, -1, demos.shape[0])  # (G, head_dim, n)
    queries = block.w_q.reshape(block.heads, -1, block.w_q.shape[1])  # (H, head_dim, d)
    group = torch.arange(block.heads) // (block.heads // block.kv_heads)
    return (values[group] @ keys[group].transpose(1, 2) @ queries).reshape(-1, block.w_q.shape[1])


def _fro(matrix: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(matrix).item()


@dataclass(frozen=True)
class Norms:
    """Exact Frobenius norm of the implicit gradient an example looks at, and its upper bound."""

    exact: float
    bound: float


def norms(block: Block, demos: torch.Tensor, example: str, dw: torch.Tensor | None = None) -> Norms:
    """||dW||_F and B_attn for examples v, k, q; ||(I + W_out W_in) W_O dW||_F and B_mlp for mlp.

    `dw` is the block's implicit gradient when known (the MLP example does not change it).
    """
    dw = implicit_gradient(block, demos) if dw is None else dw
    if example in ("v", "k", "q"):
        return Norms(_fro(dw), _fro(block.w_v @ demos.T) * _fro(block.w_k @ demos.T) * _fro(block.w_q))
    if example == "mlp":
        update = block.w_o @ dw
        through = update + block.w_out @ (block.w_in @ update)
        return Norms(_fro(through), _fro(update) * (1 + _fro(block.w_out) * _fro(block.w_in)))
    raise SvdiclError(f"unknown example {example!r}; choose from {', '.join(EXAMPLES)}")


def truncated(block: Block, example: str, rate: float) -> Block:
    """The block with the example's matrices truncated at `rate` by svdicl's exact SVD (float64)."""
    changes = {}
    for name in EXAMPLES[example]:
        matrix = getattr(block, name)
        changes[name] = svd_factors(matrix, torch.float64).truncate(kept_rank(tuple(matrix.shape), rate))
    return replace(block, **changes)


def random_block(dim: int, *, generator: torch.Generator, heads: int = 1, kv_heads: int = 1, mlp_ratio: int = 4) -> Block:
    """Gaussian matrices, entries N(0, 1/fan_in); a single head has head_dim = dim."""

    def draw(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator, dtype=torch.float64) * cols**-0.5

    head_dim = dim // heads
    return Block(
        w_q=draw(heads * head_dim, dim),
        w_k=draw(kv_heads * head_dim, dim),
        w_v=draw(kv_heads * head_dim, dim),
        w_o=draw(dim, heads * head_dim),
        w_in=draw(mlp_ratio * dim, dim),
        w_out=draw(dim, mlp_ratio * dim),
        heads=heads,
        kv_heads=kv_heads,
    )


@dataclass(frozen=True)
class NormRow:
    """One (source, layer or draw, example, rate) measurement; ratios are after / before truncation."""

    source: str
    layer: int
    example: str
    rate: float
    exact: float
    bound: float
    exact_ratio: float
    bound_ratio: float


def sweep_block(
    source: str,
    layer: int,
    block: Block,
    demos: torch.Tensor,
    rates: Sequence[float],
    truncate: Callable[[str, float], Block] | None = None,
) -> list[NormRow]:
    """Every example at every rate for one block; rate 0 is the reference.

    `truncate(example, rate)` gives the truncated block (default: `truncated` on `block`).
    """
    truncate = truncate or (lambda example, rate: truncated(block, example, rate))
    dw = implicit_gradient(block, demos)
    rows = []
    for example in EXAMPLES:
        before = norms(block, demos, example, dw)
        for rate in rates:
            after = norms(truncate(example, rate), demos, example, dw if example == "mlp" else None) if rate > 0 else before
            rows.append(
                NormRow(
                    source, layer, example, rate, after.exact, after.bound, after.exact / before.exact, after.bound / before.bound
                )
            )
    return rows


def random_sweep(draws: int, *, seed: int, dim: int, demos: int, rates: Sequence[float] = RATES) -> list[NormRow]:
    """Examples 1-4 on `draws` random single-head blocks with random demonstrations; `layer` is the draw."""
    rows = []
    for index in range(draws):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        block = random_block(dim, generator=gen)
        tokens = torch.randn(demos, dim, generator=gen, dtype=torch.float64)
        rows += sweep_block("random", index, block, tokens, rates)
    return rows


def monotone(rows: Sequence[NormRow], field: str, slack: float = 1e-12) -> dict[str, float]:
    """Per example, the fraction of (layer or draw) curves whose `field` never rises with the rate."""
    curves: dict[tuple[str, int], list[NormRow]] = {}
    for row in rows:
        curves.setdefault((row.example, row.layer), []).append(row)
    result: dict[str, list[bool]] = {}
    for (example, _), curve in curves.items():
        values = [getattr(r, field) for r in sorted(curve, key=lambda r: r.rate)]
        result.setdefault(example, []).append(all(b <= a * (1 + slack) for a, b in itertools.pairwise(values)))
    return {example: sum(flags) / len(flags) for example, flags in result.items()}


def summarize(rows: Sequence[NormRow], rates: Sequence[float]) -> dict:
    """For the rows of one source: how often each curve never rises, whether exact <= bound, mean ratios per rate."""

    def mean(field: str, example: str, rate: float) -> float:
        values = [getattr(r, field) for r in rows if r.example == example and r.rate == rate]
        return sum(values) / len(values)

    return {
        "bound_non_increasing": monotone(rows, "bound"),
        "exact_non_increasing": monotone(rows, "exact"),
        "exact_within_bound": all(r.exact <= r.bound * (1 + 1e-9) for r in rows),
        "mean_bound_ratio": {e: [mean("bound_ratio", e, rate) for rate in rates] for e in EXAMPLES},
        "mean_exact_ratio": {e: [mean("exact_ratio", e, rate) for rate in rates] for e in EXAMPLES},
    }


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Block field -> svdicl's canonical matrix name in the model's family (the relaxed MLP: up/down or fc_in/fc_out)."""
    family = family_of(model)
    if family is None:
        model_type = getattr(model.config, "model_type", "?")
        raise SvdiclError(f"model family {model_type!r} is not in svdicl's table; the norms need its q, k, v, o matrices")
    w_in, w_out = ("up", "down") if "up" in family.matrices else ("fc_in", "fc_out")
    return {"w_q": "q", "w_k": "k", "w_v": "v", "w_o": "o", "w_in": w_in, "w_out": w_out}


def _read(model: nn.Module, layer: int, name: str) -> torch.Tensor:
    """A copy of one canonical matrix of a layer, (out, in), float64."""
    (target,) = resolve(model, layer, name)
    return logical_matrix(model.get_submodule(target.module_name).weight, target).detach().to(torch.float64, copy=True)


def model_block(model: nn.Module, layer: int) -> Block:
    """A layer's matrices read from a model of svdicl's family table (float64), with its head layout.

    A gate (LLaMA's gate_proj) is not part of the relaxed MLP: it is taken as identity.
    """
    names = canonical_names(model)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return Block(**{field: _read(model, layer, name) for field, name in names.items()}, heads=heads, kv_heads=kv_heads)


@torch.no_grad()
def layer_inputs(model: nn.Module, input_ids: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """X' per layer: the hidden states entering each layer's query projection (after its input norm), float64."""
    found: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in layers:
        (target,) = resolve(model, layer, "q")

        def keep(module, args, layer=layer):
            found[layer] = args[0][0].detach().double()

        hooks.append(model.get_submodule(target.module_name).register_forward_pre_hook(keep))
    try:
        getattr(model, "base_model", model)(input_ids=input_ids)  # the decoder stack; no vocabulary logits needed
    finally:
        for hook in hooks:
            hook.remove()
    return found


def model_sweep(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: Sequence[int],
    rates: Sequence[float] = RATES,
    *,
    source: str = "model",
    progress: bool = True,
) -> list[NormRow]:
    """Examples 1-4 on a real model: X' = the demonstration tokens entering each layer, truncation by `pruned`."""
    activations = layer_inputs(model, input_ids, layers)
    names = canonical_names(model)
    rows = []
    for layer in tqdm(layers, desc="norms", unit="layer", file=sys.stderr, disable=not progress):
        block = model_block(model, layer)

        def truncate(example: str, rate: float, layer: int = layer, block: Block = block) -> Block:
            fields = EXAMPLES[example]
            with pruned(model, layers=layer, modules=[names[f] for f in fields], rate=rate):
                return replace(block, **{f: _read(model, layer, names[f]) for f in fields})

        rows += sweep_block(source, layer, block, activations[layer], rates, truncate)
    return rows
