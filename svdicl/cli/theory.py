"""`svdicl theory lemma1 | norms | linreg`: the paper's theory (section 3, appendix A, fig 5), checked numerically."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from svdicl.cli.common import add_model_args, load, log

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


def run_lemma1(args: argparse.Namespace) -> int:
    """Check Lemma 1 / Theorem 1 on random draws, write the JSON, CSV and figure, print each claim's verdict."""
    from svdicl.report import save_figure, write_csv
    from svdicl.theory.checks import Lemma1Settings, lemma1_check, output_folder
    from svdicl.theory.figures import lemma1_figure

    names = ("draws", "seed", "dim", "layers", "max_demos", "tolerance")
    settings = Lemma1Settings(**{name: getattr(args, name) for name in names})
    folder = output_folder(args.output)
    check = lemma1_check(settings)
    files = [_write_json(folder / "lemma1.json", check.to_json()), write_csv(folder / "lemma1.csv", *check.table())]
    files += save_figure(lemma1_figure(check.draws, args.dim, args.tolerance), folder / "lemma1", args.format)
    summary, tolerance = check.summary, args.tolerance
    print(f"{args.draws} draws, d = {args.dim}, {args.layers}-layer stack, float64, tolerance {tolerance:g}")
    print(f"  Lemma 1    max relative error {summary['lemma1_max_error']:.2e}   {_verdict(summary['lemma1_holds'])}")
    print(f"  Theorem 1  max relative error {summary['theorem1_max_error']:.2e}   {_verdict(summary['theorem1_holds'])}")
    for name, error in summary["perturbed_min_error"].items():
        verdict = _verdict(error > tolerance, "fails the check, as it must")
        print(f"  perturbed {name:<16} min relative error {error:.2e}   {verdict}")
    print(f"  rank(dW) <= n in every layer of every draw: {_verdict(summary['rank_bound_holds'])}")
    print(f"  truncating layer j changes dW^l exactly for l >= j: {_verdict(summary['locality_holds'])}")
    for path in files:
        log(args, f"wrote {path}")
    return 0 if check.ok else 1


def _write_json(path: Path, value: dict) -> Path:
    from svdicl.provenance import versions

    path.write_text(json.dumps({**value, "versions": versions()}, indent=2) + "\n")
    return path


def _verdict(ok: bool, text: str = "holds") -> str:
    return text if ok else "FAILS"


def run_norms(args: argparse.Namespace) -> int:
    """Check Examples 1-4 (truncation lowers the implicit-gradient norm bound), write the results, print the ratios."""
    from svdicl.report import save_figure, write_csv
    from svdicl.theory.checks import NormsSettings, norms_check, output_folder
    from svdicl.theory.figures import norms_figure
    from svdicl.theory.norms import EXAMPLES

    settings = NormsSettings(
        draws=args.draws, seed=args.seed, dim=args.dim, demos=args.demos, rates=args.rates,
        task=None if args.random_only else args.task, shots=args.shots, layers=args.layers, data_dir=args.data_dir,
        device=args.device,
    )  # fmt: skip
    folder = output_folder(args.output)
    check = norms_check(settings, load=lambda: load(args), progress=not args.quiet, log=lambda line: log(args, line))
    files = [_write_json(folder / "norms.json", check.to_json()), write_csv(folder / "norms.csv", *check.table())]
    files += save_figure(norms_figure(check.rows, check.rates), folder / "norms", args.format)
    for source, summary in check.summary.items():
        print(
            f"{source}: mean bound ratio after/before (exact ratio in brackets); bound never rises in "
            + ", ".join(f"{e} {100 * f:.0f}%" for e, f in summary["bound_non_increasing"].items())
            + " of curves"
        )
        print("  rate    " + "".join(f"{e:>20}" for e in EXAMPLES))
        for i, rate in enumerate(check.rates):
            cells = "".join(
                f"{summary['mean_bound_ratio'][e][i]:>10.4f} ({summary['mean_exact_ratio'][e][i]:.4f})" for e in EXAMPLES
            )
            print(f"  {rate:<7g} {cells}")
    for path in files:
        log(args, f"wrote {path}")
    return 0 if check.ok else 1


