"""What `svdicl eval` returns: typed views of results.json, read by the printers and by `svdicl.evaluate`'s callers.

Kept apart from svdicl.experiments.evaluate so that `import svdicl` does not import the scoring stack.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from svdicl.stats import Estimate


@dataclass(frozen=True)
class Spread:
    """A metric over seeds: mean, sample standard deviation (None for one seed), min, max and number of seeds."""

    mean: float
    std: float | None
    min: float
    max: float
    n: int


@dataclass(frozen=True)
class SeedEvaluation:
    """One seed's demonstrations: metrics with 95% intervals over the scored examples."""

    seed: int
    n_examples: int
    accuracy: Estimate
    macro_f1: Estimate
    n_ties: int
    wall_s: float = field(compare=False)  # timing, not a result: equal evaluations may differ in it
    values: Mapping[str, float | None]  # every metric's point value by name: "balanced_accuracy", "batch:accuracy", ...
    calibration: tuple[str, ...]  # the calibration methods applied, in order


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` (and `svdicl.evaluate`) returns: one entry per seed, each metric's spread over the seeds,
    and the content of results.json (`to_json()`, also as `results`)."""

    task: str
    split: str
    shots_per_class: int  # at least: with `extra_shots`, that many classes (picked per seed) have one more
    shots_total: int
    edit: str  # the applied edit's key, "none" for the unpruned model
    path: str | list[str]  # the scoring path taken (one per seed where they differ)
    fallback: str | None  # why a faster path was not taken
    runs: tuple[SeedEvaluation, ...]
    spread: Mapping[str, Spread]  # by metric: accuracy, macro_f1, and each as `<method>:<metric>` per calibration
    folder: Path | None  # where results.json and samples.jsonl were written, if anywhere
    results: dict

    @property
    def extra_shots(self) -> int:
        """Demonstrations beyond `shots_per_class` of every class, one each from as many classes (0 unless the
        total asked for was one the classes do not divide)."""
        return self.results["config"].get("extra_shots", 0)

    @property
    def accuracy(self) -> float:
        """Mean accuracy over the seeds (each seed's interval is in `runs`)."""
        return self.spread["accuracy"].mean

    @property
    def macro_f1(self) -> float:
        """Mean macro-F1 over the seeds."""
        return self.spread["macro_f1"].mean

    def to_json(self) -> dict:
        """The content of results.json."""
        return copy.deepcopy(self.results)

    @classmethod
    def from_results(cls, results: dict, folder: str | Path | None = None) -> Evaluation:
        """Read the typed view of a results.json dict (e.g. `json.load` of an eval folder's file)."""
        config = results["config"]
        runs = tuple(
            SeedEvaluation(
                seed=run["seed"],
                n_examples=run["n_examples"],
                accuracy=Estimate.from_dict(run["metrics"]["accuracy"]),
                macro_f1=Estimate.from_dict(run["metrics"]["macro_f1"]),
                n_ties=run["n_ties"],
                wall_s=run.get("timing", {}).get("wall_s", 0.0),
                values={name: entry.get("value") for name, entry in run["metrics"].items()},
                calibration=tuple(run.get("calibration", {})),
            )
            for run in results["runs"]
        )
        summary = {name: Spread(**value) for name, value in results["summary"].items() if isinstance(value, dict)}
        return cls(
            task=config["task"]["name"],
            split=config["split"],
            shots_per_class=config["shots_per_class"],
            shots_total=config["shots_total"],
            edit=config["edit"]["key"],
            path=config["scoring"].get("path"),
            fallback=config["scoring"].get("fallback"),
            runs=runs,
            spread=summary,
            folder=None if folder is None else Path(folder),
            results=results,
        )
