"""The top-level library API: svdicl.wrap takes a model already in memory, svdicl.evaluate and
svdicl.search run what the CLI runs and return typed results that agree with a reference computed
here (per-example correctness, argmax over validation, condition numbers by torch.linalg.svdvals)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer, write_toy_task

import svdicl
from svdicl.errors import SvdiclError
from svdicl.experiments.run_scoring import evaluate_run
from svdicl.experiments.runs import prepare_run
from svdicl.models import LoadedModel, fingerprint
from svdicl.specs import PruneSpec
from svdicl.tasks import get_task

N_TEST = 60


@pytest.fixture
def task_dir(tmp_path):
    """A toy task: 40 train rows, N_TEST test rows of which 20 are validation."""
    write_toy_task(tmp_path, N_TEST, validation=20)
    return tmp_path


def test_wrap_fingerprints_the_weights_in_memory_and_sets_a_pad_token():
    model, tokenizer = tiny_model("llama").train(), tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = "<s>"
    loaded = svdicl.wrap(model, tokenizer, name="mine")
    assert isinstance(loaded, LoadedModel) and loaded.source == "mine" and loaded.dtype == "float32"
    assert loaded.fingerprint == fingerprint(model) and not model.training and tokenizer.pad_token == "<s>"
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    assert svdicl.wrap(model, tokenizer).fingerprint != loaded.fingerprint  # results are keyed to the weights
    assert svdicl.wrap(loaded, None) is loaded


@pytest.mark.parametrize("bad", [lambda m, t: (torch.nn.Linear(2, 2), t), lambda m, t: (m, None)])
def test_wrap_refuses_what_it_cannot_use_in_one_line(bad):
    model, tokenizer = bad(tiny_model("llama"), tiny_tokenizer())
    with pytest.raises(SvdiclError, match=r"svdicl\.wrap"):
        svdicl.wrap(model, tokenizer)


def test_a_plain_model_passed_where_a_loaded_one_belongs_is_a_one_line_error(task_dir):
    """Before svdicl.wrap, evaluate_run(hf_model, run) failed with an AttributeError deep inside."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    task = get_task(str(task_dir / "toy.yaml"))
    run = prepare_run(svdicl.wrap(model, tokenizer), task, limit=5, data_dir=task_dir / "data")
    with pytest.raises(SvdiclError, match=r"evaluate_run takes svdicl's LoadedModel.*svdicl\.wrap\(model, tokenizer\)"):
        evaluate_run(model, run)
    with pytest.raises(SvdiclError, match="prepare_run takes svdicl's LoadedModel"):
        prepare_run(model, task, limit=5, data_dir=task_dir / "data")


def test_evaluate_a_model_in_memory_matches_its_samples_and_restores_the_weights(task_dir, one_thread):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    before = fingerprint(model)
    out = task_dir / "out"
    result = svdicl.evaluate(
        model, str(task_dir / "toy.yaml"), tokenizer=tokenizer, seeds=[0, 1], prune="-1:mlp:0.9",
        data_dir=task_dir / "data", output=out, batch_size=4,
    )  # fmt: skip
    assert isinstance(result, svdicl.Evaluation) and result.folder == out
    assert result.results == json.loads((out / "results.json").read_text())
    assert (result.task, result.split, result.shots_per_class, result.edit) == ("toy", "test", 2, "-1:mlp:0.9")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for run in result.runs:
        mine = [s for s in samples if s["seed"] == run.seed]
        assert run.n_examples == len(mine) == N_TEST - 20
        assert run.accuracy.value == pytest.approx(sum(s["correct"] for s in mine) / len(mine))
        assert run.accuracy.low <= run.accuracy.value <= run.accuracy.high
    assert result.accuracy == pytest.approx(sum(r.accuracy.value for r in result.runs) / 2)
    assert fingerprint(model) == before  # the edit was undone


def test_evaluate_through_wrap_equals_evaluate_of_the_loaded_model(task_dir, one_thread):
    """The top-level function is the CLI's function: the same numbers for the same weights."""
    from svdicl.experiments.evaluate import evaluate as cli_evaluate

    model, tokenizer = tiny_model("gpt2"), tiny_tokenizer()
    loaded = LoadedModel(model, tokenizer, "tiny", fingerprint(model), "float32")
    task = get_task(str(task_dir / "toy.yaml"))
    reference = cli_evaluate(loaded, task, seeds=(3,), limit=15, specs=[PruneSpec("0", "attn", 0.5)],
                             data_dir=task_dir / "data", quiet=True).to_json()  # fmt: skip
    result = svdicl.evaluate(model, task, tokenizer=tokenizer, name="tiny", seeds=[3], limit=15,
                             prune=[PruneSpec("0", "attn", 0.5)], data_dir=task_dir / "data")  # fmt: skip
    assert result.results["runs"][0]["metrics"] == reference["runs"][0]["metrics"]
    assert result.results["config"] == reference["config"]


def _reference_layer(model: torch.nn.Module) -> int:
    """Algorithm 1 steps 1-2 by hand: per layer, the largest sigma_max/sigma_min among the MLP matrices."""
    values = []
    for layer in model.model.layers:
        mats = [layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight]
        s = [torch.linalg.svdvals(w.detach().double()) for w in mats]
        values.append(max((v[0] / v[-1]).item() for v in s))
    return max(range(len(values)), key=values.__getitem__)


