"""Read and write a weight's real values, also when accelerate has offloaded it.

A model loaded with a device map keeps each weight on its own device.  Weights offloaded to
the CPU (behind a GPU) or to disk are meta tensors in the model; accelerate's hook on their
module copies the values in from a weights map before every forward.  Pruning such a weight
reads its values from that map and writes the truncated values back where the next forward
finds them: in memory for an in-memory entry, as a new safetensors file in the offload folder
for a disk entry, so pruning does not pull a disk-offloaded model into memory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from svdicl.errors import SvdiclError


@dataclass(frozen=True)
class Slot:
    """Where one weight's values live: in the parameter itself, or under `key` of an offload map."""

    name: str
    parameter: torch.Tensor
    mapping: Mapping | None = None
    key: str = ""

    def read(self) -> torch.Tensor:
        """The values (the parameter itself when it is not offloaded; a disk entry is loaded)."""
        return self.parameter if self.mapping is None else self.mapping[self.key]

    def stamp(self) -> tuple:
        """Identity of the current values, for the factor cache: changes whenever `write` does."""
        entry = self._disk_entry()
        if entry is not None:
            path = _entry_file(self.mapping, self.key, entry)
            return (path, entry.get("weight_name", self.key), os.stat(path).st_mtime_ns)
        values = self.read()
        return (values.data_ptr(), values._version, tuple(values.shape))

    def write(self, values: torch.Tensor) -> Callable[[], None]:
        """Make `values` what the model computes with; returns the undo."""
        if self.mapping is None:
            old = self.parameter.data
            self.parameter.data = values
            return lambda: setattr(self.parameter, "data", old)
        entry = self._disk_entry()
        folder = getattr(self.mapping, "save_folder", None)
        if entry is not None and folder is not None:
            return self._write_file(values, entry, folder)
        store = getattr(self.mapping, "state_dict", self.mapping)  # accelerate keeps in-memory entries there
        missing = object()
        old = store.get(self.key, missing)
        store[self.key] = values
        return lambda: store.__setitem__(self.key, old) if old is not missing else store.pop(self.key)

    def _disk_entry(self) -> dict | None:
        """The offload index entry when the values are read from disk, else None."""
        if self.mapping is None or self.key in getattr(self.mapping, "state_dict", self.mapping):
            return None
        return getattr(self.mapping, "index", {}).get(self.key)

    def _write_file(self, values: torch.Tensor, entry: dict, folder: str) -> Callable[[], None]:
        from safetensors.torch import save_file

        handle, path = tempfile.mkstemp(prefix="svdicl-", suffix=".safetensors", dir=folder)
        os.close(handle)
        save_file({self.key: values.detach().to("cpu").contiguous()}, path)
        index = self.mapping.index
        index[self.key] = {"safetensors_file": path, "weight_name": self.key, "dtype": str(values.dtype).removeprefix("torch.")}

        def undo() -> None:
            index[self.key] = entry
            os.unlink(path)

        return undo


def _entry_file(mapping: Mapping, key: str, entry: dict) -> str:
    """The file behind a disk entry: a safetensors file, or accelerate's own `<key>.dat` memmap."""
    return entry.get("safetensors_file") or os.path.join(mapping.save_folder, f"{key}.dat")


def slot(model: nn.Module, name: str, *, writing: bool = False) -> Slot:
    """The slot of parameter or buffer `name` (e.g. `model.layers.3.mlp.down_proj.weight`).

    `writing` refuses an offloaded tied weight: each of its names has its own map entry, so
    writing one would silently untie it from the others.
    """
    module_name, _, leaf = name.rpartition(".")
    tensor = getattr(model.get_submodule(module_name), leaf)
    if tensor.device.type != "meta":
        return Slot(name, tensor)
    parts = module_name.split(".") if module_name else []
    for depth in range(len(parts), -1, -1):
        for hook in _hooks(model.get_submodule(".".join(parts[:depth]))):
            if not getattr(hook, "offload", False) or getattr(hook, "weights_map", None) is None:
                continue
            mapping, key = hook.weights_map, ".".join([*parts[depth:], leaf])
            while hasattr(mapping, "prefix") and hasattr(mapping, "dataset"):  # accelerate's PrefixedDataset
                mapping, key = mapping.dataset, mapping.prefix + key
            if _holds(mapping, key):
                if writing:
                    _refuse_tied(model, name, tensor)
                return Slot(name, tensor, mapping, key)
    raise SvdiclError(f"{name} is on the meta device and no offload hook holds its values; load the model with real weights")


def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))  # a SequentialHook holds several


def _holds(mapping: Mapping, key: str) -> bool:
    """Whether `key` is in the map, without loading it (membership on accelerate's loader reads the file)."""
    if hasattr(mapping, "index") and hasattr(mapping, "state_dict"):
        return key in mapping.state_dict or key in mapping.index
    return key in mapping


def _refuse_tied(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    others = [n for n, p in model.named_parameters(remove_duplicate=False) if p is tensor and n != name]
    if others:
        raise SvdiclError(f"{name} is tied to {others[0]} and offloaded; keep both on a device in the device map to prune it")


def state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`model.state_dict()` items with offloaded (meta) entries read from where their values live."""
    for name, tensor in model.state_dict().items():
        yield name, (slot(model, name).read() if tensor.device.type == "meta" else tensor)
