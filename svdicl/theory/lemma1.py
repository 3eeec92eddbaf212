"""Lemma 1 and Theorem 1: linear attention over demonstrations is an implicit gradient-descent update.

Tokens are rows.  A layer has W_Q, W_K (d_k x d) and W_V (d x d).  On a sequence H = [X'; X]
(n demonstrations, then the query's own m tokens, the last one being the query x) it computes,
at every position t, causal linear attention with a residual connection:

    h_t  ->  h_t + sum_{s <= t} (W_V h_s) (W_K h_s)^T (W_Q h_t)          (the query attends to itself)

Lemma 1 (dual form).  At the query, the same output is (W0 + dW) x with
    W0 = I + sum_{j in X} (W_V x_j)(W_K x_j)^T W_Q        the zero-shot path, no demonstration in it,
    dW = sum_{i in X'} (W_V x'_i)(W_K x'_i)^T W_Q          the implicit update, rank(dW) <= n.

Theorem 1.  Stacking L layers, each layer's demonstrations are the previous layer's outputs at
the demonstration positions; the query's output is (W0^L + dW^L) ... (W0^1 + dW^1) x, one implicit
update per layer, and dW^l depends on every earlier layer's weights (and on no later one).

`attention` computes the layer directly (scores first); `implicit_update` and `dual_states`
compute it through the dual form (outer products first).  `lemma1_error` and `theorem1_error`
compare the two, and take the construction of dW as an argument so a deliberately wrong one
(`PERTURBED`) runs through the very same check and fails it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from svdicl.errors import SvdiclError
from svdicl.svd import kept_rank, svd_factors


@dataclass(frozen=True)
class LinearAttention:
    """One linear-attention layer with residual: W_Q, W_K are (d_k x d), W_V is (d x d)."""

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor

    @property
    def dim(self) -> int:
        """The token dimension."""
        return self.w_v.shape[1]


Update = Callable[[LinearAttention, torch.Tensor], torch.Tensor]


def random_layer(dim: int, key_dim: int | None = None, *, generator: torch.Generator) -> LinearAttention:
    """Gaussian weights with entries N(0, 1/dim), float64: outputs keep the scale of their inputs."""
    key_dim = key_dim or dim
    scale = dim**-0.5

    def draw(rows: int) -> torch.Tensor:
        return torch.randn(rows, dim, generator=generator, dtype=torch.float64) * scale

    return LinearAttention(w_q=draw(key_dim), w_k=draw(key_dim), w_v=draw(dim))


def attention(layer: LinearAttention, tokens: torch.Tensor) -> torch.Tensor:
    """The layer computed directly: causal scores (W_Q h_t . W_K h_s) first, then the weighted values."""
    q, k, v = tokens @ layer.w_q.T, tokens @ layer.w_k.T, tokens @ layer.w_v.T
    scores = torch.tril(q @ k.T)  # (T, T), score[t, s] for s <= t
    return tokens + scores @ v


def implicit_update(layer: LinearAttention, demos: torch.Tensor) -> torch.Tensor:
    """dW = sum_i (W_V x'_i)(W_K x'_i)^T W_Q over the demonstration rows (d x d, rank <= n)."""
    v, k = demos @ layer.w_v.T, demos @ layer.w_k.T
    outer = sum((torch.outer(v[i], k[i]) for i in range(demos.shape[0])), torch.zeros(v.shape[1], k.shape[1], dtype=v.dtype))
    return outer @ layer.w_q


def zero_shot_weight(layer: LinearAttention, context: torch.Tensor) -> torch.Tensor:
    """W0 = I + sum_j (W_V x_j)(W_K x_j)^T W_Q over the query's own tokens: the layer without demonstrations."""
    return torch.eye(layer.dim, dtype=context.dtype) + implicit_update(layer, context)


def drop_last_demo(layer: LinearAttention, demos: torch.Tensor) -> torch.Tensor:
    """Perturbed: forgets the last demonstration."""
    return implicit_update(layer, demos[:-1])


def key_for_query(layer: LinearAttention, demos: torch.Tensor) -> torch.Tensor:
    """Perturbed: W_K where W_Q belongs."""
    return implicit_update(LinearAttention(w_q=layer.w_k, w_k=layer.w_k, w_v=layer.w_v), demos)


