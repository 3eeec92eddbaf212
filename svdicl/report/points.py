"""Stored sweep cells as points of rate curves: a metric per (task, module, layers, rate), seeds averaged."""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from svdicl.errors import SvdiclError
from svdicl.report.labels import layer_order, model_labels, module_order, slug, task_label, task_order
from svdicl.store import Cell, shots_label

TASK_METRIC = "task"  # --metric value: each task's own headline metric (accuracy; macro-F1 for COPA)


@dataclass(frozen=True)
class Point:
    """One point of a rate curve: a metric of a (task, module, layers, rate) cell, over its seeds.

    `layers`/`modules` are None for the unpruned model (rate 0).  `low`/`high` are the cell's
    95% bootstrap interval for one seed, mean ± one sample standard deviation for several.
    `constant`: every seed gave one and the same answer to every example (a collapsed model).
    """

    model: str
    model_name: str
    task: str
    split: str
    shots: int
    limit: int | None
    options: tuple[tuple[str, Any], ...]
    layers: str | None
    modules: str | None
    rate: float
    metric: str
    value: float
    low: float
    high: float
    seeds: int
    n: int
    constant: bool = False
    extra_shots: int = 0  # beyond `shots` per class (a total the classes do not divide): a shot count of its own

    @property
    def shot_count(self) -> tuple[int, int]:
        """(shots per class, extra shots): what tells curves of different shot counts apart."""
        return self.shots, self.extra_shots

    @property
    def shots_label(self) -> str:
        """`5`, or `2+1` for 2 per class plus 1 extra."""
        return shots_label(self.shots, self.extra_shots)

    @property
    def setting(self) -> tuple:
        """What must match for two points to share a figure."""
        return (self.model, self.split, self.limit, self.options)


def headline_metric(task: str, metric: str = TASK_METRIC) -> str:
    """`metric`, or for "task" the task's own metric from its config (accuracy when the task is unknown)."""
    if metric != TASK_METRIC:
        return metric
    from svdicl.tasks import get_task

    try:
        return get_task(task).metric
    except SvdiclError:
        return "accuracy"


def answer_share(samples: Sequence[Mapping[str, Any]]) -> float | None:
    """Share of the examples that got the cell's most common answer: 1.0 means the model answers one label to all."""
    if not samples:
        return None
    counts: dict[Any, int] = {}
    for sample in samples:
        counts[sample["prediction"]] = counts.get(sample["prediction"], 0) + 1
    return max(counts.values()) / len(samples)


def current_data(cells: Iterable[Cell]) -> list[Cell]:
    """Per model and task, the cells of the data digest stored last: cells of older data or another definition of
    the task (kept apart in the store, `Store.other_data`) are never averaged with, or shown beside, the current ones."""
    cells = list(cells)
    latest = {(c.key.model, c.key.task): c.key.data for c in cells}
    return [c for c in cells if c.key.data == latest[(c.key.model, c.key.task)]]


def sweep_points(
    cells: Iterable[Cell], metric: str = TASK_METRIC, shares: Mapping[str, float | None] | None = None
) -> list[Point]:
    """Rate-curve points from stored cells, seeds averaged; cells with several edit specs are not on a curve.

    `shares` (cell id -> `answer_share`) marks the points whose every seed answered one label to all examples.
    """
    groups: dict[tuple, list[Cell]] = {}
    names: dict[str, str] = {}
    for cell in current_data(cells):
        if cell.rate is None:
            continue
        if cell.key.task not in names:
            names[cell.key.task] = headline_metric(cell.key.task, metric)
        name = names[cell.key.task]
        if cell.metrics.get(name, {}).get("value") is None:
            continue
        key = cell.key
        setting = (key.model, key.task, key.split, key.shots, key.extra_shots, key.limit, key.options, key.edit, name)
        groups.setdefault(setting, []).append(cell)
    points = []
    for (model, task, split, shots, extra_shots, limit, options, _, name), group in groups.items():
        values = [c.metrics[name]["value"] for c in group]
        mean = statistics.fmean(values)
        if len(values) > 1:
            spread = statistics.stdev(values)
            low, high = mean - spread, mean + spread
        else:
            entry = group[0].metrics[name]
            low = entry.get("ci_low") if entry.get("ci_low") is not None else mean
            high = entry.get("ci_high") if entry.get("ci_high") is not None else mean
        first = group[0]
        points.append(
            Point(
                model=model,
                model_name=first.model_name or model[:10],
                task=task,
                split=split,
                shots=shots,
                extra_shots=extra_shots,
                limit=limit,
                options=options,
                layers=first.layers,
                modules=first.modules,
                rate=first.rate,
                metric=name,
                value=mean,
                low=low,
                high=high,
                seeds=len({c.key.seed for c in group}),
                n=max(c.n for c in group),
                constant=shares is not None and all(shares.get(c.id) == 1.0 for c in group),
            )
        )
    return sorted(points, key=_point_order)


def _point_order(p: Point) -> tuple:
    shots = (-p.shots, -p.extra_shots)
    return (p.model_name, p.split, task_order(p.task), shots, module_order(p.modules or ""), layer_order(p.layers), p.rate)


def point_rates(points: Iterable[Point]) -> list[float]:
    """The x categories: every rate present (0 = the unpruned model); unevenly spaced, so ordinal."""
    return sorted({p.rate for p in points})


def baseline_point(points: Iterable[Point], **match: Any) -> Point | None:
    """The unpruned model's point among `points` whose fields equal `match`."""
    found = [p for p in points if p.layers is None and all(getattr(p, k) == v for k, v in match.items())]
    return found[0] if found else None


def line_order(points: Iterable[Point]) -> list[str]:
    """The pruned layers present, in drawing order: a line each."""
    return sorted({p.layers for p in points if p.layers is not None}, key=layer_order)


def setting_title(points: Sequence[Point], model: str | None = None) -> str:
    """`smollm2-135m · test split · n=200`: the model (default: its name), the split and the examples per cell
    (per task where they differ), so that a figure read on its own says what it shows."""
    model = model or ", ".join(sorted({p.model_name for p in points}))
    sizes = {p.task: max(q.n for q in points if q.task == p.task) for p in points}
    tasks = sorted(sizes, key=task_order)
    each = ", ".join(f"{task_label(t)} {sizes[t]}" for t in tasks)
    n = f"n={sizes[tasks[0]]}" if len(set(sizes.values())) == 1 else f"n: {each}"
    return f"{model} · {' + '.join(sorted({p.split for p in points}))} split · {n}"


def setting_tags(points: Sequence[Point]) -> dict[tuple, str]:
    """A file-name tag per setting: the split, plus whatever else differs between settings."""
    settings = {p.setting: p for p in points}
    models = {p.model for p in settings.values()}
    labels = model_labels((p.model, p.model_name) for p in settings.values())
    limits = {p.limit for p in settings.values()}
    options = {p.options for p in settings.values()}
    tags = {}
    for setting, p in settings.items():
        parts = [p.split]
        if len(models) > 1:
            parts.insert(0, labels[p.model])
        if len(limits) > 1:
            parts.append("full" if p.limit is None else f"limit{p.limit}")
        if len(options) > 1:
            parts.append("opts-" + hashlib.sha256(json.dumps(dict(p.options), sort_keys=True).encode()).hexdigest()[:6])
        tags[setting] = "-".join(slug(x) for x in parts)
    return tags
