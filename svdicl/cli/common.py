"""Flags and helpers shared by several subcommands: model loading, prune specs, status lines."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from svdicl.cli.config import ArgumentGroup
from svdicl.errors import SvdiclError

LM_EVAL_BACKENDS = ("hf", "hf-auto", "huggingface", "vllm", "sglang", "local-completions", "openai-completions")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model flags every command shares: --model, --dtype, --device, device maps and offloading."""
    from svdicl.aliases import ALIASES
    from svdicl.models import DEFAULT_MODEL, DTYPES

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
    group.add_argument(
        "--cache-dir",
        help="keep assembled GGUF files, fast float copies, fingerprints and condition numbers here; off for none "
        "(default: env SVDICL_CACHE, else $XDG_CACHE_HOME/svdicl or ~/.cache/svdicl)",
    )
    group.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub (off by default)")


def load(args: argparse.Namespace, *, on_cpu: bool = False):
    """The model named by the model flags (a factorized export too); `on_cpu` ignores --device and --device-map
    (a driver that only plans)."""
    from svdicl.export import load_any

    if args.model in LM_EVAL_BACKENDS and not Path(args.model).exists():
        raise SvdiclError(
            f"--model {args.model} is an lm-eval model type; svdicl's --model is the model itself (lm-eval's "
            "pretrained=...): give --model with a folder, .gguf file, Hub id or alias"
        )

    options = model_options(args)
    if on_cpu:
        options.update(device="cpu", device_map=None, max_memory=None, offload_folder=None)
    log(args, f"loading {args.model} ({args.dtype}) ...")
    return load_any(**options)


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


def add_svd_args(group: ArgumentGroup) -> None:
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


def add_scoring_args(parser: argparse.ArgumentParser, paths: tuple[str, ...]) -> ArgumentGroup:
    """Scoring flags of eval, sweep and search; `paths` are the execution paths the command has (fastest first)."""
    group = parser.add_argument_group("scoring")
    group.add_argument(
        "--batch-size", "--batch_size", dest="batch_size", type=positive_int, default=8, help="sequences per forward (default: 8)"
    )
    group.add_argument(
        "--length-normalize",
        action="store_true",
        help="rank candidates by mean log-probability per token instead of the sum (matters for COPA)",
    )
    group.add_argument(
        "--calibration",
        default="none",
        metavar="METHODS",
        help="also score every run calibrated: contextual, domain, batch (comma list), all or none; "
        "multiple-choice tasks have none (docs/evaluation.md) (default: none)",
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
        help="most memory the caches of the faster paths may take, e.g. 512MiB or 4GiB; GiB/MiB are 2^30/2^20 bytes, "
        "GB/MB 10^9/10^6, as in accelerate (default: 4GiB)",
    )
    return group


def prune_specs(args: argparse.Namespace, required: bool):
    """The edits named by --layers/--modules/--rate and every --prune; one-line error if incomplete."""
    from svdicl.specs import PruneSpec

    specs = [PruneSpec.parse(text) for text in args.prune]
    single = (args.layers, args.modules, args.rate)
    if any(v is not None for v in single):
        if any(v is None for v in single):
            raise SvdiclError("--layers, --modules and --rate go together; give all three or use --prune L:M:R")
        specs.insert(0, PruneSpec.parse(f"{args.layers}:{args.modules}:{args.rate}"))
    if required and not specs:
        raise SvdiclError("nothing to prune; give --layers, --modules and --rate (or --prune 26:mlp:0.95)")
    return specs


def _whole_number(text: str, least: int, hint: str = "") -> int:
    """`text` as an int >= `least`, else argparse's error (argparse prints it as one usage line)."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number >= {least}, not {text!r}{hint}") from None
    if number < least:
        raise argparse.ArgumentTypeError(f"takes a whole number >= {least}, not {text!r}")
    return number


def positive_int(text: str) -> int:
    """argparse type of a count of things (--limit, --batch-size): a whole number >= 1, never lm-eval's 0.1 or auto."""
    hint = "; a fraction of the examples (lm-eval's --limit 0.1) has no svdicl form" if _fraction(text) else ""
    return _whole_number(text, 1, "; svdicl has no automatic batch size" if text.startswith("auto") else hint)


def _fraction(text: str) -> bool:
    try:
        return 0 < float(text) < 1
    except ValueError:
        return False


def non_negative_int(text: str) -> int:
    """argparse type of a number of demonstrations: a whole number >= 0."""
    return _whole_number(text, 0)


def one_seed(text: str) -> str:
    """argparse type of --seed: one integer per flag (lm-eval's `--seed 0,1234,1234,1234` sets four library seeds)."""
    try:
        int(text)
    except ValueError:
        hint = " (for several runs use --seeds 0,1,2 or repeat --seed)" if "," in text else ""
        raise argparse.ArgumentTypeError(f"takes one integer demonstration seed, not {text!r}{hint}") from None
    return text


