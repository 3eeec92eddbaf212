"""Save a pruned model and load it back: dense (any tool loads it) or factorised (smaller).

Dense, the default, is a plain Hugging Face folder (save_pretrained's safetensors, tokenizer,
svdicl_edit.json) that transformers, lm-evaluation-harness or vLLM load unchanged.

Factorised stores each pruned matrix W_k (m x n, rank k) as its two thin SVD factors
B = U_k S_k (m x k) and A = Vh_k (k x n), taken from the same cached SVD the in-memory
pruning used, whenever that saves parameters (k < m n / (m + n)).  The folder holds the
unchanged config.json (transformers builds the skeleton from it), the tokenizer,
model.factorized.safetensors (every other tensor dense, plus `<module>.weight_a` = A and
`<module>.weight_b` = B) and svdicl_edit.json naming the low-rank modules and their ranks.
The weights file has its own name on purpose: a tool that knows nothing of svdicl finds no
model.safetensors and stops, instead of silently loading random weights for the missing ones.

These pruned matrices stay dense in a factorised export, each recorded with its reason:
a row block of a fused weight (only `q` of GPT-2's c_attn: the fused matrix is not low rank),
a weight tied to another (the embedding needs the full matrix anyway), a module that is not a
plain Linear or Conv1D, and a matrix whose factors would not be smaller (unless forced).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from svdicl.card import CARD_FILE, CONFIG_KEY, config_entry, model_card
from svdicl.checkpoints import check_safetensors
from svdicl.errors import SvdiclError, write_error
from svdicl.lowrank import LowRankLinear, replace_module, saves_parameters
from svdicl.models import DEFAULT_MODEL, DTYPES, LoadedModel, check_device, fingerprint, load_model
from svdicl.offload import slot, state_tensors
from svdicl.outputs import finish_output, prepare_output
from svdicl.provenance import versions
from svdicl.prune import EditRecord, MatrixEdit, logical_matrix, pruned
from svdicl.specs import TRUNCATE, PruneSpec
from svdicl.svd import factor_cache, svd_dtype
from svdicl.targets import Target, resolve

EDIT_FILE = "svdicl_edit.json"
FACTORIZED_FILE = "model.factorized.safetensors"
FORMATS = ("dense", "factorized")


def save_dense(loaded: LoadedModel, record: EditRecord, path: str | Path, overwrite: bool = False, notes: str = "") -> Path:
    """save_pretrained (safetensors) + tokenizer + svdicl_edit.json + model card; plain transformers reloads it."""
    folder = prepare_output(path, overwrite)
    info = _edit_info(loaded, record, "dense")
    with _written(folder):
        with _config_entry(loaded.model, config_entry(info, EDIT_FILE)):
            loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
        _write_edit(folder, info)
        model_card(info, path, notes).save(folder / CARD_FILE)
    finish_output(folder)
    return folder


@contextlib.contextmanager
def _config_entry(model: nn.Module, entry: dict) -> Iterator[None]:
    """`model.config.svdicl = entry` while the config is saved; the model's own config is left as it was."""
    config = model.config
    previous = config.to_dict().get(CONFIG_KEY)
    setattr(config, CONFIG_KEY, entry)
    try:
        yield
    finally:
        if previous is None:
            delattr(config, CONFIG_KEY)
        else:
            setattr(config, CONFIG_KEY, previous)


@contextlib.contextmanager
def _written(folder: Path) -> Iterator[None]:
    """Remove what an export wrote into `folder` if it fails, so no half-written model is left to load by
    mistake; a full disk or a read-only folder becomes one line."""
    before = set(folder.iterdir())
    try:
        yield
    except BaseException as exc:
        for entry in set(folder.iterdir()) - before:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        problem = write_error(exc, folder) if isinstance(exc, Exception) else None
        if problem is not None:
            raise problem from None
        raise


