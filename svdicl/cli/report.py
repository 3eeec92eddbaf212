"""`svdicl report DIR`: figures (fig 1-3) and tables (appendix C.5 layout) from an output folder."""

from __future__ import annotations

import argparse

from svdicl.cli.common import log


def add(sub) -> None:
    """Register `svdicl report` on the subparsers `sub`."""
    p = sub.add_parser(
        "report",
        help="figures (fig 1-3) and tables (appendix C.5 layout) from the output folder of sweep, condition, search or eval",
        description="Reads DIR/cells.jsonl, DIR/conditions.csv, DIR/search/*.json and DIR/results.json (whichever exist) "
        "and writes DIR/figures/*.{png,svg}, DIR/tables/*.{md,csv} and DIR/report.md. Several DIRs (one per model, say) "
        "make one combined report in --output: an Algorithm 1 table with a column per model x module, every model's "
        "sweeps, every eval paired with its unpruned eval. Files an earlier report wrote and this one does not are removed.",
    )
    p.add_argument("directories", metavar="DIR", nargs="+", help="--output folders of svdicl sweep, condition, search or eval")
    p.add_argument(
        "--output",
        "--output-path",
        "--output_path",
        metavar="OUT",
        help="where to write the report of several DIRs (default: the one DIR)",
    )
    p.add_argument(
        "--metric",
        default="task",
        help="metric to plot: accuracy, macro_f1, or task = each task's headline metric, e.g. macro-F1 for COPA (default)",
    )
    p.add_argument(
        "--format", nargs="+", default=["png", "svg"], choices=["png", "svg", "pdf"], help="figure formats (default: png svg)"
    )
    p.add_argument("--no-bands", action="store_true", help="draw lines only, without confidence or seed-spread bands")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Draw the figures and tables of one or several output folders and print the report page."""
    from svdicl.report import build_report

    report = build_report(args.directories, output=args.output, metric=args.metric, formats=args.format, bands=not args.no_bands)
    for path in report.files:
        log(args, f"wrote {path}")
    print(report.page)
    return 0
