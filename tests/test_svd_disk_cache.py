"""The opt-in disk cache of SVD factors: reused by a later process, never for edited weights or other models."""

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open

import svdicl
from svdicl import svd
from svdicl.errors import SvdiclError

MLP_FILES = [f"model.layers.1.mlp.{name}_proj.float32.safetensors" for name in ("down", "gate", "up")]


@pytest.fixture
def svd_calls(monkeypatch) -> list:
    calls = []
    real = svd.svd_factors
    monkeypatch.setattr(svd, "svd_factors", lambda matrix, dtype: calls.append(tuple(matrix.shape)) or real(matrix, dtype))
    return calls


def pruned_mlp(model, rate: float = 0.5) -> dict[str, torch.Tensor]:
    """Layer 1's MLP weights as `pruned` sets them."""
    with svdicl.pruned(model, layers=1, modules="mlp", rate=rate):
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".1.mlp." in n}


def stored_singular_values(path) -> torch.Tensor:
    with safe_open(path, framework="pt") as stored:
        return stored.get_tensor("s")


def test_a_fresh_process_reads_the_factors_bit_identically(tmp_path, svd_calls):
    first = tiny_model("llama")
    svd.use_disk_cache(first, tmp_path, "fp-a")
    expected = pruned_mlp(first)
    assert len(svd_calls) == 3
    assert sorted(p.name for p in (tmp_path / "fp-a").iterdir()) == MLP_FILES  # written atomically: no temp files left
    with safe_open(tmp_path / "fp-a" / MLP_FILES[0], framework="pt") as stored:
        assert stored.metadata()["fingerprint"] == "fp-a"

    second = tiny_model("llama")  # a new process: same weights, empty in-memory cache
    svd.use_disk_cache(second, tmp_path, "fp-a")
    got = pruned_mlp(second)
    pruned_mlp(second, 0.9)
    assert len(svd_calls) == 3  # no SVD at all
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    key = ("model.layers.1.mlp.up_proj", ())
    a_weight, b_weight = first.model.layers[1].mlp.up_proj.weight, second.model.layers[1].mlp.up_proj.weight
    a = svd.factor_cache(first).factors(key, a_weight, a_weight, torch.float32)
    b = svd.factor_cache(second).factors(key, b_weight, b_weight, torch.float32)
    assert all(torch.equal(getattr(a, part), getattr(b, part)) for part in ("u", "s", "vh"))


def test_another_fingerprint_or_other_weights_never_read_the_files(tmp_path, svd_calls):
    original = tiny_model("llama")
    svd.use_disk_cache(original, tmp_path, "fp-a")
    pruned_mlp(original)
    assert len(svd_calls) == 3

    other = tiny_model("llama", seed=1)
    svd.use_disk_cache(other, tmp_path, "fp-b")
    pruned_mlp(other)
    assert len(svd_calls) == 6
    assert sorted(p.name for p in (tmp_path / "fp-b").iterdir()) == MLP_FILES

    liar = tiny_model("llama", seed=1)  # other weights under the first model's fingerprint
    svd.use_disk_cache(liar, tmp_path, "fp-a")
    got = pruned_mlp(liar)
    assert len(svd_calls) == 9  # the files' matrix digests do not match: recomputed
    reference = pruned_mlp(tiny_model("llama", seed=1))
    assert all(torch.equal(got[name], reference[name]) for name in got)


def test_edited_weights_never_go_to_or_come_from_disk(tmp_path, svd_calls):
    model = tiny_model("llama")
    svd.use_disk_cache(model, tmp_path, "fp-a")
    folder = tmp_path / "fp-a"
    mlp = model.model.layers[1].mlp
    originals = {n: svd.svd_factors(getattr(mlp, n).weight, torch.float32).s for n in ("gate_proj", "up_proj", "down_proj")}
    svd_calls.clear()

    with svdicl.pruned(model, layers=1, modules="mlp", rate=0.5), svdicl.pruned(model, layers=1, modules="mlp", rate=0.9):
        pass  # the inner edit factorises the swapped-in, already truncated weights
    assert len(svd_calls) == 6
    assert sorted(p.name for p in folder.iterdir()) == MLP_FILES
    for name, singular in originals.items():
        assert torch.equal(stored_singular_values(folder / f"model.layers.1.mlp.{name}.float32.safetensors"), singular)

    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight.mul_(2)  # an in-place edit: no longer the fingerprinted weight
    with svdicl.pruned(model, layers=2, modules="up", rate=0.5):
        pass
    assert len(svd_calls) == 7
    assert sorted(p.name for p in folder.iterdir()) == MLP_FILES

    svdicl.prune(model, layers=1, modules="mlp", rate=0.5)  # reads the original's factors, then forgets them
    assert len(svd_calls) == 7
    with svdicl.pruned(model, layers=1, modules="mlp", rate=0.9):
        pass
    assert len(svd_calls) == 10  # the permanently pruned weights are not looked up on disk
    for name, singular in originals.items():
        assert torch.equal(stored_singular_values(folder / f"model.layers.1.mlp.{name}.float32.safetensors"), singular)


def test_an_unreadable_file_is_recomputed_and_replaced(tmp_path, svd_calls):
    model = tiny_model("llama")
    svd.use_disk_cache(model, tmp_path, "fp-a")
    expected = pruned_mlp(model)
    (tmp_path / "fp-a" / MLP_FILES[0]).write_bytes(b"not a safetensors file")
    again = tiny_model("llama")
    svd.use_disk_cache(again, tmp_path, "fp-a")
    got = pruned_mlp(again)
    assert len(svd_calls) == 4
    assert all(torch.equal(got[name], expected[name]) for name in got)
    assert stored_singular_values(tmp_path / "fp-a" / MLP_FILES[0]).shape == (64,)


@pytest.mark.parametrize("bad", ["", "..", "a/b"])
def test_a_fingerprint_that_is_not_a_folder_name_is_refused(tmp_path, bad):
    with pytest.raises(SvdiclError, match="fingerprint"):
        svd.use_disk_cache(tiny_model("llama"), tmp_path, bad)
