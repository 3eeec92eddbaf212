"""Condition numbers: against numpy on every family, planted spectra, the near-singular rule, files, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model

from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.experiments.condition import (
    condition_numbers,
    layer_conditions,
    near_singular_tol,
    read_conditions,
    top_layers,
    write_conditions,
)
from svdicl.models import LoadedModel
from svdicl.targets import resolve

EPS32 = float(np.finfo(np.float32).eps)


def plant(weight: torch.nn.Parameter, singular_values: list[float] | np.ndarray, seed: int = 0) -> None:
    """Overwrite a weight with U diag(s) V^T for random orthonormal U, V: a known spectrum."""
    m, n = weight.shape
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    s = torch.zeros(m, n, dtype=torch.float64)
    values = torch.as_tensor(np.asarray(singular_values, dtype=np.float64))
    s[range(len(values)), range(len(values))] = values
    with torch.no_grad():
        weight.copy_((u @ s @ v.T).to(weight.dtype))


def test_matches_numpy_on_every_family(any_tiny):
    found = condition_numbers(any_tiny)
    targets = resolve(any_tiny, "all", "all", allow_tied=True)
    assert [c.module for c in found] == [t.name for t in targets]
    for c, target in zip(found, targets, strict=True):
        weight = any_tiny.get_submodule(target.module_name).weight.detach().double().numpy()
        matrix = weight.T if target.transposed else weight
        if target.blocks:
            matrix = np.concatenate([matrix[a:b] for a, b in target.blocks])
        assert c.shape == matrix.shape
        assert c.condition_number == pytest.approx(np.linalg.cond(matrix), rel=1e-9)
        assert c.sigma_max == pytest.approx(np.linalg.norm(matrix, 2), rel=1e-12)
        assert c.group in ("attn", "mlp") and c.layer == target.layer
        assert c.near_singular == (np.linalg.matrix_rank(matrix, tol=c.tol * c.sigma_max) < min(matrix.shape))


def test_fused_rows_are_read_like_pruning_reads_them():
    model = tiny_model("gpt2")
    found = condition_numbers(model, layers="1", modules="q,k,v")
    weight = model.transformer.h[1].attn.c_attn.weight.detach().double().numpy().T  # Conv1D stores (in, out)
    assert [c.matrix for c in found] == ["q", "k", "v"] and {c.group for c in found} == {"attn"}
    for i, c in enumerate(found):
        assert c.condition_number == pytest.approx(np.linalg.cond(weight[64 * i : 64 * (i + 1)]), rel=1e-9)


def test_regex_matrices_are_named_within_their_layer():
    found = condition_numbers(tiny_model("llama"), modules=r"re:mlp\.down_proj")
    assert [(c.layer, c.matrix, c.group) for c in found] == [(i, "mlp.down_proj", "mlp") for i in range(3)]


def test_near_singular_threshold_is_max_dim_times_float32_eps():
    model = tiny_model("llama")
    down = model.model.layers[1].mlp.down_proj.weight  # 64 x 96
    tol = near_singular_tol((64, 96), torch.float32)
    assert tol == 96 * EPS32
    for factor, flagged in [(0.25, True), (4.0, False)]:
        plant(down, [1.0] * 63 + [factor * tol])
        (c,) = condition_numbers(model, layers="1", modules="down")
        assert c.near_singular is flagged
        assert c.condition_number == pytest.approx(1 / (factor * tol), rel=1e-3)
    plant(down, [1.0] * 63 + [0.0])
    (c,) = condition_numbers(model, layers="1", modules="down")
    assert c.near_singular and (c.condition_number == math.inf or c.condition_number > 1e6)
    others = [c for c in condition_numbers(model) if not (c.layer == 1 and c.matrix == "down")]
    assert not any(c.near_singular for c in others)  # random init is well conditioned


def test_planted_spectrum_puts_its_layer_first():
    model = tiny_model("llama")
    before = condition_numbers(model)
    plant(model.model.layers[1].mlp.up_proj.weight, np.geomspace(1.0, 1e-4, 64))  # condition number 1e4
    found = condition_numbers(model)
    per_layer = layer_conditions(found, "mlp")
    assert per_layer[1] == pytest.approx(1e4, rel=1e-4)
    assert top_layers(found, "mlp", 1) == [1]
    assert top_layers(found, "mlp", 3)[0] == 1 and sorted(top_layers(found, "mlp", 10)) == [0, 1, 2]
    assert top_layers(found, "attn", 3) == top_layers(before, "attn", 3)  # other groups untouched
    assert top_layers(found, "up", 1) == [1]


def test_group_aggregate_is_the_largest_matrix():
    found = condition_numbers(tiny_model("qwen2"))
    for group, names in [("mlp", {"gate", "up", "down"}), ("attn", {"q", "k", "v", "o"}), ("q,k", {"q", "k"})]:
        expected = {layer: max(c.condition_number for c in found if c.layer == layer and c.matrix in names) for layer in range(3)}
        assert layer_conditions(found, group) == expected
    with pytest.raises(SvdiclError, match="no condition numbers for module 'fc_in'"):
        layer_conditions(found, "fc_in")
    with pytest.raises(SvdiclError, match="at least 1"):
        top_layers(found, "mlp", 0)


def test_ties_rank_the_lower_layer_first():
    model = tiny_model("llama")
    for layer in (2, 0):  # the same matrix in both layers: exactly equal condition numbers
        plant(model.model.layers[layer].mlp.down_proj.weight, np.geomspace(1.0, 1e-3, 64))
    found = condition_numbers(model, modules="down")
    assert layer_conditions(found, "mlp")[0] == layer_conditions(found, "mlp")[2]
    assert top_layers(found, "mlp", 2) == [0, 2]


def test_csv_and_json_roundtrip(tmp_path):
    model = tiny_model("llama")
    plant(model.model.layers[2].self_attn.o_proj.weight, [1.0] * 63 + [0.0])
    found = condition_numbers(model)
    csv_path, json_path = write_conditions(found, tmp_path, model_name="tiny", fingerprint="abc", top_k=2)
    assert read_conditions(csv_path) == found
    summary = json.loads(json_path.read_text())
    assert summary["model"] == {"name": "tiny", "fingerprint": "abc"} and summary["aggregate"] == "max"
    assert summary["top_layers"] == {"attn": top_layers(found, "attn", 2), "mlp": top_layers(found, "mlp", 2)}
    assert summary["layers"]["mlp"] == {str(k): v for k, v in layer_conditions(found, "mlp").items()}
    planted = next(m for m in summary["matrices"] if m["layer"] == 2 and m["matrix"] == "o")
    assert planted["near_singular"] is True
    singular = next(c for c in found if c.layer == 2 and c.matrix == "o")
    assert planted["condition_number"] == (None if math.isinf(singular.condition_number) else singular.condition_number)


def test_cli_writes_files_and_prints_top_layers(tmp_path, monkeypatch, capsys):
    model = tiny_model("llama")
    plant(model.model.layers[2].mlp.gate_proj.weight, np.geomspace(1.0, 1e-3, 64))
    loaded = LoadedModel(model=model, tokenizer=None, source="tiny-llama", fingerprint="f" * 32, dtype="float32")
    monkeypatch.setattr("svdicl.cli.condition.load", lambda args: loaded)
    assert main(["-q", "condition", "--model", "tiny", "--modules", "mlp", "--top-k", "2", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "top-2 mlp layers by condition number: 2, " in out
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"fig3-conditions.png", "fig3-conditions.svg"}
    assert {c.matrix for c in read_conditions(tmp_path / "conditions.csv")} == {"gate", "up", "down"}
    assert main(["condition", "--model", "tiny", "--top-k", "0", "--output", str(tmp_path)]) == 2
    assert "--top-k must be at least 1" in capsys.readouterr().err


def test_condition_into_a_folder_of_every_layer_keeps_the_other_rows(tmp_path, monkeypatch, capsys):
    """A search wrote every layer's rows; `condition --layers 0-1 --modules q,k` adds to them, never replaces them."""
    model = tiny_model("llama")
    loaded = LoadedModel(model=model, tokenizer=None, source="tiny-llama", fingerprint="f" * 32, dtype="float32")
    everything = condition_numbers(model, "all", "all")
    write_conditions(everything, tmp_path, fingerprint=loaded.fingerprint)
    monkeypatch.setattr("svdicl.cli.condition.load", lambda args: loaded)
    argv = ["-q", "condition", "--model", "tiny", "--layers", "0-1", "--modules", "q,k", "--output", str(tmp_path)]
    assert main(argv) == 0
    rows = read_conditions(tmp_path / "conditions.csv")
    assert sorted(c.module for c in rows) == sorted(c.module for c in everything) and len(rows) > 4
    assert {c.module: c.condition_number for c in rows} == {c.module: c.condition_number for c in everything}
    other = LoadedModel(model=model, tokenizer=None, source="other", fingerprint="e" * 32, dtype="float32")
    write_conditions(everything[:2], tmp_path, fingerprint=other.fingerprint)  # other weights: their rows alone
    assert len(read_conditions(tmp_path / "conditions.csv")) == 2


@pytest.mark.slow
def test_real_model_against_numpy(real_model):
    found = condition_numbers(real_model.model, layers="29", modules="up,k")
    layers = real_model.model.model.layers
    for c in found:
        module = layers[c.layer].mlp.up_proj if c.matrix == "up" else layers[c.layer].self_attn.k_proj
        assert c.condition_number == pytest.approx(np.linalg.cond(module.weight.detach().double().numpy()), rel=1e-9)
    assert [(c.matrix, c.shape) for c in found] == [("up", (1536, 576)), ("k", (192, 576))]
