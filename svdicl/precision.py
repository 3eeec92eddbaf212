"""Reduced precision with exact answers: score in bfloat16, re-score in float32 whatever could differ.

bfloat16 matmuls run ~3x faster than float32 on CPUs with AMX/AVX-512 BF16, but move
log-probabilities by up to ~0.25 nats and so flip a few predictions.  The mixed path keeps
every reported decision equal to the float32 one:

1. every request is scored on a bfloat16 copy of the model (`LowPrecision`, which follows the
   float32 model's weight edits);
2. a few examples per edit (`SAMPLE`) and every calibration query are also scored in float32;
   the bound b is `SAFETY` x the largest bf16 -> fp32 change of a difference of two candidates'
   scores seen under that edit (never below `FLOOR`);
3. every example whose top-two margin, under the raw scores or any calibration method, is
   within that method's reach of the bound (`reach`) is re-scored in float32; every re-scored
   example is compared too, and if one moved by more than the bound allows, the bound grows and
   the check runs again, until no example is left within reach.

A decision is then the float32 one whenever no value moved by more than b (which the measured
error, times the safety factor, supports): see docs/fast-paths.md.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from svdicl import calibration as cal
from svdicl import forward as fw
from svdicl.errors import SvdiclError
from svdicl.requests import Request, Scores, SuffixPlan, plan_suffixes
from svdicl.targets import layer_stack

PRECISIONS = ("mixed", "float32")
SAFETY = 4.0  # bound = SAFETY x the largest bf16/fp32 difference measured
FLOOR = 1e-3  # nats: the smallest bound, should the measured difference be ~0
SAMPLE = 8  # examples per edit scored both ways to measure the difference
LOW = torch.bfloat16


def check_precision(precision: str) -> str:
    """`precision` if it names a scoring precision, else a one-line error listing them."""
    if precision not in PRECISIONS:
        raise SvdiclError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def emulated_bfloat16() -> bool:
    """Whether this CPU lacks bfloat16 matmul kernels (no AVX-512: torch reports AVX2 or less) and emulates them:
    6x slower than float32 on an AVX2 EPYC (docs/fast-paths.md), so the mixed path could only cost time there."""
    return torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX", "AVX2")


def unsupported_reason(model: nn.Module) -> str | None:
    """None when the mixed path can run `model`; otherwise why only float32 runs (recorded in results)."""
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        return f"the model's weights are {', '.join(sorted(str(d) for d in dtypes))}, not float32; scoring as loaded"
    if getattr(model, "hf_device_map", None):
        return "a model spread over devices by --device-map keeps its own precision; scoring in float32"
    if next(model.parameters()).device.type == "cpu" and emulated_bfloat16():
        capability = torch.backends.cpu.get_cpu_capability()
        return f"this CPU ({capability}, no AVX-512) emulates bfloat16 matmuls, 6x slower than float32; scoring in float32"
    return None


class LowPrecision:
    """The float32 model with the matmuls of its decoder layers in bfloat16, following the float32 model's edits.

    A copy of the module tree in which every `nn.Linear` of the decoder layers holds a bfloat16
    copy of its weight and multiplies bfloat16 inputs (accumulating in float32, as AMX does),
    returning float32.  Every other parameter (embeddings, norms, biases, LM head) is the float32
    model's own, shared, not copied: the residual stream, norms, attention and head stay float32,
    which keeps the error small (bfloat16 everywhere moved label-score differences by up to ~0.6
    nats on SmolLM2).  `sync()` re-casts every weight whose storage or version changed since the
    last sync (a `pruned` swap, its undo, an in-place edit), so the copy always holds the cast of
    the float32 weights: edits are made once, in float32.  The last synced tensor is held, so its
    memory cannot be reused by the next edit's tensor at the same address (which a stamp of
    address and version alone mistook for "unchanged": the copy then ran one edit behind).
    Memory: half the decoder layers' weights.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = LOW) -> None:
        _, layers = layer_stack(model)
        low = {id(m.weight) for m in layers.modules() if isinstance(m, nn.Linear)}
        memo = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False) if id(p) in low else p for p in model.parameters()}
        self.model = copy.deepcopy(model, memo)
        for module in layer_stack(self.model)[1].modules():
            if isinstance(module, nn.Linear):
                module.__class__ = _LowLinear
        self._pairs = [(p, q) for p, q in zip(model.parameters(), self.model.parameters(), strict=True) if p is not q]
        self._synced = [p.detach() for p, _ in self._pairs]
        self._versions = [p._version for p, _ in self._pairs]

    def sync(self) -> nn.Module:
        """The copy, with every changed float32 weight re-cast."""
        for i, (source, low) in enumerate(self._pairs):
            if not source.detach().is_set_to(self._synced[i]) or source._version != self._versions[i]:
                low.data = source.detach().to(low.dtype)
                self._synced[i], self._versions[i] = source.detach(), source._version
        return self.model