def add_demonstration_args(group: ArgumentGroup, several: bool) -> None:
    """--shots/--shots-per-class (svdicl's and the authors' count), --num_fewshot (lm-eval's total), --seed/--seeds.

    `several`: the shot flags take comma lists (a sweep's grid); otherwise one number each.
    """
    kind = {"metavar": "K,K,..."} if several else {"type": non_negative_int, "metavar": "K"}
    group.add_argument(
        "--shots",
        "--shots-per-class",
        dest="shots",
        help="demonstrations per class, the paper's convention (default: each task's paper setting: 5, AGNews 2)",
        **kind,
    )
    group.add_argument(
        "--num_fewshot",
        "--num-fewshot",
        dest="num_fewshot",
        help="demonstrations in all, as in lm-eval: as many of every class as the total allows, any left over one "
        "each from classes the seed picks (5 on RTE: 2 per class + 1)",
        **kind,
    )
    group.add_argument(
        "--seeds", dest="seeds", action="append", metavar="S,S,...", help="demonstration seeds, e.g. 0,1,2 (default: 0)"
    )
    group.add_argument(
        "--seed", dest="seeds", action="append", type=one_seed, metavar="S", help="one demonstration seed; repeat for several"
    )


def seeds_from(args: argparse.Namespace) -> tuple[int, ...]:
    """Every --seed and --seeds, in order, without repeats (default: 0)."""
    from svdicl.experiments.grid import parse_ints

    return parse_ints(",".join(args.seeds or ["0"]), "--seeds")


def check_shot_flags(args: argparse.Namespace) -> None:
    """Refuse --shots with --num_fewshot: one count, in one convention."""
    if args.shots is not None and args.num_fewshot is not None:
        raise SvdiclError("give --shots (per class) or --num_fewshot (in all), not both")


def shot_flags(args: argparse.Namespace) -> tuple[int | None, bool]:
    """The shot count the flags ask for (None: each task's paper setting) and whether it counts in all."""
    check_shot_flags(args)
    return (args.shots, False) if args.num_fewshot is None else (args.num_fewshot, True)


def add_output_arg(group: ArgumentGroup, help: str, **kwargs) -> None:
    """--output (lm-eval's --output_path): always a folder; --log_samples, accepted since samples are always written."""
    group.add_argument("--output", "--output-path", "--output_path", dest="output", help=help, **kwargs)
    group.add_argument(
        "--log-samples",
        "--log_samples",
        dest="log_samples",
        action="store_true",
        help="accepted for lm-eval users: svdicl always writes its per-example samples (resume and paired tests read them)",
    )


def output_folder(text: str) -> Path:
    """--output as a folder; a results-file name (lm-eval's `--output_path out.json`) is refused."""
    folder = Path(text)
    if folder.suffix in (".json", ".jsonl"):
        raise SvdiclError(f"--output {text} names a file; svdicl writes results.json and samples into a folder: give one")
    return folder


def add_sweep_scoring_args(p: argparse.ArgumentParser) -> None:
    """Scoring flags shared by sweep and search: every path, the precision, and the SVD's."""
    group = add_scoring_args(p, paths=("layer", "prefix", "plain"))
    group.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "mixed"],
        help="float32 = the reference; mixed = decoder matmuls in bfloat16, every example whose decision could differ "
        "re-scored in float32 (experimental: see docs/fast-paths.md; default: float32)",
    )
    add_svd_args(group)


def add_executor_args(p: argparse.ArgumentParser) -> None:
    """Where cells are computed, shared by sweep and search."""
    group = p.add_argument_group("executor (where cells are computed; the store is written here either way)")
    group.add_argument(
        "--executor",
        default="local",
        choices=["local", "ray"],
        help="local = this process; ray = worker actors that each load the model once and score whole sweep lines "
        '(pip install "svdicl[ray]") (default: local)',
    )
    group.add_argument("--address", help="Ray cluster to join, e.g. auto or HEAD:6379 (default: start one on this machine)")
    group.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes, each loads the model once (default local: the free cores, max(1, cores - load average); "
        "ray: one per GPU with --gpus-per-worker, else one per CPU)",
    )
    group.add_argument(
        "--threads-per-worker",
        type=int,
        metavar="T",
        help="torch threads of each local worker process (default: 1; one process per free core is faster on a busy machine)",
    )
    group.add_argument(
        "--gpus-per-worker",
        type=float,
        metavar="N",
        help="GPUs each Ray worker reserves; its --device cuda is then its own (default: 1 with --device cuda, else 0)",
    )


def executor_options(args: argparse.Namespace):
    """The executor the executor flags ask for, checked now (before the model loads)."""
    from svdicl.experiments.launch import ExecutorOptions

    return ExecutorOptions(args.executor, args.workers, args.threads_per_worker, args.address, args.gpus_per_worker)


def scoring_from(args: argparse.Namespace):
    """The Scoring of sweep and search that the scoring flags describe."""
    from svdicl.experiments.cells import Scoring
    from svdicl.memory import parse_memory

    return Scoring(
        batch_size=args.batch_size,
        length_normalize=args.length_normalize,
        svd=args.svd_dtype,
        allow_tied=args.allow_tied,
        path=args.path,
        cache_memory=parse_memory(args.cache_memory),
        precision=args.precision,
        calibration=args.calibration,
    )


def check_output(output: str | None) -> Path:
    """The --output folder of a result store; a one-line error if missing or a file."""
    if not output:
        raise SvdiclError("give --output DIR: the folder that holds the result store (and resumes it)")
    folder = output_folder(output)
    if folder.exists() and not folder.is_dir():
        raise SvdiclError(f"--output {folder} is a file; give a folder")
    return folder
