"""Dense and factorised exports: reload, logits against the in-memory pruned model, sizes, refusals."""

import json

import pytest
import torch
import transformers as tf
from conftest import tiny_model, tiny_tokenizer
from safetensors.torch import load_file, save_file

import svdicl
from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.export import FACTORIZED_FILE
from svdicl.models import LoadedModel, fingerprint
from svdicl.specs import PruneSpec
from svdicl.svd import kept_rank, svd_factors

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def loaded_tiny(family: str, **config) -> LoadedModel:
    model = tiny_model(family)
    if config:
        model = tf.AutoModelForCausalLM.from_config(type(model.config)(**{**model.config.to_dict(), **config})).eval()
    return LoadedModel(
        model=model, tokenizer=tiny_tokenizer(), source=f"tiny-{family}", fingerprint=fingerprint(model), dtype="float32"
    )


def pruned_logits(model: torch.nn.Module, specs: list[PruneSpec]) -> torch.Tensor:
    with torch.no_grad(), svdicl.pruned(model, specs=specs):
        return model(IDS).logits


def stored_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied parameters once


def test_low_rank_linear_computes_the_dense_product():
    factors = svd_factors(torch.randn(40, 24, generator=torch.Generator().manual_seed(2)))
    bias = torch.randn(40)
    module = svdicl.LowRankLinear.from_factors(*factors.thin(5), bias)
    dense = torch.nn.Linear(24, 40)
    with torch.no_grad():
        dense.weight.copy_(factors.truncate(5))
        dense.bias.copy_(bias)
        x = torch.randn(3, 7, 24)
        assert torch.allclose(module(x), dense(x), atol=1e-5)
    assert (module.rank, sum(p.numel() for p in module.parameters())) == (5, 5 * (40 + 24) + 40)


# llama: GQA, no biases; gpt2: Conv1D (W stored transposed), whole fused c_attn; opt: biases; phi3: whole fused qkv/gate_up.
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "phi3"])
def test_factorized_export_reloads_with_the_in_memory_pruned_logits(family, tmp_path):
    loaded = loaded_tiny(family)
    specs = [PruneSpec("all", "all", 0.75)]
    expected = pruned_logits(loaded.model, specs)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    info = svdicl.save_pruned(loaded, specs, tmp_path, format="factorized")
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in before.items())  # the model is left unpruned
    back = svdicl.load_pruned(tmp_path)
    with torch.no_grad():
        assert (back.model(IDS).logits - expected).abs().max().item() < 1e-5
    assert info["factorized"]["modules"] and not info["factorized"]["dense"]
    for spec in info["factorized"]["modules"]:
        module = back.model.get_submodule(spec["name"])
        assert isinstance(module, svdicl.LowRankLinear) and module.rank == spec["rank"] == kept_rank(tuple(spec["shape"]), 0.75)
        original = before[f"{spec['name']}.weight"]
        reference = svd_factors(original.T if family == "gpt2" else original).truncate(spec["rank"])  # independent SVD
        assert torch.allclose(module.dense(), reference, atol=1e-5)
    first = info["factorized"]["modules"][0]["name"]
    assert isinstance(svdicl.load_model(str(tmp_path)).model.get_submodule(first), svdicl.LowRankLinear)  # load_model delegates


def test_sizes_are_counted_from_the_tensors(tmp_path):
    loaded = loaded_tiny("llama")
    info = svdicl.save_pruned(loaded, [PruneSpec("0-1", "mlp", 0.9), PruneSpec("2", "attn", 0.9)], tmp_path, format="factorized")
    size, modules = info["size"], info["factorized"]["modules"]
    saved = sum(m * n - rank * (m + n) for (m, n), rank in ((s["shape"], s["rank"]) for s in modules))
    assert size["params_dense"] == stored_params(loaded.model)
    assert size["params_factorized"] == stored_params(svdicl.load_pruned(tmp_path).model) == size["params_dense"] - saved
    assert size["params_saved"] == saved > 0
    assert size["bytes_dense"] == 4 * size["params_dense"] and size["bytes_factorized"] == 4 * size["params_factorized"]
    assert size["file_bytes"] == (tmp_path / FACTORIZED_FILE).stat().st_size >= size["bytes_factorized"]
    assert json.loads((tmp_path / "svdicl_edit.json").read_text())["size"] == size


