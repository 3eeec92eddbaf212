"""The core on the real default model: SmolLM2-135M-Instruct from its PyPI package, offline."""

import json

import torch
import transformers as tf

import svdicl
from svdicl.export import save_dense
from svdicl.models import fingerprint


def test_default_model_is_the_real_pretrained_smollm2(real_model):
    config = real_model.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    ids = real_model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = real_model.model(ids).logits[0, -1].argmax().item()
    assert real_model.tokenizer.decode(next_token).strip() == "Paris"  # pretrained, not random weights


def test_prune_last_mlp_then_restore_is_bit_identical(real_model):
    model = real_model.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with svdicl.pruned(model, layers=-1, modules="mlp", rate=0.9) as edit:
        assert [m.kept_rank for m in edit.matrices] == [57, 57, 57]
        assert not torch.equal(model.model.layers[29].mlp.up_proj.weight, before["model.layers.29.mlp.up_proj.weight"])
        assert fingerprint(model) != real_model.fingerprint
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert fingerprint(model) == real_model.fingerprint


def test_dense_export_reloads_with_transformers_and_matches_in_memory_logits(real_model, tmp_path):
    model = real_model.model
    ids = real_model.tokenizer("text: a gorgeous, witty, seductive movie. sentiment:", return_tensors="pt").input_ids
    with svdicl.pruned(model, layers=-1, modules="mlp", rate=0.9) as record, torch.no_grad():
        expected = model(ids).logits
        save_dense(real_model, record, tmp_path / "export")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    with torch.no_grad():
        got = reloaded(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    edit = json.loads((tmp_path / "export" / "svdicl_edit.json").read_text())
    assert edit["source_fingerprint"] == real_model.fingerprint and edit["edit"]["key"] == "-1:mlp:0.9"
