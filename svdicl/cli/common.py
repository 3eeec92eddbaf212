"""Flags and helpers shared by several subcommands: model loading, prune specs, status lines."""

from __future__ import annotations

import argparse
import sys

from svdicl.errors import SvdiclError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model flags every command shares: --model, --dtype, --device, device maps and offloading."""
    from svdicl.models import ALIASES, DEFAULT_MODEL, DTYPES

    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"alias ({', '.join(ALIASES)}), a .gguf file, a local model folder or a Hub id (default: {DEFAULT_MODEL})",
    )
    group.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weight dtype (default: float32)")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    group.add_argument(
        "--device-map",
        help="spread a large model with accelerate instead of --device: auto, balanced, sequential, or a JSON file of "
        "module: device (devices: GPU index, cpu, disk)",
    )
    group.add_argument("--max-memory", help="memory per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=60GiB")
    group.add_argument("--offload-folder", help="folder for weights --device-map offloads to disk")
    group.add_argument("--cache-dir", help="keep assembled GGUF files and fast float copies here (env SVDICL_CACHE)")
    group.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub (off by default)")


def load(args: argparse.Namespace, *, on_cpu: bool = False):
    """The model named by the model flags; `on_cpu` ignores --device and --device-map (a driver that only plans)."""
    from svdicl.models import load_model

    options = model_options(args)
    if on_cpu:
        options.update(device="cpu", device_map=None, max_memory=None, offload_folder=None)
    log(args, f"loading {args.model} ({args.dtype}) ...")
    return load_model(**options)


def model_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of `load_model` the model flags give (what Ray workers load, too)."""
    return {
        "source": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "cache_dir": args.cache_dir,
        "trust_remote_code": args.trust_remote_code,
        "device_map": args.device_map,
        "max_memory": args.max_memory,
        "offload_folder": args.offload_folder,
    }


def log(args: argparse.Namespace, message: str) -> None:
    """A status line on stderr, unless --quiet."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def add_prune_args(parser: argparse.ArgumentParser) -> None:
    """The edit flags: --layers/--modules/--rate for one spec, or --prune L:M:R repeated."""
    group = parser.add_argument_group("pruning")
    group.add_argument("--layers", help="layers: 26, -1, 0-3, first2, last2, all, or a comma list")
    group.add_argument("--modules", help="attn, mlp, all, q,k,v,o,gate,up,down,fc_in,fc_out, qkv, or re:<regex>")
    group.add_argument("--rate", type=float, help="clipping rate xi in [0, 1): keep floor((1 - xi) * min(m, n)) singular values")
    group.add_argument(
        "--prune",
        action="append",
        default=[],
        metavar="LAYERS:MODULES:RATE",
        help="an edit as one string, e.g. 26:mlp:0.95; repeat for several. A null control at the same rate: "
        "26:mlp:0.95@random-subspace or @matched-noise, optionally :seed=N (docs/experiments.md)",
    )
    add_svd_args(group)


def add_svd_args(group: argparse._ArgumentGroup) -> None:
    """The SVD flags: its dtype and whether a tied weight may be pruned."""
    group.add_argument(
        "--svd-dtype", default="float32", choices=["float32", "float64"], help="dtype of the SVD (default: float32)"
    )
    group.add_argument(
        "--allow-tied", action="store_true", help="allow pruning a weight tied to another (e.g. lm_head = embeddings)"
    )


PATHS = {
    "layer": "layer = layers below the pruned one run once per sweep line",
    "prefix": "prefix = the demonstrations' keys/values once, then each example's own tokens",
    "plain": "plain = every prompt in full",
}


def add_scoring_args(parser: argparse.ArgumentParser, paths: tuple[str, ...]) -> argparse._ArgumentGroup:
    """Scoring flags of eval, sweep and search; `paths` are the execution paths the command has (fastest first)."""
    group = parser.add_argument_group("scoring")
    group.add_argument(
        "--batch-size", "--batch_size", dest="batch_size", type=int, default=8, help="sequences per forward (default: 8)"
    )
    group.add_argument(
        "--length-normalize",
        action="store_true",
        help="rank candidates by mean log-probability per token instead of the sum (matters for COPA)",
    )
    group.add_argument(
        "--path",
        default="auto",
        choices=["auto", *paths],
        help="execution path: "
        + "; ".join(PATHS[path] for path in paths)
        + "; auto = the fastest the model family has and --cache-memory holds (default: auto)",
    )
    group.add_argument(
        "--cache-memory",
        default="4GiB",
        metavar="SIZE",
        help="most memory the caches of the faster paths may take, e.g. 512MiB or 4GiB (default: 4GiB)",
    )
    return group


def prune_specs(args: argparse.Namespace, required: bool):
    """The edits named by --layers/--modules/--rate and every --prune; one-line error if incomplete."""
    from svdicl.prune import PruneSpec

    specs = [PruneSpec.parse(text) for text in args.prune]
    single = (args.layers, args.modules, args.rate)
    if any(v is not None for v in single):
        if any(v is None for v in single):
            raise SvdiclError("--layers, --modules and --rate go together; give all three or use --prune L:M:R")
        specs.insert(0, PruneSpec.parse(f"{args.layers}:{args.modules}:{args.rate}"))
    if required and not specs:
        raise SvdiclError("nothing to prune; give --layers, --modules and --rate (or --prune 26:mlp:0.95)")
    return specs
