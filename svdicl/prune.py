"""Apply clipping rates to a model: a context manager that restores on exit, and a permanent prune.

The edit swaps each parameter's tensor for a truncated copy and swaps the original back on
exit, so restoring is bit-identical and a sweep never compounds edits.  Rate 0 touches
nothing.  Both entry points return an `EditRecord`: what changed, matrix by matrix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from svdicl.errors import SvdiclError
from svdicl.offload import Slot, slot
from svdicl.svd import check_rate, factor_cache, kept_rank, svd_dtype
from svdicl.targets import Target, check_overlap, resolve


@dataclass(frozen=True)
class PruneSpec:
    """Layers, modules and one clipping rate, as the user wrote them (`26:mlp:0.95`)."""

    layers: str
    modules: str
    rate: float

    @classmethod
    def parse(cls, text: str) -> PruneSpec:
        """Read `LAYERS:MODULES:RATE`, e.g. `last2:attn:0.9` or `0-1:re:mlp\\..*:0.5`."""
        layers, sep, rest = text.partition(":")
        modules, sep2, rate = rest.rpartition(":")
        if not (sep and sep2 and layers and modules and rate):
            raise SvdiclError(f"cannot read prune spec {text!r}; write LAYERS:MODULES:RATE, e.g. 26:mlp:0.95")
        return cls(layers=layers, modules=modules, rate=check_rate(rate))

    def __str__(self) -> str:
        return f"{self.layers}:{self.modules}:{self.rate:g}"


@dataclass(frozen=True)
class MatrixEdit:
    """One truncated matrix: shape is the logical (out, in) shape."""

    name: str
    layer: int | None
    shape: tuple[int, int]
    rate: float
    rank: int
    kept_rank: int
    relative_error: float
    dense_params: int
    factorized_params: int


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


def _specs(layers, modules, rate, specs: Sequence[PruneSpec]) -> tuple[PruneSpec, ...]:
    single = (layers, modules, rate)
    if any(v is not None for v in single):
        if any(v is None for v in single):
            raise SvdiclError("give layers, modules and rate together (or a list of PruneSpec)")
        specs = [PruneSpec(str(layers) if not isinstance(layers, str) else layers, _join(modules), check_rate(rate)), *specs]
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
    resolved: list[tuple[Target, float]] = []
    for spec in specs:
        resolved += [(t, spec.rate) for t in resolve(model, spec.layers, spec.modules, allow_tied=allow_tied)]
    check_overlap([t for t, _ in resolved])
    edits: list[MatrixEdit] = []
    replaced: dict[int, tuple[Slot, torch.Tensor]] = {}  # one entry per parameter, tied or fused
    with torch.no_grad():
        for target, rate in resolved:
            where = slot(model, f"{target.module_name}.weight", writing=True)
            weight = where.read()
            matrix = logical_matrix(weight, target)
            shape = (matrix.shape[0], matrix.shape[1])
            k = kept_rank(shape, rate)
            full = min(shape)
            if rate == 0 or k >= full:
                edits.append(_record(target, shape, rate, full, full, 0.0))
                continue
            factors = cache.factors((target.module_name, target.blocks), weight, matrix, dtype, where.stamp())
            if id(where.parameter) not in replaced:
                replaced[id(where.parameter)] = (where, weight.detach().clone())
            new = replaced[id(where.parameter)][1]
            _write(new.T if target.transposed else new, target, factors.truncate(k).to(new.dtype))
            edits.append(_record(target, shape, rate, full, k, factors.relative_error(k)))
        undos = [where.write(new) for where, new in replaced.values()]
    return EditRecord(specs=specs, matrices=tuple(edits)), undos


def _write(matrix: torch.Tensor, target: Target, values: torch.Tensor) -> None:
    if not target.blocks:
        matrix.copy_(values)
        return
    offset = 0
    for a, b in target.blocks:
        matrix[a:b].copy_(values[offset : offset + b - a])
        offset += b - a


def _record(target: Target, shape: tuple[int, int], rate: float, full: int, k: int, error: float) -> MatrixEdit:
    m, n = shape
    return MatrixEdit(
        name=target.name,
        layer=target.layer,
        shape=shape,
        rate=rate,
        rank=full,
        kept_rank=k,
        relative_error=error,
        dense_params=m * n,
        factorized_params=k * (m + n),
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
) -> Iterator[EditRecord]:
    """Truncate in place for the `with` block, then restore the exact original tensors.

    `with svdicl.pruned(model, layers=26, modules="mlp", rate=0.95) as edit: ...`
    """
    record, undos = _apply(model, _specs(layers, modules, rate, specs), svd_dtype(svd), allow_tied)
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
) -> EditRecord:
    """Truncate in place for good (for export); the factor cache forgets the replaced matrices."""
    record, _ = _apply(model, _specs(layers, modules, rate, specs), svd_dtype(svd), allow_tied)
    cache = factor_cache(model)
    for spec in record.specs:
        for target in resolve(model, spec.layers, spec.modules, allow_tied=True):
            cache.forget(target.module_name)
    return record
