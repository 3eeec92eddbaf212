"""Every scored result records the machine its timing was measured on: the CPU (model name and the vector
instructions torch uses), torch's threads and the load average, on every execution path."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import edits_at, tiny_loaded, tiny_run

from svdicl import provenance
from svdicl.experiments.edits import evaluate_edits
from svdicl.experiments.run_scoring import evaluate_run


@pytest.fixture
def fake_cpu(tmp_path, monkeypatch):
    """A /proc/cpuinfo naming a CPU, torch reporting AVX512, a load average of 3.25."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Test CPU 9000 @ 3.0GHz\nflags\t\t: fpu\n")
    monkeypatch.setattr(provenance, "CPUINFO", info)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(os, "getloadavg", lambda: (3.25, 1.0, 0.5))
    provenance.cpu.cache_clear()
    yield "Test CPU 9000 @ 3.0GHz (AVX512)"
    provenance.cpu.cache_clear()


def test_cpu_is_the_model_name_and_torchs_vector_instructions(fake_cpu, tmp_path, monkeypatch):
    assert provenance.cpu() == fake_cpu
    monkeypatch.setattr(provenance, "CPUINFO", tmp_path / "missing")  # not Linux: the platform's name
    provenance.cpu.cache_clear()
    assert provenance.cpu().endswith(" (AVX512)") and provenance.cpu() != fake_cpu


@pytest.mark.parametrize("path", ["layer", "prefix", "plain"])
def test_every_path_records_the_machine(fake_cpu, label_tasks, path):
    loaded = tiny_loaded("llama")
    run = tiny_run(loaded, label_tasks, "words")
    results = [r for _, r in evaluate_edits(loaded, run, edits_at(1), path=path)]
    if path != "layer":
        results.append(evaluate_run(loaded, run, path=path))
    expected = {"device": fake_cpu, "threads": torch.get_num_threads(), "load": 3.25}
    for result in results:
        assert result.timing["path"] == path
        assert {key: result.timing[key] for key in expected} == expected
