"""From "layer 26, mlp" to concrete weight matrices, per architecture family.

Each family is a row of data: where its decoder layers live and which module inside a layer
holds each canonical matrix (q, k, v, o, gate, up, down, fc_in, fc_out).  Fused projections
(GPT-2's c_attn, GPT-NeoX's query_key_value, Phi-3's qkv_proj and gate_up_proj) are one
matrix: the groups `attn`/`mlp` truncate them whole, as one matrix, because that is the weight
the model owns.  Asking for a single canonical matrix (`q`, `k`, `v`, `gate`, `up`) truncates
only its rows of the fused weight.  Everything is expressed in the logical (out, in)
orientation; GPT-2's Conv1D stores W transposed and is read through `transposed`.  A family
svdicl.forward runs in pieces also names its final norm, cache keyword, rotary embedding and
layer types: the one table of architecture facts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from svdicl.errors import SvdiclError

GROUPS = ("attn", "mlp", "all")
REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class Fused:
    """A canonical matrix that is a row block of a fused weight.

    layout "concat": the fused rows are the parts one after another (sizes from the config);
    layout "per_head": rows are grouped per attention head as [q | k | v] of head_dim each.
    """

    module: str
    layout: str
    parts: tuple[str, ...]
    index: int


@dataclass(frozen=True)
class Family:
    """One architecture family's row: where the decoder layers are, each matrix's module path, and what the fast paths need."""

    name: str
    layers: str  # dotted path of the ModuleList of decoder layers
    matrices: dict[str, str | Fused]  # canonical name -> module path inside a layer
    attn: tuple[str, ...]  # the `attn` group, in canonical names or whole fused modules
    mlp: tuple[str, ...]
    whole: dict[str, str] = field(default_factory=dict)  # names of whole fused modules
    # What svdicl.forward's layer loop needs (its fast paths run only where `fast_path` is set):
    fast_path: bool = False
    norm: str = "norm"  # final norm, inside `base`
    cache_arg: str = "past_key_values"  # keyword a decoder layer took the cache by before transformers renamed it `cache`
    rotary: str = "shared"  # "shared": base.rotary_emb(h, pos); "per_type": one per layer type; "inside": the attention
    #   does it (unless this transformers gives the base model a shared `rotary_emb`, as it does GPT-J since 5.2x)
    layer_types: str = "full"  # "full": all causal; "window": config.sliding_window (if set) everywhere; "config": its list

    @property
    def base(self) -> str:
        """The module holding the decoder layers, embeddings, rotary embedding and final norm."""
        return self.layers.rpartition(".")[0]


_LLAMA = dict(
    matrices={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
    attn=("q", "k", "v", "o"),
    mlp=("gate", "up", "down"),
)

FAMILIES: dict[str, Family] = {}


def _register(names: Sequence[str], **spec) -> None:
    for name in names:
        FAMILIES[name] = Family(name=name, **spec)


_register(["llama", "gemma"], layers="model.layers", fast_path=True, **_LLAMA)
_register(["mistral"], layers="model.layers", fast_path=True, layer_types="window", **_LLAMA)
_register(["qwen2", "qwen3", "gemma2"], layers="model.layers", fast_path=True, layer_types="config", **_LLAMA)
_register(["gemma3_text"], layers="model.layers", fast_path=True, rotary="per_type", layer_types="config", **_LLAMA)
_register(["olmo2", "granite"], layers="model.layers", **_LLAMA)
_register(["gemma3"], layers="model.language_model.layers", **_LLAMA)
_register(
    ["gptj"],
    layers="transformer.h",
    matrices={
        "q": "attn.q_proj",
        "k": "attn.k_proj",
        "v": "attn.v_proj",
        "o": "attn.out_proj",
        "fc_in": "mlp.fc_in",
        "fc_out": "mlp.fc_out",
    },
    attn=("q", "k", "v", "o"),
    mlp=("fc_in", "fc_out"),
    fast_path=True,
    norm="ln_f",
    cache_arg="layer_past",
    rotary="inside",
)
_register(
    ["gpt2"],
    layers="transformer.h",
    matrices={
        "q": Fused("attn.c_attn", "concat", ("q", "k", "v"), 0),
        "k": Fused("attn.c_attn", "concat", ("q", "k", "v"), 1),
        "v": Fused("attn.c_attn", "concat", ("q", "k", "v"), 2),
        "o": "attn.c_proj",
        "fc_in": "mlp.c_fc",
        "fc_out": "mlp.c_proj",
    },
    attn=("qkv", "o"),
    mlp=("fc_in", "fc_out"),
    whole={"qkv": "attn.c_attn"},
)
_register(
    ["gpt_neox"],
    layers="gpt_neox.layers",
    matrices={
        "q": Fused("attention.query_key_value", "per_head", ("q", "k", "v"), 0),
        "k": Fused("attention.query_key_value", "per_head", ("q", "k", "v"), 1),
        "v": Fused("attention.query_key_value", "per_head", ("q", "k", "v"), 2),
        "o": "attention.dense",
        "fc_in": "mlp.dense_h_to_4h",
        "fc_out": "mlp.dense_4h_to_h",
    },
    attn=("qkv", "o"),
    mlp=("fc_in", "fc_out"),
    whole={"qkv": "attention.query_key_value"},
)
_register(
    ["opt"],
    layers="model.decoder.layers",
    matrices={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.out_proj",
        "fc_in": "fc1",
        "fc_out": "fc2",
    },
    attn=("q", "k", "v", "o"),
    mlp=("fc_in", "fc_out"),
)
_register(
    ["phi"],
    layers="model.layers",
    matrices={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.dense",
        "fc_in": "mlp.fc1",
        "fc_out": "mlp.fc2",
    },
    attn=("q", "k", "v", "o"),
    mlp=("fc_in", "fc_out"),
)
_register(
    ["phi3"],
    layers="model.layers",
    matrices={
        "q": Fused("self_attn.qkv_proj", "concat", ("q", "k", "v"), 0),
        "k": Fused("self_attn.qkv_proj", "concat", ("q", "k", "v"), 1),
        "v": Fused("self_attn.qkv_proj", "concat", ("q", "k", "v"), 2),
        "o": "self_attn.o_proj",
        "gate": Fused("mlp.gate_up_proj", "concat", ("gate", "up"), 0),
        "up": Fused("mlp.gate_up_proj", "concat", ("gate", "up"), 1),
        "down": "mlp.down_proj",
    },
    attn=("qkv", "o"),
    mlp=("gate_up", "down"),
    whole={"qkv": "self_attn.qkv_proj", "gate_up": "mlp.gate_up_proj"},
)


@dataclass(frozen=True)
class Target:
    """One matrix to truncate: a module's weight, or a row block of a fused weight.

    `blocks` are [start, stop) row ranges of the logical (out, in) matrix; empty = whole matrix.
    """

    module_name: str
    layer: int | None
    canonical: str | None
    blocks: tuple[tuple[int, int], ...] = ()
    transposed: bool = False

    @property
    def name(self) -> str:
        """The module name, with the block of a fused matrix in brackets."""
        return f"{self.module_name}[{self.canonical}]" if self.blocks else self.module_name


def family_of(model: nn.Module) -> Family | None:
    """The table row for the model's `config.model_type`, or None if the family is not known."""
    return FAMILIES.get(getattr(model.config, "model_type", ""))


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, ModuleList) of the decoder layers: from the table, else the longest ModuleList."""
    family = family_of(model)
    if family is not None:
        return family.layers, model.get_submodule(family.layers)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise SvdiclError(f"cannot find the decoder layers of {type(model).__name__}; it has no ModuleList of blocks")
    return max(lists, key=lambda item: len(item[1]))


def parse_layers(spec: str | int | Sequence[int | str], num_layers: int) -> list[int]:
    """Layer indices from `3`, `-1`, `0-1`, `first2`, `last2`, `all` or a comma list of those."""
    if isinstance(spec, int):
        parts: list[str] = [str(spec)]
    elif isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
    else:
        parts = [str(p) for p in spec]
    if not parts:
        raise SvdiclError("no layers given; name layers like 26, -1, 0-3, first2, last2 or all")
    chosen: list[int] = []
    for part in parts:
        chosen.extend(_parse_layer_part(part, num_layers))
    return sorted(set(chosen))


def _parse_layer_part(part: str, num_layers: int) -> list[int]:
    hint = f"the model has {num_layers} layers: use 0..{num_layers - 1}, negative indices from the end, 0-1, first2, last2 or all"
    if part == "all":
        return list(range(num_layers))
    match = re.fullmatch(r"(first|last)(\d+)", part)
    if match:
        count = int(match.group(2))
        if not 1 <= count <= num_layers:
            raise SvdiclError(f"layer spec {part!r} asks for {count} layers; {hint}")
        return list(range(count)) if match.group(1) == "first" else list(range(num_layers - count, num_layers))
    match = re.fullmatch(r"(\d+)-(\d+)", part)
    if match:
        start, stop = int(match.group(1)), int(match.group(2))
        if start > stop or stop >= num_layers:
            raise SvdiclError(f"layer range {part!r} is out of range; {hint}")
        return list(range(start, stop + 1))
    if re.fullmatch(r"-?\d+", part):
        index = int(part)
        if not -num_layers <= index < num_layers:
            raise SvdiclError(f"layer {index} is out of range; {hint}")
        return [index % num_layers]
    raise SvdiclError(f"cannot read layer spec {part!r}; {hint}")


def module_choices(family: Family) -> list[str]:
    """Every name the family accepts in --modules, for error messages and --help."""
    return [*GROUPS, *family.matrices, *family.whole]


def resolve(
    model: nn.Module,
    layers: str | int | Sequence[int | str],
    modules: str | Sequence[str],
    *,
    allow_tied: bool = False,
) -> list[Target]:
    """The matrices named by (layers, modules), in layer order; raises a one-line error on bad input.

    `modules` is a comma list of groups (attn, mlp, all), canonical matrices, whole fused
    modules (qkv, gate_up), or one `re:<regex>` searched in full module names.
    """
    stack_path, stack = layer_stack(model)
    layer_ids = parse_layers(layers, len(stack))
    names = [m.strip() for m in (modules.split(",") if isinstance(modules, str) else modules) if m.strip()]
    if not names:
        raise SvdiclError("no modules given; use attn, mlp, all, a matrix like q or down, or re:<regex>")
    regexes = [n for n in names if n.startswith(REGEX_PREFIX)]
    if regexes:
        if len(names) > 1:
            raise SvdiclError("a regex module spec must stand alone; write one re:<regex> that matches everything")
        found = _resolve_regex(model, stack_path, len(stack), layer_ids, names[0][len(REGEX_PREFIX) :])
    else:
        family = family_of(model)
        if family is None:
            model_type = getattr(model.config, "model_type", "?")
            raise SvdiclError(
                f"model family {model_type!r} is not in svdicl's table ({', '.join(sorted(FAMILIES))}); "
                "name its matrices with a regex, e.g. --modules 're:mlp\\.(up|down)_proj'"
            )
        found = [t for layer in layer_ids for t in _resolve_family(model, family, layer, names)]
    _check_targets(model, found, allow_tied)
    return found


def _resolve_family(model: nn.Module, family: Family, layer: int, names: list[str]) -> list[Target]:
    canonical: list[str] = []
    for name in names:
        if name == "all":
            canonical += [*family.attn, *family.mlp]
        elif name in ("attn", "mlp"):
            canonical += getattr(family, name)
        elif name in family.matrices or name in family.whole:
            canonical.append(name)
        else:
            raise SvdiclError(
                f"unknown module {name!r} for family {family.name}; choose from {', '.join(module_choices(family))} "
                "or a regex re:<pattern>"
            )
    prefix = f"{family.layers}.{layer}"
    targets = []
    for name in dict.fromkeys(canonical):
        spec = family.whole.get(name) or family.matrices[name]
        if isinstance(spec, Fused):
            module = model.get_submodule(f"{prefix}.{spec.module}")
            blocks = _fused_blocks(model.config, spec, _logical_shape(module)[0])
            targets.append(_target(model, f"{prefix}.{spec.module}", layer, name, blocks))
        else:
            targets.append(_target(model, f"{prefix}.{spec}", layer, name, ()))
    return targets


def _resolve_regex(model: nn.Module, stack_path: str, num_layers: int, layer_ids: list[int], pattern: str) -> list[Target]:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise SvdiclError(f"module regex {pattern!r} does not compile ({exc}); fix the pattern") from None
    wanted = set(layer_ids)
    everything = wanted == set(range(num_layers))
    targets = []
    for name, module in model.named_modules():
        if not _is_matrix_module(module) or not regex.search(name):
            continue
        layer = _layer_index(name, stack_path)
        outside = layer is None and not everything  # lm_head etc. only when all layers are chosen
        if outside or (layer is not None and layer not in wanted):
            continue
        targets.append(_target(model, name, layer, None, ()))
    if not targets:
        raise SvdiclError(
            f"module regex {pattern!r} matches no weight matrix in the chosen layers; run `svdicl inspect` to see module names"
        )
    return targets


def _layer_index(name: str, stack_path: str) -> int | None:
    match = re.match(re.escape(stack_path) + r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _is_matrix_module(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, nn.Embedding)


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D: weight stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _logical_shape(module: nn.Module) -> tuple[int, int]:
    rows, cols = module.weight.shape
    return (cols, rows) if _is_conv1d(module) else (rows, cols)


def _target(model: nn.Module, name: str, layer: int | None, canonical: str | None, blocks) -> Target:
    module = model.get_submodule(name)
    if not _is_matrix_module(module):
        raise SvdiclError(f"{name} is a {type(module).__name__}, not a weight matrix; pick a Linear module")
    return Target(module_name=name, layer=layer, canonical=canonical, blocks=blocks, transposed=_is_conv1d(module))


def _fused_blocks(config, spec: Fused, rows: int) -> tuple[tuple[int, int], ...]:
    """Row ranges of part `spec.index` inside a fused weight with `rows` output rows."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    if spec.layout == "per_head":  # rows = heads x [q | k | v] x head_dim
        size = rows // (heads * len(spec.parts))
        starts = (h * size * len(spec.parts) + spec.index * size for h in range(heads))
        return tuple((start, start + size) for start in starts)
    if spec.parts == ("q", "k", "v"):  # rows = [q (heads x d) | k (kv_heads x d) | v (kv_heads x d)]
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or (getattr(text, "hidden_size", None) or text.n_embd) // heads
        sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
        if sum(sizes) != rows:
            raise SvdiclError(f"fused {spec.module} has {rows} rows, expected {sum(sizes)} from the config; use --modules qkv")
    else:
        sizes = (rows // len(spec.parts),) * len(spec.parts)
    start = sum(sizes[: spec.index])
    return ((start, start + sizes[spec.index]),)


def check_overlap(targets: Sequence[Target]) -> None:
    """Refuse a matrix (or rows of a fused one) that two specs both select: it would get two rates."""
    seen: dict[str, list[tuple[int, int]]] = {}
    for target in targets:
        ranges = list(target.blocks) or [(0, 1 << 62)]
        for start, stop in seen.get(target.module_name, []):
            if any(a < stop and start < b for a, b in ranges):
                raise SvdiclError(f"{target.name} is selected twice (overlapping module specs); name each matrix once")
        seen.setdefault(target.module_name, []).extend(ranges)


def _check_targets(model: nn.Module, targets: list[Target], allow_tied: bool) -> None:
    """Refuse overlaps and, unless allowed, weights shared with another module (tied embeddings)."""
    check_overlap(targets)
    if allow_tied:
        return
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for target in targets:
        weight = model.get_submodule(target.module_name).weight
        shared = [n for n in owners.get(id(weight), []) if n != f"{target.module_name}.weight"]
        if shared:
            raise SvdiclError(
                f"{target.module_name}.weight is tied to {shared[0]}; pruning it would change both. "
                "Pass allow_tied=True (--allow-tied) if that is what you want"
            )


def describe(model: nn.Module) -> dict:
    """Architecture summary for `svdicl inspect`: layers, canonical matrices with shapes, parameter counts."""
    stack_path, stack = layer_stack(model)
    family = family_of(model)
    params = {id(p): p.numel() for p in model.parameters()}
    embeddings = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    matrices = []
    if family is not None:
        for name in [*family.attn, *family.mlp, *(n for n in family.matrices if isinstance(family.matrices[n], Fused))]:
            (target,) = _resolve_family(model, family, 0, [name])
            module = model.get_submodule(target.module_name)
            rows = sum(b - a for a, b in target.blocks) if target.blocks else _logical_shape(module)[0]
            shape = (rows, _logical_shape(module)[1])
            group = "attn" if name in family.attn else "mlp" if name in family.mlp else "part"
            matrices.append({"name": name, "group": group, "module": target.name.replace(f"{stack_path}.0.", ""), "shape": shape})
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "family": family.name if family else None,
        "layers_path": stack_path,
        "num_layers": len(stack),
        "matrices": matrices,
        "params_total": sum(params.values()),
        "params_per_layer": sum(p.numel() for p in stack[0].parameters()),
        "params_embeddings": embeddings.numel(),
        "tied_embeddings": output is not None and output.weight is embeddings,
        "dtype": str(embeddings.dtype).removeprefix("torch."),
    }
