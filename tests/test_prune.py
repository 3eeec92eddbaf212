"""The pruning API: edits in place, restores bit-identically, records what changed; the null controls."""

import json

import numpy as np
import pytest
import test_fast_paths as fast
import torch
from conftest import tiny_model

import svdicl
from svdicl import svd
from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.experiments.edits import evaluate_edits
from svdicl.export import save_pruned
from svdicl.models import LoadedModel
from svdicl.prune import control_seed
from svdicl.specs import PruneSpec
from svdicl.store import canonical_edit


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


# Null controls (issue 17, item 2): the same rate, a random subspace or noise of the truncation's size.


def float64_model() -> torch.nn.Module:
    return tiny_model("llama").double()


def reference_svd(matrix: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.linalg.svd(matrix.detach().numpy().astype(np.float64), full_matrices=False)


@pytest.mark.parametrize("rate", [0.5, 0.9])
def test_random_subspace_keeps_k_random_components_and_reports_their_residual(rate):
    model = float64_model()
    weight = model.model.layers[1].mlp.up_proj.weight  # 96 x 64
    original = weight.detach().clone()
    u, s, vh = reference_svd(original)
    k = svd.kept_rank(tuple(original.shape), rate)
    with svdicl.pruned(model, layers=1, modules="up", rate=rate, svd="float64", control="random-subspace", seed=4) as edit:
        written = weight.detach().numpy().copy()
    (matrix,) = edit.matrices
    kept = svd.random_components(64, k, torch.Generator().manual_seed(control_seed(4, matrix.name))).numpy()
    dropped = np.setdiff1d(np.arange(64), kept)
    assert len(set(kept.tolist())) == k and not np.array_equal(kept, np.arange(k))  # not the top k
    assert np.allclose(written, (u[:, kept] * s[kept]) @ vh[kept], rtol=0, atol=1e-12)
    assert np.allclose(np.linalg.svd(written, compute_uv=False)[:k], np.sort(s[kept])[::-1], rtol=1e-10)
    assert np.linalg.matrix_rank(written) == k == matrix.kept_rank
    residual = np.linalg.norm(original.numpy() - written)
    assert matrix.residual_norm == pytest.approx(residual, rel=1e-10)
    assert matrix.residual_norm == pytest.approx(np.sqrt(np.sum(s[dropped] ** 2)), rel=1e-12)
    assert matrix.relative_error == pytest.approx(residual / np.linalg.norm(original.numpy()), rel=1e-10)
    assert matrix.relative_error > np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2))  # Eckart–Young: worse than the truncation
    assert (matrix.control, matrix.seed, matrix.rate) == ("random-subspace", 4, rate)


@pytest.mark.parametrize("rate", [0.5, 0.9])
def test_matched_noise_has_exactly_the_truncation_residual_norm(rate):
    model = float64_model()
    weight = model.model.layers[0].self_attn.q_proj.weight  # 64 x 64
    original = weight.detach().numpy().copy()
    u, s, vh = reference_svd(weight)
    k = svd.kept_rank(original.shape, rate)
    truncation_residual = np.linalg.norm(original - (u[:, :k] * s[:k]) @ vh[:k])
    with svdicl.pruned(model, layers=0, modules="q", rate=rate, svd="float64", control="matched-noise", seed=2) as edit:
        noise = weight.detach().numpy() - original
    (matrix,) = edit.matrices
    assert np.linalg.norm(noise) == pytest.approx(truncation_residual, rel=1e-10)
    assert matrix.residual_norm == pytest.approx(truncation_residual, rel=1e-10)
    assert matrix.relative_error == pytest.approx(truncation_residual / np.linalg.norm(original), rel=1e-10)
    assert matrix.kept_rank == matrix.rank == 64 and np.linalg.matrix_rank(original + noise) == 64
    assert abs(noise.mean()) < 0.2 * noise.std()  # centred Gaussian, not a structured shift
    assert (matrix.control, matrix.seed) == ("matched-noise", 2)


@pytest.mark.parametrize("control", ["random-subspace", "matched-noise"])
def test_controls_are_reproducible_by_seed_and_differ_between_seeds_and_matrices(control):
    model = tiny_model("llama")

    def written(seed: int) -> dict[str, torch.Tensor]:
        with svdicl.pruned(model, layers=1, modules="mlp", rate=0.75, control=control, seed=seed):
            return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("model.layers.1.mlp.")}

    first, again, other = written(0), written(0), written(1)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert all(not torch.equal(first[n], other[n]) for n in first)
    if control == "matched-noise":  # each matrix draws its own noise: gate and up have the same shape
        gate, up = (first[f"model.layers.1.mlp.{m}_proj.weight"] for m in ("gate", "up"))
        before = {n: p for n, p in tiny_model("llama").named_parameters()}
        noise = [gate - before["model.layers.1.mlp.gate_proj.weight"], up - before["model.layers.1.mlp.up_proj.weight"]]
        assert not torch.allclose(noise[0] / noise[0].norm(), noise[1] / noise[1].norm())


