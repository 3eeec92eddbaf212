"""Pruning a model spread by a device map: offloaded weights are read and written where they live.

No GPU here, so the tests offload to disk (accelerate keeps those weights on the meta device and
loads them in a hook) and to an in-memory weights map (what CPU offload behind a GPU uses), and
compare with the same edit on a plainly loaded model.
"""

import json
import os

import pytest
import torch
import transformers as tf
from accelerate.hooks import attach_align_device_hook
from accelerate.utils import OffloadedWeightsLoader
from conftest import tiny_model, tiny_tokenizer

import svdicl
from svdicl import svd
from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.specs import PruneSpec

IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
DISK_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
SPECS = [PruneSpec("1-2", "attn", 0.9), PruneSpec("0-2", "mlp", 0.75)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def pruned_logits(model: torch.nn.Module) -> torch.Tensor:
    with svdicl.pruned(model, specs=SPECS):
        return logits(model)


def test_disk_offloaded_prune_matches_plain_and_restores_exactly(folder, tmp_path):
    plain = svdicl.load_model(str(folder))
    mapped = svdicl.load_model(str(folder), device_map=DISK_MAP, offload_folder=tmp_path)
    assert mapped.model.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    assert mapped.fingerprint == plain.fingerprint  # the fingerprint reads offloaded weights too
    before = logits(mapped.model)
    with svdicl.pruned(mapped.model, specs=SPECS) as record:
        edited = logits(mapped.model)
        written = os.listdir(tmp_path)
    assert torch.equal(edited, pruned_logits(plain.model)) and not torch.allclose(edited, before, atol=1e-3)
    assert len(written) == sum(m.layer in (1, 2) for m in record.matrices)  # one file per disk-offloaded matrix
    assert torch.equal(logits(mapped.model), before) and not os.listdir(tmp_path)
    assert svdicl.models.fingerprint(mapped.model) == plain.fingerprint


def test_disk_offloaded_factors_are_computed_once_per_matrix(folder, tmp_path, monkeypatch):
    mapped = svdicl.load_model(str(folder), device_map=DISK_MAP, offload_folder=tmp_path)
    calls, exact = [], svd.svd_factors
    monkeypatch.setattr(svd, "svd_factors", lambda *args: calls.append(args) or exact(*args))
    for rate in (0.9, 0.5, 0.9):
        with svdicl.pruned(mapped.model, layers=2, modules="mlp", rate=rate):
            pass
    assert len(calls) == 3  # a fresh tensor is read from disk every time, yet the cache still hits


def test_permanent_prune_and_dense_export_of_an_offloaded_model(folder, tmp_path):
    plain = svdicl.load_model(str(folder))
    mapped = svdicl.load_model(str(folder), device_map=DISK_MAP, offload_folder=tmp_path / "offload")
    expected = pruned_logits(plain.model)
    svdicl.save_pruned(mapped, SPECS, tmp_path / "dense")
    svdicl.save_pruned(mapped, SPECS, tmp_path / "factorized", format="factorized")
    assert torch.equal(logits(svdicl.load_pruned(tmp_path / "dense").model), expected)
    assert (logits(svdicl.load_pruned(tmp_path / "factorized").model) - expected).abs().max().item() < 1e-5
    svdicl.prune(mapped.model, specs=SPECS)
    assert torch.equal(logits(mapped.model), expected)


@pytest.mark.parametrize("holder", ["dict", "loader"])
def test_in_memory_offload_map_is_edited_and_restored(holder):
    """CPU offload behind a GPU keeps weights in an in-memory map; here the execution device is the CPU."""
    reference, model = tiny_model("llama"), tiny_model("llama")
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    weights_map = weights if holder == "dict" else OffloadedWeightsLoader(state_dict=weights)
    attach_align_device_hook(model, execution_device="cpu", offload=True, weights_map=weights_map)
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    before = logits(model)
    assert torch.equal(pruned_logits(model), pruned_logits(reference))
    assert torch.equal(logits(model), before)
    assert all(torch.equal(weights[name], tensor) for name, tensor in reference.state_dict().items())


def test_auto_device_map_with_a_memory_cap_offloads_and_prunes(folder, tmp_path):
    plain = svdicl.load_model(str(folder))
    mapped = svdicl.load_model(str(folder), device_map="auto", max_memory="cpu=150KB", offload_folder=tmp_path)
    assert "disk" in mapped.model.hf_device_map.values()
    assert torch.equal(pruned_logits(mapped.model), pruned_logits(plain.model))


def test_device_map_input_errors_are_one_line(folder, tmp_path):
    with pytest.raises(SvdiclError, match="neither auto"):
        svdicl.load_model(str(folder), device_map="everywhere")
    with pytest.raises(SvdiclError, match="only apply with a device map"):
        svdicl.load_model(str(folder), max_memory="cpu=1GiB")
    with pytest.raises(SvdiclError, match="DEVICE=SIZE"):
        svdicl.load_model(str(folder), device_map="auto", max_memory="lots")
    if not torch.cuda.is_available():
        with pytest.raises(SvdiclError, match="does not exist here"):
            svdicl.load_model(str(folder), device_map={"": 0})
    map_file = tmp_path / "map.json"
    map_file.write_text("{not json")
    with pytest.raises(SvdiclError, match="cannot parse device map"):
        svdicl.load_model(str(folder), device_map=str(map_file))


def test_an_offloaded_tied_weight_is_refused(tmp_path):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    tf.AutoModelForCausalLM.from_config(model.config).save_pretrained(tmp_path / "tied")
    tiny_tokenizer().save_pretrained(tmp_path / "tied")
    mapped = svdicl.load_model(str(tmp_path / "tied"), device_map={"": "disk"}, offload_folder=tmp_path / "offload")
    assert mapped.model.lm_head.weight is mapped.model.model.embed_tokens.weight
    with pytest.raises(SvdiclError, match=r"tied to model\.embed_tokens\.weight and offloaded"):
        svdicl.prune(mapped.model, layers="all", modules="re:lm_head", rate=0.5, allow_tied=True)


def test_cli_prunes_with_a_device_map_file(folder, tmp_path, capsys):
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(DISK_MAP))
    argv = ["--quiet", "prune", "--model", str(folder), "--device-map", str(map_file), "--offload-folder", str(tmp_path / "off")]
    assert main([*argv, "--prune", "1-2:attn:0.9", "--prune", "0-2:mlp:0.75", "--output", str(tmp_path / "out")]) == 0
    plain = svdicl.load_model(str(folder))
    assert torch.equal(logits(svdicl.load_pruned(tmp_path / "out").model), pruned_logits(plain.model))
