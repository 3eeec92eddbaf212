"""What a search returns and writes, and how it is read back: the `svdicl.search/1` record (docs/experiments.md)
as frozen dataclasses, DIR/search/<task>-<module>.json beside replayable eval and prune configs, and the model
card's account of an export.

The writer owns the schema: `svdicl report` reads search results through `read_search` here.  `read_search`
gives the JSON dict, not a `SearchRecord`: the report also reads files that older svdicl versions wrote,
with fewer fields (`mcnemar_p` before `p_value`, no arms), and checks only what it draws.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from svdicl.errors import SvdiclError
from svdicl.experiments.condition import AGGREGATE
from svdicl.files import write_atomic
from svdicl.stats import PairedComparison

SEARCH_DIR = "search"
SEARCH_FORMAT = "svdicl.search/1"


@dataclass(frozen=True)
class SearchModel:
    """The searched model: its display name, the fingerprint of its weights and its dtype."""

    name: str
    fingerprint: str
    dtype: str

    def to_json(self) -> dict:
        """The record's `model` entry."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TestMetric:
    """A test metric: one seed's value with its 95% CI over examples, or over several seeds their mean, the CI
    of the mean and the standard deviation over seeds (`std`, None for one seed)."""

    value: float
    ci_low: float | None
    ci_high: float | None
    std: float | None = None

    def to_json(self, *, std: bool = True) -> dict:
        """`value`, `ci_low`, `ci_high`, and `std` unless `std` is False (a seed's own entry has none)."""
        entry = {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high}
        return {**entry, "std": self.std} if std else entry


@dataclass(frozen=True)
class TestSummary:
    """Step 4: the unpruned and the rate*-pruned model on the test split, and their example-level paired
    comparison on the same examples (each example's correctness averaged over seeds)."""

    n: int
    baseline: TestMetric
    pruned: TestMetric
    paired: PairedComparison

    @property
    def p_value(self) -> float:
        """The paired test's p-value (exact McNemar for one seed)."""
        return self.paired.p_value

    def to_json(self) -> dict:
        """The record's `test` entry."""
        return {"split": "test", "n": self.n, "baseline": self.baseline.to_json(), "pruned": self.pruned.to_json(),
                "p_value": self.p_value, "paired": self.paired.to_dict()}  # fmt: skip


@dataclass(frozen=True)
class CalibratedCurve:
    """The validation curve under one calibration method and the rate* chosen on it."""

    values: tuple[float, ...]
    rate_star: float


@dataclass(frozen=True)
class Validation:
    """Step 3: the metric at each candidate rate on the validation split, mean over seeds; per calibration method
    its own curve and rate*."""

    n: int
    values: tuple[float, ...]
    calibrated: dict[str, CalibratedCurve]

    def to_json(self) -> dict:
        """The record's `validation` entry."""
        calibrated = {m: {"values": list(c.values), "rate_star": c.rate_star} for m, c in self.calibrated.items()}
        return {"split": "validation", "n": self.n, "values": list(self.values), "calibrated": calibrated}


@dataclass(frozen=True)
class SeedResult:
    """One demonstration seed: its validation curve, its test metric of the unpruned and the rate*-pruned model
    (rate* is shared by the seeds), exact McNemar on that seed alone, and the ids of its store cells."""

    seed: int
    validation: tuple[float, ...]
    baseline: TestMetric
    pruned: TestMetric
    mcnemar_p: float
    only_baseline_correct: int
    only_pruned_correct: int
    validation_cells: tuple[str, ...]
    baseline_cell: str
    pruned_cell: str

    def to_json(self) -> dict:
        """The seed's entry in the record's `seeds`."""
        return {
            "seed": self.seed,
            "validation": list(self.validation),
            "baseline": self.baseline.to_json(std=False),
            "pruned": self.pruned.to_json(std=False),
            "mcnemar_p": self.mcnemar_p,
            "discordant": {"only_baseline_correct": self.only_baseline_correct, "only_pruned_correct": self.only_pruned_correct},
            "cells": {"validation": list(self.validation_cells), "baseline": self.baseline_cell, "pruned": self.pruned_cell},
        }


