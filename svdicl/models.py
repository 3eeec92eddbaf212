"""Load a causal LM and its tokenizer (a built-in alias, a GGUF file, a local folder or a Hub id) and fingerprint it.

`load_model` resolves the source (aliases.py, checkpoints.py), puts the model on its device in eval
mode and keys it by `fingerprint`, a digest of every weight; for a model loaded from files that
digest is remembered in the model cache (cachedir.py), so a warm load makes no pass over the
weights.  `wrap` does the same for a model already in memory.  Bad input fails in one line: a
dtype or device this machine lacks, or whatever checkpoints.py refuses.  A factorized svdicl
export is rebuilt by export.load_any, which is `svdicl.load_model`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from svdicl.aliases import ALIASES, alias_gguf
from svdicl.cachedir import cache_dir_from, file_digest, remembered
from svdicl.checkpoints import load_gguf, load_pretrained, placement_options
from svdicl.errors import SvdiclError
from svdicl.offload import state_tensors

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_MODEL = "smollm2-135m"


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
    """Load `source` (alias, .gguf file, local folder or Hub id) in eval mode on `device`.

    For a model bigger than one device, `device_map` (auto, balanced, sequential, a JSON file or
    a {module: device} dict whose devices may include "cpu" and "disk") spreads it with accelerate
    instead, and `device` is ignored; `max_memory` caps devices (`0=20GiB,cpu=60GiB` or a dict)
    and `offload_folder` holds weights that must be re-saved for disk offload.  `cache_dir` is the
    model cache (default: SVDICL_CACHE, else $XDG_CACHE_HOME/svdicl or ~/.cache/svdicl; "off": none).
    """
    torch_dtype = _dtype(dtype)
    cache = cache_dir_from(cache_dir)
    placement = placement_options(device_map, max_memory, offload_folder)
    if not placement:
        check_device(device)
    if source in ALIASES:
        gguf = alias_gguf(ALIASES[source], cache)
        files = {"gguf": ALIASES[source].sha256}
        model, tokenizer = load_gguf(gguf, ALIASES[source].sha256, torch_dtype, cache, placement)
    elif source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise SvdiclError(f"GGUF file {source} does not exist; check the path")
        files = {"gguf": file_digest(path, cache)} if cache is not None else None  # without a cache nothing reuses it
        model, tokenizer = load_gguf(path, files and files["gguf"], torch_dtype, cache, placement)
    else:
        model, tokenizer = load_pretrained(source, torch_dtype, trust_remote_code, placement)
        files = _folder_files(Path(source).expanduser(), cache) if not trust_remote_code else None
    if not placement:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, source, _remembered_fingerprint(model, files, dtype, cache), dtype)


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
    return remembered(cache / "fingerprints", key, lambda: fingerprint(model))


_FINGERPRINT_VERSION = 1  # bump when `fingerprint` changes what it digests


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
