"""One unit of the powered study, float32 against the mixed path (bfloat16 + float32 re-scores), in one run.

The unit (Algorithm 1 at a fixed layer, then the test arms):

  validation  --validation examples under the 8 paper rates (0 included) of --layer's --module:
              one `evaluate_edits` call (the layer path); xi* = the rate of best validation accuracy;
  test        --test examples under every arm: unpruned, pruned at xi*, and the two null
              controls at xi* (random-subspace, matched-noise): one `evaluate_edits` call.

Every run also carries --calibration (default: contextual, domain and batch): their queries are
scored after the examples and every calibrated prediction counts in the agreement.

Both sides run the same prepared runs with the same options except `precision`; the SVD
factors are computed once before either side is timed.  Printed per side: process CPU seconds
(all threads; not wall), wall seconds, re-scored examples and the bound; then the CPU ratio,
prediction agreement over every validation rate and test arm (must be 100%), xi* of each side,
peak RSS after each side, and the load average before and after.

    OMP_NUM_THREADS=1 python benchmarks/study_speed.py --model smollm2-135m
    python benchmarks/study_speed.py --model qwen2.5-coder-0.5b --validation 100 --test 300
"""

from __future__ import annotations

import argparse
import json
import os

import measure
import model_flags
import torch

from svdicl.experiments.edits import evaluate_edits
from svdicl.experiments.runs import prepare_run
from svdicl.experiments.search import choose_rate
from svdicl.experiments.sweep import PAPER_RATES
from svdicl.prune import PruneSpec, pruned
from svdicl.targets import layer_stack


def side(loaded, validation, test, layer: int, module: str, precision: str, batch_size: int) -> dict:
    """The unit on one precision: CPU and wall seconds, predictions per cell, xi*."""
    started = measure.clocks()
    options = dict(batch_size=batch_size, precision=precision)
    edits = [(PruneSpec(layers=str(layer), modules=module, rate=r),) for r in PAPER_RATES]
    swept = [r for _, r in evaluate_edits(loaded, validation, edits, **options)]
    xi = choose_rate(PAPER_RATES, [r.accuracy.value for r in swept])
    arms = [
        (),
        *[
            (PruneSpec(layers=str(layer), modules=module, rate=xi, control=c),)
            for c in ("truncate", "random-subspace", "matched-noise")
        ],
    ]
    tested = [r for _, r in evaluate_edits(loaded, test, arms, **options)]
    wall, cpu = measure.since(started)
    results = swept + tested
    return {
        "precision": precision,
        "cpu_s": round(cpu, 1),
        "wall_s": round(wall, 1),
        "xi": xi,
        "predictions": [p for r in results for p in (r.predictions, *(c.calibrated.predictions for c in r.calibrated))],
        "accuracy": [round(r.accuracy.value, 4) for r in results],
        "rescored": sum(r.timing.get("rescored", 0) for r in results),
        "scored": sum(len(r.predictions) for r in results),
        "bound": max((r.timing.get("precision_bound") or 0) for r in results),
        "observed": max((r.timing.get("precision_observed") or 0) for r in results),
        "peak_rss_mib": round(measure.peak_rss() / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_flags.add(parser)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--validation", type=int, default=200, help="validation examples (the study: 200)")
    parser.add_argument("--test", type=int, default=1000, help="test examples per arm (the study: 1,000)")
    parser.add_argument("--layer", type=int, default=-1, help="the pruned layer (negative: from the end)")
    parser.add_argument("--module", default="mlp")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calibration", default="contextual,domain,batch", help="methods scored beside the raw scores, or none")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    loaded = model_flags.load(args)
    layer = args.layer % len(layer_stack(loaded.model)[1])
    methods = () if args.calibration == "none" else tuple(args.calibration.split(","))
    validation = prepare_run(loaded, args.task, split="validation", limit=args.validation, seed=0, calibration=methods)
    test = prepare_run(loaded, args.task, split="test", limit=args.test, seed=0, calibration=methods)
    with pruned(loaded.model, layers=layer, modules=args.module, rate=0.5):  # the SVD factors, outside both timings
        pass
    print(model_flags.describe(loaded, args.device), f"| {args.task} layer {layer} {args.module} | torch threads {args.threads}")
    print(f"unit: {args.validation} validation x {len(PAPER_RATES)} rates, then 4 arms x {args.test} test; calibration {methods}")
    sides = [side(loaded, validation, test, layer, args.module, p, args.batch_size) for p in ("float32", "mixed")]
    load_after = os.getloadavg()
    for s in sides:
        print(
            f"{s['precision']:>8}: {s['cpu_s']:8.1f} CPU-s  {s['wall_s']:8.1f} wall-s  xi*={s['xi']}  "
            f"re-scored {s['rescored']}/{s['scored']}  bound {s['bound']:.4f} (observed {s['observed']:.4f})  "
            f"peak RSS {s['peak_rss_mib']} MiB"
        )
    exact, mixed = sides
    cells = list(zip(exact["predictions"], mixed["predictions"], strict=True))
    same = sum(a == b for x, y in cells for a, b in zip(x, y, strict=True))
    total = sum(len(x) for x, _ in cells)
    arms = ["unpruned", "xi*", "random-subspace", "matched-noise"]
    names = [f"validation rate {r}" for r in PAPER_RATES] + [f"test {arm}" for arm in arms]
    per = len(exact["predictions"]) // len(names)  # raw, then each calibration's
    for k, (x, y) in enumerate(cells):
        for i in (i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b):
            method = "raw" if k % per == 0 else f"calibration {k % per}"
            print(f"  differs: {names[k // per]}, {method}, example {i}: {x[i]} vs {y[i]}")
    print(f"CPU ratio float32/mixed: {exact['cpu_s'] / mixed['cpu_s']:.2f}x")
    print(f"prediction agreement: {same}/{total} ({100 * same / total:.2f}%), xi* {exact['xi']} vs {mixed['xi']}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); {os.cpu_count()} CPUs")
    summary = {k: v for k, v in mixed.items() if k != "predictions"}
    print(json.dumps({"float32": {k: v for k, v in exact.items() if k != "predictions"}, "mixed": summary}))


if __name__ == "__main__":
    main()