def save_pruned(
    loaded: LoadedModel,
    specs: Sequence[PruneSpec],
    path: str | Path,
    *,
    format: str = "dense",
    svd: str | torch.dtype = "float32",
    allow_tied: bool = False,
    force: bool = False,
    overwrite: bool = False,
    notes: str = "",
) -> dict:
    """Prune `loaded` by `specs`, write it to `path` as `format`, and restore the model.

    Returns what svdicl_edit.json records.  Every export also gets a model card (README.md, with
    `notes` as its section on how the edit was chosen) and the edit in short in config.json.
    `force` (factorized only) stores every pruned whole Linear as factors even where they hold
    more parameters than the dense matrix; without it such matrices stay dense, and an export
    in which no matrix would shrink is refused.
    """
    if format not in FORMATS:
        raise SvdiclError(f"export format {format!r} is not known; use {' or '.join(FORMATS)}")
    if force and format == "dense":
        raise SvdiclError("--force only applies to --format factorized (a dense export stores every matrix whole); drop it")
    if any(spec.control != TRUNCATE for spec in specs):
        raise SvdiclError("null controls (@random-subspace, @matched-noise) are baselines to evaluate, not models to export")
    model = loaded.model
    if format == "dense":
        with pruned(model, specs=specs, svd=svd, allow_tied=allow_tied) as record:
            folder = save_dense(loaded, record, path, overwrite, notes)
        return json.loads((folder / EDIT_FILE).read_text())
    with pruned(model, specs=specs, svd=svd, allow_tied=allow_tied) as record:
        plan = _plan(model, record, allow_tied, force)
        state = _stored_state(model)  # pruned matrices as their truncated dense tensors, for now
    chosen = [(target, edit) for target, edit, reason in plan if reason is None]
    dense_params, dense_bytes = _size(state)
    cache = factor_cache(model)  # the factors `pruned` just used: same SVD, same stamp after the restore
    dtype = svd_dtype(svd)
    for target, edit in chosen:
        where = slot(model, f"{target.module_name}.weight")
        weight = where.read()
        factors = cache.factors((target.module_name, ()), weight, logical_matrix(weight, target), dtype, where.stamp())
        b, a = factors.thin(edit.kept_rank)
        del state[f"{target.module_name}.weight"]
        state[f"{target.module_name}.weight_a"] = a.to(weight.dtype)
        state[f"{target.module_name}.weight_b"] = b.to(weight.dtype)
    from safetensors.torch import save_file

    folder = prepare_output(path, overwrite)
    info = _edit_info(loaded, record, "factorized")
    with _written(folder):
        with _config_entry(model, config_entry(info, EDIT_FILE)):
            model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}
        save_file(tensors, folder / FACTORIZED_FILE, metadata={"format": "pt"})
        params, size = _size(state)
        info["factorized"] = {
            "file": FACTORIZED_FILE,
            "modules": [
                {
                    "name": target.module_name,
                    "shape": list(edit.shape),
                    "rank": edit.kept_rank,
                    "bias": getattr(model.get_submodule(target.module_name), "bias", None) is not None,
                }
                for target, edit in chosen
            ],
            "dense": [{"name": edit.name, "reason": reason} for _, edit, reason in plan if reason is not None],
        }
        info["size"] = {
            "params_dense": dense_params,
            "params_factorized": params,
            "params_saved": dense_params - params,
            "bytes_dense": dense_bytes,
            "bytes_factorized": size,
            "bytes_saved": dense_bytes - size,
            "file_bytes": (folder / FACTORIZED_FILE).stat().st_size,
        }
        _write_edit(folder, info)
        model_card(info, path, notes).save(folder / CARD_FILE)
    finish_output(folder)
    return info


def _plan(model: nn.Module, record: EditRecord, allow_tied: bool, force: bool) -> list[tuple[Target, MatrixEdit, str | None]]:
    """Every truncated matrix with None (store as factors) or the reason it stays dense."""
    targets = [t for spec in record.specs for t in resolve(model, spec.layers, spec.modules, allow_tied=allow_tied)]
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    plan, larger = [], []
    for target, edit in zip(targets, record.matrices, strict=True):
        if edit.kept_rank >= edit.rank:
            continue  # rate 0: untouched
        module = model.get_submodule(target.module_name)
        tied = [n for n in owners[id(module.weight)] if n != f"{target.module_name}.weight"]
        reason = None
        if target.blocks:
            reason = "row block of a fused weight; the fused matrix as a whole is not low rank"
        elif tied:
            reason = f"tied to {tied[0]}, which needs the full matrix"
        elif type(module) is not nn.Linear and not target.transposed:
            reason = f"{type(module).__name__} is not a plain Linear"
        elif not saves_parameters(edit.shape, edit.kept_rank):
            larger.append(edit)
            if not force:
                reason = f"rank {edit.kept_rank} factors hold {edit.factorized_params:,} >= {edit.dense_params:,} parameters"
        plan.append((target, edit, reason))
    if not plan:
        raise SvdiclError("nothing was pruned (every rate keeps the full rank); give a rate above 0 to factorize")
    if all(reason is not None for _, _, reason in plan):
        if larger:
            edit = larger[0]
            raise SvdiclError(
                f"factorizing saves no parameters ({edit.name}: rank {edit.kept_rank} factors hold {edit.factorized_params:,} "
                f">= {edit.dense_params:,}); use a higher --rate, --format dense, or --force to store the factors anyway"
            )
        _, edit, reason = plan[0]
        raise SvdiclError(f"no pruned matrix can be stored factorized ({edit.name}: {reason}); use --format dense")
    return plan


