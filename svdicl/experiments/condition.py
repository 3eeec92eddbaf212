"""Condition numbers sigma_max / sigma_min of weight matrices, per layer (the paper's fig 3, Algorithm 1 step 1).

Singular values come from torch.linalg.svdvals in float64 on the logical (out, in) matrix
(the same rows of a fused weight that pruning would truncate), taken on its tall orientation:
a matrix and its transpose have the same singular values, and LAPACK is ~3x faster on the
one with fewer columns (a 576 x 1536 float64 matrix, one thread: 0.18 CPU-s wide, 0.06 tall,
benchmarks/threads_under_load.py; issue 18 measured 2.78 s vs 1.02 s on a loaded machine).
Given the model's fingerprint and a cache folder, each matrix's pair (sigma_max, sigma_min) is
kept in `<cache>/conditions/<fingerprint>.json` (keyed by matrix and SVD dtype, written
atomically), so a second output folder, search or `svdicl condition` run on the same weights
reads them instead of computing them again.  A matrix is near-singular
when sigma_min <= tol * sigma_max with tol = max(m, n) * eps(weight dtype) -- numpy's
matrix_rank threshold at the precision the weights are stored in (1.19e-7 for float32):
below it the smallest singular value is rounding noise of the stored weights, so the
condition number says nothing about the layer.  Such matrices are flagged, and their
condition number is still reported (inf when sigma_min is exactly 0).

Algorithm 1 ranks layers by one number per (layer, module group): the largest condition
number among the group's matrices.  The group is pruned as a whole at one rate, and the
paper's criterion is "large condition number"; the maximum keeps the ranking independent of
how many matrices a family puts in a group.  (The authors' notebook computes
np.linalg.cond per matrix and states no aggregate.)
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from svdicl.errors import SvdiclError
from svdicl.files import replaced, write_atomic
from svdicl.prune import logical_matrix
from svdicl.targets import family_of, layer_stack, resolve

AGGREGATE = "max"
TOL_RULE = "sigma_min <= max(m, n) * eps(weight dtype) * sigma_max"
CSV_FILE = "conditions.csv"
JSON_FILE = "conditions.json"
CSV_COLUMNS = (
    "layer",
    "group",
    "matrix",
    "module",
    "shape",
    "sigma_max",
    "sigma_min",
    "condition_number",
    "near_singular",
    "tol",
)


@dataclass(frozen=True)
class MatrixCondition:
    """Extreme singular values of one matrix (logical shape m x n) of one layer."""

    layer: int | None
    group: str | None  # attn / mlp, None for matrices outside the family's groups
    matrix: str  # canonical name (q, k, down, qkv, ...); for regex specs the module path inside the layer
    module: str
    shape: tuple[int, int]
    sigma_max: float
    sigma_min: float
    tol: float  # relative threshold: near-singular when sigma_min <= tol * sigma_max

    @property
    def condition_number(self) -> float:
        """sigma_max / sigma_min (infinite for an exactly singular matrix)."""
        return self.sigma_max / self.sigma_min if self.sigma_min > 0 else math.inf

    @property
    def near_singular(self) -> bool:
        """sigma_min is within `tol` (size x dtype epsilon) of zero relative to sigma_max."""
        return self.sigma_min <= self.tol * self.sigma_max

    def to_row(self) -> dict[str, object]:
        """The conditions.csv row (exact floats as repr text)."""
        return {
            "layer": "" if self.layer is None else self.layer,
            "group": self.group or "",
            "matrix": self.matrix,
            "module": self.module,
            "shape": f"{self.shape[0]}x{self.shape[1]}",
            "sigma_max": repr(self.sigma_max),
            "sigma_min": repr(self.sigma_min),
            "condition_number": repr(self.condition_number),
            "near_singular": str(self.near_singular).lower(),
            "tol": repr(self.tol),
        }

    def to_json(self) -> dict[str, object]:
        """The conditions.json entry."""
        return {
            "layer": self.layer,
            "group": self.group,
            "matrix": self.matrix,
            "module": self.module,
            "shape": list(self.shape),
            "sigma_max": self.sigma_max,
            "sigma_min": self.sigma_min,
            "condition_number": _json_number(self.condition_number),
            "near_singular": self.near_singular,
            "tol": self.tol,
        }

    @classmethod
    def from_row(cls, row: dict[str, str]) -> MatrixCondition:
        """Read back a conditions.csv row written by `to_row`."""
        rows, cols = row["shape"].split("x")
        return cls(
            layer=int(row["layer"]) if row["layer"] != "" else None,
            group=row["group"] or None,
            matrix=row["matrix"],
            module=row["module"],
            shape=(int(rows), int(cols)),
            sigma_max=float(row["sigma_max"]),
            sigma_min=float(row["sigma_min"]),
            tol=float(row["tol"]),
        )


def near_singular_tol(shape: tuple[int, int], dtype: torch.dtype) -> float:
    """max(m, n) * machine epsilon of the weights' dtype."""
    return max(shape) * torch.finfo(dtype).eps