class _LowLinear(nn.Linear):
    """A linear layer whose weight is bfloat16: inputs cast to it, output (and bias) float32."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(hidden.to(self.weight.dtype), self.weight).to(hidden.dtype)
        return out if self.bias is None else out + self.bias


_COPIES: weakref.WeakKeyDictionary[nn.Module, LowPrecision] = weakref.WeakKeyDictionary()


def low_precision(model: nn.Module) -> LowPrecision:
    """The bfloat16 copy attached to `model` (made once, then synced): it lives as long as the model does."""
    found = _COPIES.get(model)
    if found is None:
        found = _COPIES[model] = LowPrecision(model)
    found.sync()
    return found


def reach(method: str | None) -> float:
    """How far, in bounds b, a top-two margin can move when every difference s_y - s_z of two
    candidates' ranking values (of one example) moves by at most b.

    Raw (None): the margin is such a difference, b.  contextual/domain: the calibrated value
    log softmax(s)_y - log p_cf(y) differs between labels by s_y - s_z minus a constant (p_cf
    comes from queries scored in float32), b.  batch: each example's label distribution
    log q_y = -log sum_z exp(s_z - s_y) moves by at most b, so does the log of their mean p_cf,
    and a calibrated margin by b + 2b: 3b.
    """
    return {None: 1.0, "contextual": 1.0, "domain": 1.0, "batch": 3.0}[method]


def margins(values: np.ndarray) -> np.ndarray:
    """Per row: the best value minus the second best (inf for a single candidate)."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape[1] < 2:
        return np.full(len(values), np.inf)
    top = np.sort(values, axis=1)
    return top[:, -1] - top[:, -2]


def uncertain(
    values: np.ndarray, bound: float, methods: Sequence[str] = (), probes: dict[str, np.ndarray] | None = None
) -> np.ndarray:
    """Rows (examples x labels of ranking values) whose decision could change if each difference of two values moved by `bound`.

    A row is uncertain when its raw margin, or its margin under any of `methods` (calibration
    priors from `probes[method]`, batch: from `values` itself), is at most that method's reach.
    """
    values = np.asarray(values, dtype=np.float64)
    flagged = margins(values) <= reach(None) * bound
    for method in methods:
        source = values if method == "batch" else (probes or {}).get(method)
        if source is None or len(source) == 0:
            raise SvdiclError(f"{method} calibration needs the scores of its content-free queries")
        flagged |= margins(cal.calibrate(values, cal.prior(source))) <= reach(method) * bound
    return np.flatnonzero(flagged)


@dataclass(frozen=True)
class PrecisionRecord:
    """Which precision scored a run, the bound used and how many examples float32 re-scored."""

    precision: str
    bound: float | None = None  # nats, on a difference of two candidates' ranking values
    observed: float | None = None  # the largest such bf16 -> fp32 change seen
    rescored: int = 0  # examples (calibration queries excluded) scored in float32 too
    fallback: str | None = None

    def to_dict(self) -> dict:
        """As results record it."""
        return {
            "precision": self.precision,
            "precision_bound": self.bound,
            "precision_observed": self.observed,
            "precision_safety": SAFETY if self.precision == "mixed" else None,
            "rescored": self.rescored,
            **({"precision_fallback": self.fallback} if self.fallback else {}),
        }


class Bound:
    """The bound of one edit: SAFETY x the largest error seen, at least FLOOR.

    The error of an example is the largest change, bf16 to fp32, of a difference of two of its
    candidates' ranking values: what decisions (and calibration, which reads only those
    differences) depend on.  It is much smaller than a log-prob's own error, most of which is the
    log-softmax normaliser, shared by every candidate read at the same position.
    """

    def __init__(self) -> None:
        self.observed = 0.0
        self.compared = 0

    @property
    def value(self) -> float:
        """The bound b in nats."""
        return max(FLOOR, SAFETY * self.observed)

    def see(self, low: np.ndarray, exact: np.ndarray) -> None:
        """Record the errors of rows of ranking values (examples x candidates) scored both ways."""
        change = np.asarray(exact, dtype=np.float64) - np.asarray(low, dtype=np.float64)
        if change.size:
            self.observed = max(self.observed, float((change.max(axis=1) - change.min(axis=1)).max()))
        self.compared += len(change)


