"""`svdicl prune`: truncate chosen matrices and save the pruned model for any other tool."""

from __future__ import annotations

import argparse

from svdicl.cli.common import add_model_args, add_prune_args, load, log, prune_specs


def add(sub) -> None:
    """Register `svdicl prune` on the subparsers `sub`."""
    p = sub.add_parser(
        "prune",
        help="truncate chosen matrices and save the pruned model (dense for any tool, or factorized and smaller)",
    )
    add_model_args(p)
    add_prune_args(p)
    group = p.add_argument_group("output")
    group.add_argument(
        "--output", "--output-path", "--output_path", required=True, help="folder for the pruned model (must be empty or new)"
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what svdicl wrote in a non-empty output folder (only that; see its .svdicl-manifest.json)",
    )
    group.add_argument(
        "--format",
        choices=["dense", "factorized"],
        default="dense",
        help="dense: a plain Hugging Face folder any tool loads (default); factorized: each pruned matrix as two thin "
        "factors where that saves parameters, loaded with svdicl.load_pruned",
    )
    group.add_argument(
        "--force",
        action="store_true",
        help="factorized: store every pruned whole matrix as factors, even where they are larger than the dense matrix",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Truncate the chosen matrices and save the model, dense or factorized."""
    from svdicl.export import save_pruned
    from svdicl.outputs import check_output

    specs = prune_specs(args, required=True)
    check_output(args.output, args.overwrite)  # refuse a bad folder before the slow load; cleared only once all is valid
    loaded = load(args)
    log(args, f"pruning and saving as {args.format} ...")
    info = save_pruned(
        loaded,
        specs,
        args.output,
        format=args.format,
        svd=args.svd_dtype,
        allow_tied=args.allow_tied,
        force=args.force,
        overwrite=args.overwrite,
    )
    factorized = {m["name"]: m["rank"] for m in info.get("factorized", {}).get("modules", [])}
    kept_dense = {m["name"]: m["reason"] for m in info.get("factorized", {}).get("dense", [])}
    for m in info["edit"]["matrices"]:
        stored = ""
        if args.format == "factorized":
            stored = "  factors" if m["name"] in factorized else f"  dense ({kept_dense.get(m['name'], 'not pruned')})"
        print(
            f"{m['name']:<40} {m['shape'][0]:>5} x {m['shape'][1]:<5} rank {m['kept_rank']:>4}/{m['rank']:<4} "
            f"rel. error {m['relative_error']:.4f}{stored}"
        )
    count = len(info["edit"]["matrices"])
    if args.format == "dense":
        low_rank, dense = info["edit"]["factorized_params"], info["edit"]["dense_params"]
        print(f"saved {args.output}  ({count} matrices; factorised they would need {low_rank:,} of {dense:,} parameters)")
        return 0
    size = info["size"]
    print(
        f"saved {args.output}  ({len(factorized)} of {count} matrices factorized; parameters {size['params_dense']:,} -> "
        f"{size['params_factorized']:,} (-{size['params_saved'] / size['params_dense']:.1%}), bytes {size['bytes_dense']:,} -> "
        f"{size['bytes_factorized']:,}; load with svdicl.load_pruned)"
    )
    return 0
