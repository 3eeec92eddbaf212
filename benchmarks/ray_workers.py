"""One small sweep grid on the local executor and on Ray with 1 and with 2 workers: wall time, agreement, peak RSS.

Every process scores on one torch thread (the local driver, and each worker, whose Ray cluster
is started with one CPU per worker), so the comparison is workers, not threads.  Each run fills
a fresh store; the stores must agree cell by cell (predictions exactly, log-probabilities to
1e-5).  Wall time is the sweep's own (model loaded, Ray started and workers loaded before it).

    python benchmarks/ray_workers.py --model smollm2-135m --task sst2 --limit 40
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import measure
import ray
import torch

from svdicl.experiments.executors import RayExecutor, RaySettings
from svdicl.experiments.sweep import SweepGrid, sweep
from svdicl.export import load_any
from svdicl.store import Store


def peak_rss_mib(pid: int) -> float:
    """VmHWM of a live process on this machine."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def predictions(store: Store) -> dict[str, tuple[list[int], list[list[float]]]]:
    return {c.id: ([s["prediction"] for s in store.samples(c)], [s["logprobs"] for s in store.samples(c)]) for c in store.cells()}


def agree(a: dict, b: dict) -> bool:
    """Same cells, the same predictions, log-probabilities within 1e-5."""
    if a.keys() != b.keys():
        return False
    for key, (predicted, logprobs) in a.items():
        pairs = [(x, y) for xs, ys in zip(logprobs, b[key][1], strict=True) for x, y in zip(xs, ys, strict=True)]
        if predicted != b[key][0] or any(abs(x - y) > 1e-5 for x, y in pairs):
            return False
    return True


def run_ray(workers: int, model: str, loaded, grid: SweepGrid, folder: Path, data_dir: str | None) -> dict:
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR")  # one CPU, one thread per worker
    try:
        executor = RayExecutor({"source": model}, loaded.fingerprint, RaySettings(workers=workers))
        ray.get([actor.ready.remote() for actor in executor.actors])  # loads before the clock starts
        result = sweep(loaded, grid, Store(folder), data_dir=data_dir, progress=False, executor=executor)
        pids = ray.get([actor.__ray_call__.remote(lambda self: os.getpid()) for actor in executor.actors])
        rss = [peak_rss_mib(pid) for pid in pids]
        executor.close()
    finally:
        ray.shutdown()
    return {"wall_s": result.wall_s, "threads": executor.plan.threads, "worker_peak_rss_mib": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--layers", default="0,-1")
    parser.add_argument("--modules", default="mlp,attn")
    parser.add_argument("--rates", default="0,0.5,0.9,0.99")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--data-dir", default=os.environ.get("SVDICL_DATA"))
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    loaded = load_any(args.model)
    grid = SweepGrid(
        tasks=(args.task,), layers=tuple(args.layers.split(",")), modules=tuple(args.modules.split(",")), rates=args.rates,
        limit=args.limit,
    )  # fmt: skip
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        result = sweep(loaded, grid, Store(Path(tmp) / "local"), data_dir=args.data_dir, progress=False)
        rows = {"local": {"wall_s": result.wall_s, "threads": 1, "cells": len(result.cells)}}
        for workers in (1, 2):
            rows[f"ray-{workers}"] = run_ray(workers, args.model, loaded, grid, Path(tmp) / f"ray-{workers}", args.data_dir)
        stores = {name: predictions(Store(Path(tmp) / name)) for name in rows}
    rows["local"]["driver_peak_rss_mib"] = measure.peak_rss() / (1 << 20)
    for name, row in rows.items():
        row["agrees_with_local"] = agree(stores["local"], stores[name])
    loads = f"{load:.1f} -> {os.getloadavg()[0]:.1f}"
    print(f"{len(result.cells)} cells x {args.limit} examples, {args.model}, {args.task}; load average {loads}")
    print(f"{'executor':10} {'wall s':>8} {'threads':>8} {'agrees':>7}  peak RSS MiB")
    for name, row in rows.items():
        rss = ", ".join(f"{r:.0f}" for r in row.get("worker_peak_rss_mib") or [row["driver_peak_rss_mib"]])
        print(f"{name:10} {row['wall_s']:8.1f} {row['threads']:8d} {row['agrees_with_local']!s:>7}  {rss}")
    ratio = rows["ray-1"]["wall_s"] / rows["ray-2"]["wall_s"]
    local = rows["local"]["wall_s"] / rows["ray-1"]["wall_s"]
    print(f"1 worker / 2 workers: {ratio:.2f}x the wall time; local / 1 worker: {local:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio_1_to_2": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
