"""One exact SVD + 8 slices vs 8 randomized SVDs (the authors' code), per weight-matrix shape.

For each shape a random float32 matrix W is pruned at the paper's 8 clipping rates two ways,
each ending in the dense rank-k matrix the model would receive:

  exact       svdicl: one torch.linalg.svd (svdicl.svd_factors), then W_k = U_k S_k Vh_k per rate
  randomized  LASER's do_low_rank, as the paper's code calls it: per rate
              torch.svd_lowrank(W, q=k, niter=2) and U diag(S) V^T

Both use the same k = floor((1 - rate) * min(m, n)).  Printed per shape: wall-clock and CPU
seconds of each (best of --repeats; on a shared machine CPU seconds are the steadier measure),
their ratios, and the relative Frobenius error ||W - W_k|| / ||W|| of both next to the
Eckart-Young optimum sqrt(sum_{i>k} s_i^2) / ||W||.

    python benchmarks/svd_cost.py                          # SmolLM2-135M shapes (seconds)
    python benchmarks/svd_cost.py --shapes all --json out.json  # + GPT-J-6B and LLaMA-2-7B shapes (long)
    python benchmarks/svd_cost.py --shapes 4096x4096,llama2 --repeats 1 --threads 2
    python benchmarks/svd_cost.py --shapes all --device cuda                # on a GPU, as the authors ran
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import measure
import torch

from svdicl.svd import kept_rank, svd_factors

RATES = (0.0, 0.1, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995)
PRESETS = {
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
    "gptj": [(4096, 4096), (16384, 4096), (4096, 16384)],
    "llama2": [(4096, 4096), (11008, 4096), (4096, 11008)],
}


def parse_shapes(text: str) -> dict[tuple[int, int], list[str]]:
    """Shapes from preset names (smollm2, gptj, llama2, all) and MxN items, each with the models it comes from."""
    shapes: dict[tuple[int, int], list[str]] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        names = list(PRESETS) if item == "all" else [item] if item in PRESETS else []
        for name in names:
            for shape in PRESETS[name]:
                shapes.setdefault(shape, []).append(name)
        if not names:
            rows, _, cols = item.partition("x")
            if not (rows.isdigit() and cols.isdigit()):
                raise SystemExit(f"cannot read shape {item!r}; use MxN or one of {', '.join(PRESETS)}, all")
            shapes.setdefault((int(rows), int(cols)), []).append("given")
    return shapes


def exact(matrix: torch.Tensor) -> tuple[tuple[float, float], list[torch.Tensor], torch.Tensor]:
    """Seconds for one SVD + every rate's reconstruction; the reconstructions; the singular values."""
    start = measure.clocks()
    factors = svd_factors(matrix)
    pruned = [factors.truncate(kept_rank(tuple(matrix.shape), rate)) for rate in RATES]
    return measure.since(start), pruned, factors.s


def randomized(matrix: torch.Tensor) -> tuple[tuple[float, float], list[torch.Tensor]]:
    """Seconds for one torch.svd_lowrank + reconstruction per rate (LASER's do_low_rank); the reconstructions."""
    start = measure.clocks()
    pruned = []
    for rate in RATES:
        u, s, v = torch.svd_lowrank(matrix, q=kept_rank(tuple(matrix.shape), rate), niter=2)
        pruned.append(u @ torch.diag(s) @ v.T)
    return measure.since(start), pruned


def errors(matrix: torch.Tensor, pruned: list[torch.Tensor]) -> list[float]:
    """||W - W_k||_F / ||W||_F, summed in float64 (a float32 sum over 10^7+ entries is off by ~1e-4)."""
    norm = torch.linalg.matrix_norm(matrix.double()).item()
    return [torch.linalg.matrix_norm((matrix - approx).double()).item() / norm for approx in pruned]


def optimum(matrix: torch.Tensor, singular: torch.Tensor) -> list[float]:
    energy = singular.double().square()
    return [math.sqrt(energy[kept_rank(tuple(matrix.shape), rate) :].sum().item() / energy.sum().item()) for rate in RATES]


