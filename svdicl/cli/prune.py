"""`svdicl prune`: truncate chosen matrices and save the pruned model for any other tool."""

from __future__ import annotations

import argparse

from svdicl.cli.common import add_model_args, add_prune_args, load, prune_specs


def add(sub) -> None:
    p = sub.add_parser("prune", help="truncate chosen matrices and save the pruned model (dense, loadable by transformers)")
    add_model_args(p)
    add_prune_args(p)
    p.add_argument("--output", required=True, help="folder for the pruned model (must be empty or new)")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty output folder")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from svdicl.export import prepare_output, save_dense
    from svdicl.prune import prune

    specs = prune_specs(args, required=True)
    prepare_output(args.output, args.overwrite)  # refuse a bad folder before the slow load
    loaded = load(args)
    record = prune(loaded.model, specs=specs, svd=args.svd_dtype, allow_tied=args.allow_tied)
    folder = save_dense(loaded, record, args.output, overwrite=True)
    for m in record.matrices:
        print(
            f"{m.name:<40} {m.shape[0]:>5} x {m.shape[1]:<5} rank {m.kept_rank:>4}/{m.rank:<4} rel. error {m.relative_error:.4f}"
        )
    summary = record.to_dict()
    low_rank, dense = summary["factorized_params"], summary["dense_params"]
    print(f"saved {folder}  ({len(record.matrices)} matrices; factorised they would need {low_rank:,} of {dense:,} parameters)")
    return 0
