"""The pruning API: edits in place, restores bit-identically, records what changed."""

import pytest
import torch
from conftest import tiny_model

import svdicl
from svdicl import svd
from svdicl.errors import SvdiclError
from svdicl.prune import PruneSpec


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_identical(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_restore_on_exit_is_bit_identical_on_every_parameter(any_tiny):
    before = snapshot(any_tiny)
    with svdicl.pruned(any_tiny, layers="all", modules="all", rate=0.9) as edit:
        changed = [n for n, p in any_tiny.named_parameters() if not torch.equal(p, before[n])]
        assert len(changed) == len({m.name.split("[")[0] for m in edit.matrices})
    assert_identical(any_tiny, before)


def test_rate_zero_leaves_every_parameter_bit_identical(any_tiny):
    before = snapshot(any_tiny)
    storage = {n: p.data_ptr() for n, p in any_tiny.named_parameters()}
    with svdicl.pruned(any_tiny, layers="all", modules="all", rate=0) as edit:
        assert_identical(any_tiny, before)
        assert {n: p.data_ptr() for n, p in any_tiny.named_parameters()} == storage  # nothing was even copied
        assert edit.key == "none"
        assert all(m.kept_rank == m.rank and m.relative_error == 0 for m in edit.matrices)


def test_restore_happens_even_when_the_block_raises():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(RuntimeError), svdicl.pruned(model, layers=0, modules="attn", rate=0.5):
        raise RuntimeError("boom")
    assert_identical(model, before)


def test_a_sweep_never_compounds_edits():
    model = tiny_model("llama")
    ids = torch.arange(10).unsqueeze(0)
    with svdicl.pruned(model, layers=1, modules="mlp", rate=0.9):
        first = model(ids).logits
    for rate in (0.1, 0.5, 0.75):
        with svdicl.pruned(model, layers=1, modules="mlp", rate=rate):
            pass
    with svdicl.pruned(model, layers=1, modules="mlp", rate=0.9):
        assert torch.equal(model(ids).logits, first)


def test_record_matches_the_weights_actually_written():
    model = tiny_model("gptj")
    before = snapshot(model)
    with svdicl.pruned(model, layers=-1, modules="mlp", rate=0.75) as edit:
        for matrix in edit.matrices:
            weight = dict(model.named_parameters())[matrix.name + ".weight"]
            original = before[matrix.name + ".weight"]
            assert matrix.shape == tuple(weight.shape)
            assert torch.linalg.matrix_rank(weight).item() == matrix.kept_rank
            actual = (torch.linalg.norm(original - weight) / torch.linalg.norm(original)).item()
            assert matrix.relative_error == pytest.approx(actual, rel=1e-4)
            assert matrix.factorized_params == matrix.kept_rank * sum(matrix.shape)
            assert matrix.dense_params == matrix.shape[0] * matrix.shape[1]
    record = edit.to_dict()
    assert record["key"] == "-1:mlp:0.75"
    assert record["dense_params"] == sum(m.dense_params for m in edit.matrices)


def test_one_svd_per_matrix_across_rates(monkeypatch):
    calls = []
    real = svd.svd_factors
    monkeypatch.setattr(svd, "svd_factors", lambda m, d: calls.append(1) or real(m, d))
    model = tiny_model("qwen2")
    for rate in (0.1, 0.5, 0.9, 0.99):
        with svdicl.pruned(model, layers=2, modules="mlp", rate=rate):
            pass
    assert len(calls) == 3


def test_permanent_prune_changes_weights_and_forgets_cached_factors():
    model = tiny_model("llama")
    with svdicl.pruned(model, layers=0, modules="down", rate=0.5):
        inside = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    record = svdicl.prune(model, layers=0, modules="down", rate=0.5)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, inside)
    assert record.matrices[0].kept_rank == 32
    with svdicl.pruned(model, layers=0, modules="down", rate=0.9) as edit:  # a fresh SVD of the pruned weight
        assert edit.matrices[0].kept_rank == 6
        assert torch.linalg.matrix_rank(model.model.layers[0].mlp.down_proj.weight).item() == 6


def test_several_specs_at_once():
    model = tiny_model("llama")
    specs = [PruneSpec.parse("0:attn:0.5"), PruneSpec.parse("last1:re:mlp\\.up_proj:0.9")]
    with svdicl.pruned(model, specs=specs) as edit:
        assert [m.name for m in edit.matrices][-1] == "model.layers.2.mlp.up_proj"
        assert [m.rate for m in edit.matrices] == [0.5] * 4 + [0.9]
    assert edit.key == "0:attn:0.5;last1:re:mlp\\.up_proj:0.9"


def test_float64_svd_on_request():
    model = tiny_model("llama")
    with svdicl.pruned(model, layers=0, modules="q", rate=0.5, svd="float64") as edit:
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
        assert edit.matrices[0].kept_rank == 32
    with pytest.raises(SvdiclError, match="SVD dtype"):
        svdicl.prune(model, layers=0, modules="q", rate=0.5, svd="float16")


@pytest.mark.parametrize(
    ("text", "message"),
    [("26:mlp", "LAYERS:MODULES:RATE"), ("26:mlp:x", "not a number"), ("26:mlp:1", "outside"), (":mlp:0.5", "LAYERS")],
)
def test_bad_prune_specs(text, message):
    with pytest.raises(SvdiclError, match=message):
        PruneSpec.parse(text)


def test_incomplete_arguments_are_refused():
    with pytest.raises(SvdiclError, match="together"), svdicl.pruned(tiny_model("llama"), layers=0, modules="mlp"):
        pass
