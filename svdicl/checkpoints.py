"""Model files into a transformers model and tokenizer: a local folder, a Hub id or a GGUF file.

GGUF weights are dequantised to plain float tensors; with the model cache on, a safetensors copy is
kept (it loads in seconds instead of tens).  A local folder is checked before transformers reads it,
so what would fail with a traceback is one line: a truncated or damaged .gguf or safetensors file, a
folder without weights or tokenizer (an interrupted export), a `model_type` this transformers does not
know.  Offline, a Hub id is looked up in the local Hugging Face cache only.  `placement_options` turns the
device-map flags into accelerate's from_pretrained arguments.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch

from svdicl import hub
from svdicl.aliases import ALIASES
from svdicl.cachedir import cache_entry, remove_entry, sha256_file
from svdicl.errors import SvdiclError, write_error

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies


def placement_options(device_map: str | dict | None, max_memory: str | dict | None, offload_folder: str | Path | None) -> dict:
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


def _check_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise SvdiclError(f"loading a GGUF file needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def load_gguf(path: Path, sha256: str | None, dtype: torch.dtype, cache: Path | None, placement: dict):
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
                remove_entry(copy)
        if not (copy / "config.json").is_file():
            model, tokenizer = _dequantise(path, dtype, placement)
            _write_copy(model, tokenizer, partial, copy)
            return model, tokenizer
    return load_pretrained(str(copy), dtype, False, placement)


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


def load_pretrained(source: str, dtype: torch.dtype, trust_remote_code: bool, placement: dict):
    """A model folder or Hub id through transformers; a local folder checked first, a Hub id offline-aware."""
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
    offline = not looks_local and not hub.reachable()
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
    if (folder / "model.factorized.safetensors").is_file() and (folder / "svdicl_edit.json").is_file():
        raise SvdiclError(f"{folder} is a factorized svdicl export; load it with svdicl.load_model or svdicl.load_pruned")
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
