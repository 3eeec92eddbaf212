"""How many torch threads and worker processes to use: only the cores other programs leave free.

Two torch threads on a two-core machine that other programs keep busy are far slower than one
(threads wait at every barrier for a core the scheduler gave away: condition numbers took 1,340 s
with 2 threads at load 10 vs 96 s with 1 thread at load 8).  So by default svdicl counts the
cores it may run on, takes away the one-minute load average (rounded) and uses what is left,
at least one:

    free cores = max(1, cores - round(load average)), never more than the cores

The local executor runs that many single-threaded worker processes; code that runs in one
process (condition numbers, SVDs, a single worker) uses that many torch threads.  Explicit
settings (--workers, --threads-per-worker, OMP_NUM_THREADS) are kept as given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from svdicl.errors import SvdiclError


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def load_average() -> float:
    """The one-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def free_cores(total: int | None = None, load: float | None = None) -> int:
    """max(1, cores - round(load)), at most the cores: the cores other programs leave idle."""
    total = cores() if total is None else total
    load = load_average() if load is None else load
    return max(1, min(total, total - round(load)))


@dataclass(frozen=True)
class ThreadPlan:
    """`workers` processes with `threads` torch threads each, and what the default was chosen from."""

    workers: int
    threads: int
    cores: int
    load: float

    def describe(self) -> str:
        """One line for the log."""
        return f"{self.workers} worker(s) x {self.threads} thread(s) ({self.cores} cores, load {self.load:.1f})"


def thread_plan(
    workers: int | None = None,
    threads_per_worker: int | None = None,
    *,
    total: int | None = None,
    load: float | None = None,
    fits: int | None = None,
) -> ThreadPlan:
    """Workers: as given, else the free cores divided by the threads per worker, at most `fits` (the copies of the
    model memory holds, `workers_that_fit`); threads per worker: as given, else 1."""
    total = cores() if total is None else total
    load = load_average() if load is None else load
    for flag, value in (("--workers", workers), ("--threads-per-worker", threads_per_worker)):
        if value is not None and value < 1:
            raise SvdiclError(f"{flag} must be at least 1, got {value}")
    threads = threads_per_worker or 1
    chosen = workers or max(1, min(free_cores(total, load) // threads, fits or total))
    return ThreadPlan(workers=chosen, threads=threads, cores=total, load=load)


def workers_that_fit(model_bytes: int, available: int | None = None) -> int:
    """How many more copies of a model of `model_bytes` the available memory holds (each worker loads its own;
    1.5x for what loading and scoring add), at least 1."""
    if available is None:
        import psutil  # installed with accelerate, a dependency

        available = psutil.virtual_memory().available
    return max(1, int(available // max(1, int(1.5 * model_bytes))))


def default_torch_threads() -> int:
    """Torch threads for work in one process: OMP_NUM_THREADS where the user set it, else the free cores."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return free_cores()


def apply_torch_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to `threads` (default: `default_torch_threads`); returns the number set."""
    import torch

    chosen = threads or default_torch_threads()
    torch.set_num_threads(chosen)
    return chosen