def run_linreg(args: argparse.Namespace) -> int:
    """Train (or resume) the in-context linear regression model, compare it with baselines, prune it, print the
    tables: every flag checked first, then --output taken (one run at a time; --overwrite clears only svdicl's files)."""
    from svdicl.report import save_figure, write_csv
    from svdicl.theory.checks import LinRegSettings, linreg_check, linreg_folder, spread
    from svdicl.theory.figures import linreg_figure, pruning_figure
    from svdicl.theory.linreg import LinRegConfig

    settings = LinRegSettings(
        config=LinRegConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LinRegConfig)}),
        eval_prompts=args.eval_prompts, ridge=args.ridge, prune_layers=args.prune_layers, prune_modules=args.prune_modules,
        rates=args.rates, shots=args.shots, threads=args.threads,
    )  # fmt: skip
    with linreg_folder(args.output, args.overwrite) as folder:
        check = linreg_check(settings, folder, progress=not args.quiet, log=lambda line: log(args, line))
        files = [write_csv(folder / name, *table) for name, table in check.tables().items()]
        files.append(_write_json(folder / "linreg.json", check.to_json()))
        shown, config = spread(check.checkpoints, 6), settings.config
        figure = linreg_figure(check.final, shown, check.baselines, check.training["loss"], config.dim)
        files += save_figure(figure, folder / "linreg-curves", args.format)
        figure = pruning_figure(check.results, check.final, check.baseline("least_squares"), settings.shots, settings.rates)
        files += save_figure(figure, folder / "linreg-pruning", args.format)
    _print_curves(check)
    _print_pruning(check)
    if not check.learned:
        points, zero = settings.config.points, check.baseline("zero")
        print(
            f"warning: with {points - 1} shots the model's error is {check.final.mean[-1]:.3f} (zero predictor "
            f"{zero.mean[-1]:.3f}): training is still on a plateau, so the pruning table says little; "
            "train longer (--steps, in a new --output) or try another --seed",
            file=sys.stderr,
        )
    log(args, f"done in {check.seconds:.0f} s")
    for path in files:
        log(args, f"wrote {path}")
    return 0


def _print_curves(check) -> None:
    points, final, checkpoints = check.settings.config.points, check.final, check.checkpoints
    print(f"squared error / d vs shots (mean over held-out prompts; +- = 1.96 stderr); d = {check.settings.config.dim}")
    print(f"{'shots':<22}" + "".join(f"{k:>8}" for k in range(points)))
    for name, curve in [(f"model (step {checkpoints[-1][0]})", final), *((c.name, c) for c in check.baselines)]:
        print(f"{name:<22}" + "".join(f"{m:>8.4f}" for m in curve.mean))
    print(f"{'+- (model)':<22}" + "".join(f"{1.96 * s:>8.4f}" for s in final.stderr))
    for step, curve in checkpoints[:-1]:
        print(f"{f'step {step}':<22}" + "".join(f"{m:>8.4f}" for m in curve.mean))


def _print_pruning(check) -> None:
    shots, rates = check.settings.shots, check.settings.rates
    print(f"pruning: squared error / d at {shots} shots (unpruned {check.final.mean[shots]:.4f})")
    print(f"{'layer':<16}" + "".join(f"{r:>9g}" for r in rates))
    for module in check.settings.modules:
        for layer in check.settings.layers:
            found = {r.rate: r for r in check.results if r.layer == layer and r.module == module}
            depth = next(iter(found.values())).depth
            print(f"{f'L{layer} {module} ({depth})':<16}" + "".join(f"{found[r].curve.mean[shots]:>9.4f}" for r in rates))