PERTURBED: dict[str, Update] = {"drop-last-demo": drop_last_demo, "key-for-query": key_for_query}


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """||reference - candidate|| / ||reference||."""
    return (torch.linalg.vector_norm(reference - candidate) / torch.linalg.vector_norm(reference)).item()


def _split(tokens: torch.Tensor, n_demos: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 1 <= n_demos < tokens.shape[0]:
        raise SvdiclError(
            f"{n_demos} demonstrations in a sequence of {tokens.shape[0]} tokens; the query needs at least one token"
        )
    return tokens[:n_demos], tokens[n_demos:]


def lemma1_error(layer: LinearAttention, tokens: torch.Tensor, n_demos: int, update: Update = implicit_update) -> float:
    """Relative error between the direct layer output at the query and W0 x + dW x with dW from `update`."""
    demos, context = _split(tokens, n_demos)
    direct = attention(layer, tokens)[-1]
    dual = zero_shot_weight(layer, context) @ context[-1] + update(layer, demos) @ context[-1]
    return relative_error(direct, dual)


@dataclass(frozen=True)
class Trajectory:
    """The implicit GD trajectory of the query through a stack: one (W0^l, dW^l) per layer."""

    zero_shot: tuple[torch.Tensor, ...]
    updates: tuple[torch.Tensor, ...]
    output: torch.Tensor  # the query's output, (W0^L + dW^L) ... (W0^1 + dW^1) x

    def effective_map(self) -> torch.Tensor:
        """The product of the per-layer maps (W0^l + dW^l), last layer leftmost."""
        total = torch.eye(self.updates[0].shape[0], dtype=self.updates[0].dtype)
        for w0, dw in zip(self.zero_shot, self.updates, strict=True):
            total = (w0 + dw) @ total
        return total


def dual_states(layer: LinearAttention, tokens: torch.Tensor, n_demos: int, update: Update = implicit_update) -> torch.Tensor:
    """Every position's output through the dual form: demonstration t sees demonstrations 0..t as its
    own "training set" (dW from `update`), a query-side token sees all demonstrations (dW) plus the
    query-side tokens up to itself (W0)."""
    demos, context = _split(tokens, n_demos)
    rows = [(torch.eye(layer.dim, dtype=tokens.dtype) + update(layer, demos[: t + 1])) @ demos[t] for t in range(n_demos)]
    dw = update(layer, demos)
    rows += [(zero_shot_weight(layer, context[: j + 1]) + dw) @ context[j] for j in range(context.shape[0])]
    return torch.stack(rows)


def trajectory(
    stack: Sequence[LinearAttention], tokens: torch.Tensor, n_demos: int, update: Update = implicit_update
) -> Trajectory:
    """Theorem 1 in the dual form only: dW^l from the layer-(l-1) demonstration states, composed per layer."""
    zero_shot, updates = [], []
    states = tokens
    query = tokens[-1]
    for layer in stack:
        demos, context = _split(states, n_demos)
        zero_shot.append(zero_shot_weight(layer, context))
        updates.append(update(layer, demos))
        query = (zero_shot[-1] + updates[-1]) @ query
        states = dual_states(layer, states, n_demos, update)
    return Trajectory(zero_shot=tuple(zero_shot), updates=tuple(updates), output=query)


def stack_forward(stack: Sequence[LinearAttention], tokens: torch.Tensor) -> torch.Tensor:
    """The stack computed directly, layer after layer; all positions."""
    for layer in stack:
        tokens = attention(layer, tokens)
    return tokens


def theorem1_error(
    stack: Sequence[LinearAttention], tokens: torch.Tensor, n_demos: int, update: Update = implicit_update
) -> float:
    """Relative error between the direct stack output at the query and the composed implicit updates."""
    direct = stack_forward(stack, tokens)[-1]
    traj = trajectory(stack, tokens, n_demos, update)
    return max(relative_error(direct, traj.output), relative_error(direct, traj.effective_map() @ tokens[-1]))


def rank(matrix: torch.Tensor) -> int:
    """Numerical rank (float64 tolerance of torch.linalg.matrix_rank)."""
    return int(torch.linalg.matrix_rank(matrix).item())


def truncate_layer(layer: LinearAttention, rate: float) -> LinearAttention:
    """W_Q, W_K, W_V each truncated at `rate` with svdicl's exact SVD (float64)."""

    def cut(matrix: torch.Tensor) -> torch.Tensor:
        return svd_factors(matrix, torch.float64).truncate(kept_rank(tuple(matrix.shape), rate))

    return LinearAttention(w_q=cut(layer.w_q), w_k=cut(layer.w_k), w_v=cut(layer.w_v))


def update_changes(stack: Sequence[LinearAttention], tokens: torch.Tensor, n_demos: int, layer: int, rate: float) -> list[float]:
    """||dW^l(pruned) - dW^l||_F / ||dW^l||_F for every l after truncating layer `layer`: zero before it."""
    edited = [truncate_layer(w, rate) if i == layer else w for i, w in enumerate(stack)]
    before = trajectory(stack, tokens, n_demos).updates
    after = trajectory(edited, tokens, n_demos).updates
    return [relative_error(a, b) for a, b in zip(before, after, strict=True)]


@dataclass(frozen=True)
class Draw:
    """One random draw: shapes, the check's errors for the true and the perturbed constructions."""

    draw: int
    n_demos: int
    query_tokens: int
    lemma1_error: float
    theorem1_error: float
    perturbed_lemma1: dict[str, float]
    perturbed_theorem1: dict[str, float]
    ranks: list[int]  # rank(dW^l) per layer of the stack
    pruned_layer: int
    update_changes: list[float]  # per layer, after truncating `pruned_layer` at rate 0.5


def draw_one(index: int, *, seed: int, dim: int, layers: int, max_demos: int) -> Draw:
    """Draw weights, demonstrations and a query (n in 1..max_demos, 1..3 query tokens) and run every check."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    n_demos = int(torch.randint(1, max_demos + 1, (), generator=gen))
    query_tokens = int(torch.randint(1, 4, (), generator=gen))
    stack = [random_layer(dim, generator=gen) for _ in range(layers)]
    tokens = torch.randn(n_demos + query_tokens, dim, generator=gen, dtype=torch.float64) * dim**-0.5
    pruned_layer = int(torch.randint(0, layers, (), generator=gen))
    return Draw(
        draw=index,
        n_demos=n_demos,
        query_tokens=query_tokens,
        lemma1_error=lemma1_error(stack[0], tokens, n_demos),
        theorem1_error=theorem1_error(stack, tokens, n_demos),
        perturbed_lemma1={name: lemma1_error(stack[0], tokens, n_demos, fn) for name, fn in PERTURBED.items()},
        perturbed_theorem1={name: theorem1_error(stack, tokens, n_demos, fn) for name, fn in PERTURBED.items()},
        ranks=[rank(dw) for dw in trajectory(stack, tokens, n_demos).updates],
        pruned_layer=pruned_layer,
        update_changes=update_changes(stack, tokens, n_demos, pruned_layer, 0.5),
    )


def summarize(draws: Sequence[Draw], dim: int, tolerance: float) -> dict:
    """Pass/fail of each claim over all draws; the perturbed constructions must fail the same check."""
    perturbed = [e for d in draws for e in (*d.perturbed_lemma1.values(), *d.perturbed_theorem1.values())]
    return {
        "draws": len(draws),
        "tolerance": tolerance,
        "lemma1_max_error": max(d.lemma1_error for d in draws),
        "theorem1_max_error": max(d.theorem1_error for d in draws),
        "lemma1_holds": all(d.lemma1_error <= tolerance for d in draws),
        "theorem1_holds": all(d.theorem1_error <= tolerance for d in draws),
        "perturbed_min_error": {
            name: min(min(d.perturbed_lemma1[name], d.perturbed_theorem1[name]) for d in draws) for name in PERTURBED
        },
        "perturbed_all_fail": all(e > tolerance for e in perturbed),
        "rank_bound_holds": all(r <= min(d.n_demos, dim) for d in draws for r in d.ranks),
        "rank_equals_min_n_d": sum(all(r == min(d.n_demos, dim) for r in d.ranks) for d in draws),
        "locality_holds": all(
            all(c == 0.0 for c in d.update_changes[: d.pruned_layer]) and all(c > 0 for c in d.update_changes[d.pruned_layer :])
            for d in draws
        ),
    }