def test_an_export_that_saves_nothing_is_refused_unless_forced(tmp_path):
    loaded = loaded_tiny("llama")
    specs = [PruneSpec("-1", "mlp", 0.1)]  # 96 x 64 at rank 57: factors hold 9,120 > 6,144 parameters
    with pytest.raises(SvdiclError, match=r"saves no parameters.*--force"):
        svdicl.save_pruned(loaded, specs, tmp_path / "refused", format="factorized")
    assert not (tmp_path / "refused").exists()
    info = svdicl.save_pruned(loaded, specs, tmp_path / "forced", format="factorized", force=True)
    assert len(info["factorized"]["modules"]) == 3 and info["size"]["params_saved"] < 0
    with torch.no_grad():
        logits = svdicl.load_pruned(tmp_path / "forced").model(IDS).logits
    assert (logits - pruned_logits(loaded.model, specs)).abs().max().item() < 1e-5


def test_matrices_that_cannot_be_factors_stay_dense_with_a_reason(tmp_path):
    loaded = loaded_tiny("gpt2")
    specs = [PruneSpec("0", "q", 0.9), PruneSpec("1", "o", 0.9)]  # q: rows of the fused c_attn
    info = svdicl.save_pruned(loaded, specs, tmp_path / "mixed", format="factorized")
    assert [m["name"] for m in info["factorized"]["modules"]] == ["transformer.h.1.attn.c_proj"]
    assert "row block" in info["factorized"]["dense"][0]["reason"]
    with torch.no_grad():
        logits = svdicl.load_pruned(tmp_path / "mixed").model(IDS).logits
    assert (logits - pruned_logits(loaded.model, specs)).abs().max().item() < 1e-5
    with pytest.raises(SvdiclError, match="no pruned matrix can be stored factorized"):
        svdicl.save_pruned(loaded, [PruneSpec("0", "q", 0.9)], tmp_path / "none", format="factorized")


def test_tied_embeddings_are_stored_once_and_retied(tmp_path):
    loaded = loaded_tiny("llama", tie_word_embeddings=True)
    specs = [PruneSpec("all", "re:lm_head", 0.9), PruneSpec("all", "mlp", 0.9)]
    expected = _pruned_tied(loaded, specs)
    info = svdicl.save_pruned(loaded, specs, tmp_path, format="factorized", allow_tied=True)
    assert [d["name"] for d in info["factorized"]["dense"]] == ["lm_head"] and "tied" in info["factorized"]["dense"][0]["reason"]
    assert "lm_head.weight" not in load_file(tmp_path / FACTORIZED_FILE)
    back = svdicl.load_pruned(tmp_path).model
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        assert (back(IDS).logits - expected).abs().max().item() < 1e-5


def _pruned_tied(loaded: LoadedModel, specs: list[PruneSpec]) -> torch.Tensor:
    with torch.no_grad(), svdicl.pruned(loaded.model, specs=specs, allow_tied=True):
        return loaded.model(IDS).logits