def condition_numbers(
    model: nn.Module,
    layers: str | int | Sequence[int | str] = "all",
    modules: str | Sequence[str] = "all",
    *,
    progress: bool = False,
    fingerprint: str = "",
    cache: Path | None = None,
) -> list[MatrixCondition]:
    """sigma_max, sigma_min (float64) of every chosen matrix, in layer order; with `fingerprint` (of `model`'s
    weights as they are now) and `cache`, pairs computed before for these weights are read, new ones kept."""
    from tqdm.auto import tqdm

    targets = resolve(model, layers, modules, allow_tied=True)
    stack_path, _ = layer_stack(model)
    group_of = {}  # module name -> attn / mlp; a row block of a fused weight takes the group of the whole weight
    if family_of(model) is not None:
        group_of = {t.module_name: g for g in ("attn", "mlp") for t in resolve(model, layers, g, allow_tied=True)}
    hex_digest = bool(fingerprint) and all(c in "0123456789abcdef" for c in fingerprint)  # a name a file can take
    store = _PairCache(cache, fingerprint) if cache is not None and hex_digest else None
    found = []
    with torch.no_grad():
        for target in tqdm(targets, desc="condition numbers", unit="matrix", disable=not progress):
            weight = model.get_submodule(target.module_name).weight
            if weight.device.type == "meta":
                raise SvdiclError(f"{target.module_name} is offloaded (meta tensor); load the model without --device-map")
            matrix = logical_matrix(weight, target)
            shape = (matrix.shape[0], matrix.shape[1])
            key = f"{target.name}|{shape[0]}x{shape[1]}|float64"
            pair = store.get(key) if store is not None else None
            if pair is None:
                pair = extreme_singular_values(matrix)
                if store is not None:
                    store.put(key, pair)
            found.append(
                MatrixCondition(
                    layer=target.layer,
                    group=group_of.get(target.module_name),
                    matrix=target.canonical or target.module_name.removeprefix(f"{stack_path}.{target.layer}."),
                    module=target.name,
                    shape=shape,
                    sigma_max=pair[0],
                    sigma_min=pair[1],
                    tol=near_singular_tol(shape, weight.dtype),
                )
            )
    if store is not None:
        store.save()
    return found


def extreme_singular_values(matrix: torch.Tensor) -> tuple[float, float]:
    """(sigma_max, sigma_min) in float64, from the orientation with fewer columns (the same values, faster)."""
    tall = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T
    sigma = torch.linalg.svdvals(tall.detach().to("cpu", torch.float64))
    return sigma[0].item(), sigma[-1].item()


class _PairCache:
    """The (sigma_max, sigma_min) pairs of one fingerprint's matrices in `<cache>/conditions/<fingerprint>.json`.

    Saving merges with what is on disk now and replaces the file in one rename, so concurrent runs
    lose nothing but, at worst, pairs another run then computes again."""

    def __init__(self, cache: Path, fingerprint: str) -> None:
        self.path = Path(cache) / "conditions" / f"{fingerprint}.json"
        self.pairs, self.new = self._read(), {}

    def _read(self) -> dict[str, tuple[float, float]]:
        try:
            data = json.loads(self.path.read_text())
            return {str(k): (float(v[0]), float(v[1])) for k, v in data.items()}
        except (OSError, ValueError, TypeError, IndexError, AttributeError):
            return {}  # none yet, or damaged: computed again and rewritten

    def get(self, key: str) -> tuple[float, float] | None:
        return self.pairs.get(key)

    def put(self, key: str, pair: tuple[float, float]) -> None:
        self.pairs[key] = self.new[key] = pair

    def save(self) -> None:
        """Write the new pairs (a cache that cannot be written is skipped: the numbers are in the results anyway)."""
        if not self.new:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(), **self.new}
            write_atomic(self.path, json.dumps({k: list(v) for k, v in merged.items()}, sort_keys=True), unique=True)
        except OSError:
            pass


