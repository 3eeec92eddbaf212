"""Two `svdicl eval` folders on the same examples: is B more accurate than A, and by how much, honestly.

    comparison = compare_evals("out/base", "out/pruned")
    comparison.paired.difference, comparison.paired.low, comparison.paired.high, comparison.paired.p_value
    compare_tasks("runs/base", "runs/pruned")   # multi-task eval folders: one comparison per task, Holm over them

The unit of inference is the example, never example x seed: each example's correctness is averaged
over the seeds of its arm first (the demonstrations of seed s are the same in both arms, but the
examples are what is sampled), then `svdicl.stats.paired_comparison` gives the mean paired difference
with its t-interval, an exact sign-flip p-value and the minimum detectable effect at 80% power.
Both folders must hold the same task, split and example ids (same gold labels); anything else is
refused in one line naming the mismatch, because an unpaired difference is not what this reports.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from svdicl.errors import SvdiclError
from svdicl.experiments.evaluate import RESULTS_FILE, SAMPLES_FILE, STORE_DIR
from svdicl.stats import Estimate, PairedComparison, holm, paired_comparison, seed_mean_ci
from svdicl.store import CELLS_FILE

EVAL_FORMAT = "svdicl-eval/"
SAMPLE_KEYS = ("seed", "id", "gold", "prediction", "correct")


@dataclass(frozen=True)
class EvalFolder:
    """A finished `svdicl eval` output folder: its results.json and its samples, checked to be complete."""

    folder: Path
    results: dict[str, Any]
    samples: tuple[dict[str, Any], ...]

    @property
    def config(self) -> dict[str, Any]:
        """results.json's config: model, task, split, seeds, edit, scoring."""
        return self.results["config"]

    @property
    def model_name(self) -> str:
        """The model as given to eval (alias, path or Hub id), else the fingerprint's start."""
        model = self.config.get("model", {})
        return str(model.get("source") or model.get("fingerprint", "")[:10] or "model")

    @property
    def fingerprint(self) -> str:
        """Digest of the weights as loaded (before the edit)."""
        return str(self.config.get("model", {}).get("fingerprint", ""))

    @property
    def dtype(self) -> str:
        """The dtype the model was loaded in."""
        return str(self.config.get("model", {}).get("dtype", ""))

    @property
    def task(self) -> str:
        """The task's name."""
        return str(self.config["task"]["name"])

    @property
    def split(self) -> str:
        """The split scored (test or validation)."""
        return str(self.config["split"])

    @property
    def metric(self) -> str:
        """The task's headline metric (the paired comparison is always on accuracy)."""
        return str(self.results.get("summary", {}).get("metric") or "accuracy")

    @property
    def edit(self) -> str:
        """The edit's key: `none` for the unpruned model, else e.g. `29:mlp:0.9`."""
        return str(self.config.get("edit", {}).get("key", "none"))

    @property
    def seeds(self) -> tuple[int, ...]:
        """The demonstration seeds, in results.json's order."""
        return tuple(self.config["seeds"])

    @property
    def ids(self) -> list[str]:
        """The example ids in file order (those of the first seed; every seed holds the same)."""
        first = self.seeds[0]
        return [s["id"] for s in self.samples if s["seed"] == first]

    def table(self, field: str) -> dict[str, list[Any]]:
        """id -> the field's value per seed, in `seeds` order."""
        rows: dict[str, list[Any]] = {i: [] for i in self.ids}
        for seed in self.seeds:
            for s in self.samples:
                if s["seed"] == seed:
                    rows[s["id"]].append(s[field])
        return rows


