"""Factorised export against the same pruning stored dense: parameters, bytes and forward latency.

Both models compute the same function (every layer's MLP truncated at each rate); the dense one
holds each W_k as an m x n matrix, the factorised one (svdicl.load_pruned of a
`--format factorized` export) as B (m x k) and A (k x n).  Timings are interleaved (dense,
factorised, dense, ...) on the same inputs, so load on a shared machine hits both alike.

    python benchmarks/factorized.py --model smollm2-135m --rates 0.9 0.5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import svdicl
from svdicl.specs import PruneSpec


def forward_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids, logits_to_keep=1)
    return time.perf_counter() - start


def bench_rate(loaded: svdicl.LoadedModel, specs: list[PruneSpec], ids: torch.Tensor, repeats: int, folder: Path) -> dict:
    info = svdicl.save_pruned(loaded, specs, folder, format="factorized", overwrite=True)
    factorized = svdicl.load_pruned(folder).model
    with svdicl.pruned(loaded.model, specs=specs):
        with torch.inference_mode():
            expected = loaded.model(ids, logits_to_keep=1).logits
            difference = (factorized(ids, logits_to_keep=1).logits - expected).abs().max().item()
        dense_times, factor_times = [], []
        for _ in range(repeats):
            dense_times.append(forward_seconds(loaded.model, ids))
            factor_times.append(forward_seconds(factorized, ids))
    dense, factor = statistics.median(dense_times), statistics.median(factor_times)
    ranks = sorted({m["rank"] for m in info["factorized"]["modules"]})
    return {
        "edit": ";".join(map(str, specs)),
        "ranks": ranks,
        **info["size"],
        "dense_ms": 1000 * dense,
        "factorized_ms": 1000 * factor,
        "latency_ratio": factor / dense,
        "params_ratio": info["size"]["params_factorized"] / info["size"]["params_dense"],
        "max_abs_logit_difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="all")
    parser.add_argument("--modules", default="mlp")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.9, 0.5])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per model and rate (median reported)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = svdicl.load_model(args.model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, loaded.model.config.vocab_size, (args.batch, args.tokens), generator=generator)
    forward_seconds(loaded.model, ids)  # warm-up
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for rate in args.rates:
            rows.append(bench_rate(loaded, [PruneSpec(args.layers, args.modules, rate)], ids, args.repeats, Path(scratch)))
    print(f"{args.model}, input {args.batch} x {args.tokens} tokens, {torch.get_num_threads()} threads, median of {args.repeats}")
    header = f"{'edit':<16} {'ranks':<8} {'params dense':>13} {'factorized':>12} {'MB dense':>9} {'factorized':>10}"
    print(f"{header} {'ms dense':>9} {'factorized':>10} {'ratio':>6} {'max |dlogit|':>12}")
    for row in rows:
        print(
            f"{row['edit']:<16} {','.join(map(str, row['ranks'])):<8} {row['params_dense']:>13,} {row['params_factorized']:>12,} "
            f"{row['bytes_dense'] / 1e6:>9.1f} {row['bytes_factorized'] / 1e6:>10.1f} {row['dense_ms']:>9.1f} "
            f"{row['factorized_ms']:>10.1f} {row['latency_ratio']:>6.2f} {row['max_abs_logit_difference']:>12.2e}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
