"""`svdicl compare A B`: the paired, seed-aware comparison of two `svdicl eval` folders (B against A)."""

from __future__ import annotations

import argparse
import json


def add(sub) -> None:
    """Register `svdicl compare` on the subparsers `sub`."""
    p = sub.add_parser(
        "compare",
        help="paired comparison of two eval folders on the same examples: difference, CI, p-value, detectable effect",
        description="Compares the --output folders of two `svdicl eval` runs of one task and split on the same examples "
        "(B - A). Each example's correctness is averaged over its seeds first, so n is the number of examples: each "
        "arm's accuracy with a 95% CI, the paired difference with its 95% t-interval, an exact sign-flip p-value and "
        "the minimum detectable difference at 80% power. Folders that scored other examples are refused.",
    )
    p.add_argument("a", metavar="A", help="eval --output folder of the reference arm (e.g. the unpruned model)")
    p.add_argument("b", metavar="B", help="eval --output folder compared with it (e.g. the pruned model)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON (schema svdicl.compare/1)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Compare the two folders and print each arm, the paired difference, p and the detectable effect (or JSON)."""
    from svdicl.experiments.compare import compare_tasks

    comparisons = compare_tasks(args.a, args.b)
    if args.json:
        print(json.dumps({"format": "svdicl.compare/1", "comparisons": [c.to_dict() for c in comparisons]}, indent=2))
        return 0
    for comparison in comparisons:
        _print(comparison, len(comparisons))
    return 0


def _print(comparison, tasks: int) -> None:
    paired = comparison.paired
    print(f"{comparison.task} {comparison.split}: B - A on the same {comparison.n} examples, each averaged over its seeds")
    if comparison.headline != "accuracy":
        print(f"  (paired on accuracy; the task's headline metric is {comparison.headline}, see each folder's results.json)")
    for name, arm in (("A", comparison.a), ("B", comparison.b)):
        acc = arm.accuracy
        print(
            f"  {name}  accuracy {acc.value:.4f} [{acc.low:.4f}, {acc.high:.4f}] ({acc.method})  {arm.model} edit={arm.edit}  "
            f"seeds {','.join(map(str, arm.seeds))}  ({arm.folder})"
        )
    level = f"{paired.confidence:.0%}"
    print(
        f"  B - A  {paired.difference:+.4f} [{paired.low:+.4f}, {paired.high:+.4f}]  ({level} {paired.ci_method} over examples)"
    )
    holm = "" if comparison.p_holm is None else f"; Holm over {tasks} tasks: p = {comparison.p_holm:.4g}"
    print(f"  p = {paired.p_value:.4g}  ({paired.method}, two-sided{holm})")
    mde = "none (no example differs)" if paired.mde is None else f"±{paired.mde:.4f}"
    print(f"  minimum detectable difference ({paired.power:.0%} power, α = {1 - paired.confidence:.2g}): {mde}")
