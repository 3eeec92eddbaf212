"""`svdicl condition`: condition numbers sigma_max / sigma_min per layer and matrix (fig 3, Algorithm 1 step 1)."""

from __future__ import annotations

import argparse
from pathlib import Path

from svdicl.cli.common import add_model_args, load, log
from svdicl.errors import SvdiclError


def add(sub) -> None:
    """Register `svdicl condition` (fig 3) on the subparsers `sub`."""
    p = sub.add_parser(
        "condition",
        help="condition numbers sigma_max/sigma_min per layer and matrix: CSV, JSON and the fig 3 figure",
        description="Singular values in float64 of every chosen matrix; writes conditions.csv, conditions.json and "
        "figures/fig3-conditions.{png,svg} to --output. Near-singular: sigma_min <= max(m, n) * eps(weight dtype) * sigma_max.",
    )
    add_model_args(p)
    group = p.add_argument_group("matrices")
    group.add_argument("--modules", default="all", help="attn, mlp, all (default), matrices like q,k,down, or re:<regex>")
    group.add_argument("--layers", default="all", help="layers: all (default), 26, -1, 0-3, first2, last2, or a comma list")
    group.add_argument(
        "--top-k", type=int, default=3, help="how many layers to rank per module group, as Algorithm 1 does (default: 3)"
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--output",
        "--output-path",
        "--output_path",
        required=True,
        help="folder for conditions.csv, conditions.json and figures/",
    )
    out.add_argument(
        "--format", nargs="+", default=["png", "svg"], choices=["png", "svg", "pdf"], help="figure formats (default: png svg)"
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Compute condition numbers per layer and matrix, write CSV/JSON and draw fig 3."""
    from svdicl.cachedir import cache_dir_from
    from svdicl.experiments.condition import condition_numbers, layer_conditions, top_layers, write_conditions
    from svdicl.report import plot_conditions, save_figure

    if args.top_k < 1:
        raise SvdiclError(f"--top-k must be at least 1, got {args.top_k}")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise SvdiclError(f"--output {output} is a file; give a folder")
    loaded = load(args)
    cache = cache_dir_from(args.cache_dir)  # numbers for these weights computed before, in any output folder
    conditions = condition_numbers(
        loaded.model, args.layers, args.modules, progress=not args.quiet, fingerprint=loaded.fingerprint, cache=cache
    )
    files = write_conditions(conditions, output, model_name=loaded.source, fingerprint=loaded.fingerprint, top_k=args.top_k)
    figure = plot_conditions(conditions, title=f"{loaded.source} · condition numbers per layer")
    files += save_figure(figure, output / "figures" / "fig3-conditions", args.format)

    groups = [g for g in ("attn", "mlp") if any(c.group == g for c in conditions)]
    per_group = {g: layer_conditions(conditions, g) for g in groups}
    print(f"condition numbers of {loaded.source} (largest per layer and group; * = a near-singular matrix in it)")
    print("layer " + "".join(f"{g.upper():>14}" for g in groups))
    for layer in sorted({c.layer for c in conditions if c.layer is not None}):
        row = f"{layer:>5} "
        for g in groups:
            flagged = any(c.near_singular for c in conditions if c.layer == layer and c.group == g)
            row += f"{per_group[g][layer]:>13.4g}{'*' if flagged else ' '}"
        print(row)
    for g in groups:
        print(f"top-{args.top_k} {g} layers by condition number: {', '.join(map(str, top_layers(conditions, g, args.top_k)))}")
    flagged = sum(c.near_singular for c in conditions)
    print(f"{flagged} of {len(conditions)} matrices are near-singular")
    for path in files:
        log(args, f"wrote {path}")
    return 0