def read_eval(folder: str | Path) -> EvalFolder:
    """Read and check one eval folder: results.json of format svdicl-eval/*, every seed scored on the same ids."""
    folder = Path(folder)
    results_path, samples_path = folder / RESULTS_FILE, folder / SAMPLES_FILE
    if not results_path.is_file():
        tasks = sorted(p.parent.name for p in folder.glob(f"*/{RESULTS_FILE}"))
        if tasks:
            raise SvdiclError(f"{folder} holds evaluations of several tasks ({', '.join(tasks)}); give one task's folder")
        if (folder / STORE_DIR / CELLS_FILE).is_file():
            raise SvdiclError(f"{folder} is an unfinished evaluation; rerun the same svdicl eval command to finish it")
        raise SvdiclError(f"{folder} holds no {RESULTS_FILE}; give the --output folder of svdicl eval")
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
        fmt = results.get("format", "")
        config = results["config"]
        seeds = [int(s) for s in config["seeds"]]
        if not seeds or not isinstance(config["task"]["name"], str) or not isinstance(config["split"], str):
            raise ValueError("no seeds, task name or split")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise SvdiclError(f"{results_path} is not a readable svdicl eval result; rerun svdicl eval") from None
    if not str(fmt).startswith(EVAL_FORMAT):
        raise SvdiclError(f"{results_path} is not an svdicl eval result (format {fmt!r}); give the --output of svdicl eval")
    samples = _read_samples(samples_path)
    ids: dict[int, list[str]] = {seed: [] for seed in seeds}
    for number, sample in enumerate(samples, start=1):
        if sample["seed"] not in ids:
            raise SvdiclError(f"{samples_path} line {number} is of seed {sample['seed']}, not one of {RESULTS_FILE}'s seeds")
        ids[sample["seed"]].append(sample["id"])
    first = ids[seeds[0]]
    for seed, found in ids.items():
        if len(set(found)) != len(found):
            raise SvdiclError(f"{samples_path}: seed {seed} scores an example twice; rerun svdicl eval with --overwrite")
        if set(found) != set(first) or not found:
            raise SvdiclError(f"{samples_path}: seed {seed} scored other examples than seed {seeds[0]}; rerun with --overwrite")
    return EvalFolder(folder, results, tuple(samples))


def _read_samples(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SvdiclError(f"{path} is missing; rerun svdicl eval with --overwrite to score the examples again")
    samples = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)  # bad UTF-8 raises UnicodeDecodeError, a ValueError
            if not isinstance(sample, dict) or any(key not in sample for key in SAMPLE_KEYS):
                raise ValueError
        except ValueError:
            raise SvdiclError(
                f"{path} line {number} is damaged (not a sample with {', '.join(SAMPLE_KEYS)}); rerun eval with --overwrite"
            ) from None
        samples.append(sample)
    return samples


@dataclass(frozen=True)
class Arm:
    """One side of a comparison: where it came from and its accuracy (seed mean) with a CI over examples."""

    folder: str
    model: str
    edit: str
    seeds: tuple[int, ...]
    accuracy: Estimate

    def to_dict(self) -> dict[str, Any]:
        """The arm as JSON (the `a`/`b` entries of svdicl.compare/1)."""
        return {"folder": self.folder, "model": self.model, "edit": self.edit, "seeds": list(self.seeds),
                "accuracy": self.accuracy.to_dict()}  # fmt: skip


@dataclass(frozen=True)
class Comparison:
    """B against A on the same `n` examples of one task and split; `paired.difference` = accuracy B - accuracy A."""

    task: str
    split: str
    n: int
    a: Arm
    b: Arm
    paired: PairedComparison
    headline: str = "accuracy"  # the task's own metric; the comparison is on accuracy whatever it is
    p_holm: float | None = None  # Holm-adjusted over the tasks of one `compare_tasks` call; None for one comparison

    def to_dict(self) -> dict[str, Any]:
        """The comparison as JSON (an entry of svdicl.compare/1's `comparisons`, what `svdicl compare --json` prints)."""
        return {"task": self.task, "split": self.split, "n": self.n, "metric": "accuracy", "headline_metric": self.headline,
                "a": self.a.to_dict(), "b": self.b.to_dict(), "paired": self.paired.to_dict(), "p_holm": self.p_holm}  # fmt: skip


def compare_evals(a: str | Path | EvalFolder, b: str | Path | EvalFolder) -> Comparison:
    """The example-level paired comparison of two eval folders (B - A), refusing folders that are not paired."""
    first = a if isinstance(a, EvalFolder) else read_eval(a)
    second = b if isinstance(b, EvalFolder) else read_eval(b)
    paired = paired_accuracy(first, second)
    ids = first.ids
    return Comparison(first.task, first.split, len(ids), _arm(first, ids), _arm(second, ids), paired, first.metric)


