"""`svdicl eval`: in-context learning accuracy with 95% CIs on the paper's tasks, optionally pruned."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from svdicl.cli.common import (
    add_demonstration_args,
    add_model_args,
    add_output_arg,
    add_prune_args,
    add_scoring_args,
    load,
    log,
    output_folder,
    positive_int,
    prune_specs,
    seeds_from,
    shot_flags,
)

if TYPE_CHECKING:
    from svdicl.experiments.eval_result import Evaluation
    from svdicl.stats import Estimate


def add(sub) -> None:
    """Register `svdicl eval` on the subparsers `sub`."""
    from svdicl.tasks import TASKS

    p = sub.add_parser(
        "eval",
        help="evaluate in-context learning on the paper's tasks (accuracy, macro-F1, 95%% CIs)",
        description="Evaluate in-context learning: label-word log-likelihoods after k demonstrations per class "
        "(--shots; or --num_fewshot demonstrations in all, as in lm-eval), metrics with 95% CIs over examples "
        "(Wilson for accuracy, BCa bootstrap for macro-F1), results.json + samples.jsonl. Resumes an interrupted --output.",
    )
    add_model_args(p)
    task = p.add_argument_group("task")
    task.add_argument(
        "--task",
        "--tasks",
        dest="task",
        action="append",
        metavar="TASK",
        help=f"task name ({', '.join(TASKS)}) or task YAML file; comma list or repeat for several",
    )
    add_demonstration_args(task, several=False)
    task.add_argument("--split", default="test", choices=["validation", "test"], help="examples to score (default: test)")
    task.add_argument(
        "--limit", type=positive_int, metavar="N", help="score only N examples (the same seeded subset for every run)"
    )
    task.add_argument("--data-dir", help="folder of <task>/<split>.jsonl files (default: env SVDICL_DATA, else the Hub)")
    scoring = add_scoring_args(p, paths=("prefix", "plain"))
    scoring.add_argument(
        "--padding-side", default="left", choices=["left", "right"], help="batch padding side of the plain path (default: left)"
    )
    add_prune_args(p)
    out = p.add_argument_group("output")
    add_output_arg(out, help="folder for results.json and samples.jsonl (required)")
    out.add_argument("--overwrite", action="store_true", help="discard results of a different evaluation in --output")
    out.add_argument(
        "--dry-run",
        action="store_true",
        help="print the cells, examples, tokens and an estimated time (from a short timing here); score and write nothing",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate each --task under the optional edit and print per-seed metrics with their CIs."""
    from svdicl.errors import SvdiclError
    from svdicl.experiments.evaluate import RESULTS_FILE, evaluate
    from svdicl.memory import parse_memory
    from svdicl.outputs import exclusive
    from svdicl.tasks import get_task

    if not args.task or not args.output:
        raise SvdiclError("give --task (e.g. --task sst2) and --output DIR")
    tasks = [get_task(name) for text in args.task for name in text.split(",") if name]
    shots, total = shot_flags(args)
    specs = prune_specs(args, required=False)
    cache_memory = parse_memory(args.cache_memory)
    seeds = list(seeds_from(args))
    root = output_folder(args.output)
    loaded = load(args)
    if args.dry_run:
        from svdicl.experiments.dryrun import dry_run_eval

        edit = ";".join(str(spec) for spec in specs if spec.rate > 0) or "unpruned"
        outputs = [root if len(tasks) == 1 else root / task.name for task in tasks]
        print(
            dry_run_eval(
                loaded, tasks, split=args.split, shots=shots, shots_total=total, seeds=seeds, limit=args.limit, edit=edit,
                data_dir=args.data_dir, outputs=outputs, batch_size=args.batch_size, path=args.path, cache_memory=cache_memory,
                calibration=args.calibration,
            ).text()
        )  # fmt: skip
        return 0
    for task in tasks:
        folder = root if len(tasks) == 1 else root / task.name
        if (folder / RESULTS_FILE).is_file() and not args.overwrite:
            log(args, f"{folder / RESULTS_FILE} exists; reporting it (if it is the same evaluation) without rescoring")
        with exclusive(folder, "eval"):  # a second eval into this folder at the same time is refused
            evaluation = evaluate(
                loaded,
                task,
                split=args.split,
                shots=shots,
                shots_total=total,
                seeds=seeds,
                limit=args.limit,
                specs=specs,
                svd=args.svd_dtype,
                allow_tied=args.allow_tied,
                batch_size=args.batch_size,
                padding_side=args.padding_side,
                length_normalize=args.length_normalize,
                data_dir=args.data_dir,
                output=folder,
                overwrite=args.overwrite,
                quiet=args.quiet,
                path=args.path,
                cache_memory=cache_memory,
                calibration=args.calibration,
            )
        _print(task.name, evaluation, folder)
    return 0


def _print(name: str, evaluation: Evaluation, folder: Path) -> None:
    print(
        f"{name}  split={evaluation.split}  shots={evaluation.shots_total} ({_per_class(evaluation)})  "
        f"edit={evaluation.edit}  path={evaluation.path}  -> {folder / 'results.json'}"
    )
    if evaluation.fallback:
        print(f"  ({evaluation.fallback})")
    for run in evaluation.runs:
        print(
            f"  seed {run.seed:<4} n={run.n_examples:<6} accuracy {_ci(run.accuracy)}  macro-F1 {_ci(run.macro_f1)}"
            f"  ties {run.n_ties}  {run.wall_s:.1f} s"
        )
        for method in [None, *run.calibration]:
            print(f"    {method or 'uncalibrated'}: {_bias(run.values, f'{method}:' if method else '')}")
    if len(evaluation.runs) > 1:
        acc, f1 = evaluation.spread["accuracy"], evaluation.spread["macro_f1"]
        print(
            f"  over {acc.n} seeds: accuracy {acc.mean:.4f} ± {acc.std:.4f} (min {acc.min:.4f}, max {acc.max:.4f})"
            f"  macro-F1 {f1.mean:.4f} ± {f1.std:.4f}\n  [ ]: 95% CI over examples; ±: standard deviation over seeds"
        )


def _per_class(evaluation: Evaluation) -> str:
    """`2/class`, or `2/class + 1` where the total left demonstrations over (one each from classes the seed picks)."""
    extra = f" + {evaluation.extra_shots}" if evaluation.extra_shots else ""
    return f"{evaluation.shots_per_class}/class{extra}"


def _bias(values: Mapping[str, float | None], prefix: str) -> str:
    """Accuracy, balanced accuracy, top-answer share and (binary) AUC of one way of predicting."""
    value = {name: values[prefix + name] for name in ("accuracy", "balanced_accuracy", "top_answer_share", "auc")}
    auc = f"  AUC {value['auc']:.4f}" if value["auc"] is not None else ""
    return (
        f"accuracy {value['accuracy']:.4f}  balanced {value['balanced_accuracy']:.4f}"
        f"  top-answer share {value['top_answer_share']:.3f}{auc}"
    )


def _ci(estimate: Estimate) -> str:
    return f"{estimate.value:.4f} [{estimate.low:.4f}, {estimate.high:.4f}]"
