"""Fixed costs paid once: the model cache is on by default in the user cache (XDG, overridable, off on
request), a file-loaded model's fingerprint is remembered (no pass over the weights on a warm load),
and condition numbers are computed on the tall orientation and reused across output folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer, write_tiny_gguf

import svdicl
from svdicl import cachedir, checkpoints, models
from svdicl.cachedir import cache_dir_from, default_cache_dir
from svdicl.models import fingerprint, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_cache_defaults_to_the_xdg_user_cache_and_is_overridden_or_turned_off(monkeypatch, tmp_path):
    monkeypatch.delenv("SVDICL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "svdicl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "svdicl"
    monkeypatch.setenv("SVDICL_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" == cache_dir_from(None)
    assert cache_dir_from(tmp_path / "given") == tmp_path / "given"  # --cache-dir over the environment
    monkeypatch.setenv("SVDICL_CACHE", "off")
    assert default_cache_dir() is None and cache_dir_from("OFF") is None and cache_dir_from(None) is None


def test_a_gguf_model_is_cached_in_the_user_cache_without_being_asked(monkeypatch, tmp_path):
    monkeypatch.delenv("SVDICL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    first = load_model(str(gguf))
    (copy,) = [p for p in (tmp_path / "xdg" / "svdicl" / "models").glob("*-float32-*") if p.is_dir()]
    assert (copy / "config.json").is_file()
    calls = count(monkeypatch, checkpoints, "_dequantise")
    again = load_model(str(gguf))
    assert calls == [] and again.fingerprint == first.fingerprint == fingerprint(again.model)  # read from the copy


def count(monkeypatch, module, name: str) -> list:
    """Record every call of `module.<name>` (still calling it)."""
    calls, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_a_file_loaded_fingerprint_is_remembered_not_recomputed(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    folder = save(tiny_model("llama", seed=0), tmp_path / "a")
    passes = count(monkeypatch, models, "fingerprint")
    cold = load_model(str(folder), cache_dir=cache)
    assert len(passes) == 1 and cold.fingerprint == fingerprint(cold.model)
    passes.clear()
    reads = count(monkeypatch, cachedir, "sha256_file")
    warm = load_model(str(folder), cache_dir=cache)
    assert passes == [] and reads == []  # no pass over the weights, not even a read of the files
    assert warm.fingerprint == cold.fingerprint == fingerprint(warm.model)  # the same key as before: stores stay valid
    other = load_model(str(save(tiny_model("llama", seed=1), tmp_path / "b")), cache_dir=cache)
    assert other.fingerprint != cold.fingerprint
    save(tiny_model("llama", seed=2), folder)  # the same folder rewritten with other weights
    assert load_model(str(folder), cache_dir=cache).fingerprint == fingerprint(tiny_model("llama", seed=2))
    assert load_model(str(folder), cache_dir="off").fingerprint == fingerprint(tiny_model("llama", seed=2))


def test_a_pruned_model_never_takes_the_unpruned_fingerprint(tmp_path):
    cache = tmp_path / "cache"
    model = tiny_model("llama")
    folder = save(model, tmp_path / "dense")
    unpruned = load_model(str(folder), cache_dir=cache).fingerprint
    with svdicl.pruned(model, layers=-1, modules="mlp", rate=0.5):
        pruned_folder = save(model, tmp_path / "pruned")
        in_memory = svdicl.wrap(model, tiny_tokenizer()).fingerprint
    assert load_model(str(pruned_folder), cache_dir=cache).fingerprint == in_memory != unpruned
    assert load_model(str(folder), cache_dir=cache).fingerprint == unpruned == fingerprint(model)  # restored


def test_a_damaged_remembered_entry_is_recomputed(tmp_path):
    cache = tmp_path / "cache"
    folder = save(tiny_model("llama"), tmp_path / "a")
    expected = load_model(str(folder), cache_dir=cache).fingerprint
    for entry in (cache / "fingerprints").iterdir():
        entry.write_text("not a digest")
    assert load_model(str(folder), cache_dir=cache).fingerprint == expected


def test_the_tall_orientation_gives_the_reference_singular_values():
    import numpy as np

    from svdicl.experiments.condition import extreme_singular_values

    generator = torch.Generator().manual_seed(0)
    for shape in [(24, 64), (64, 24), (40, 40)]:
        matrix = torch.randn(shape, generator=generator)
        reference = np.linalg.svd(matrix.double().numpy(), compute_uv=False)  # the wide matrix itself, numpy
        assert extreme_singular_values(matrix) == pytest.approx((reference[0], reference[-1]), rel=1e-12)


def test_condition_numbers_from_the_cache_equal_a_fresh_computation(monkeypatch, tmp_path):
    from svdicl.experiments import condition
    from svdicl.experiments.condition import condition_numbers

    model, cache = tiny_model("llama"), tmp_path / "cache"
    fp = fingerprint(model)
    fresh = condition_numbers(model, "all", "all")  # no cache
    first = condition_numbers(model, "all", "all", fingerprint=fp, cache=cache)
    assert first == fresh and (cache / "conditions" / f"{fp}.json").is_file()
    assert not list((cache / "conditions").glob("*.partial"))  # written by rename
    calls = []
    monkeypatch.setattr(condition, "extreme_singular_values", lambda m: calls.append(m) or (0.0, 0.0))
    assert condition_numbers(model, "all", "all", fingerprint=fp, cache=cache) == fresh and calls == []  # all read
    assert condition_numbers(model, "all", "all", fingerprint="f" * 32, cache=cache) != fresh  # other weights: computed
    assert len(calls) == len(fresh)


def test_a_second_search_folder_reuses_the_condition_numbers(monkeypatch, tmp_path):
    from svdicl.experiments import condition
    from svdicl.experiments.search import conditions_for

    monkeypatch.setenv("SVDICL_CACHE", str(tmp_path / "cache"))
    loaded = svdicl.wrap(tiny_model("llama"), tiny_tokenizer())
    first = conditions_for(loaded, ["mlp"], tmp_path / "one")
    monkeypatch.setattr(condition, "extreme_singular_values", lambda m: pytest.fail("computed again"))
    assert conditions_for(loaded, ["mlp"], tmp_path / "two") == first
    assert (tmp_path / "two" / "conditions.csv").is_file()