def test_dense_export_loads_in_plain_transformers_and_factorized_does_not(tmp_path):
    loaded = loaded_tiny("llama")
    specs = [PruneSpec("-1", "mlp", 0.9)]
    expected = pruned_logits(loaded.model, specs)
    svdicl.save_pruned(loaded, specs, tmp_path / "dense")
    svdicl.save_pruned(loaded, specs, tmp_path / "factorized", format="factorized")
    with torch.no_grad():
        assert torch.allclose(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")(IDS).logits, expected, atol=1e-6)
        assert torch.allclose(svdicl.load_pruned(tmp_path / "dense").model(IDS).logits, expected, atol=1e-6)
    with pytest.raises(OSError):  # no model.safetensors: refused, never random weights for the missing matrices
        tf.AutoModelForCausalLM.from_pretrained(tmp_path / "factorized")


def test_a_damaged_factorized_file_is_refused(tmp_path):
    svdicl.save_pruned(loaded_tiny("llama"), [PruneSpec("-1", "mlp", 0.9)], tmp_path, format="factorized")
    tensors = load_file(tmp_path / FACTORIZED_FILE)
    extra = dict(tensors, stray=torch.zeros(1))
    save_file(extra, tmp_path / FACTORIZED_FILE)
    with pytest.raises(SvdiclError, match=r"unexpected tensors \(stray\)"):
        svdicl.load_pruned(tmp_path)
    tensors.pop("model.layers.2.mlp.up_proj.weight_a")
    save_file(tensors, tmp_path / FACTORIZED_FILE)
    with pytest.raises(SvdiclError, match=r"lacks tensors \(model\.layers\.2\.mlp\.up_proj\.weight_a\)"):
        svdicl.load_pruned(tmp_path)
    with pytest.raises(SvdiclError, match=r"no config\.json"):
        svdicl.load_pruned(tmp_path / "missing")


def test_cli_prints_and_records_the_savings(capsys, tmp_path):
    folder = tmp_path / "tiny"
    loaded = loaded_tiny("llama")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    out_dir = tmp_path / "out"
    argv = ["--quiet", "prune", "--model", str(folder), "--layers", "all", "--modules", "mlp", "--output", str(out_dir)]
    assert main([*argv, "--rate", "0.9", "--format", "factorized"]) == 0
    out = capsys.readouterr().out
    size = json.loads((out_dir / "svdicl_edit.json").read_text())["size"]
    assert f"parameters {size['params_dense']:,} -> {size['params_factorized']:,}" in out and out.count("  factors") == 9
    assert main([*argv, "--rate", "0.1", "--format", "factorized", "--overwrite"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--rate", "0.1", "--format", "factorized", "--overwrite", "--force"]) == 0


def test_the_cli_takes_a_factorized_export_as_its_model(toy, tmp_path, capsys):
    """--model of a factorized export scores the rebuilt model (transformers alone cannot load it); on one device only."""
    export = tmp_path / "export"
    svdicl.save_pruned(loaded_tiny("llama"), [PruneSpec("all", "mlp", 0.9)], export, format="factorized")
    data = ["--task", str(toy), "--data-dir", str(toy.parent / "data"), "--limit", "4"]
    argv = ["-q", "eval", "--model", str(export), *data]
    assert main([*argv, "--output", str(tmp_path / "e")]) == 0  # the default path: its memory plan reads factorised sizes
    assert main([*argv, "--path", "plain", "--output", str(tmp_path / "p")]) == 0
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("e", "p")]
    assert results[0]["config"]["model"]["fingerprint"] == svdicl.load_pruned(export).fingerprint
    samples = [[json.loads(line)["prediction"] for line in (tmp_path / d / "samples.jsonl").open()] for d in ("e", "p")]
    assert samples[0] == samples[1] and len(samples[0]) == 4
    assert main([*argv, "--device-map", "auto", "--output", str(tmp_path / "f")]) == 2
    assert "is a factorized export, which loads on one device" in capsys.readouterr().err


@pytest.mark.slow
def test_real_model_factorized_export_matches_in_memory_pruning(real_model, tmp_path):
    specs = [PruneSpec("-1", "mlp", 0.9)]
    ids = real_model.tokenizer(["text: a gorgeous, witty film sentiment:"], return_tensors="pt").input_ids
    with torch.no_grad(), svdicl.pruned(real_model.model, specs=specs):
        expected = real_model.model(ids).logits
    info = svdicl.save_pruned(real_model, specs, tmp_path, format="factorized")
    back = svdicl.load_pruned(tmp_path)
    with torch.no_grad():
        # float32 rounding of x A^T B^T vs x (B A)^T through 30 layers: within 1e-5 of the logits' scale (~30)
        assert (back.model(ids).logits - expected).abs().max().item() < 1e-5 * expected.abs().max().item()
    assert back.model.lm_head.weight is back.model.model.embed_tokens.weight
    assert info["size"]["params_saved"] == sum(m["dense_params"] - m["factorized_params"] for m in info["edit"]["matrices"])


@pytest.mark.parametrize("format", ["dense", "factorized"])
def test_every_export_explains_itself_in_a_model_card_and_config_json(format, tmp_path):
    from huggingface_hub import ModelCard

    loaded = loaded_tiny("llama")
    specs = [PruneSpec("-1", "mlp", 0.9), PruneSpec("0", "attn", 0.75)]
    info = svdicl.save_pruned(loaded, specs, tmp_path, format=format, notes="picked by hand for a test")
    card = ModelCard.load(tmp_path / "README.md")
    assert {"svdicl", "pruned"} <= set(card.data.tags)
    text = card.text
    for m in info["edit"]["matrices"]:  # every matrix with its kept rank and relative error, from the record
        assert f"| `{m['name']}` | {m['shape'][0]} x {m['shape'][1]} | {m['kept_rank']} / {m['rank']} | " in text
        assert f"| {m['relative_error']:.4f} |" in text
    assert loaded.fingerprint in text and f"svdicl {info['versions']['svdicl']}" in text and "picked by hand" in text
    loading = "AutoModelForCausalLM.from_pretrained" if format == "dense" else "HFLM(pretrained=loaded.model"
    assert loading in text and ("factorised" in text) == (format == "factorized")
    entry = tf.AutoConfig.from_pretrained(tmp_path).svdicl  # transformers keeps the unknown key on reload
    assert entry == {
        "format": format,
        "version": info["versions"]["svdicl"],
        "source": "tiny-llama",
        "source_fingerprint": loaded.fingerprint,
        "edit": "-1:mlp:0.9;0:attn:0.75",
        "kept_ranks": {m["name"]: m["kept_rank"] for m in info["edit"]["matrices"]},
        "details": "svdicl_edit.json",
    }
    back = svdicl.load_pruned(tmp_path)
    assert back.model.config.svdicl == entry
    back.model.config.save_pretrained(tmp_path / "resaved")  # and keeps it through another save
    assert tf.AutoConfig.from_pretrained(tmp_path / "resaved").svdicl == entry
    assert not hasattr(loaded.model.config, "svdicl")  # the in-memory model is left as it was
    if format == "dense":  # the entry is provenance, not part of the weights' identity
        with svdicl.pruned(loaded.model, specs=specs):
            assert back.fingerprint == fingerprint(loaded.model)


def test_an_unpruned_export_says_nothing_was_truncated(tmp_path):
    svdicl.save_pruned(loaded_tiny("llama"), [PruneSpec("-1", "mlp", 0.0)], tmp_path)
    assert "No matrix was truncated" in (tmp_path / "README.md").read_text()


def test_lm_eval_scores_a_factorized_export_through_hflm(tmp_path):
    """docs/lm-eval.md: lm-eval's HFLM, handed the model object, gives the pruned model's log-likelihoods."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra svdicl[lm-eval]")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from svdicl.requests import Request
    from svdicl.scoring import score_requests

    loaded = loaded_tiny("llama")
    specs = [PruneSpec("all", "mlp", 0.75)]
    svdicl.save_pruned(loaded, specs, tmp_path, format="factorized")
    back = svdicl.load_pruned(tmp_path)
    lm = HFLM(pretrained=back.model, tokenizer=back.tokenizer, batch_size=2)
    pairs = [("text: a fine film sentiment:", " positive"), ("text: dull sentiment:", " negative"), ("abc", " d e")]
    answers = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    requests = [
        Request((), tuple(lm.tok_encode(context)), (tuple(lm.tok_encode(c, add_special_tokens=False)),)) for context, c in pairs
    ]
    with svdicl.pruned(loaded.model, specs=specs):
        expected = [s.logprobs[0] for s in score_requests(loaded.model, requests)]
    unpruned = [s.logprobs[0] for s in score_requests(loaded.model, requests)]
    assert [lp for lp, _ in answers] == pytest.approx(expected, abs=1e-4)
    assert all(abs(a - u) > 1e-3 for (a, _), u in zip(answers, unpruned, strict=True))
