"""Exact truncation: kept rank, Eckart–Young error, rank of the result, cached factors."""

import math

import pytest
import torch

from svdicl import svd
from svdicl.errors import SvdiclError
from svdicl.svd import FactorCache, kept_rank, svd_factors

RATES = [0, 0.1, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995]


@pytest.mark.parametrize("shape", [(40, 40), (64, 24), (24, 64), (1, 7)])
@pytest.mark.parametrize("rate", RATES)
def test_truncation_error_is_the_dropped_singular_values(shape, rate):
    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=torch.float64)
    k = kept_rank(shape, rate)
    factors = svd_factors(weight, torch.float64)
    approx = factors.truncate(k)
    singular = torch.linalg.svdvals(weight)
    dropped = math.sqrt(singular[k:].square().sum().item())
    assert torch.linalg.norm(weight - approx).item() == pytest.approx(dropped, rel=1e-5, abs=1e-9)
    assert factors.relative_error(k) == pytest.approx(dropped / torch.linalg.norm(weight).item(), rel=1e-5, abs=1e-9)
    assert torch.linalg.matrix_rank(approx).item() == k


def test_float32_truncation_matches_float64_reference():
    torch.manual_seed(1)
    weight = torch.randn(96, 48)
    exact = svd_factors(weight.double(), torch.float64).truncate(10)
    fast = svd_factors(weight).truncate(10)
    assert fast.dtype == torch.float32
    assert torch.allclose(fast.double(), exact, atol=1e-4)


def test_kept_rank_is_floor_of_the_decimal_rate_and_at_least_one():
    assert kept_rank((576, 1536), 0.9) == 57  # floor(57.6)
    assert kept_rank((1000, 1000), 0.9) == 100  # binary floating point alone would give 99
    assert kept_rank((576, 576), 0.995) == 2
    assert kept_rank((100, 3), 0.995) == 1
    assert kept_rank((10, 20), 0) == 10
    for rate in RATES:
        assert kept_rank((1536, 576), rate) == max(1, math.floor(round((1 - rate) * 576, 9)))


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "x"])
def test_rate_outside_unit_interval_is_refused(bad):
    with pytest.raises(SvdiclError, match="clipping rate"):
        kept_rank((4, 4), bad)


def test_factor_cache_computes_once_and_notices_in_place_edits(monkeypatch):
    calls = []
    real = svd.svd_factors
    monkeypatch.setattr(svd, "svd_factors", lambda m, d: calls.append(1) or real(m, d))
    weight = torch.nn.Parameter(torch.randn(12, 8))
    cache = FactorCache()
    first = cache.factors(("w", ()), weight, weight, torch.float32)
    assert cache.factors(("w", ()), weight, weight, torch.float32) is first
    assert len(calls) == 1
    with torch.no_grad():
        weight.mul_(2)
    again = cache.factors(("w", ()), weight, weight, torch.float32)
    assert len(calls) == 2
    assert torch.allclose(again.s, first.s * 2)
    cache.factors(("w", ()), weight, weight, torch.float64)
    assert len(calls) == 3  # another dtype is another entry
    cache.forget("w")
    assert len(cache) == 0
