"""Apply clipping rates to a model: a context manager that restores on exit, and a permanent prune.

The edit swaps each parameter's tensor for a truncated copy and swaps the original back on
exit, so restoring is bit-identical and a sweep never compounds edits.  Rate 0 touches
nothing.  Both entry points return an `EditRecord`: what changed, matrix by matrix.

Beside the truncation W_k (keep the k largest singular components) two seeded null controls
answer "would any perturbation of this size do the same?" (docs/experiments.md, "Null controls"):
`random-subspace` keeps k components drawn uniformly at random (same rank k), and
`matched-noise` writes W + E, E Gaussian with ||E||_F = ||W - W_k||_F exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from svdicl.errors import SvdiclError
from svdicl.offload import Slot, slot
from svdicl.specs import RANDOM_SUBSPACE, TRUNCATE, PruneSpec, check_rate
from svdicl.svd import Factors, factor_cache, kept_rank, matched_noise, random_components, svd_dtype
from svdicl.targets import Target, check_overlap, resolve


@dataclass(frozen=True)
class MatrixEdit:
    """One edited matrix: shape is the logical (out, in) shape; kept_rank the rank of what was written.

    residual_norm = ||W - W'||_F (from the singular values: exact up to the SVD's precision) and
    relative_error = residual_norm / ||W||_F. For `matched-noise` the written matrix has full rank
    and its residual equals the truncation's at this rate; `seed` is None for a truncation.
    """

    name: str
    layer: int | None
    shape: tuple[int, int]
    rate: float
    rank: int
    kept_rank: int
    relative_error: float
    dense_params: int
    factorized_params: int
    control: str = TRUNCATE
    seed: int | None = None
    residual_norm: float = 0.0


@dataclass(frozen=True)
class EditRecord:
    """What an edit did: the specs as given and every matrix truncated, with ranks and errors."""

    specs: tuple[PruneSpec, ...]
    matrices: tuple[MatrixEdit, ...]

    @property
    def key(self) -> str:
        """Canonical text of the edit, for result keys: `none` for the unedited model."""
        return ";".join(str(s) for s in self.specs if s.rate > 0) or "none"

    def to_dict(self) -> dict:
        """The edit as results files record it: key, specs, matrices and parameter counts."""
        return {
            "key": self.key,
            "specs": [str(s) for s in self.specs],
            "matrices": [asdict(m) for m in self.matrices],
            "dense_params": sum(m.dense_params for m in self.matrices),
            "factorized_params": sum(m.factorized_params for m in self.matrices),
        }


def _specs(layers, modules, rate, specs: Sequence[PruneSpec], control: str = TRUNCATE, seed: int = 0) -> tuple[PruneSpec, ...]:
    single = (layers, modules, rate)
    if any(v is not None for v in single):
        if any(v is None for v in single):
            raise SvdiclError("give layers, modules and rate together (or a list of PruneSpec)")
        layers = str(layers) if not isinstance(layers, str) else layers
        specs = [PruneSpec(layers, _join(modules), check_rate(rate), control, seed), *specs]
    elif (control, seed) != (TRUNCATE, 0):
        raise SvdiclError("control and seed go with layers, modules and rate; in a PruneSpec list give them per spec")
    return tuple(specs)


def _join(modules: str | Sequence[str]) -> str:
    return modules if isinstance(modules, str) else ",".join(modules)


def logical_matrix(weight: torch.Tensor, target: Target) -> torch.Tensor:
    """The (out, in) matrix of a target, a view into `weight` (rows gathered for fused blocks)."""
    matrix = weight.T if target.transposed else weight
    if not target.blocks:
        return matrix
    return torch.cat([matrix[a:b] for a, b in target.blocks])


def _apply(model: nn.Module, specs: tuple[PruneSpec, ...], dtype: torch.dtype, allow_tied: bool):
    """Truncate every target, each on the device its weight lives on; return the record and the undos.

    Weights offloaded by a device map are read from, and written back to, accelerate's offload
    map (see svdicl.offload); every other weight gets its truncated copy as `param.data`.
    """
    cache = factor_cache(model)
    resolved: list[tuple[Target, PruneSpec]] = []
    for spec in specs:
        resolved += [(t, spec) for t in resolve(model, spec.layers, spec.modules, allow_tied=allow_tied)]
    check_overlap([t for t, _ in resolved])
    edits: list[MatrixEdit] = []
    replaced: dict[int, tuple[Slot, torch.Tensor]] = {}  # one entry per parameter, tied or fused
    with torch.no_grad():
        for target, spec in resolved:
            where = slot(model, f"{target.module_name}.weight", writing=True)
            weight = where.read()
            matrix = logical_matrix(weight, target)
            shape = (matrix.shape[0], matrix.shape[1])
            k = kept_rank(shape, spec.rate)
            full = min(shape)
            if spec.rate == 0 or k >= full:
                edits.append(_record(target, shape, spec, full, full))
                continue
            factors = cache.factors((target.module_name, target.blocks), weight, matrix, dtype, where.stamp())
            if id(where.parameter) not in replaced:
                replaced[id(where.parameter)] = (where, weight.detach().clone())
            new = replaced[id(where.parameter)][1]
            values, rank, residual = _edited(matrix, factors, k, spec, target.name)
            _write(new.T if target.transposed else new, target, values.to(new.dtype))
            edits.append(_record(target, shape, spec, full, rank, residual, factors.norm()))
        undos = [where.write(new) for where, new in replaced.values()]
    return EditRecord(specs=specs, matrices=tuple(edits)), undos


def _edited(matrix: torch.Tensor, factors: Factors, k: int, spec: PruneSpec, name: str) -> tuple[torch.Tensor, int, float]:
    """The matrix to write, its rank and ||W - W'||_F, for the spec's edit at rank k."""
    if spec.control == TRUNCATE:
        return factors.truncate(k), k, factors.residual_norm(k)
    generator = torch.Generator().manual_seed(control_seed(spec.seed, name))
    if spec.control == RANDOM_SUBSPACE:
        kept = random_components(len(factors.s), k, generator).to(factors.s.device)
        return factors.subspace(kept), k, factors.residual_norm(kept)
    residual = factors.residual_norm(k)
    noise = matched_noise(factors.shape, residual, generator, factors.s.dtype).to(matrix.device)
    return matrix.to(factors.s.dtype) + noise, min(factors.shape), residual


def control_seed(seed: int, name: str) -> int:
    """The generator seed of one matrix: the user's seed mixed with the matrix name, so every matrix
    of an edit draws its own components or noise, and the same (seed, matrix) always draws the same."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are below 2**63


