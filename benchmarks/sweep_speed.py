"""One layer's clipping-rate sweep: the paper's protocol against svdicl's fast path, side by side in one run.

For each layer, the same prepared run (svdicl's SST-2 validation examples, demonstrations and
token ids, so every side reads identical prompts) is scored at every rate three ways:

  (a) paper   the authors' protocol, written plainly: per rate, restore the layer's original
              matrices (reloaded from an in-memory copy of the loaded weights), replace each by
              torch.svd_lowrank(W, q=k, niter=2) reconstructed as U diag(S) V^T (LASER's
              do_low_rank), then one batch-1 forward of the full prompt (demonstrations + query)
              per example; the label words are read from a log-softmax at the answer position.
  (x) exact   the same plain loop with the exact truncation (torch.linalg.svd per rate): the
              reference for svdicl, which truncates exactly too.
  (b) svdicl  evaluate_edits over all rates with the options `svdicl sweep` uses (path auto: the
              shared prefix and the layer cache, one SVD per matrix); the SVD is timed with it.

k is svdicl's kept rank on every side; rate 0 leaves the weights as loaded on every side.
Printed: wall-clock and CPU seconds, (a)/(b) speed-up, prediction agreement of (b) with (a)
and with (x) per rate, accuracy per rate, peak RSS against --cache-memory.  The plain loops
are slow (one full forward per example and rate); --paper-examples N runs them on a fixed
seeded subset and extrapolates their time to all examples, marked "est." wherever it is used.

    nice -n 5 python benchmarks/sweep_speed.py --model smollm2-135m --examples 500 --layers -1 0 --rates paper --threads 2
    python benchmarks/sweep_speed.py --limit 8 --rates 0,0.9 --layers -1   # smoke run
    python benchmarks/sweep_speed.py --model meta-llama/Llama-2-7b-hf --random-weights --device cuda --dtype bfloat16 \
        --paper-examples 64   # a 7B-shaped model on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import random

import measure
import model_flags
import torch

from svdicl.experiments.cells import Scoring
from svdicl.experiments.edits import evaluate_edits
from svdicl.experiments.grid import PAPER_RATES, parse_rates
from svdicl.experiments.runs import EvalRun, prepare_run
from svdicl.memory import DEFAULT_CACHE_MEMORY, parse_memory
from svdicl.requests import Request
from svdicl.specs import PruneSpec
from svdicl.svd import cuda_driver, kept_rank
from svdicl.targets import layer_stack, parse_layers, resolve


def randomized(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """The authors' truncation (LASER's do_low_rank): a randomized SVD of rank k, niter=2 (in float32, as svdicl's SVD)."""
    u, s, v = torch.svd_lowrank(matrix.float(), q=k, niter=2)
    return u @ torch.diag(s) @ v.T


def exact(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """The paper's definition: the best rank-k approximation from a full SVD (float32)."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False, driver=cuda_driver(matrix))
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


@torch.no_grad()
def batch1_scores(model: torch.nn.Module, requests: list[Request]) -> list[list[float]]:
    """Summed log-probability of every candidate: one forward of the full prompt per example
    (per candidate when a candidate has several tokens), batch 1, no padding, no caches."""
    scores = []
    device = next(model.parameters()).device
    for request in requests:
        head = list(request.prefix + request.context)
        if all(len(c) == 1 for c in request.continuations):
            logprobs = model(torch.tensor([head], device=device)).logits[0, -1].float().log_softmax(-1)
            scores.append([logprobs[c[0]].item() for c in request.continuations])
            continue
        row = []
        for c in request.continuations:
            logits = model(torch.tensor([head + list(c[:-1])], device=device)).logits[0, -len(c) :]
            logprobs = logits.float().log_softmax(-1)
            row.append(sum(logprobs[j, token].item() for j, token in enumerate(c)))
        scores.append(row)
    return scores


def plain_sweep(model, weights: dict[str, torch.nn.Parameter], rates, requests, truncate, seed: int):
    """Per rate: reload the original matrices, truncate each with `truncate`, score batch 1. Returns seconds and scores."""
    originals = {name: w.detach().clone() for name, w in weights.items()}
    per_rate = []
    started = measure.clocks()
    for rate in rates:
        with torch.no_grad():
            for name, weight in weights.items():
                weight.copy_(originals[name])  # weights reloaded between rates
                k = kept_rank(tuple(weight.shape), rate)
                if k < min(weight.shape):
                    torch.manual_seed(seed)
                    weight.copy_(truncate(weight, k))
        per_rate.append(batch1_scores(model, requests))
    seconds = measure.since(started)
    with torch.no_grad():
        for name, weight in weights.items():
            weight.copy_(originals[name])
    return seconds, per_rate


def predictions(scores: list[list[float]]) -> list[int]:
    """Argmax per example, the lowest index on a tie (as svdicl chooses)."""
    return [max(range(len(row)), key=row.__getitem__) for row in scores]


def share(a, b) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def layer_weights(model, layer: int, modules: str) -> dict[str, torch.nn.Parameter]:
    """The matrices `modules` names in `layer`, as parameters (whole unfused weights only)."""
    targets = resolve(model, str(layer), modules)
    if any(t.blocks or t.transposed for t in targets):
        raise SystemExit("the plain reference truncates whole (out, in) weights; pick a model without fused or Conv1D modules")
    return {t.module_name: model.get_submodule(t.module_name).weight for t in targets}


def bench_layer(loaded, run: EvalRun, layer: int, args, subset: list[int], budget: int) -> dict:
    rates = args.rates
    model = loaded.model
    gold = run.gold
    edits = [[PruneSpec(str(layer), args.modules, rate)] for rate in rates]
    started = measure.clocks()
    results = [r for _, r in evaluate_edits(loaded, run, edits, **Scoring(cache_memory=budget).edit_options())]
    fast_seconds = measure.since(started)
    fast_rss = measure.peak_rss()
    weights = layer_weights(model, layer, args.modules)
    requests = [run.requests[i] for i in subset]
    paper_seconds, paper = plain_sweep(model, weights, rates, requests, randomized, args.seed)
    exact_seconds, reference = plain_sweep(model, weights, rates, requests, exact, args.seed) if args.exact else (None, None)
    scale = len(run.requests) / len(subset)
    rows = []
    for i, rate in enumerate(rates):
        fast = results[i].predictions
        on_subset = [fast[j] for j in subset]
        row = {
            "rate": rate,
            "ranks": sorted({kept_rank(tuple(w.shape), rate) for w in weights.values()}),
            "accuracy_svdicl": share(fast, gold),
            "accuracy_svdicl_subset": share(on_subset, [gold[j] for j in subset]),
            "accuracy_paper": share(predictions(paper[i]), [gold[j] for j in subset]),
            "agree_paper": share(on_subset, predictions(paper[i])),
        }
        if reference is not None:
            row["accuracy_exact"] = share(predictions(reference[i]), [gold[j] for j in subset])
            row["agree_exact"] = share(on_subset, predictions(reference[i]))
            pairs = [(results[i].scores[j].logprobs, ref) for j, ref in zip(subset, reference[i], strict=True)]
            row["max_logprob_difference_exact"] = max(abs(a - b) for ours, ref in pairs for a, b in zip(ours, ref, strict=True))
        rows.append(row)
    return {
        "layer": layer,
        "modules": args.modules,
        "matrices": sorted(weights),
        "path": results[0].timing.get("path"),
        "fallback": results[0].timing.get("fallback"),
        "passes": results[0].timing.get("passes"),
        "svdicl_seconds": fast_seconds[0],
        "svdicl_cpu_seconds": fast_seconds[1],
        "paper_examples": len(subset),
        "paper_seconds_measured": paper_seconds[0],
        "paper_cpu_seconds_measured": paper_seconds[1],
        "paper_seconds": paper_seconds[0] * scale,
        "paper_cpu_seconds": paper_seconds[1] * scale,
        "paper_extrapolated": scale != 1,
        "exact_seconds": None if exact_seconds is None else exact_seconds[0] * scale,
        "speedup": paper_seconds[0] * scale / fast_seconds[0],
        "cpu_speedup": paper_seconds[1] * scale / fast_seconds[1],
        "peak_rss_after_svdicl": fast_rss,
        "rates": rows,
    }


def report(row: dict, examples: int) -> None:
    est = " est." if row["paper_extrapolated"] else ""
    print(f"\nlayer {row['layer']} {row['modules']} ({', '.join(row['matrices'])})")
    print(f"  svdicl path: {row['path']} (passes: {row['passes']}){'; fallback: ' + row['fallback'] if row['fallback'] else ''}")
    if row["paper_extrapolated"]:
        print(
            f"  (a) and (x) ran on a fixed seeded subset of {row['paper_examples']} of the {examples} examples; "
            f"their times below are extrapolated per example to all {examples} ('est.'); "
            f"(a) measured {row['paper_seconds_measured']:.1f} s wall, {row['paper_cpu_seconds_measured']:.1f} s CPU"
        )
    print(
        f"  (a) paper {row['paper_seconds']:.1f} s wall{est}, {row['paper_cpu_seconds']:.1f} s CPU{est}   "
        f"(b) svdicl {row['svdicl_seconds']:.1f} s wall, {row['svdicl_cpu_seconds']:.1f} s CPU   "
        f"speed-up {row['speedup']:.1f}x wall{est}, {row['cpu_speedup']:.1f}x CPU{est}"
    )
    if row["exact_seconds"] is not None:
        print(f"  (x) exact plain batch-1 {row['exact_seconds']:.1f} s wall{est}")
    subset = row["paper_extrapolated"]
    header = f"  {'rate':>6} {'k':>9} {'acc (b)':>8}" + (f" {'(b) sub':>8}" if subset else "") + f" {'acc (a)':>8}"
    has_exact = "agree_exact" in row["rates"][0]
    header += f" {'acc (x)':>8}" * has_exact + f" {'(b)=(a)':>8}" + f" {'(b)=(x)':>8} {'max |dlogp| (b)-(x)':>20}" * has_exact
    print(header)
    for r in row["rates"]:
        ranks = "/".join(map(str, r["ranks"]))
        line = f"  {r['rate']:>6g} {ranks:>9} {r['accuracy_svdicl']:>8.3f}"
        line += f" {r['accuracy_svdicl_subset']:>8.3f}" if subset else ""
        line += f" {r['accuracy_paper']:>8.3f}"
        if has_exact:
            line += f" {r['accuracy_exact']:>8.3f}"
        line += f" {r['agree_paper']:>8.1%}"
        if has_exact:
            line += f" {r['agree_exact']:>8.1%} {r['max_logprob_difference_exact']:>20.1e}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_flags.add(parser)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--examples", "--limit", type=int, default=500, help="examples of the split (svdicl's --limit rule)")
    parser.add_argument("--shots", type=int, default=None, help="demonstrations per class (default: the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="demonstrations, the subset and svd_lowrank's draws")
    parser.add_argument("--layers", nargs="+", default=["-1", "0"], help="each swept alone, e.g. -1 0")
    parser.add_argument("--modules", default="mlp")
    parser.add_argument("--rates", default="paper", help="'paper' (the 8 rates) or a comma list")
    parser.add_argument("--paper-examples", type=int, default=None, help="run (a) and (x) on this many examples, extrapolate")
    parser.add_argument("--no-exact", dest="exact", action="store_false", help="skip the exact plain reference (x)")
    parser.add_argument("--cache-memory", default=DEFAULT_CACHE_MEMORY, type=parse_memory, help="svdicl's budget (4GiB)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args()
    args.rates = PAPER_RATES if args.rates == "paper" else parse_rates(args.rates)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = measure.clocks()
    loaded = model_flags.load(args)
    loaded_rss = measure.peak_rss()
    model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    run = prepare_run(loaded, args.task, split=args.split, shots=args.shots, seed=args.seed, limit=args.examples)
    n = len(run.requests)
    subset = list(range(n))
    if args.paper_examples is not None and args.paper_examples < n:
        subset = sorted(random.Random(f"paper:{args.seed}").sample(range(n), args.paper_examples))
    layers = [parse_layers(text, len(layer_stack(loaded.model)[1]))[0] for text in args.layers]
    tokens = sum(len(r.prefix) + len(r.context) for r in run.requests) / n
    print(f"{model_flags.describe(loaded, args.device)}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"{args.task} {args.split}: {n} examples, {run.shots} shots per class, "
        f"prompt {len(run.requests[0].prefix)} demonstration + {tokens - len(run.requests[0].prefix):.1f} query tokens (mean)"
    )
    print(f"rates {list(args.rates)}; layers {layers} {args.modules}; (a)/(x) on {len(subset)} of {n} examples")
    print("load average (1, 5, 15 min) at the start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    rows = []
    for layer in layers:
        rows.append(bench_layer(loaded, run, layer, args, subset, args.cache_memory))
        report(rows[-1], n)
    rss, gib = measure.peak_rss(), 1 << 30
    after = max(r["peak_rss_after_svdicl"] for r in rows)
    print(
        f"\npeak RSS {rss / gib:.2f} GiB (model loaded: {loaded_rss / gib:.2f} GiB; "
        f"after the svdicl sweeps: {after / gib:.2f} GiB); --cache-memory budget {args.cache_memory / gib:.2f} GiB: "
        f"{'within' if rss <= args.cache_memory else 'OVER'}"
    )
    gpu = measure.gpu_peak(args.device)
    if gpu is not None:
        print(f"peak GPU memory allocated {gpu / gib:.2f} GiB (model {model_bytes / gib:.2f} GiB)")
    print("total {:.0f} s; load average at the end: {:.2f} {:.2f} {:.2f}".format(measure.since(started)[0], *os.getloadavg()))
    if args.json:
        summary = {
            "model": loaded.source,
            "dtype": args.dtype,
            "device": args.device,
            "peak_gpu_memory": gpu,
            "task": args.task,
            "examples": n,
            "threads": torch.get_num_threads(),
            "peak_rss": rss,
            "cache_memory": args.cache_memory,
            "layers": rows,
        }
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=1)


if __name__ == "__main__":
    main()