@pytest.mark.parametrize("control", ["random-subspace", "matched-noise"])
def test_controls_restore_bit_identically_on_every_family(any_tiny, control):
    before = snapshot(any_tiny)
    with svdicl.pruned(any_tiny, layers="all", modules="all", rate=0.9, control=control, seed=7) as edit:
        changed = [n for n, p in any_tiny.named_parameters() if not torch.equal(p, before[n])]
        assert len(changed) == len({m.name.split("[")[0] for m in edit.matrices})
    assert_identical(any_tiny, before)
    assert all(m.control == control and m.seed == 7 and m.residual_norm > 0 for m in edit.matrices)


def test_control_specs_read_write_and_key_the_edit():
    spec = PruneSpec.parse("-1:mlp:0.9@random-subspace:seed=3")
    assert (spec.layers, spec.modules, spec.rate, spec.control, spec.seed) == ("-1", "mlp", 0.9, "random-subspace", 3)
    assert str(spec) == "-1:mlp:0.9@random-subspace:seed=3"
    assert str(PruneSpec.parse("0-1:re:mlp\\..*:0.5@matched-noise")) == "0-1:re:mlp\\..*:0.5@matched-noise:seed=0"
    assert PruneSpec.parse("26:mlp:0.95") == PruneSpec("26", "mlp", 0.95) and str(PruneSpec("26", "mlp", 0.95)) == "26:mlp:0.95"
    assert canonical_edit("-1:mlp:0.90@matched-noise") == "-1:mlp:0.9@matched-noise:seed=0"
    model = tiny_model("llama")
    with svdicl.pruned(model, specs=[spec]) as edit:
        assert edit.key == "-1:mlp:0.9@random-subspace:seed=3"
        assert edit.to_dict()["matrices"][0]["control"] == "random-subspace"
    with svdicl.pruned(model, layers=-1, modules="mlp", rate=0.9) as edit:  # a truncation records no seed
        assert {(m["control"], m["seed"]) for m in edit.to_dict()["matrices"]} == {("truncate", None)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("26:mlp:0.9@shuffle", "unknown null control"),
        ("26:mlp:0.9@matched-noise:3", "seed=N"),
        ("26:mlp:0.9@matched-noise:seed=-1", "seed=N"),
        ("26:mlp@random-subspace", "LAYERS:MODULES:RATE"),
    ],
)
def test_bad_control_specs(text, message):
    with pytest.raises(SvdiclError, match=message):
        PruneSpec.parse(text)


def test_bad_control_arguments():
    model = tiny_model("llama")
    with pytest.raises(SvdiclError, match="unknown edit"), svdicl.pruned(model, layers=0, modules="q", rate=0.5, control="noise"):
        pass
    with pytest.raises(SvdiclError, match="only to a null control"):
        PruneSpec("0", "q", 0.5, seed=1)
    with pytest.raises(SvdiclError, match="go with layers"), svdicl.pruned(model, control="matched-noise"):
        pass
    loaded = LoadedModel(model=model, tokenizer=None, source="tiny", fingerprint="0", dtype="float32")
    with pytest.raises(SvdiclError, match="not models to export"):
        save_pruned(loaded, [PruneSpec.parse("0:q:0.5@random-subspace")], "unused")


data = fast.data  # the toy task folder of test_fast_paths


@pytest.mark.parametrize("control", ["random-subspace", "matched-noise"])
def test_layer_cache_path_matches_plain_under_controls(data, control):
    """Sweeps score edits on cached inputs of the lowest edited layer: the controls edit in place like a truncation."""
    loaded = fast.tiny_loaded("llama")
    run = fast.tiny_run(loaded, data, "words")
    edits = [(), *[(PruneSpec(str(layer), "mlp", 0.9, control, seed),) for layer in (1, 2) for seed in (0, 1)]]
    layer = list(evaluate_edits(loaded, run, edits, path="layer"))
    assert {r.timing["path"] for _, r in layer} == {"layer"}
    fast.assert_same(layer, list(evaluate_edits(loaded, run, edits, path="plain")))
    assert fast.moved(layer) > 1e-3  # the control changed the answers' log-probs


def test_cli_eval_takes_a_control_suffix_and_records_it(data, tmp_path):
    loaded = fast.tiny_loaded("llama")
    model_dir = tmp_path / "model"
    loaded.model.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    argv = ["-q", "eval", "--model", str(model_dir), "--task", str(data / "words.yaml"), "--data-dir", str(data / "data")]
    assert main([*argv, "--prune=-1:mlp:0.9@matched-noise:seed=2", "--output", str(tmp_path / "out")]) == 0
    edit = json.loads((tmp_path / "out" / "results.json").read_text())["config"]["edit"]
    assert edit["key"] == "-1:mlp:0.9@matched-noise:seed=2"
    with svdicl.pruned(loaded.model, layers=-1, modules="mlp", rate=0.9, control="matched-noise", seed=2) as expected:
        pass
    assert [(m["control"], m["seed"]) for m in edit["matrices"]] == [("matched-noise", 2)] * 3
    assert [m["residual_norm"] for m in edit["matrices"]] == pytest.approx([m.residual_norm for m in expected.matrices])
