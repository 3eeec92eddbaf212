"""`svdicl sweep`: a grid of clipping rates x layers x modules x shots x seeds (the paper's fig 1-2), resumable."""

from __future__ import annotations

import argparse
from collections import Counter

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


def add(sub) -> None:
    """Register `svdicl sweep` (fig 1-2 grids) on the subparsers `sub`."""
    from svdicl.tasks import TASKS

    p = sub.add_parser(
        "sweep",
        help="evaluate a grid of clipping rates x layers x modules x shots x seeds (fig 1-2); resumable",
        description="Score every cell of the grid tasks x shots x seeds x layers x modules x rates into the result store "
        "in --output (cells.jsonl), skipping cells already there, then draw the report (fig 1, fig 2 with several shot "
        "counts, tables). Each layer and module is swept alone; join with + to prune several together (0+1, q+k). "
        "Rate 0 is the unpruned model, scored once per task, shots and seed. Rerun the same command to resume.",
    )
    add_model_args(p)
    grid = p.add_argument_group("grid (comma lists; a YAML/JSON --config may give lists)")
    grid.add_argument("--tasks", "--task", dest="tasks", help=f"tasks ({', '.join(TASKS)}) or task YAML files (required)")
    grid.add_argument(
        "--layers",
        default="first2,last2",
        help="layers, each swept alone: 26, -1, 0-3, first2, last2, all; + joins a set pruned together, e.g. 0+1 "
        "(default: first2,last2)",
    )
    grid.add_argument(
        "--modules",
        default="mlp,attn",
        help="modules, each swept alone: mlp, attn, q, k, ...; q+k prunes both (default: mlp,attn)",
    )
    grid.add_argument("--rates", help="clipping rates in [0, 1) (default: the paper's 0,0.1,0.5,0.75,0.9,0.95,0.99,0.995)")
    add_demonstration_args(grid, several=True)
    grid.add_argument("--split", default="test", choices=["validation", "test"], help="examples to score (default: test)")
    grid.add_argument(
        "--limit",
        type=positive_int,
        metavar="N",
        help="score N examples per task (the same seeded subset in every cell; recorded)",
    )
    grid.add_argument(
        "--sampling",
        choices=["random", "balanced"],
        default="random",
        help="how --limit draws its subset: random = seeded from the whole split; balanced = the same number of each "
        "class where the split allows, as the authors' code samples validation (default: random)",
    )
    grid.add_argument("--data-dir", help="folder of <task>/<split>.jsonl files (default: env SVDICL_DATA, else the Hub)")
    add_sweep_scoring_args(p)
    add_executor_args(p)
    out = p.add_argument_group("output")
    add_output_arg(out, help="folder of the result store and report (required)")
    out.add_argument("--no-report", action="store_true", help="only fill the store; draw figures later with svdicl report DIR")
    out.add_argument(
        "--dry-run",
        action="store_true",
        help="print the cells, examples, tokens and an estimated time (from a short timing here); score and write nothing",
    )
    out.add_argument(
        "--format", nargs="+", default=["png", "svg"], choices=["png", "svg", "pdf"], help="figure formats (default: png svg)"
    )
    p.set_defaults(handler=run)


def paths_used(cells) -> str:
    """`layer 48, prefix 1 (fallback: ...)`: how the cells were scored."""
    counts = Counter(str(c.info.get("scoring", {}).get("path")) for c in cells)
    text = ", ".join(f"{path} {count}" for path, count in counts.most_common())
    reasons = sorted({c.info["scoring"]["fallback"] for c in cells if c.info.get("scoring", {}).get("fallback")})
    return text + (f" (fallback: {'; '.join(reasons)})" if reasons else "")


def run(args: argparse.Namespace) -> int:
    """Score every cell of the grid into the store in --output (resuming), then draw the report."""
    from svdicl.errors import SvdiclError
    from svdicl.experiments.grid import PAPER_RATES, SweepGrid, parse_ints, parse_list
    from svdicl.experiments.launch import start_executor
    from svdicl.experiments.sweep import sweep
    from svdicl.store import Store

    if not args.tasks:
        raise SvdiclError("give --tasks, e.g. --tasks sst2,rte,copa")
    folder = check_output(args.output)
    check_shot_flags(args)
    shots = args.shots if args.num_fewshot is None else args.num_fewshot
    grid = SweepGrid(
        tasks=tuple(parse_list(args.tasks)),
        layers=tuple(parse_list(args.layers)),
        modules=tuple(parse_list(args.modules)),
        rates=PAPER_RATES if args.rates is None else args.rates,
        shots=(None,) if shots is None else parse_ints(shots, "--shots" if args.num_fewshot is None else "--num_fewshot"),
        shots_total=args.num_fewshot is not None,
        seeds=seeds_from(args),
        split=args.split,
        limit=args.limit,
        sampling=args.sampling,
    )
    scoring = scoring_from(args)
    options = executor_options(args)
    loaded = load(args, on_cpu=args.executor != "local")  # Ray workers load their own copy where the scoring runs
    if args.dry_run:
        from svdicl.experiments.dryrun import dry_run_sweep

        print(dry_run_sweep(loaded, grid, scoring, data_dir=args.data_dir, output=folder).text())
        return 0
    store = Store(folder)
    executor, plan = start_executor(options, loaded, model_options(args))
    log(args, plan)
    try:
        result = sweep(
            loaded, grid, store, scoring=scoring, data_dir=args.data_dir, model_name=loaded.source, progress=not args.quiet,
            executor=executor,
        )  # fmt: skip
    finally:
        executor.close()
    print(
        f"sweep: {len(result.cells)} cells, {result.computed} scored now and {len(result.cells) - result.computed} "
        f"from the store, in {result.wall_s:.0f} s -> {store.file}"
    )
    print(f"scoring paths: {paths_used(result.cells)}")
    if not args.no_report:
        from svdicl.report import build_report

        report = build_report(folder, formats=args.format)
        for path in report.files:
            if path.suffix == ".md" and path.name.startswith("sweep-"):
                print(f"\n{path}:\n{path.read_text()}")
        print(f"report: {report.page}")
    return 0
