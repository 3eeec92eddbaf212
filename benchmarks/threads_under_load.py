"""Threads under load: a fixed workload with 1 and 2 torch threads, on a quiet machine and while a
busy-loop process keeps one core busy, and what svdicl's thread policy (svdicl.threads) chooses.

First the orientation: float64 svdvals of the wide matrix vs its transpose.  The workload is
the condition numbers' kernel: float64 svdvals of a 576 x 1536 matrix (SmolLM2's
down projection, tall orientation), repeated.  Prints wall and CPU seconds, the 2-thread/1-thread
ratios, and the policy's workers x threads for the load seen.

    python benchmarks/threads_under_load.py [--repeats 6]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time

import torch

from svdicl.threads import cores, free_cores, load_average, thread_plan


def burn(stop) -> None:
    """Keep one core busy until `stop` is set."""
    while not stop.is_set():
        sum(range(10_000))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def workload(threads: int, repeats: int) -> tuple[float, float]:
    """(wall s, CPU s) of `repeats` float64 svdvals with `threads` torch threads."""
    torch.set_num_threads(threads)
    matrix = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.linalg.svdvals(matrix)  # warm up
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(repeats):
        torch.linalg.svdvals(matrix)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def measure(label: str, repeats: int) -> None:
    one, two = workload(1, repeats), workload(2, repeats)
    plan = thread_plan()
    print(f"{label}: load {load_average():.2f} on {cores()} cores -> policy: {free_cores()} free core(s), {plan.describe()}")
    print(f"  1 thread : {one[0]:7.2f} s wall {one[1]:7.2f} s CPU")
    print(
        f"  2 threads: {two[0]:7.2f} s wall {two[1]:7.2f} s CPU   (2/1: wall {two[0] / one[0]:.2f}x, CPU {two[1] / one[1]:.2f}x)"
    )


def orientation(repeats: int) -> None:
    """float64 svdvals of the wide 576 x 1536 matrix vs its tall transpose, one thread (what condition numbers use)."""
    torch.set_num_threads(1)
    wide = torch.randn(576, 1536, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    times = {}
    for name, matrix in (("wide", wide), ("tall", wide.T)):
        torch.linalg.svdvals(matrix)
        started = cpu_seconds()
        for _ in range(repeats):
            values = torch.linalg.svdvals(matrix)
        times[name] = (cpu_seconds() - started) / repeats
        times[name + " values"] = values
    same = torch.allclose(times["wide values"], times["tall values"], rtol=1e-12, atol=0)
    print(
        f"svdvals 576x1536 float64, 1 thread: wide {times['wide']:.3f} CPU-s, tall (transposed) {times['tall']:.3f} CPU-s, "
        f"{times['wide'] / times['tall']:.2f}x; same singular values: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, pid {os.getpid()}")
    orientation(args.repeats)
    measure("as found", args.repeats)
    stop = multiprocessing.Event()
    hog = multiprocessing.Process(target=burn, args=(stop,), daemon=True)
    hog.start()
    try:
        time.sleep(1.0)
        measure("with a busy-loop process on one core", args.repeats)
    finally:
        stop.set()
        hog.join()


if __name__ == "__main__":
    main()
