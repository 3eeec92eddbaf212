"""Exact truncated SVD (Eckart–Young): the kept rank for a clipping rate, factors computed once.

A weight W (m x n) has the thin SVD W = U S Vh.  Pruning at clipping rate xi keeps the
k = floor((1 - xi) * min(m, n)) largest singular values (at least one), which is the best
rank-k approximation in Frobenius and spectral norm.  The factors are computed once per
matrix and cached, so every further rate is only a slice of them.  Optionally the factors
are also kept on disk (`use_disk_cache`), so a later process skips the SVD of unedited weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from svdicl.errors import SvdiclError
from svdicl.files import replaced
from svdicl.specs import check_rate

SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def kept_rank(shape: tuple[int, int], rate: float) -> int:
    """k = floor((1 - rate) * min(m, n)), at least 1.

    The rate is read as the decimal it prints as, so 0.9 of 1000 keeps 100 (binary floating
    point would give 99.999... and floor to 99).
    """
    full = min(shape)
    exact = (1 - Fraction(repr(check_rate(rate)))) * full
    return max(1, math.floor(exact))


@dataclass(frozen=True)
class Factors:
    """Thin SVD of one matrix: u (m x r), s (r,), vh (r x n), in the dtype the SVD ran in."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """The (out, in) shape of the factorised matrix."""
        return (self.u.shape[0], self.vh.shape[1])

    def truncate(self, k: int) -> torch.Tensor:
        """W_k = U_k S_k Vh_k, the best rank-k approximation."""
        return (self.u[:, :k] * self.s[:k]) @ self.vh[:k]

    def thin(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with W_k = B @ A, B = U_k S_k (m x k), A = Vh_k (k x n): the factorised form."""
        return self.u[:, :k] * self.s[:k], self.vh[:k]

    def relative_error(self, k: int) -> float:
        """||W - W_k||_F / ||W||_F from the singular values (Eckart–Young)."""
        energy = self.s.double().square()
        total = energy.sum().item()
        return math.sqrt(energy[k:].sum().item() / total) if total > 0 else 0.0

    def norm(self) -> float:
        """||W||_F = sqrt(sum of s²), in float64."""
        return math.sqrt(self.s.double().square().sum().item())

    def residual_norm(self, kept: torch.Tensor | int) -> float:
        """||W - W'||_F when W' keeps the components `kept` (indices, or the first k): sqrt(sum of the dropped s²)."""
        dropped = torch.ones(len(self.s), dtype=torch.bool, device=self.s.device)
        dropped[kept if isinstance(kept, torch.Tensor) else slice(0, kept)] = False
        return math.sqrt(self.s.double()[dropped].square().sum().item())

    def subspace(self, kept: torch.Tensor) -> torch.Tensor:
        """U_I S_I Vh_I for the component indices I: a rank-|I| matrix that need not be the best one."""
        return (self.u[:, kept] * self.s[kept]) @ self.vh[kept]


