"""The benchmarks' plain reference loops score what svdicl scores (tiny model; no timing here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from svdicl.prune import pruned
from svdicl.requests import Request
from svdicl.scoring import choose, score_requests

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
REQUESTS = [
    Request((1, 5, 6, 7), (8, 9), ((10,), (11,))),
    Request((1, 5, 6, 7), (9,), ((12,), (13,))),
    Request((1, 5, 6, 7), (8, 3, 9), ((10, 12), (11,))),
]


def flat(scores: list[list[float]]) -> list[float]:
    return [value for row in scores for value in row]


def load(name: str):
    """A benchmark script as a module; its sibling imports (model_flags, measure) resolve as when it runs."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_speed_reference_matches_svdicl_and_restores_the_weights():
    bench = load("sweep_speed")
    model = tiny_model("llama")
    weights = bench.layer_weights(model, 2, "mlp")
    before = {name: w.detach().clone() for name, w in weights.items()}
    _, per_rate = bench.plain_sweep(model, weights, (0.0, 0.5), REQUESTS, bench.exact, seed=0)
    assert all(torch.equal(w, before[name]) for name, w in weights.items())
    for rate, reference in zip((0.0, 0.5), per_rate, strict=True):
        with pruned(model, layers=2, modules="mlp", rate=rate):
            ours = score_requests(model, REQUESTS, batch_size=2)
        for scores, row in zip(ours, reference, strict=True):
            assert list(scores.logprobs) == pytest.approx(row, abs=1e-4)
    assert flat(per_rate[0]) != pytest.approx(flat(per_rate[1]), abs=1e-3)  # the edit moves the answer, so the check can fail
    _, randomized = bench.plain_sweep(model, weights, (0.5,), REQUESTS, bench.randomized, seed=0)
    assert flat(randomized[0]) != pytest.approx(flat(per_rate[1]), abs=1e-6)  # the authors' truncation is not the exact one


def test_throughput_raw_forward_predicts_as_svdicl():
    bench = load("throughput")
    model = tiny_model("llama", seed=1)
    single = REQUESTS[:2] * 3
    expected = [choose(s)[0] for s in score_requests(model, single, batch_size=4)]
    assert len(set(expected)) > 1  # both answers occur, so a wrong label column would show
    assert bench.raw_predictions(model, single, batch_size=4, pad_id=0) == expected
