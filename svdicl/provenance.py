"""What produced a result: package versions, so a results file can be reproduced, and the machine a timing was
measured on, so that seconds from two machines are never compared as if they were one."""

from __future__ import annotations

import functools
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")  # Linux; elsewhere the platform's processor name
_PACKAGES = ("svdicl", "torch", "transformers", "tokenizers", "datasets", "gguf", "accelerate", "numpy")


def versions() -> dict[str, str | None]:
    """Python's and the relevant packages' versions (None if not installed), for results files."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


@functools.cache
def cpu() -> str:
    """The CPU's model name and the vector instructions torch uses on it, e.g. "AMD EPYC (AVX2)": the same cell
    took 2-3x longer on an AVX2 machine than on an AVX-512 one (docs/STUDY.md)."""
    name = platform.processor() or platform.machine() or "unknown CPU"
    try:
        found = [line for line in CPUINFO.read_text().splitlines() if line.startswith("model name")]
        name = found[0].split(":", 1)[1].strip() if found else name
    except OSError:  # not Linux
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def machine(device: torch.device) -> dict[str, str | int | float | None]:
    """What a timing depends on besides the work: the device (the CPU, or the GPU's name), torch's threads, and
    the one-minute load average when it ended (above the threads: other programs shared the cores)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu()
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {"device": name, "threads": torch.get_num_threads(), "load": load}