def _select(conditions: Sequence[MatrixCondition], module: str) -> list[MatrixCondition]:
    names = {m.strip() for m in module.split(",") if m.strip()}
    chosen = [c for c in conditions if c.layer is not None and ("all" in names or c.group in names or c.matrix in names)]
    if not chosen:
        have = sorted({c.group for c in conditions if c.group} | {c.matrix for c in conditions})
        raise SvdiclError(f"no condition numbers for module {module!r}; computed: {', '.join(have) or 'none'}")
    return chosen


def layer_conditions(conditions: Sequence[MatrixCondition], module: str) -> dict[int, float]:
    """One number per layer for a module group (mlp, attn, all, or matrices like `q,k`): the largest condition number."""
    per_layer: dict[int, float] = {}
    for c in _select(conditions, module):
        per_layer[c.layer] = max(per_layer.get(c.layer, 0.0), c.condition_number)
    return dict(sorted(per_layer.items()))


def top_layers(conditions: Sequence[MatrixCondition], module: str, k: int) -> list[int]:
    """The k layers with the largest condition number of `module`, largest first (ties: lower layer first)."""
    if k < 1:
        raise SvdiclError(f"top-k must be at least 1, got {k}")
    per_layer = layer_conditions(conditions, module)
    return sorted(per_layer, key=lambda layer: (-per_layer[layer], layer))[:k]


def write_conditions(
    conditions: Sequence[MatrixCondition],
    directory: str | Path,
    *,
    model_name: str = "",
    fingerprint: str = "",
    top_k: int = 3,
) -> list[Path]:
    """conditions.csv (one row per matrix) and conditions.json (rows, per-layer group values, top-k layers).

    Rows already there for the same weights (fingerprint) are kept, those of the matrices given
    replaced: `svdicl condition --layers 0-1` into a search's folder adds to its every-layer rows.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = folder / CSV_FILE, folder / JSON_FILE
    given = {c.module for c in conditions}
    kept = [c for c in stored_conditions(folder, fingerprint) if c.module not in given]
    conditions = sorted([*kept, *conditions], key=lambda c: (c.layer is None, c.layer or 0))  # stable: by layer
    with replaced(csv_path) as partial, open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(c.to_row() for c in conditions)
    groups = sorted({c.group for c in conditions if c.group and c.layer is not None})
    summary = {
        "format": "svdicl.conditions/1",
        "model": {"name": model_name, "fingerprint": fingerprint},
        "svd_dtype": "float64",
        "near_singular_rule": TOL_RULE,
        "aggregate": AGGREGATE,
        "matrices": [c.to_json() for c in conditions],
        "layers": {g: {str(k): _json_number(v) for k, v in layer_conditions(conditions, g).items()} for g in groups},
        "top_layers": {g: top_layers(conditions, g, top_k) for g in groups},
        "top_k": top_k,
    }
    write_atomic(json_path, json.dumps(summary, indent=2) + "\n")
    return [csv_path, json_path]


def stored_conditions(folder: Path, fingerprint: str) -> list[MatrixCondition]:
    """The rows of DIR/conditions.csv when conditions.json says they are of these weights, else none."""
    try:
        same = fingerprint and json.loads((folder / JSON_FILE).read_text())["model"]["fingerprint"] == fingerprint
        return read_conditions(folder / CSV_FILE) if same else []
    except (OSError, ValueError, KeyError, TypeError, SvdiclError):
        return []  # nothing readable of these weights: the new rows stand alone


def _json_number(value: float) -> float | None:
    """JSON has no infinity: an exactly singular matrix's condition number is written as null."""
    return value if math.isfinite(value) else None


def read_conditions(path: str | Path) -> list[MatrixCondition]:
    """Rows of a conditions.csv written by `write_conditions` (or `svdicl condition`)."""
    file = Path(path)
    with open(file, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = set(CSV_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise SvdiclError(f"{file} is not a conditions CSV (no column {sorted(missing)[0]!r}); rerun svdicl condition")
        try:
            return [MatrixCondition.from_row(row) for row in reader]
        except (ValueError, KeyError) as exc:
            raise SvdiclError(f"{file} line {reader.line_num}: cannot read ({exc}); rerun svdicl condition") from None