def _stored_names(model: nn.Module) -> list[str]:
    """state_dict names, minus the second and later names of tied parameters (stored once)."""
    seen: set[int] = set()
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return [name for name in model.state_dict() if name not in aliases]


def _stored_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = set(_stored_names(model))
    return {name: tensor for name, tensor in state_tensors(model) if name in names}


def _size(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(parameters, bytes) of a state dict."""
    return sum(t.numel() for t in state.values()), sum(t.numel() * t.element_size() for t in state.values())


def _edit_info(loaded: LoadedModel, record: EditRecord, format: str) -> dict:
    return {
        "source": loaded.source,
        "source_fingerprint": loaded.fingerprint,
        "dtype": loaded.dtype,
        "format": format,
        "edit": record.to_dict(),
        "versions": versions(),
    }


def _write_edit(folder: Path, info: dict) -> None:
    (folder / EDIT_FILE).write_text(json.dumps(info, indent=2) + "\n")


def read_edit(folder: str | Path) -> dict:
    """The svdicl_edit.json of an export folder; empty for a folder svdicl did not write."""
    file = Path(folder).expanduser() / EDIT_FILE
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise SvdiclError(f"cannot read {file} ({exc}); export the model again") from None


def is_factorized(source: str | Path) -> bool:
    """A folder written by `svdicl prune --format factorized`, which transformers alone cannot load."""
    return read_edit(source).get("format") == "factorized"


def load_any(source: str = DEFAULT_MODEL, **options) -> LoadedModel:
    """Load `source` as `svdicl.models.load_model` does (same keyword arguments), or rebuild a factorized export.

    This is `svdicl.load_model`: an alias, .gguf file, model folder (a dense export is one), Hub id,
    or a folder of `svdicl prune --format factorized`, which `load_pruned` rebuilds on one device.
    """
    if not is_factorized(source):
        return load_model(source, **options)
    if any(options.get(name) for name in ("device_map", "max_memory", "offload_folder")):
        raise SvdiclError(f"{source} is a factorized export, which loads on one device; drop --device-map or export dense")
    return load_pruned(source, dtype=options.get("dtype", "float32"), device=options.get("device", "cpu"))


def load_pruned(path: str | Path, *, dtype: str | None = None, device: str = "cpu") -> LoadedModel:
    """Load an svdicl export, dense or factorized, with its tokenizer (no download).

    A factorized export is rebuilt from its config with LowRankLinear modules where it stored
    factors; its weights file must account for every tensor of that model, no more, no less.
    """
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise SvdiclError(f"{folder} is not a model folder (no config.json); give the --output folder of `svdicl prune`")
    info = read_edit(folder)
    dtype = dtype or info.get("dtype", "float32")
    if dtype not in DTYPES:
        raise SvdiclError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if info.get("format", "dense") == "dense":
        return load_model(str(folder), dtype=dtype, device=device)
    if info["format"] != "factorized":
        raise SvdiclError(f"{folder / EDIT_FILE} names format {info['format']!r}; svdicl writes {' or '.join(FORMATS)}")
    check_device(device)
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(folder)
    with no_init_weights():  # every tensor comes from the file; skip the costly random init
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.tie_weights()
    for spec in info["factorized"]["modules"]:
        out_features, in_features = spec["shape"]
        module = LowRankLinear(in_features, out_features, spec["rank"], spec["bias"], dtype=DTYPES[dtype])
        replace_module(model, spec["name"], module)
    file = folder / info["factorized"]["file"]
    check_safetensors(file)
    tensors = load_file(file)
    _check_tensors(model, tensors, file)
    model.load_state_dict(tensors, strict=False)  # only tied aliases are absent, checked above
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(folder), fingerprint=fingerprint(model), dtype=dtype)


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Every stored tensor of the rebuilt model is in the file with its shape, and nothing else is."""
    expected = model.state_dict()
    names = _stored_names(model)
    missing = [n for n in names if n not in tensors]
    unexpected = sorted(set(tensors) - set(names))
    wrong = [n for n in names if n in tensors and tuple(tensors[n].shape) != tuple(expected[n].shape)]
    for problem, found in (("lacks", missing), ("has unexpected", unexpected), ("has wrongly shaped", wrong)):
        if found:
            raise SvdiclError(
                f"{file} {problem} tensors ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); "
                "the export is damaged or from another model: export it again"
            )