@dataclass(frozen=True)
class ScoringInfo:
    """How the cells were scored: the scoring options in their keys, the forward paths taken and any fallbacks."""

    options: dict[str, Any]
    paths: tuple[str, ...]
    fallbacks: tuple[str, ...]

    def to_json(self) -> dict:
        """The record's `scoring` entry."""
        return {"options": self.options, "paths": list(self.paths), "fallbacks": list(self.fallbacks)}


@dataclass(frozen=True)
class SearchRecord:
    """What `search` returns and DIR/search/<task>-<module>.json holds (`to_json`, schema svdicl.search/1).

    `per_layer` (condition number per layer, None where not finite), `top_k` and `top_layers` are None, None
    and () when the layer was given; `shots` counts demonstrations per class, `extra_shots` those beyond it (one each
    from as many classes, for a total the classes do not divide); `limit` the examples per split;
    `arms` are experiments/arms.py's entries as it writes them.
    """

    created: str
    model: SearchModel
    task: str
    task_source: str
    module: str
    metric: str
    shots: int
    shots_total: int
    limit: dict[str, int | None]
    data: str
    per_layer: dict[str, float | None] | None
    top_k: int | None
    top_layers: tuple[int, ...]
    layer: int
    rates: tuple[float, ...]
    validation: Validation
    rate_star: float
    test: TestSummary
    arms: tuple[dict, ...]
    seeds: tuple[SeedResult, ...]
    scoring: ScoringInfo
    wall_s: float
    cells_scored: int
    validation_sampling: str = "random"  # how the validation limit drew its subset (experiments/runs.py SAMPLINGS)
    extra_shots: int = 0

    @property
    def layer_from(self) -> str:
        """Where the layer came from: "given", or "condition numbers" when steps 1-2 chose it."""
        return "given" if self.per_layer is None else "condition numbers"

    @property
    def stem(self) -> str:
        """`sst2-mlp`, `rte-q+k`: the file name of the result, without suffix."""
        return f"{self.task}-{self.module.replace(',', '+')}"

    def to_json(self) -> dict:
        """The svdicl.search/1 dict, key for key as the result file holds it (less `config` and `prune_config`)."""
        return {
            "format": SEARCH_FORMAT,
            "created": self.created,
            "model": self.model.to_json(),
            "task": self.task,
            "task_source": self.task_source,
            "module": self.module,
            "metric": self.metric,
            "shots": self.shots,
            "shots_per_class": self.shots,
            "extra_shots": self.extra_shots,
            "shots_total": self.shots_total,
            "limit": dict(self.limit),
            "validation_sampling": self.validation_sampling,
            "data": self.data,
            "condition": None if self.per_layer is None else {"aggregate": AGGREGATE, "per_layer": dict(self.per_layer)},
            "top_k": self.top_k,
            "top_layers": list(self.top_layers),
            "layer": self.layer,
            "layer_from": self.layer_from,
            "rates": list(self.rates),
            "validation": self.validation.to_json(),
            "rate_star": self.rate_star,
            "test": self.test.to_json(),
            "arms": list(self.arms),
            "seeds": [seed.to_json() for seed in self.seeds],
            "scoring": self.scoring.to_json(),
            "timing": {"wall_s": self.wall_s, "cells_scored": self.cells_scored},
        }


def card_notes(result: SearchRecord) -> str:
    """The model card's account of a search's export: how Algorithm 1 chose the edit and what it measured."""
    test, metric = result.test, result.metric
    layer = (
        f"layer {result.layer}, the largest condition number among the top {result.top_k} ({list(result.top_layers)})"
        if result.top_layers
        else f"layer {result.layer} (given)"
    )
    curve = ", ".join(f"{r:g}: {v:.4f}" for r, v in zip(result.rates, result.validation.values, strict=True))
    return (
        f"Algorithm 1 (svdicl search) on task `{result.task}`, module `{result.module}`, "
        f"{result.shots_total} demonstrations, seeds {[s.seed for s in result.seeds]}, model "
        f"`{result.model.name}`:\n\n"
        f"- {layer};\n"
        f"- validation {metric} per clipping rate (n = {result.validation.n}): {curve};\n"
        f"- rate* = {result.rate_star:g} (the validation argmax, ties to the smaller rate);\n"
        f"- test {metric} (n = {test.n}): unpruned {_card_estimate(test.baseline)}, this model "
        f"{_card_estimate(test.pruned)}, paired p = {test.p_value:.3g} ({test.paired.method}).\n"
    )


