"""`svdicl search`: Algorithm 1 -- a layer by condition number, a clipping rate on validation, baseline -> pruned on test."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from svdicl.cli.common import (
    add_demonstration_args,
    add_executor_args,
    add_model_args,
    add_output_arg,
    add_sweep_scoring_args,
    check_output,
    check_shot_flags,
    executor_options,
    load,
    log,
    model_options,
    positive_int,
    scoring_from,
    seeds_from,
)

if TYPE_CHECKING:
    from svdicl.experiments.search_output import SearchRecord, TestMetric


def add(sub) -> None:
    """Register `svdicl search` (Algorithm 1) on the subparsers `sub`."""
    from svdicl.tasks import TASKS

    p = sub.add_parser(
        "search",
        help="Algorithm 1: choose a layer by condition number and a clipping rate on validation, report test with CIs",
        description="Algorithm 1 of Yao et al. (2024): condition numbers of the module in every layer; the top-k layers and "
        "the one with the largest (or --layer); every candidate rate (0 always included) on the validation split, rate* = "
        "the argmax of the task's metric (mean over seeds; ties to the smaller rate); the unpruned and the rate*-pruned "
        "model on the test split with 95% bootstrap CIs and an exact McNemar test. Writes DIR/search/<task>-<module>.json "
        "(schema svdicl.search/1) and replayable configs, prints the appendix C.5 table, draws the report. Every "
        "evaluation is a cell of the result store in DIR: rerun to resume.",
    )
    add_model_args(p)
    what = p.add_argument_group("search (comma lists run one search each)")
    what.add_argument("--tasks", "--task", dest="tasks", help=f"tasks ({', '.join(TASKS)}) or task YAML files (required)")
    what.add_argument(
        "--modules", "--module", dest="modules", default="mlp", help="mlp, attn, or matrices (q+k prunes both) (default: mlp)"
    )
    what.add_argument("--top-k", type=int, default=3, help="layers ranked by condition number, reported (default: 3)")
    what.add_argument("--layer", help="fix the layer (e.g. 26 or -1) and skip the condition-number choice")
    what.add_argument(
        "--rates", help="candidate clipping rates; 0 is always added (default: the paper's 0,0.1,0.5,0.75,0.9,0.95,0.99,0.995)"
    )
    add_demonstration_args(what, several=False)
    what.add_argument("--metric", choices=["accuracy", "macro_f1"], help="metric to choose rate* on (default: the task's own)")
    what.add_argument(
        "--limit", type=positive_int, metavar="N", help="score N examples per split (the same seeded subset everywhere)"
    )
    what.add_argument(
        "--limit-validation", type=positive_int, metavar="N", help="examples of the validation split (overrides --limit)"
    )
    what.add_argument("--limit-test", type=positive_int, metavar="N", help="examples of the test split (overrides --limit)")
    what.add_argument(
        "--validation-sampling",
        choices=["random", "balanced"],
        default="random",
        help="how the validation limit is drawn: random = a seeded subset of the split (the paper gives sizes only); "
        "balanced = the same number of each class where the split allows, as the authors' code samples validation "
        "(default: random)",
    )
    what.add_argument(
        "--arms",
        default="all",
        help="arms scored beside unpruned and pruned on the same test examples: calibration (each --calibration method, "
        "default all, on the unpruned and the pruned model), controls (random-subspace and norm-matched-noise edits at "
        "rate*), calibrated-controls (the controls also at each calibrated arm's own rate*; needs the other two), "
        "all or none (default: all)",
    )
    what.add_argument("--data-dir", help="folder of <task>/<split>.jsonl files (default: env SVDICL_DATA, else the Hub)")
    add_sweep_scoring_args(p)
    add_executor_args(p)
    out = p.add_argument_group("output")
    add_output_arg(out, help="folder of the result store, search/ and report (required)")
    out.add_argument(
        "--export", metavar="DIR", help="save the rate*-pruned model here (a subfolder per task and module if several)"
    )
    out.add_argument(
        "--export-format", choices=["dense", "factorized"], default="dense", help="see svdicl prune (default: dense)"
    )
    out.add_argument(
        "--overwrite", action="store_true", help="replace what svdicl wrote in a non-empty --export folder (only that)"
    )
    out.add_argument("--no-report", action="store_true", help="skip drawing the report (svdicl report DIR draws it later)")
    out.add_argument(
        "--dry-run",
        action="store_true",
        help="print the cells, examples, tokens and an estimated time (from a short timing here); score and write nothing",
    )
    out.add_argument(
        "--format", nargs="+", default=["png", "svg"], choices=["png", "svg", "pdf"], help="figure formats (default: png svg)"
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run one Algorithm 1 search per task and module into one store, print each, optionally export rate*."""
    from svdicl.errors import SvdiclError
    from svdicl.experiments.grid import PAPER_RATES, parse_list
    from svdicl.experiments.searches import export_folders, export_rate_star, run_searches, search_configs
    from svdicl.experiments.sweep import load_task_splits
    from svdicl.report import algorithm1_markdown, arms_markdown

    if not args.tasks:
        raise SvdiclError("give --tasks, e.g. --tasks sst2 (and --modules mlp,attn)")
    folder = check_output(args.output)
    check_shot_flags(args)
    configs = search_configs(
        parse_list(args.tasks), parse_list(args.modules), rates=PAPER_RATES if args.rates is None else args.rates,
        top_k=args.top_k, layer=args.layer, shots=args.shots if args.num_fewshot is None else args.num_fewshot,
        shots_total=args.num_fewshot is not None, seeds=seeds_from(args), metric=args.metric, arms=args.arms,
        limit=args.limit, limit_validation=args.limit_validation, limit_test=args.limit_test,
        validation_sampling=args.validation_sampling,
    )  # fmt: skip
    scoring = scoring_from(args)
    executor = executor_options(args)
    if args.dry_run:
        from svdicl.experiments.dryrun import dry_run_search

        loaded = load(args, on_cpu=args.executor != "local")
        splits = load_task_splits([c.task for c in configs], args.data_dir)
        print(dry_run_search(loaded, configs, scoring, splits, output=folder).text())
        return 0
    exports = export_folders(configs, args.export, args.overwrite)  # cleared only when written
    loaded = load(args, on_cpu=args.executor != "local")  # Ray workers load their own copy where the scoring runs
    searched = run_searches(
        loaded, configs, folder, scoring=scoring, executor=executor, model=model_options(args), data_dir=args.data_dir,
        progress=not args.quiet, log=lambda line: log(args, line),
    )  # fmt: skip
    for one in searched:
        _print(one.result)
        if one.result.arms:
            print()
            print(arms_markdown(one.result.to_json()))
    print()
    print(algorithm1_markdown([one.result.to_json() for one in searched]))
    for one in searched:
        print(f"search result: {one.files[0]}  (replay: svdicl eval --config {one.files[1]} --output DIR)")
        if one.config in exports:
            spec = export_rate_star(
                loaded, one.result, exports[one.config], format=args.export_format, svd=args.svd_dtype,
                allow_tied=args.allow_tied, overwrite=args.overwrite,
            )  # fmt: skip
            print(f"saved the rate*-pruned model ({spec}) to {exports[one.config]}")
    if not args.no_report:
        from svdicl.report import build_report

        print(f"report: {build_report(folder, formats=args.format).page}")
    return 0


