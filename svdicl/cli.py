"""`svdicl` command line: parses flags (or a YAML/JSON config), calls the library, prints results.

Every subcommand takes `--config FILE`: its keys are the subcommand's flag names (dashes or
underscores), and flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from svdicl.errors import SvdiclError

Handler = Callable[[argparse.Namespace], int]


def _add_model_args(parser: argparse.ArgumentParser) -> None:
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
        "--cache-dir", default=None, help="keep assembled GGUF files and fast float copies here (env SVDICL_CACHE)"
    )
    group.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub (off by default)")


def _load(args: argparse.Namespace):
    from svdicl.models import load_model

    _log(args, f"loading {args.model} ({args.dtype}) ...")
    return load_model(
        args.model,
        dtype=args.dtype,
        device=args.device,
        cache_dir=args.cache_dir,
        trust_remote_code=args.trust_remote_code,
    )


def _log(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


# inspect --------------------------------------------------------------------------------------


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show architecture, layers, prunable matrices and parameter counts")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from svdicl.targets import describe

    loaded = _load(args)
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


# prune ----------------------------------------------------------------------------------------


def _add_prune_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pruning")
    group.add_argument("--layers", help="layers: 26, -1, 0-3, first2, last2, all, or a comma list")
    group.add_argument("--modules", help="attn, mlp, all, q,k,v,o,gate,up,down,fc_in,fc_out, qkv, or re:<regex>")
    group.add_argument("--rate", type=float, help="clipping rate xi in [0, 1): keep floor((1 - xi) * min(m, n)) singular values")
    group.add_argument(
        "--prune",
        action="append",
        default=[],
        metavar="LAYERS:MODULES:RATE",
        help="an edit as one string, e.g. 26:mlp:0.95; repeat for several",
    )
    group.add_argument(
        "--svd-dtype", default="float32", choices=["float32", "float64"], help="dtype of the SVD (default: float32)"
    )
    group.add_argument(
        "--allow-tied", action="store_true", help="allow pruning a weight tied to another (e.g. lm_head = embeddings)"
    )


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


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="truncate chosen matrices and save the pruned model (dense, loadable by transformers)")
    _add_model_args(p)
    _add_prune_args(p)
    p.add_argument("--output", required=True, help="folder for the pruned model (must be empty or new)")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty output folder")
    p.set_defaults(handler=_run_prune)


def _run_prune(args: argparse.Namespace) -> int:
    from svdicl.export import prepare_output, save_dense
    from svdicl.prune import prune

    specs = prune_specs(args, required=True)
    prepare_output(args.output, args.overwrite)  # refuse a bad folder before the slow load
    loaded = _load(args)
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


# entry point ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svdicl",
        description="SVD-based weight pruning for better in-context learning (Yao et al., NeurIPS 2024).",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_inspect, _add_prune):
        add(sub)
    for subparser in sub.choices.values():
        subparser.add_argument("--config", help="YAML or JSON file of flag values (command-line flags win)")
    return parser


def _config_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Apply `--config FILE` of the chosen subcommand as parser defaults."""
    probe, _ = parser.parse_known_args(argv)
    path = getattr(probe, "config", None)
    if not path:
        return
    file = Path(path)
    if not file.is_file():
        raise SvdiclError(f"config file {path} does not exist")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as exc:  # any parse failure is a problem in the user's file
        raise SvdiclError(f"cannot parse config {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise SvdiclError(f"config {path} must be a mapping of flag names to values")
    subparser = parser._subparsers._group_actions[0].choices[probe.command]
    actions = {a.dest: a for a in subparser._actions if a.dest not in ("config", "help")}
    defaults = {}
    for key, value in values.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            raise SvdiclError(
                f"config {path}: unknown key {key!r} for `svdicl {probe.command}`; see svdicl {probe.command} --help"
            )
        takes_list = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")
        if takes_list and not isinstance(value, list):
            value = [value]
        elif isinstance(value, list) and not takes_list:
            value = ",".join(map(str, value))  # `layers: [0, 1]` means --layers 0,1
        defaults[action.dest] = value
    subparser.set_defaults(**defaults)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        _config_defaults(parser, argv)
        args = parser.parse_args(argv)
        if args.quiet:
            os.environ.setdefault("TQDM_DISABLE", "1")
        _quiet_libraries()
        return args.handler(args)
    except SvdiclError as exc:
        print(f"svdicl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdicl: interrupted; finished work is kept, rerun the same command to resume", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Keep transformers' info/warning chatter out of the output; errors still surface."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    logging.getLogger("accelerate").setLevel(logging.ERROR)


if __name__ == "__main__":
    raise SystemExit(main())
