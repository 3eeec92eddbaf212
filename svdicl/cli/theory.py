"""`svdicl theory lemma1 | norms | linreg`: the paper's theory (section 3, appendix A, fig 5), checked numerically."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from svdicl.cli.common import add_model_args, load, log
from svdicl.errors import SvdiclError

RATES_HELP = "clipping rates (default: the paper's 0 0.1 0.5 0.75 0.9 0.95 0.99 0.995)"


def add(sub) -> None:
    """Register `svdicl theory` and its checks (lemma1, norms, linreg) on the subparsers `sub`."""
    p = sub.add_parser(
        "theory",
        help="check the paper's theory numerically: Lemma 1 / Theorem 1, Examples 1-4, in-context linear regression",
        description="Numerical checks of the paper's theory. Each check writes JSON, CSV and figures (PNG + SVG) to --output.",
    )
    checks = p.add_subparsers(dest="check", required=True, metavar="CHECK")
    _add_lemma1(checks)
    _add_norms(checks)
    _add_linreg(checks)
    for parser in checks.choices.values():
        parser.add_argument("--format", nargs="+", default=["png", "svg"], choices=["png", "svg", "pdf"], help="figure formats")


def _add_lemma1(checks) -> None:
    p = checks.add_parser(
        "lemma1",
        help="Lemma 1 and Theorem 1: linear attention = zero-shot path + implicit update, per layer and through a stack",
        description="Over random float64 draws, compare a linear-attention layer (and an L-layer stack) computed directly "
        "with its dual form W0 x + dW x, dW = sum_i (W_V x'_i)(W_K x'_i)^T W_Q; check rank(dW) <= n; run deliberately "
        "perturbed constructions through the same check (they must fail it). Exit status 1 if a claim fails.",
    )
    p.add_argument("--draws", type=int, default=100, help="random draws (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    p.add_argument("--dim", type=int, default=8, help="token width d (default: 8)")
    p.add_argument("--layers", type=int, default=4, help="layers of the Theorem 1 stack (default: 4)")
    p.add_argument(
        "--max-demos", type=int, default=16, help="demonstrations per draw: 1..N, so both n < d and n > d occur (default: 16)"
    )
    p.add_argument("--tolerance", type=float, default=1e-10, help="largest relative error that passes (default: 1e-10)")
    p.add_argument("--output", required=True, help="folder for lemma1.json, lemma1.csv and lemma1.{png,svg}")
    p.set_defaults(handler=run_lemma1)


def _add_norms(checks) -> None:
    from svdicl.theory.norms import RATES

    p = checks.add_parser(
        "norms",
        help="Examples 1-4: truncating W_V, W_K, W_Q or the MLP lowers the bound on the implicit gradient's norm",
        description="Norm of the implicit gradient dW and its Frobenius upper bound before and after truncation at each rate, "
        "on random matrices and on a real model's layers with X' = the hidden states of a real demonstrations block "
        "entering each layer. Writes norms.csv, norms.json and norms.{png,svg}.",
    )
    add_model_args(p)
    data = p.add_argument_group("demonstrations (real model)")
    data.add_argument("--task", default="sst2", help="task whose demonstrations block feeds the model (default: sst2)")
    data.add_argument("--shots", type=int, help="demonstrations per class (default: the task's, 5 for SST-2)")
    data.add_argument("--seed", type=int, default=0, help="demonstration seed, also the seed of the random draws (default: 0)")
    data.add_argument("--data-dir", help="folder of <task>/<split>.jsonl files (default: env SVDICL_DATA)")
    data.add_argument("--layers", default="all", help="model layers: all (default), 0-3, first2,last2, ...")
    data.add_argument("--random-only", action="store_true", help="skip the real model: random matrices only")
    rand = p.add_argument_group("random matrices")
    rand.add_argument("--draws", type=int, default=100, help="random blocks (default: 100)")
    rand.add_argument("--dim", type=int, default=64, help="width d of the random blocks (default: 64)")
    rand.add_argument("--demos", type=int, default=32, help="demonstration tokens per random block (default: 32)")
    p.add_argument("--rates", type=float, nargs="+", default=list(RATES), help=RATES_HELP)
    p.add_argument("--output", required=True, help="folder for norms.csv, norms.json and norms.{png,svg}")
    p.set_defaults(handler=run_norms)


def _add_linreg(checks) -> None:
    from svdicl.theory.linreg import LinRegConfig
    from svdicl.theory.norms import RATES

    d = LinRegConfig()
    p = checks.add_parser(
        "linreg",
        help="train a small GPT-2 on in-context linear regression, compare with least squares, prune shallow vs deep",
        description="Garg et al. 2022 / the paper's fig 5: a GPT-2 backbone trained from scratch on prompts "
        "(x_1, w.x_1, ..., x_k, w.x_k, x_query). Reports squared error / d against the number of shots at every checkpoint "
        "next to least squares, ridge, averaging and the zero predictor, then prunes shallow and deep layers with svdicl. "
        "Checkpoints (safetensors) and state.json make a rerun resume where it stopped.",
    )
    m = p.add_argument_group("model and training")
    m.add_argument("--dim", type=int, default=d.dim, help=f"dimension d of x and w (default: {d.dim})")
    m.add_argument("--points", type=int, default=d.points, help=f"(x, y) pairs per prompt: 0..N-1 shots (default: {d.points})")
    m.add_argument("--layers", type=int, default=d.layers, help=f"GPT-2 layers (default: {d.layers})")
    m.add_argument("--width", type=int, default=d.width, help=f"hidden width (default: {d.width})")
    m.add_argument("--heads", type=int, default=d.heads, help=f"attention heads (default: {d.heads})")
    m.add_argument("--batch-size", type=int, default=d.batch_size, help=f"prompts per step (default: {d.batch_size})")
    m.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default: {d.steps})")
    m.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default: {d.lr:g})")
    m.add_argument("--warmup", type=int, default=d.warmup, help=f"linear warmup steps, then cosine decay (default: {d.warmup})")
    m.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default: {d.weight_decay:g})")
    m.add_argument("--noise", type=float, default=d.noise, help=f"label noise std (default: {d.noise:g})")
    m.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help=f"steps (default: {d.checkpoint_every})")
    m.add_argument(
        "--seed", type=int, default=d.seed, help=f"seed of init, training batches and held-out prompts (default: {d.seed})"
    )
    m.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, fastest for a model this small)")
    e = p.add_argument_group("evaluation and pruning")
    e.add_argument("--eval-prompts", type=int, default=2000, help="held-out prompts (default: 2000)")
    e.add_argument("--ridge", type=float, default=0.1, help="ridge baseline's lambda (default: 0.1)")
    e.add_argument("--prune-layers", default="first2,last2", help="layers to prune one at a time (default: first2,last2)")
    e.add_argument("--prune-modules", default="attn,mlp", help="module groups, comma list (default: attn,mlp)")
    e.add_argument("--rates", type=float, nargs="+", default=list(RATES), help=RATES_HELP)
    e.add_argument("--shots", type=int, help="shots of the pruning table (default: the largest, points - 1)")
    p.add_argument("--output", required=True, help="folder of the run: checkpoints/, state.json, linreg.json, CSVs, figures")
    p.add_argument("--overwrite", action="store_true", help="discard a run of a different config in --output")
    p.set_defaults(handler=run_linreg)


def _output(path: str) -> Path:
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SvdiclError(f"--output {folder} is a file; give a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_json(path: Path, value: dict) -> Path:
    from svdicl.provenance import versions

    path.write_text(json.dumps({**value, "versions": versions()}, indent=2) + "\n")
    return path


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise SvdiclError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")


def run_lemma1(args: argparse.Namespace) -> int:
    """Check Lemma 1 / Theorem 1 on random draws and write the JSON, CSV and figure."""
    from svdicl.report import save_figure, write_csv
    from svdicl.theory.figures import lemma1_figure
    from svdicl.theory.lemma1 import PERTURBED, draw_one, summarize

    _positive(args, "draws", "dim", "layers", "max_demos")
    if not 0 <= args.tolerance < float("inf"):  # NaN fails this too: every comparison with it is false
        raise SvdiclError(f"--tolerance must be a finite number >= 0, not {args.tolerance}")
    output = _output(args.output)
    draws = [draw_one(i, seed=args.seed, dim=args.dim, layers=args.layers, max_demos=args.max_demos) for i in range(args.draws)]
    summary = summarize(draws, args.dim, args.tolerance)
    settings = {k: getattr(args, k) for k in ("draws", "seed", "dim", "layers", "max_demos", "tolerance")}
    files = [
        _write_json(
            output / "lemma1.json",
            {"check": "lemma1", "settings": settings, "summary": summary, "draws": [asdict(d) for d in draws]},
        )
    ]
    names = list(PERTURBED)
    headers = ["draw", "n_demos", "query_tokens", "lemma1_error", "theorem1_error"]
    headers += [f"perturbed_{kind}_{n}" for kind in ("lemma1", "theorem1") for n in names] + ["ranks", "pruned_layer"]
    rows = [
        [
            d.draw,
            d.n_demos,
            d.query_tokens,
            d.lemma1_error,
            d.theorem1_error,
            *(d.perturbed_lemma1[n] for n in names),
            *(d.perturbed_theorem1[n] for n in names),
            " ".join(map(str, d.ranks)),
            d.pruned_layer,
        ]
        for d in draws
    ]
    files.append(write_csv(output / "lemma1.csv", headers, rows))
    files += save_figure(lemma1_figure(draws, args.dim, args.tolerance), output / "lemma1", args.format)
    ok = summary["lemma1_holds"] and summary["theorem1_holds"] and summary["perturbed_all_fail"]
    ok = ok and summary["rank_bound_holds"] and summary["locality_holds"]
    print(f"{args.draws} draws, d = {args.dim}, {args.layers}-layer stack, float64, tolerance {args.tolerance:g}")
    print(f"  Lemma 1    max relative error {summary['lemma1_max_error']:.2e}   {_verdict(summary['lemma1_holds'])}")
    print(f"  Theorem 1  max relative error {summary['theorem1_max_error']:.2e}   {_verdict(summary['theorem1_holds'])}")
    for name, error in summary["perturbed_min_error"].items():
        verdict = _verdict(error > args.tolerance, "fails the check, as it must")
        print(f"  perturbed {name:<16} min relative error {error:.2e}   {verdict}")
    print(f"  rank(dW) <= n in every layer of every draw: {_verdict(summary['rank_bound_holds'])}")
    print(f"  truncating layer j changes dW^l exactly for l >= j: {_verdict(summary['locality_holds'])}")
    for path in files:
        log(args, f"wrote {path}")
    return 0 if ok else 1


def _verdict(ok: bool, text: str = "holds") -> str:
    return text if ok else "FAILS"


def run_norms(args: argparse.Namespace) -> int:
    """Check Examples 1-4 (truncation lowers the implicit-gradient norm bound) and write the results."""
    from svdicl.report import save_figure, write_csv
    from svdicl.svd import check_rate
    from svdicl.theory.figures import norms_figure
    from svdicl.theory.norms import EXAMPLES, NormRow, random_sweep, summarize

    _positive(args, "draws", "dim", "demos")
    rates = sorted({0.0, *(check_rate(r) for r in args.rates)})
    output = _output(args.output)
    log(args, f"random blocks: {args.draws} draws, d = {args.dim}, {args.demos} demonstration tokens")
    rows = random_sweep(args.draws, seed=args.seed, dim=args.dim, demos=args.demos, rates=rates)
    settings = {k: getattr(args, k) for k in ("seed", "draws", "dim", "demos")} | {"rates": rates}
    if not args.random_only:
        rows_model, details = _model_norms(args, rates)
        rows += rows_model
        settings |= details
    sources = list(dict.fromkeys(r.source for r in rows))
    summary = {source: summarize([r for r in rows if r.source == source], rates) for source in sources}
    files = [_write_json(output / "norms.json", {"check": "norms", "settings": settings, "summary": summary})]
    columns = list(NormRow.__dataclass_fields__)
    files.append(write_csv(output / "norms.csv", columns, [[getattr(r, c) for c in columns] for r in rows]))
    files += save_figure(norms_figure(rows, rates), output / "norms", args.format)
    for source in sources:
        print(
            f"{source}: mean bound ratio after/before (exact ratio in brackets); bound never rises in "
            + ", ".join(f"{e} {100 * f:.0f}%" for e, f in summary[source]["bound_non_increasing"].items())
            + " of curves"
        )
        print("  rate    " + "".join(f"{e:>20}" for e in EXAMPLES))
        for i, rate in enumerate(rates):
            cells = "".join(
                f"{summary[source]['mean_bound_ratio'][e][i]:>10.4f} ({summary[source]['mean_exact_ratio'][e][i]:.4f})"
                for e in EXAMPLES
            )
            print(f"  {rate:<7g} {cells}")
    for path in files:
        log(args, f"wrote {path}")
    ok = all(all(f == 1.0 for f in s["bound_non_increasing"].values()) and s["exact_within_bound"] for s in summary.values())
    return 0 if ok else 1


def _model_norms(args: argparse.Namespace, rates: list[float]):
    import torch

    from svdicl.prompts import demonstrations_text, sample_demonstrations
    from svdicl.targets import layer_stack, parse_layers
    from svdicl.tasks import get_task
    from svdicl.tasks.data import load_splits
    from svdicl.theory.norms import model_sweep

    task = get_task(args.task)
    shots = task.shots if args.shots is None else args.shots
    if shots < 1:
        raise SvdiclError("--shots must be at least 1: the norms need a demonstrations block")
    splits = load_splits(task, args.data_dir)
    text = demonstrations_text(task, sample_demonstrations(task, splits.demonstrations, shots, args.seed))
    loaded = load(args)
    _, stack = layer_stack(loaded.model)
    layers = parse_layers(args.layers, len(stack))
    input_ids = torch.tensor([loaded.tokenizer(text, add_special_tokens=True)["input_ids"]], device=args.device)
    log(args, f"{loaded.source}: {input_ids.shape[1]} demonstration tokens of {task.name} ({shots} per class, seed {args.seed})")
    rows = model_sweep(loaded.model, input_ids, layers, rates, source=loaded.source, progress=not args.quiet)
    details = {
        "model": loaded.source,
        "fingerprint": loaded.fingerprint,
        "task": task.name,
        "shots_per_class": shots,
        "demonstration_tokens": int(input_ids.shape[1]),
        "layers": layers,
        "demonstrations": text,
    }
    return rows, details


def run_linreg(args: argparse.Namespace) -> int:
    """Train (or resume) the in-context linear regression model, compare it with baselines, prune it: every flag
    checked first, then --output taken (one run at a time; --overwrite clears only svdicl's files)."""
    from svdicl.outputs import check_clearable, clear_output, exclusive, is_empty, reopen_output
    from svdicl.svd import check_rate
    from svdicl.targets import parse_layers, resolve
    from svdicl.theory.linreg import LinRegConfig, build

    config = LinRegConfig(
        dim=args.dim,
        points=args.points,
        layers=args.layers,
        width=args.width,
        heads=args.heads,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        noise=args.noise,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    ).check()
    _positive(args, "eval_prompts", "threads")
    rates = sorted({0.0, *(check_rate(r) for r in args.rates)})
    prune_layers = parse_layers(args.prune_layers, config.layers)
    modules = [m.strip() for m in args.prune_modules.split(",") if m.strip()]
    shots = config.points - 1 if args.shots is None else args.shots
    if not 0 <= shots < config.points:
        raise SvdiclError(f"--shots {shots} is outside 0..{config.points - 1} (prompts hold {config.points} points)")
    for module in modules:  # every input is checked before --overwrite clears anything
        resolve(build(config), ",".join(map(str, prune_layers)), module)
    if args.overwrite and not is_empty(args.output):
        check_clearable(Path(args.output))  # refused before the folder is touched at all
    with exclusive(args.output, "theory linreg") as output:
        if args.overwrite and not is_empty(output):
            clear_output(output)  # only what svdicl wrote there (its manifest); never a folder it did not write
        return _linreg(args, config, reopen_output(output), rates, prune_layers, modules, shots)


def _linreg(args, config, output: Path, rates: list[float], prune_layers: list[int], modules: list[str], shots: int) -> int:
    """The linreg run in `output`, which this process holds: train or resume, evaluate, prune, write, print."""
    import torch

    from svdicl.outputs import finish_output
    from svdicl.report import save_figure, write_csv
    from svdicl.theory.figures import linreg_figure, pruning_figure
    from svdicl.theory.linreg import baseline_curves, held_out, learned, load_checkpoint, model_curve, prune_sweep, train

    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model, state = train(config, output, progress=not args.quiet)
    log(args, f"training: {state['step']} steps, {state['train_seconds']:.0f} s of training time in total")
    prompts = held_out(config, args.eval_prompts)
    baselines = baseline_curves(prompts, args.ridge)
    checkpoints = [
        (step, model_curve(f"step {step}", load_checkpoint(config, output, step), prompts)) for step in state["checkpoints"]
    ]
    final = checkpoints[-1][1]
    results = prune_sweep(model, prompts, prune_layers, modules, rates, progress=not args.quiet)
    by_name = {c.name: c for c in baselines}

    curve_rows = [[f"step {step}", "model", k, c.mean[k], c.stderr[k]] for step, c in checkpoints for k in range(config.points)]
    curve_rows += [[c.name, "baseline", k, c.mean[k], c.stderr[k]] for c in baselines for k in range(config.points)]
    prune_rows = [
        [r.layer, r.depth, r.module, r.rate, k, r.curve.mean[k], r.curve.stderr[k]] for r in results for k in range(config.points)
    ]
    files = [
        write_csv(output / "curves.csv", ["curve", "kind", "shots", "mean_sq_error_over_d", "stderr"], curve_rows),
        write_csv(
            output / "pruning.csv", ["layer", "depth", "module", "rate", "shots", "mean_sq_error_over_d", "stderr"], prune_rows
        ),
    ]
    files.append(
        _write_json(
            output / "linreg.json",
            {
                "check": "linreg",
                "config": asdict(config),
                "metric": "squared error / d on held-out prompts; stderr = std / sqrt(prompts); 95% CI = mean +- 1.96 stderr",
                "eval_prompts": args.eval_prompts,
                "ridge": args.ridge,
                "training": {k: state[k] for k in ("step", "train_seconds", "loss", "checkpoints")},
                "checkpoints": [{"step": step, **asdict(c)} for step, c in checkpoints],
                "baselines": [asdict(c) for c in baselines],
                "learned": learned(final, by_name["zero"]),
                "pruning": {"shots": shots, "rates": rates, "results": [asdict(r) for r in results]},
            },
        )
    )
    shown = _spread(checkpoints, 6)
    fig = linreg_figure(final, shown, baselines, state["loss"], config.dim)
    files += save_figure(fig, output / "linreg-curves", args.format)
    fig = pruning_figure(results, final, by_name["least_squares"], shots, rates)
    files += save_figure(fig, output / "linreg-pruning", args.format)

    _print_curves(final, baselines, checkpoints, config)
    _print_pruning(results, final, shots, rates, modules, prune_layers)
    if not learned(final, by_name["zero"]):
        print(
            f"warning: with {config.points - 1} shots the model's error is {final.mean[-1]:.3f} (zero predictor "
            f"{by_name['zero'].mean[-1]:.3f}): training is still on a plateau, so the pruning table says little; "
            "train longer (--steps, in a new --output) or try another --seed",
            file=sys.stderr,
        )
    finish_output(output)
    log(args, f"done in {time.perf_counter() - started:.0f} s")
    for path in files:
        log(args, f"wrote {path}")
    return 0


def _spread(items: list, count: int) -> list:
    """At most `count` items, evenly spaced, always with the last."""
    if len(items) <= count:
        return items
    picks = sorted({round(i * (len(items) - 1) / (count - 1)) for i in range(count)})
    return [items[i] for i in picks]


def _print_curves(final, baselines, checkpoints, config) -> None:
    print(f"squared error / d vs shots (mean over held-out prompts; +- = 1.96 stderr); d = {config.dim}")
    print(f"{'shots':<22}" + "".join(f"{k:>8}" for k in range(config.points)))
    for name, curve in [(f"model (step {checkpoints[-1][0]})", final), *((c.name, c) for c in baselines)]:
        print(f"{name:<22}" + "".join(f"{m:>8.4f}" for m in curve.mean))
    print(f"{'+- (model)':<22}" + "".join(f"{1.96 * s:>8.4f}" for s in final.stderr))
    for step, curve in checkpoints[:-1]:
        print(f"{f'step {step}':<22}" + "".join(f"{m:>8.4f}" for m in curve.mean))


def _print_pruning(results, final, shots, rates, modules, layers) -> None:
    print(f"pruning: squared error / d at {shots} shots (unpruned {final.mean[shots]:.4f})")
    print(f"{'layer':<16}" + "".join(f"{r:>9g}" for r in rates))
    for module in modules:
        for layer in layers:
            found = {r.rate: r for r in results if r.layer == layer and r.module == module}
            depth = next(iter(found.values())).depth
            print(f"{f'L{layer} {module} ({depth})':<16}" + "".join(f"{found[r].curve.mean[shots]:>9.4f}" for r in rates))