def _print(result: SearchRecord) -> None:
    """The search, step by step: layer choice, validation curve, test comparison."""
    test = result.test
    chosen = f"layer {result.layer}"
    if result.top_layers:
        ranked = ", ".join(f"{layer} (κ={_number(result.per_layer[str(layer)])})" for layer in result.top_layers)
        chosen += f" (top-{result.top_k} by condition number: {ranked})"
    else:
        chosen += " (given)"
    print(f"{result.task} · {result.module} · {result.model.name}: {chosen}")
    curve = "  ".join(f"{rate:g}: {value:.4f}" for rate, value in zip(result.rates, result.validation.values, strict=True))
    print(f"  validation {result.metric} (n={result.validation.n}, {len(result.seeds)} seed(s)): {curve}")
    print(f"  rate* = {result.rate_star:g} (the validation argmax; ties go to the smaller rate)")
    paired = test.paired
    print(
        f"  test {result.metric} (n={test.n}): {_printed_estimate(test.baseline)} -> {_printed_estimate(test.pruned)}"
        f"  paired Δ correct {paired.difference:+.4f} [{paired.low:+.4f}, {paired.high:+.4f}]"
        f"  p = {test.p_value:.3g} ({paired.method})"
    )
    fallbacks = "; ".join(result.scoring.fallbacks)
    print(f"  scored on the {', '.join(result.scoring.paths)} path" + (f" ({fallbacks})" if fallbacks else ""))


def _printed_estimate(entry: TestMetric) -> str:
    spread = f" ± {entry.std:.4f} (SD over seeds)" if entry.std is not None else ""
    return f"{entry.value:.4f}{spread} [{entry.ci_low:.4f}, {entry.ci_high:.4f}]"


def _number(value: float | None) -> str:
    return "inf" if value is None else f"{value:.4g}"
