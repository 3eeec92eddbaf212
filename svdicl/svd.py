"""Exact truncated SVD (Eckart–Young): the kept rank for a clipping rate, factors computed once.

A weight W (m x n) has the thin SVD W = U S Vh.  Pruning at clipping rate xi keeps the
k = floor((1 - xi) * min(m, n)) largest singular values (at least one), which is the best
rank-k approximation in Frobenius and spectral norm.  The factors are computed once per
matrix and cached, so every further rate is only a slice of them.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from fractions import Fraction

import torch

from svdicl.errors import SvdiclError

SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_rate(rate: float) -> float:
    """Return `rate` as a float, or raise if it is not a clipping rate in [0, 1)."""
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise SvdiclError(f"clipping rate {rate!r} is not a number; use a value in [0, 1) such as 0.9") from None
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise SvdiclError(f"clipping rate {value} is outside [0, 1); use e.g. 0.9 to drop 90% of the singular values")
    return value


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


def svd_factors(matrix: torch.Tensor, dtype: torch.dtype = torch.float32) -> Factors:
    """Exact thin SVD with torch.linalg.svd, run on the tall orientation (faster for wide matrices)."""
    work = matrix.detach().to(dtype)
    if work.shape[0] < work.shape[1]:
        u, s, vh = torch.linalg.svd(work.T, full_matrices=False)
        return Factors(u=vh.T, s=s, vh=u.T)
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    return Factors(u=u, s=s, vh=vh)


class FactorCache:
    """One SVD per matrix, reused for every clipping rate.

    An entry is valid only while the matrix it came from is untouched: it remembers the
    storage pointer and autograd version counter of the parameter, so an in-place edit or a
    swapped tensor forces a fresh SVD instead of returning stale factors.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[tuple[str, tuple], torch.dtype], tuple[tuple, Factors]] = {}

    def factors(self, key: tuple[str, tuple], parameter: torch.Tensor, matrix: torch.Tensor, dtype: torch.dtype) -> Factors:
        """Factors of `matrix`, a view of `parameter`; `key` = (module name, row blocks)."""
        stamp = (parameter.data_ptr(), parameter._version, tuple(parameter.shape))
        hit = self._entries.get((key, dtype))
        if hit is not None and hit[0] == stamp:
            return hit[1]
        found = svd_factors(matrix, dtype)
        self._entries[(key, dtype)] = (stamp, found)
        return found

    def forget(self, module_name: str) -> None:
        """Drop every entry of a module (a permanent edit replaced its weight)."""
        for cached in [k for k in self._entries if k[0][0] == module_name]:
            del self._entries[cached]

    def __len__(self) -> int:
        return len(self._entries)


_CACHES: weakref.WeakKeyDictionary[torch.nn.Module, FactorCache] = weakref.WeakKeyDictionary()


def factor_cache(model: torch.nn.Module) -> FactorCache:
    """The cache attached to `model`; it lives as long as the model does."""
    cache = _CACHES.get(model)
    if cache is None:
        cache = _CACHES[model] = FactorCache()
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