def compare_tasks(a: str | Path, b: str | Path) -> list[Comparison]:
    """`compare_evals` of two eval folders, or of each task of two multi-task eval folders (one subfolder per task,
    as `svdicl eval --task a,b` writes them) with Holm's adjustment over the tasks; both must hold the same tasks."""
    a, b = Path(a), Path(b)
    if (a / RESULTS_FILE).is_file() or (b / RESULTS_FILE).is_file():
        return [compare_evals(a, b)]
    tasks_a, tasks_b = _task_folders(a), _task_folders(b)
    if not tasks_a or not tasks_b or set(tasks_a) != set(tasks_b):
        for folder, tasks in ((a, tasks_a), (b, tasks_b)):
            if not tasks:
                read_eval(folder)  # says what the folder is instead
        raise SvdiclError(
            f"A ({a}) holds tasks {', '.join(sorted(tasks_a))} and B ({b}) {', '.join(sorted(tasks_b))}; "
            "compare folders of the same tasks, or one task's folder of each"
        )
    found = [compare_evals(tasks_a[task], tasks_b[task]) for task in sorted(tasks_a)]
    adjusted = holm([c.paired.p_value for c in found])
    return [dataclasses.replace(c, p_holm=p) for c, p in zip(found, adjusted, strict=True)]


def _task_folders(folder: Path) -> dict[str, Path]:
    return {path.parent.name: path.parent for path in sorted(folder.glob(f"*/{RESULTS_FILE}"))}


def paired_accuracy(a: EvalFolder, b: EvalFolder) -> PairedComparison:
    """B - A on the same examples, each example's correctness averaged over its arm's seeds (refuses unpaired folders)."""
    _check_paired(a, b)
    ids = a.ids
    correct_a, correct_b = _matrix(a, "correct", ids), _matrix(b, "correct", ids)
    if correct_a.shape[1] == correct_b.shape[1]:
        return paired_comparison(correct_a, correct_b)
    # other seed counts: still one value per example and arm, the mean over that arm's seeds
    return paired_comparison(correct_a.mean(axis=1), correct_b.mean(axis=1))


def _check_paired(a: EvalFolder, b: EvalFolder) -> None:
    where = f"A ({a.folder}) and B ({b.folder})"
    if (a.task, a.split) != (b.task, b.split):
        raise SvdiclError(f"{where} are {a.task} {a.split} and {b.task} {b.split}; compare evaluations of one task and split")
    ids_a, ids_b = set(a.ids), set(b.ids)
    if ids_a != ids_b:
        only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
        raise SvdiclError(
            f"{where} scored different examples: {len(only_a)} only in A{_examples(only_a)}, {len(only_b)} only in B"
            f"{_examples(only_b)}; compare evaluations with the same --limit and data"
        )
    gold_a, gold_b = a.table("gold"), b.table("gold")
    differ = sorted(i for i in ids_a if gold_a[i][0] != gold_b[i][0])
    if differ:
        raise SvdiclError(f"{where} give {len(differ)} examples other gold labels{_examples(differ)}; they scored other data")


def _examples(ids: Sequence[str]) -> str:
    return f" (e.g. {', '.join(ids[:3])})" if ids else ""


def _matrix(output: EvalFolder, field: str, ids: Sequence[str]) -> np.ndarray:
    """(examples x seeds) array of a sample field, rows in `ids` order."""
    table = output.table(field)
    return np.array([table[i] for i in ids], dtype=float)


def _arm(output: EvalFolder, ids: Sequence[str]) -> Arm:
    gold = [output.table("gold")[i][0] for i in ids]
    predicted = _matrix(output, "prediction", ids).T.astype(np.int64)  # seeds x examples
    accuracy = seed_mean_ci(gold, predicted, "accuracy", int(max(gold + predicted.ravel().tolist())) + 1)
    return Arm(str(output.folder), output.model_name, output.edit, output.seeds, accuracy)
