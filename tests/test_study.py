"""studies/study.py, the powered study's runner: its parts are valid svdicl commands, and the oracle layer is the
argmax of the layer sweep's validation accuracy over rates > 0."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from svdicl.cli import parse_args
from svdicl.store import CellKey, Result, Store

ROOT = Path(__file__).resolve().parents[1]


def load_study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "studies" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module
    spec.loader.exec_module(module)
    return module


def put(store: Store, task: str, edit: str, accuracy: float, *, split: str = "validation", seed: int = 0) -> None:
    store.put(CellKey("fp", task, split, 5, seed, edit), Result(metrics={"accuracy": accuracy}, n=4, samples=None))


def test_every_part_is_a_command_svdicl_accepts(monkeypatch):
    study = load_study()
    monkeypatch.setattr(study, "oracle_layer", lambda out, task, module: 7)
    parts = study.parts()
    assert len({p.name for p in parts}) == len(parts)
    for part in parts:
        args = parse_args(["-q", *part.argv()])  # argparse exits on a misspelt flag or a bad choice
        assert args.output.startswith(str(study.HERE))
        if args.command == "search":
            assert (args.limit_validation, args.limit_test, args.validation_sampling) == (200, 1000, "balanced")
    oracle = next(p for p in parts if p.name == "smollm2-135m/layer-oracle/rte-attn")
    args = parse_args(oracle.argv())
    assert (args.layer, args.seeds, args.tasks, args.modules) == ("7", ["0"], "rte", "attn")


def test_the_oracle_layer_is_the_best_validation_accuracy_over_rates_above_zero(tmp_path):
    study = load_study()
    store = Store(tmp_path)
    put(store, "rte", "none", 0.9)  # the unpruned cell is no layer's
    put(store, "rte", "3:mlp:0.5", 0.6)
    put(store, "rte", "3:mlp:0.9", 0.7)
    put(store, "rte", "5:mlp:0.1", 0.7)  # ties with layer 3: the shallower wins
    put(store, "rte", "8:attn:0.5", 0.95)  # another module
    put(store, "sst2", "9:mlp:0.5", 0.99)  # another task
    put(store, "rte", "9:mlp:0.5", 0.99, split="test")  # another split
    put(store, "rte", "9:mlp:0.5", 0.99, seed=1)  # another seed
    assert study.oracle_layer(tmp_path, "rte", "mlp") == 3
    put(store, "rte", "4:mlp:0.99", 0.71)
    assert study.oracle_layer(tmp_path, "rte", "mlp") == 4
    with pytest.raises(SystemExit, match="no layer sweep of cb mlp"):
        study.oracle_layer(tmp_path, "cb", "mlp")