def measure_shape(shape: tuple[int, int], repeats: int, seed: int, device: str) -> dict:
    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    exact_runs = [exact(matrix) for _ in range(repeats)]
    torch.manual_seed(seed)  # svd_lowrank's random draws
    random_runs = [randomized(matrix) for _ in range(repeats)]
    exact_wall, exact_cpu = (min(run[0][i] for run in exact_runs) for i in (0, 1))
    random_wall, random_cpu = (min(run[0][i] for run in random_runs) for i in (0, 1))
    return {
        "shape": list(shape),
        "exact_seconds": exact_wall,
        "randomized_seconds": random_wall,
        "ratio": random_wall / exact_wall,
        "exact_cpu_seconds": exact_cpu,
        "randomized_cpu_seconds": random_cpu,
        "cpu_ratio": random_cpu / exact_cpu,
        "ranks": [kept_rank(shape, rate) for rate in RATES],
        "optimal_error": optimum(matrix, exact_runs[0][2]),
        "exact_error": errors(matrix, exact_runs[0][1]),
        "randomized_error": errors(matrix, random_runs[0][1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="smollm2", help="comma list of presets (smollm2, gptj, llama2, all) or MxN")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per method; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the matrices live and the SVDs run (cpu, cuda)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = parse_shapes(args.shapes)
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(args.device) if cuda else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}: {where}")
    print(f"rates {list(RATES)}; best of {args.repeats}; float32\n")
    if cuda:  # the first call pays for the solver libraries' start-up; time neither side with it
        warm = torch.randn(64, 64, device=args.device)
        svd_factors(warm)
        torch.svd_lowrank(warm, q=8, niter=2)
    print(f"{'':>27}{'wall-clock seconds':^36}{'CPU seconds':^36}")
    header = f"{'exact 1 SVD+8':>14} {'8 randomized':>13} {'ratio':>7}"
    print(f"{'shape':>12} {'models':>13} {header} {header}   worst error above optimum")
    results = []
    started = time.perf_counter()
    for shape, models in shapes.items():
        row = measure_shape(shape, args.repeats, args.seed, args.device)
        row["models"] = models
        results.append(row)
        above_exact = max(e - o for e, o in zip(row["exact_error"], row["optimal_error"], strict=True))
        above_random = max(e - o for e, o in zip(row["randomized_error"], row["optimal_error"], strict=True))
        print(
            f"{'x'.join(map(str, shape)):>12} {','.join(models):>13} {row['exact_seconds']:>13.2f}s "
            f"{row['randomized_seconds']:>12.2f}s {row['ratio']:>6.1f}x {row['exact_cpu_seconds']:>13.2f}s "
            f"{row['randomized_cpu_seconds']:>12.2f}s {row['cpu_ratio']:>6.1f}x   "
            f"exact {above_exact:+.1e}, randomized {above_random:+.1e}",
            flush=True,
        )
    print("\nrelative Frobenius error per rate: optimum / exact / randomized")
    for row in results:
        cells = [
            f"{rate:g}: {o:.4f}/{e:.4f}/{r:.4f}"
            for rate, o, e, r in zip(RATES, row["optimal_error"], row["exact_error"], row["randomized_error"], strict=True)
        ]
        print(f"{'x'.join(map(str, row['shape'])):>12}  " + "  ".join(cells))
    total = time.perf_counter() - started
    rss = measure.peak_rss()
    print(f"\ntotal {total:.0f}s, peak RSS {rss / (1 << 30):.2f} GiB")
    if args.json:
        with open(args.json, "w") as handle:
            setup = {"rates": RATES, "threads": torch.get_num_threads(), "device": args.device}
            json.dump({**setup, "seconds": total, "peak_rss": rss, "shapes": results}, handle, indent=1)


if __name__ == "__main__":
    main()