def random_components(rank: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k of the indices 0..rank-1 drawn uniformly without replacement (sorted), for a random-subspace control."""
    return torch.randperm(rank, generator=generator)[:k].sort().values


def matched_noise(shape: tuple[int, int], norm: float, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A Gaussian matrix scaled to Frobenius norm `norm` exactly (scaled in float64, then cast to `dtype`).

    Drawn on the CPU, so a seed gives the same noise on every device."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    size = torch.linalg.norm(noise).item()
    return (noise * (norm / size) if size > 0 else noise).to(dtype)


def svd_factors(matrix: torch.Tensor, dtype: torch.dtype = torch.float32) -> Factors:
    """Exact thin SVD with torch.linalg.svd, run on the tall orientation (faster for wide matrices)."""
    work = matrix.detach().to(dtype)
    tall = work.shape[0] >= work.shape[1]
    u, s, vh = torch.linalg.svd(work if tall else work.T, full_matrices=False, driver=cuda_driver(work))
    return Factors(u=u, s=s, vh=vh) if tall else Factors(u=vh.T, s=s, vh=u.T)


def cuda_driver(matrix: torch.Tensor) -> str | None:
    """cuSOLVER's QR-based gesvd on a GPU, None (torch's only choice) elsewhere.

    torch's default on CUDA, the iterative gesvdj, stops early: on an H100 (torch 2.11) a 4096 x 4096
    float32 matrix came back with 1e-3 relative reconstruction error and ||U^T U - I|| = 6e-2, where
    gesvd gives 1e-5, float32 rounding as on the CPU.
    """
    return "gesvd" if matrix.is_cuda else None


def _stamp(parameter: torch.Tensor) -> tuple:
    """Storage pointer, autograd version counter and shape: they change on an in-place edit or a swapped tensor."""
    return (parameter.data_ptr(), parameter._version, tuple(parameter.shape))


class FactorStore:
    """Factors of one model's original weights as safetensors files, shared between processes.

    Files live in `<directory>/<fingerprint>/`, one per matrix (and row blocks) and SVD dtype, so
    a model with another fingerprint never finds them.  Only a weight that is still the parameter
    and tensor seen when the store was attached (`originals`: module name -> (weak reference,
    stamp)) is read or written: a weight that `pruned` has swapped, anything has edited in place,
    or a new module has replaced is never looked up under the original model's fingerprint.
    Each file also records a digest of the matrix it factorises and is ignored when that does
    not match (a fingerprint given for other weights).
    """

    FORMAT = "svdicl-factors-1"

    def __init__(self, directory: Path, fingerprint: str, originals: dict[str, tuple[weakref.ref, tuple]]) -> None:
        if not fingerprint or fingerprint.strip(".") == "" or any(c in fingerprint for c in "/\\"):
            raise SvdiclError(f"fingerprint {fingerprint!r} cannot name a cache folder; pass the model's hex fingerprint")
        self.folder = directory / fingerprint
        self.fingerprint = fingerprint
        self.originals = originals

    def is_original(self, module_name: str, parameter: torch.Tensor, stamp: tuple) -> bool:
        """Whether `parameter` is still the tensor whose factors are cached (same object, same stamp)."""
        seen = self.originals.get(module_name)
        return seen is not None and seen[0]() is parameter and seen[1] == stamp and parameter.device.type != "meta"

    def path(self, key: tuple[str, tuple], dtype: torch.dtype) -> Path:
        """The safetensors file of a matrix's factors in the on-disk cache."""
        name, blocks = key
        rows = "-rows" + hashlib.blake2b(repr(blocks).encode(), digest_size=6).hexdigest() if blocks else ""
        return self.folder / f"{name}{rows}.{str(dtype).removeprefix('torch.')}.safetensors"

    def _metadata(self, key: tuple[str, tuple], dtype: torch.dtype, matrix: torch.Tensor) -> dict[str, str]:
        data = matrix.detach().to("cpu").contiguous().reshape(-1)
        digest = hashlib.blake2b(memoryview(data.view(torch.uint8).numpy()), digest_size=16).hexdigest()
        return {
            "format": self.FORMAT,
            "fingerprint": self.fingerprint,
            "matrix": key[0],
            "blocks": json.dumps(key[1]),
            "svd_dtype": str(dtype).removeprefix("torch."),
            "shape": json.dumps(list(matrix.shape)),
            "matrix_dtype": str(matrix.dtype).removeprefix("torch."),
            "matrix_digest": digest,
        }

    def read(self, key: tuple[str, tuple], dtype: torch.dtype, matrix: torch.Tensor) -> Factors | None:
        """The stored factors of `matrix`; None when absent, unreadable, or made from other values."""
        path = self.path(key, dtype)
        if not path.is_file():
            return None
        expected = self._metadata(key, dtype, matrix)
        try:
            with safe_open(path, framework="pt", device=str(matrix.device)) as stored:
                if stored.metadata() != expected or set(stored.keys()) != {"u", "s", "vh"}:
                    return None
                return Factors(u=stored.get_tensor("u"), s=stored.get_tensor("s"), vh=stored.get_tensor("vh"))
        except (OSError, SafetensorError):
            return None

    def write(self, key: tuple[str, tuple], dtype: torch.dtype, matrix: torch.Tensor, factors: Factors) -> None:
        """Write atomically (temporary file, then rename), so a concurrent reader never sees half a file."""
        path = self.path(key, dtype)
        tensors = {name: getattr(factors, name).detach().to("cpu").contiguous() for name in ("u", "s", "vh")}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with replaced(path, unique=True) as partial:
                save_file(tensors, str(partial), metadata=self._metadata(key, dtype, matrix))
        except OSError as exc:
            raise SvdiclError(
                f"cannot write the factor cache file {path} ({exc}); fix the folder's permissions or space"
            ) from None