def _write(matrix: torch.Tensor, target: Target, values: torch.Tensor) -> None:
    if not target.blocks:
        matrix.copy_(values)
        return
    offset = 0
    for a, b in target.blocks:
        matrix[a:b].copy_(values[offset : offset + b - a])
        offset += b - a


def _record(
    target: Target, shape: tuple[int, int], spec: PruneSpec, full: int, k: int, residual: float = 0.0, norm: float = 0.0
) -> MatrixEdit:
    """What was written to one matrix; residual = ||W - W'||_F, norm = ||W||_F."""
    m, n = shape
    return MatrixEdit(
        name=target.name,
        layer=target.layer,
        shape=shape,
        rate=spec.rate,
        rank=full,
        kept_rank=k,
        relative_error=residual / norm if norm > 0 else 0.0,
        dense_params=m * n,
        factorized_params=k * (m + n),
        control=spec.control,
        seed=None if spec.control == TRUNCATE else spec.seed,
        residual_norm=residual,
    )


@contextlib.contextmanager
def pruned(
    model: nn.Module,
    layers: str | int | Sequence[int | str] | None = None,
    modules: str | Sequence[str] | None = None,
    rate: float | None = None,
    *,
    specs: Sequence[PruneSpec] = (),
    svd: str | torch.dtype = "float32",
    allow_tied: bool = False,
    control: str = TRUNCATE,
    seed: int = 0,
) -> Iterator[EditRecord]:
    """Truncate (or apply a null `control`) in place for the `with` block, then restore the exact original tensors.

    `with svdicl.pruned(model, layers=26, modules="mlp", rate=0.95) as edit: ...`
    `with svdicl.pruned(model, layers=26, modules="mlp", rate=0.95, control="random-subspace", seed=1): ...`
    """
    record, undos = _apply(model, _specs(layers, modules, rate, specs, control, seed), svd_dtype(svd), allow_tied)
    try:
        yield record
    finally:
        for undo in reversed(undos):
            undo()


def prune(
    model: nn.Module,
    layers: str | int | Sequence[int | str] | None = None,
    modules: str | Sequence[str] | None = None,
    rate: float | None = None,
    *,
    specs: Sequence[PruneSpec] = (),
    svd: str | torch.dtype = "float32",
    allow_tied: bool = False,
    control: str = TRUNCATE,
    seed: int = 0,
) -> EditRecord:
    """Truncate (or apply a null `control`) in place for good; the factor cache forgets the replaced matrices."""
    record, _ = _apply(model, _specs(layers, modules, rate, specs, control, seed), svd_dtype(svd), allow_tied)
    cache = factor_cache(model)
    for spec in record.specs:
        for target in resolve(model, spec.layers, spec.modules, allow_tied=True):
            cache.forget(target.module_name)
    return record