def _card_estimate(entry: TestMetric) -> str:
    return f"{entry.value:.4f} [{entry.ci_low:.4f}, {entry.ci_high:.4f}]"


def write_search(result: SearchRecord, directory: str | Path, *, data_dir: str | Path | None = None) -> list[Path]:
    """DIR/search/<task>-<module>.json plus replayable configs: `.yaml` for `svdicl eval --config` (the
    test evaluation of the chosen model) and, when rate* > 0, `.prune.yaml` for `svdicl prune --config`.

    Returns the paths written, the JSON first and the eval config second."""
    folder = Path(directory) / SEARCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = result.stem
    spec = f"{result.layer}:{result.module}:{result.rate_star:g}"
    prune = [spec] if result.rate_star > 0 else []
    common = {"model": result.model.name, "dtype": result.model.dtype, "prune": prune,
              "svd_dtype": result.scoring.options["svd"]}  # fmt: skip
    evaluation = {
        "task": result.task_source,
        **({"num_fewshot": result.shots_total} if result.extra_shots else {"shots_per_class": result.shots}),
        "seed": [s.seed for s in result.seeds],
        "split": "test",
        "limit": result.limit["test"],
        "length_normalize": result.scoring.options["length_normalize"],
        **({"data_dir": str(Path(data_dir).resolve())} if data_dir is not None else {}),
        **common,
    }
    where = f"{result.task}, {result.module} of layer {result.layer}, rate* {result.rate_star:g}"
    unpruned = " (rate* = 0: the unpruned model)" if not prune else ""
    files = {
        f"{stem}.yaml": (
            f"# Algorithm 1's choice for {where}{unpruned}.\n"
            f"# Replays the test evaluation of the chosen model: svdicl eval --config {SEARCH_DIR}/{stem}.yaml --output DIR\n",
            evaluation,
        )
    }
    if prune:  # rate* = 0 leaves nothing to prune
        files[f"{stem}.prune.yaml"] = (
            f"# Algorithm 1's choice for {where}.\n"
            f"# Saves the chosen model: svdicl prune --config {SEARCH_DIR}/{stem}.prune.yaml --output DIR\n",
            common,
        )
    (folder / f"{stem}.prune.yaml").unlink(missing_ok=True)
    written = [
        write_atomic(folder / name, text + yaml.safe_dump(values, sort_keys=False)) for name, (text, values) in files.items()
    ]
    data = {
        **result.to_json(),
        "config": f"{SEARCH_DIR}/{stem}.yaml",
        "prune_config": f"{SEARCH_DIR}/{stem}.prune.yaml" if prune else None,
    }
    written.insert(0, write_atomic(folder / f"{stem}.json", json.dumps(data, indent=2, allow_nan=False) + "\n"))
    return written


def read_search(path: str | Path) -> dict[str, Any]:
    """One search result (schema `svdicl.search/1`, docs/experiments.md), checked for the fields the report needs."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SvdiclError(f"cannot read search result {file} ({exc}); rerun svdicl search") from None
    fmt = data.get("format", "") if isinstance(data, dict) else ""
    if not fmt.startswith("svdicl.search/"):
        raise SvdiclError(f"{file} is not an svdicl search result (format {fmt!r}); expected {SEARCH_FORMAT}")
    if int(fmt.rpartition("/")[2] or 0) > int(SEARCH_FORMAT.rpartition("/")[2]):
        raise SvdiclError(f"{file} has format {fmt}, newer than this svdicl reads; upgrade svdicl")
    required = ("task", "module", "layer", "rates", "rate_star", "validation.values", "test.baseline.value", "test.pruned.value")
    for dotted in required:
        node: Any = data
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise SvdiclError(f"search result {file} has no {dotted!r}; it does not follow {SEARCH_FORMAT}")
            node = node[part]
    values, rates = data["validation"]["values"], data["rates"]
    if len(values) != len(rates) or data["rate_star"] not in rates:
        raise SvdiclError(f"search result {file}: needs one validation value per rate and rate_star among the rates")
    return data
