"""svdicl's evaluation against a raw model forward over the same token sequences: prompt tokens per second.

One prepared run (SST-2 test examples with the paper's demonstrations, unpruned model) is scored
three ways, interleaved per repeat so machine load hits all alike:

  raw      model(input_ids, attention_mask, position_ids, logits_to_keep=1) over each example's
           full prompt (demonstrations + query), batches of --batch-size in svdicl's order
           (longest first, left-padded), then a log-softmax over the label words' logits: the
           least a correct batched harness does
  plain    svdicl's plain path (evaluate_run(path="plain")): the same sequences and batches
  default  svdicl's default path (evaluate_run(), path auto: the demonstrations' keys/values
           once, then each example's own tokens)
  layer    svdicl's layer path (evaluate_edits with one edit at --layer, 1% of its MLP's rank
           cut, SVD computed before timing): the layers below --layer once, then the layers above

Every side is credited with the same prompt tokens (padding excluded), so tokens/s are
comparable; the default path runs far fewer of them.  The "work" column compares how fast each
side runs the tokens it does run: token-layers forwarded per CPU second against raw's (raw and
plain forward every prompt token through every layer; default and layer the shared prefix once
and each example's own tokens once through every layer).  Printed: seconds (wall, CPU), prompt
tokens/s, each svdicl path's ratio to raw, the work ratio, prediction agreement with raw, peak RSS.

    nice -n 5 python benchmarks/throughput.py --model smollm2-135m --examples 256 --threads 2
    python benchmarks/throughput.py --model meta-llama/Llama-2-7b-hf --random-weights --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os

import measure
import model_flags
import torch

from svdicl.experiments.edits import evaluate_edits
from svdicl.experiments.run_scoring import evaluate_run
from svdicl.experiments.runs import prepare_run
from svdicl.prune import pruned
from svdicl.requests import Request, shared_prefix
from svdicl.specs import PruneSpec


@torch.inference_mode()
def raw_predictions(model: torch.nn.Module, requests: list[Request], batch_size: int, pad_id: int) -> list[int]:
    """Label-word argmax per request from a plain batched forward of prefix + query (single-token label words)."""
    if any(len(c) != 1 for r in requests for c in r.continuations):
        raise SystemExit("the raw forward reads one position per example; pick a task whose label words are one token each")
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prefix + requests[i].context))
    chosen = [0] * len(requests)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        rows = [requests[i].prefix + requests[i].context for i in batch]
        width = max(map(len, rows))
        ids = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in rows])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
        logits = model(**{k: v.to(device) for k, v in inputs.items()}, logits_to_keep=1).logits[:, -1].cpu()
        logprobs = logits.float().log_softmax(-1)
        for b, i in enumerate(batch):
            labels = torch.tensor([c[0] for c in requests[i].continuations])
            chosen[i] = int(logprobs[b, labels].argmax())
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_flags.add(parser)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--split", default="test")
    parser.add_argument("--examples", "--limit", type=int, default=256, help="examples of the split (svdicl's --limit rule)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the best of each side is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--layer", type=int, default=17, help="the layer path's edited layer (17: SmolLM2's by condition number)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = model_flags.load(args)
    run = prepare_run(loaded, args.task, split=args.split, limit=args.examples)
    requests = list(run.requests)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    tokens = sum(len(r.prefix) + len(r.context) for r in requests)
    shared = len(shared_prefix(run.scored_requests))  # run once by the default and layer paths
    load = os.getloadavg()
    raw_predictions(loaded.model, requests[: args.batch_size], args.batch_size, pad_id)  # warm-up
    edit = (PruneSpec(layers=str(args.layer), modules="mlp", rate=0.01),)
    with pruned(loaded.model, specs=edit):  # the SVD factors, outside every timing
        pass
    sides = {
        "raw": lambda: raw_predictions(loaded.model, requests, args.batch_size, pad_id),
        "plain": lambda: evaluate_run(loaded, run, batch_size=args.batch_size, path="plain"),
        "default": lambda: evaluate_run(loaded, run, batch_size=args.batch_size),
        "layer": lambda: next(iter(evaluate_edits(loaded, run, [edit], batch_size=args.batch_size)))[1],
    }
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    answers: dict = {}
    for _ in range(args.repeats):
        for name, side in sides.items():
            started = measure.clocks()
            answers[name] = side()
            seconds[name].append(measure.since(started))
    raw = answers["raw"]
    print(f"{model_flags.describe(loaded, args.device)}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"{args.task} {args.split}: {len(requests)} examples, {tokens} prompt tokens "
        f"({len(requests[0].prefix)} demonstration tokens each), batch {args.batch_size}, best of {args.repeats}"
    )
    header = f"{'side':>8} {'path':>7} {'wall s':>8} {'CPU s':>8} {'tokens/s':>9} {'ratio':>7} {'CPU ratio':>9} {'work':>7}"
    print(f"{header} {'= raw':>7}")
    best = {name: (min(s[0] for s in runs), min(s[1] for s in runs)) for name, runs in seconds.items()}
    rows = {}
    for name in sides:
        wall, cpu = best[name]
        path = "raw" if name == "raw" else answers[name].timing["path"]
        predictions = raw if name == "raw" else list(answers[name].predictions)
        agree = sum(a == b for a, b in zip(predictions, raw, strict=True)) / len(raw)
        forwarded = tokens if name in ("raw", "plain") else answers[name].timing["tokens_forwarded"] + shared
        rows[name] = {
            "path": path,
            "wall_s": wall,
            "cpu_s": cpu,
            "tokens_per_s": tokens / wall,
            "ratio": best["raw"][0] / wall,
            "cpu_ratio": best["raw"][1] / cpu,
            "work_ratio": (forwarded / cpu) / (tokens / best["raw"][1]),
            "agreement_with_raw": agree,
        }
        print(
            f"{name:>8} {path:>7} {wall:>8.1f} {cpu:>8.1f} {tokens / wall:>9.1f} {rows[name]['ratio']:>6.2f}x "
            f"{rows[name]['cpu_ratio']:>8.2f}x {rows[name]['work_ratio']:>6.2f}x {agree:>7.1%}"
        )
    rss = measure.peak_rss()
    gpu = measure.gpu_peak(args.device)
    print(f"peak RSS {rss / (1 << 30):.2f} GiB" + ("" if gpu is None else f", peak GPU memory {gpu / (1 << 30):.2f} GiB"))
    print("load average (1, 5, 15 min) at the start: {:.2f} {:.2f} {:.2f}".format(*load))
    print("load average at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    if args.json:
        summary = {
            "model": loaded.source,
            "dtype": args.dtype,
            "device": args.device,
            "examples": len(requests),
            "prompt_tokens": tokens,
            "peak_rss": rss,
            "peak_gpu_memory": gpu,
            "sides": rows,
        }
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=1)


if __name__ == "__main__":
    main()
