"""`svdicl inspect`: architecture, layers, prunable matrices with shapes, parameter counts."""

from __future__ import annotations

import argparse
import json

from svdicl.cli.common import add_model_args, load


def add(sub) -> None:
    """Register `svdicl inspect` on the subparsers `sub`."""
    p = sub.add_parser("inspect", help="show architecture, layers, prunable matrices and parameter counts")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Print the model's family, layers, prunable matrices and parameter counts (text or --json)."""
    from svdicl.targets import describe

    loaded = load(args)
    info = {"source": loaded.source, "fingerprint": loaded.fingerprint, **describe(loaded.model)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model         {info['source']}  ({info['architecture']}, family {info['family'] or 'not in table: use re:<regex>'})")
    print(f"fingerprint   {info['fingerprint']}")
    print(f"layers        {info['num_layers']} at {info['layers_path']}")
    total, per_layer, embed = info["params_total"], info["params_per_layer"], info["params_embeddings"]
    print(f"parameters    {total:,} total, {per_layer:,} per layer, {embed:,} in embeddings")
    tied = "tied to lm_head (never pruned by groups)" if info["tied_embeddings"] else "untied"
    print(f"embeddings    {tied}; dtype {info['dtype']}")
    print("matrices per layer (logical out x in):")
    for m in info["matrices"]:
        print(f"  {m['name']:<8} {m['group']:<5} {m['module']:<28} {m['shape'][0]} x {m['shape'][1]}")
    return 0
