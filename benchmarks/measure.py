"""What the benchmarks measure with: wall and CPU clocks that count queued GPU work, peak memory.

Imported by the benchmark scripts as a sibling module (they run from benchmarks/).
"""

from __future__ import annotations

import resource
import time

import torch


def synchronize() -> None:
    """Wait for queued GPU work, so that it counts in the interval that queued it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def clocks() -> tuple[float, float]:
    """(wall, CPU) clock readings after the GPU's queued work is done."""
    synchronize()
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since `start`; CPU counts every thread of the process."""
    now = clocks()
    return now[0] - start[0], now[1] - start[1]


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gpu_peak(device: str) -> int | None:
    """Peak bytes torch allocated on a CUDA `device` so far, None elsewhere."""
    return torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None
