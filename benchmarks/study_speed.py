"""One unit of the powered study (docs/STUDY.md), a baseline revision's code against this tree's, side by side in one run.

The unit is Algorithm 1 at a fixed layer with every arm the study reports: --validation
examples under the paper's 8 rates, then --test examples under the unpruned model, the pruned
one at each rate* (raw and per calibration), the contextual, domain and batch calibrations, and
both null controls at each pruned rate.  Each side runs it as `svdicl search` in its own process
(one torch thread, a fresh output folder, the shared model cache), one side after the other:

  baseline  the code at --baseline (default 5b0628a: the start of this speed work, which already
            had every arm and the mixed path), checked out in a temporary git worktree; float32
  float32   this tree, float32
  mixed     this tree, --precision mixed (bfloat16, float32 re-scores of what could differ)

Printed per side: CPU seconds (user + system of the process and its children, from wait4), wall
seconds, peak RSS, the load average before and after; then each side's CPU ratio to the baseline
and its agreement with the baseline's predictions over every cell (validation rates, test arms,
controls), raw and under each calibration: it must be 100%.  The thread policy's choice for the
machine as it is (`svdicl.threads.thread_plan`) is printed beside the load, but every side runs
single-threaded so CPU seconds compare.

    python benchmarks/study_speed.py --model smollm2-135m --layer 17
    python benchmarks/study_speed.py --model qwen2.5-coder-0.5b --layer 5 --validation 100 --test 300
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from svdicl.threads import thread_plan

ROOT = Path(__file__).resolve().parent.parent

DUMP = """
import json, sys
from svdicl.store import Store
store = Store(sys.argv[1])
found = {}
for cell in store.cells():
    key = f"{cell.key.split} {cell.key.edit} seed {cell.key.seed}"
    found[key] = [[s["prediction"], *(c["prediction"] for _, c in sorted(s.get("calibrated", {}).items()))]
                  for s in store.samples(cell)]
json.dump(found, sys.stdout)
"""


def run_side(tree: Path, args: argparse.Namespace, out: Path, precision: str) -> dict:
    """`svdicl search` of the unit in `tree`: CPU and wall seconds, peak RSS, and every cell's predictions."""
    command = [
        sys.executable, "-m", "svdicl", "search", "--model", args.model, "--task", args.task, "--module", args.module,
        "--layer", str(args.layer), "--limit-validation", str(args.validation), "--limit-test", str(args.test),
        "--seeds", "0", "--calibration", "contextual,domain,batch", "--arms", "all", "--workers", "1",
        "--threads-per-worker", "1", "--precision", precision, "--no-report", "--output", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    load = os.getloadavg()[0]
    started = time.perf_counter()
    log = out.with_suffix(".log")  # a file, not a pipe: a pipe nobody reads fills up and stops the run
    with log.open("w") as errors:
        process = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{tree.name} ({precision}) failed: {log.read_text()[-2000:]}")
    dump = subprocess.run(
        [sys.executable, "-c", DUMP, str(out)], cwd=tree, env=env, capture_output=True, text=True, check=True
    ).stdout
    return {
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "predictions": json.loads(dump),
    }


def agreement(base: dict, other: dict) -> tuple[int, int, list[str]]:
    """Equal predictions over the baseline's cells (raw and each calibration), their count, and where they differ."""
    same = total = 0
    differs = []
    for cell, rows in base.items():
        mine = other.get(cell)
        if mine is None:
            differs.append(f"{cell}: missing")
            continue
        for i, (a, b) in enumerate(zip(rows, mine, strict=True)):
            total += len(a)
            same += sum(x == y for x, y in zip(a, b, strict=True))
            if a != b:
                differs.append(f"{cell} example {i}: {a} vs {b}")
    return same, total, differs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--module", default="mlp")
    parser.add_argument("--layer", type=int, default=17, help="the pruned layer (17: SmolLM2's MLP layer by condition number)")
    parser.add_argument("--validation", type=int, default=200, help="validation examples (the study: 200)")
    parser.add_argument("--test", type=int, default=1000, help="test examples per arm (the study: 1,000)")
    parser.add_argument("--baseline", default="5b0628a", help="git revision whose float32 path is the baseline")
    parser.add_argument("--sides", default="baseline,float32,mixed", help="which sides to run, in order")
    args = parser.parse_args()
    plan = thread_plan()
    print(f"{args.model} | {args.task} layer {args.layer} {args.module} | {args.validation} validation x 8 rates, "
          f"{args.test} test x every arm | thread policy now: {plan.describe()}; each side runs 1 worker x 1 thread")  # fmt: skip
    sides = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))  # so the temporary worktree is removed on `kill` too
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        old = scratch / "baseline-tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.baseline], check=True)
        try:
            for side in args.sides.split(","):
                tree, precision = (old, "float32") if side == "baseline" else (ROOT, side)
                sides[side] = run_side(tree, args, scratch / side, precision)
                s = sides[side]
                print(f"{side:>9}: {s['cpu_s']:8.1f} CPU-s {s['wall_s']:8.1f} wall-s  peak RSS {s['peak_rss_mib']} MiB  "
                      f"load {s['load_before']} -> {s['load_after']}", flush=True)  # fmt: skip
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    base = sides.get("baseline") or next(iter(sides.values()))
    for side, s in sides.items():
        same, total, differs = agreement(base["predictions"], s["predictions"])
        print(f"{side:>9}: CPU ratio baseline/side {base['cpu_s'] / s['cpu_s']:.2f}x, predictions equal to the baseline's "
              f"{same}/{total} ({100 * same / max(total, 1):.2f}%) over {len(base['predictions'])} cells")  # fmt: skip
        for line in differs[:10]:
            print(f"           differs: {line}")
    print(json.dumps({side: {k: v for k, v in s.items() if k != "predictions"} for side, s in sides.items()}))


if __name__ == "__main__":
    main()