class FactorCache:
    """One SVD per matrix, reused for every clipping rate.

    An entry is valid only while the matrix it came from is untouched: it remembers the
    storage pointer and autograd version counter of the parameter, so an in-place edit or a
    swapped tensor forces a fresh SVD instead of returning stale factors.  With a `FactorStore`
    attached (`use_disk_cache`), the factors of original weights also go to and come from disk.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[tuple[str, tuple], torch.dtype], tuple[tuple, Factors]] = {}
        self.store: FactorStore | None = None

    def factors(
        self,
        key: tuple[str, tuple],
        parameter: torch.Tensor,
        matrix: torch.Tensor,
        dtype: torch.dtype,
        stamp: tuple | None = None,
    ) -> Factors:
        """Factors of `matrix`, a view of `parameter`; `key` = (module name, row blocks).

        `stamp` identifies values that live outside `parameter` (a disk-offloaded weight is a
        fresh tensor at every read); by default it is taken from `parameter`.
        """
        stamp = stamp or (parameter.data_ptr(), parameter._version, tuple(parameter.shape))
        hit = self._entries.get((key, dtype))
        if hit is not None and hit[0] == stamp:
            return hit[1]
        store = self.store if self.store is not None and self.store.is_original(key[0], parameter, stamp) else None
        found = store.read(key, dtype, matrix) if store is not None else None
        if found is None:
            found = svd_factors(matrix, dtype)
            if store is not None:
                store.write(key, dtype, matrix, found)
        self._entries[(key, dtype)] = (stamp, found)
        return found

    def forget(self, module_name: str) -> None:
        """Drop every entry of a module (a permanent edit replaced its weight); its weight is original no more."""
        for cached in [k for k in self._entries if k[0][0] == module_name]:
            del self._entries[cached]
        if self.store is not None:
            self.store.originals.pop(module_name, None)

    def __len__(self) -> int:
        return len(self._entries)


_CACHES: weakref.WeakKeyDictionary[torch.nn.Module, FactorCache] = weakref.WeakKeyDictionary()


def factor_cache(model: torch.nn.Module) -> FactorCache:
    """The cache attached to `model`; it lives as long as the model does."""
    cache = _CACHES.get(model)
    if cache is None:
        cache = _CACHES[model] = FactorCache()
    return cache


def use_disk_cache(model: torch.nn.Module, directory: str | Path, fingerprint: str) -> FactorCache:
    """Keep `model`'s factors on disk too, in `directory/fingerprint/`, for its weights as they are now.

    `fingerprint` must identify exactly the current weights (`LoadedModel.fingerprint`, taken at
    load, before any permanent `prune`).  Later `pruned`/`prune` calls on this model then read an
    unedited matrix's factors from disk instead of running its SVD, and write the ones they compute.
    """
    originals = {
        name: (weakref.ref(module.weight), _stamp(module.weight))
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor)
    }
    cache = factor_cache(model)
    cache.store = FactorStore(Path(directory).expanduser(), fingerprint, originals)
    return cache


def svd_dtype(name: str | torch.dtype) -> torch.dtype:
    """float32 (default) or float64, by name."""
    if isinstance(name, torch.dtype):
        if name in SVD_DTYPES.values():
            return name
        name = str(name).removeprefix("torch.")
    if name not in SVD_DTYPES:
        raise SvdiclError(f"SVD dtype {name!r} is not supported; use float32 or float64")
    return SVD_DTYPES[name]