def _prior_undecided(values: np.ndarray, bound: float, exact: set[int]) -> bool:
    """Whether a re-scored example's batch-calibrated decision still rests on the prior's own error.

    Its scores are float32, but batch calibration's prior averages the label distributions of every
    example, and those not re-scored may each be off by a factor e^{+-b}: log p_y is then off by up
    to log(1 + (e^b - 1) w_y), w_y their share of the mass of label y, and a margin by twice that.
    """
    q = cal.label_distribution(values)
    loose = np.array([i not in exact for i in range(len(values))])
    share = (q[loose].sum(axis=0) / q.sum(axis=0)).max() if loose.any() else 0.0
    reach_prior = 2 * np.log1p(np.expm1(bound) * share)
    fixed = [i for i in sorted(exact) if i < len(values)]
    if not fixed or reach_prior <= 0:
        return False
    return bool((margins(cal.calibrate(values[fixed], cal.prior(values))) <= reach_prior).any())


def ranking(scores: Sequence[Scores], length_normalize: bool) -> np.ndarray:
    """The values candidates are ranked by (summed log-probs, or per token), examples x candidates."""
    return np.array([[lp / n if length_normalize else lp for lp, n in zip(s.logprobs, s.n_tokens, strict=True)] for s in scores])


def resolve(
    low: Sequence[Scores],
    exact: Callable[[list[int]], list[Scores]],
    bound: Bound,
    *,
    examples: int,
    probe_methods: Sequence[str] = (),
    methods: Sequence[str] = (),
    length_normalize: bool = False,
    offset: int = 0,
) -> tuple[list[Scores], PrecisionRecord]:
    """Scores whose every decision is the float32 one: `low` (bf16) with what could differ re-scored by `exact(indices)`.

    `low` holds the `examples` examples' scores, then one per calibration query (`probe_methods`
    names each query's method); the queries are always re-scored.  `offset` rotates which
    examples are sampled, so successive edits measure the difference on different ones.
    """
    scores = list(low)
    done: set[int] = set()

    def rescore(indices: Sequence[int]) -> None:
        todo = sorted(set(indices) - done)
        if not todo:
            return
        found = exact(todo)
        own = [k for k, i in enumerate(todo) if i < examples]  # queries are always float32: their error bounds nothing
        bound.see(ranking([low[todo[k]] for k in own], length_normalize), ranking([found[k] for k in own], length_normalize))
        for i, s in zip(todo, found, strict=True):
            scores[i] = s
        done.update(todo)

    sample = [(offset + k) % examples for k in range(min(SAMPLE, examples))] if examples else []
    rescore(sample + list(range(examples, len(low))))
    while examples:
        values = ranking(scores[:examples], length_normalize)
        probes = {m: ranking([s for s, p in zip(scores[examples:], probe_methods, strict=True) if p == m], length_normalize)
                  for m in set(probe_methods)}  # fmt: skip
        before = len(done)
        rescore([int(i) for i in uncertain(values, bound.value, methods, probes)])
        if len(done) == before and "batch" in methods and _prior_undecided(values, bound.value, done):
            rescore(range(examples))  # only the exact prior decides these: every example in float32
        if len(done) == before:
            break
    record = PrecisionRecord("mixed", round(bound.value, 6), round(bound.observed, 6), len([i for i in done if i < examples]))
    return scores, record


class ExactRows:
    """Float32 re-scores on the layer path: the examples first asked for together are batched and their inputs of
    the start layer computed once, then reused under every later edit (the uncertain examples of one rate are
    mostly those of the next).

    Per call only layers start..L run: for the prefix, then for every group holding a requested example.
    """

    def __init__(
        self, model: nn.Module, requests: Sequence[Request], prefix: Sequence[int], start: int, pad_id: int, batch_size: int = 8
    ) -> None:
        self.requests, self.prefix, self.pad_id, self.batch_size = requests, tuple(prefix), pad_id, batch_size
        self.cache = fw.LayerCache(model, self.prefix, start)
        self.groups: list[tuple[list[int], SuffixPlan, list[fw.CachedBatch]]] = []
        self.group_of: dict[int, int] = {}

    def __call__(self, indices: Sequence[int]) -> list[Scores]:
        """Float32 scores of `requests[i]` for each index, under the model's current weights."""
        new = [i for i in dict.fromkeys(indices) if i not in self.group_of]
        if new:
            plan = plan_suffixes([self.requests[i] for i in new], self.prefix, batch_size=self.batch_size, pad_id=self.pad_id)
            self.groups.append((new, plan, [self.cache.encode(b) for b in plan.batches]))
            self.group_of.update(dict.fromkeys(new, len(self.groups) - 1))
        upper = self.cache.prefix()
        found: dict[int, Scores] = {}
        for group in sorted({self.group_of[i] for i in indices}):
            members, plan, cached = self.groups[group]
            found.update(zip(members, plan.scores([self.cache.score(c, upper) for c in cached]), strict=True))
        return [found[i] for i in indices]