def test_search_picks_the_reference_layer_and_rate_and_agrees_with_evaluate(task_dir, one_thread):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    yaml, data = str(task_dir / "toy.yaml"), task_dir / "data"
    found = svdicl.search(model, yaml, tokenizer=tokenizer, module="mlp", rates="0.5,0.99", top_k=2, data_dir=data,
                          output=task_dir / "out")  # fmt: skip
    assert isinstance(found, svdicl.SearchResult)
    assert found.layer == _reference_layer(model) == found.top_layers[0] and len(found.top_layers) == 2
    assert found.rates == (0.0, 0.5, 0.99)
    best = max(found.validation)
    assert found.rate_star == min(r for r, v in zip(found.rates, found.validation, strict=True) if v == best)
    validation = [
        svdicl.evaluate(model, yaml, tokenizer=tokenizer, split="validation", data_dir=data,
                        prune=[f"{found.layer}:mlp:{rate}"] if rate else ()).accuracy
        for rate in found.rates
    ]  # fmt: skip
    assert list(found.validation) == pytest.approx(validation)
    baseline = svdicl.evaluate(model, yaml, tokenizer=tokenizer, data_dir=data)
    assert found.baseline.value == pytest.approx(baseline.accuracy)
    pruned = svdicl.evaluate(model, yaml, tokenizer=tokenizer, data_dir=data, prune=f"{found.layer}:mlp:{found.rate_star}")
    assert found.pruned.value == pytest.approx(pruned.accuracy)
    assert 0 <= found.p_value <= 1 and found.p_value == found.results["test"]["p_value"]
    assert [a["name"] for a in found.arms][:2] == ["unpruned", "unpruned + contextual"]
    written = json.loads((task_dir / "out" / "search" / "toy-mlp.json").read_text())
    assert svdicl.SearchResult.from_results(written).rate_star == found.rate_star
    again = svdicl.search(model, yaml, tokenizer=tokenizer, rates="0.5,0.99", layer=found.layer, data_dir=data)  # no output
    assert again.folder is None and again.top_layers == () and again.layer == found.layer
    assert (again.validation, again.rate_star, again.baseline, again.pruned) == (
        found.validation, found.rate_star, found.baseline, found.pruned
    )  # fmt: skip


@pytest.mark.slow
def test_real_smollm2_loaded_by_transformers_wraps_to_the_same_weights(real_model, data_dir):
    """SmolLM2 loaded with transformers directly (not svdicl.load_model) is keyed and scored as the svdicl-loaded
    model is (which `real_model` reads back from SVDICL_CACHE when set)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from svdicl.aliases import ALIASES, alias_gguf
    from svdicl.offload import state_tensors

    gguf = alias_gguf(ALIASES["smollm2-135m"], None)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    wrapped = svdicl.wrap(model, tokenizer, name="smollm2-135m")
    assert wrapped.fingerprint == real_model.fingerprint and not model.training  # the same cells in every store
    theirs_weights = dict(state_tensors(real_model.model))
    assert all(torch.equal(tensor, theirs_weights[name]) for name, tensor in state_tensors(model))
    mine = svdicl.evaluate(model, "sst2", tokenizer=tokenizer, limit=24, data_dir=data_dir, prune="-1:mlp:0.9")
    theirs = svdicl.evaluate(real_model, "sst2", limit=24, data_dir=data_dir, prune="-1:mlp:0.9")
    assert mine.runs == theirs.runs  # the same weights score the same, however they were loaded
    assert mine.edit == theirs.edit == "-1:mlp:0.9" and mine.runs[0].n_examples == 24


def _public_definitions():
    """(name, object) of svdicl.__all__ and of every public function, class, method and property its modules define."""
    import importlib
    import inspect
    import pkgutil

    found = [(f"svdicl.{name}", getattr(svdicl, name)) for name in svdicl.__all__ if name != "ALIASES"]
    packages = pkgutil.walk_packages(svdicl.__path__, "svdicl.")
    modules = ["svdicl", *sorted(m.name for m in packages if m.name != "svdicl.__main__")]  # __main__ would run the CLI
    for module_name in modules:
        module = importlib.import_module(module_name)
        found.append((module_name, module))
        for name, obj in vars(module).items():
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)) or obj.__module__ != module_name:
                continue
            found.append((f"{module_name}.{name}", obj))
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    if isinstance(member, property):
                        found.append((f"{module_name}.{name}.{attr}", member))
                    elif inspect.isfunction(member) or isinstance(member, (classmethod, staticmethod)):
                        found.append((f"{module_name}.{name}.{attr}", getattr(obj, attr)))
    return found


def _undocumented(obj) -> bool:
    """No docstring; for a class, none of its own (a dataclass's generated `Name(field, ...)` does not count)."""
    import inspect

    if inspect.isclass(obj):
        doc = vars(obj).get("__doc__")
        return not doc or doc.startswith(obj.__name__ + "(")
    return not inspect.getdoc(obj)


def test_every_public_definition_has_a_docstring():
    definitions = _public_definitions()
    assert len(definitions) > 300 and any(name == "svdicl.wrap" for name, _ in definitions)
    missing = sorted({name for name, obj in definitions if _undocumented(obj)})
    assert not missing, f"{len(missing)} public definitions lack a docstring: {', '.join(missing)}"


def test_the_docstring_check_catches_a_missing_docstring():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Bare:
        x: int

    def bare() -> None:
        pass

    assert _undocumented(Bare) and _undocumented(bare) and not _undocumented(svdicl.Evaluation)


def test_the_fingerprint_does_not_depend_on_whether_the_model_was_saved(tmp_path):
    """save_pretrained fills in config.architectures: SmolLM2 from its GGUF file (or any model built in
    memory and wrapped) once fingerprinted differently from the same weights read back from SVDICL_CACHE."""
    import transformers as tf

    model = tiny_model("llama")
    assert model.config.architectures is None
    before = fingerprint(model)
    model.save_pretrained(tmp_path / "saved")
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert fingerprint(model) == before == fingerprint(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "saved"))
