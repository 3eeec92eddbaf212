"""Algorithm 1 of the paper: a layer by condition number, a clipping rate on validation, the gain on test.

    1. condition numbers of the module's matrices in every layer (experiments/condition.py; one
       number per layer: the largest among the group's matrices);
    2. the top-k layers by that number, and the one with the largest;
    3. every candidate rate (0 always included) scored on the validation split; rate* = the argmax
       of the task's metric averaged over seeds, ties to the smaller rate, so validation never
       gets worse than the unpruned model;
    4. the unpruned and the rate*-pruned model on the test split: 95% CIs and an example-level
       paired test (seeds averaged per example) on the same examples;
    5. beside them, the arms of experiments/arms.py: calibration of the unpruned and the pruned
       model (rate* re-chosen on validation under each calibration) and the null controls at rate*.

As the paper writes step 2, "the largest among the top k" is the largest overall: the top-k list
is reported, not searched (the authors' scripts fix the layer by hand, `l_num = 26`).  Every
evaluation is a store cell (experiments/sweep.py's `evaluate_calls`), so a search resumes after
an interruption and shares cells with sweeps written to the same folder.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from svdicl.calibration import applicable, metric_key
from svdicl.errors import SvdiclError
from svdicl.executors import Executor
from svdicl.experiments.arms import GROUPS, Arm, arm_name, calibration_methods, parse_arms, seed_mean_ci, summarize
from svdicl.experiments.condition import (
    AGGREGATE,
    MatrixCondition,
    condition_numbers,
    layer_conditions,
    stored_conditions,
    top_layers,
    write_conditions,
)
from svdicl.experiments.evaluate import EvalRun, limit_examples, prepare_run, scored_seeds
from svdicl.experiments.sweep import (
    PAPER_RATES,
    Progress,
    Scoring,
    cell_limit,
    data_digest,
    edit_cell,
    evaluate_calls,
    module_sets,
    note_other_data,
    parse_rates,
    reuse_cells,
    run_key,
)
from svdicl.models import LoadedModel, default_cache_dir
from svdicl.prompts import sample_demonstrations
from svdicl.prune import CONTROLS, PruneSpec
from svdicl.report import SEARCH_DIR, SEARCH_FORMAT
from svdicl.stats import compare, paired_by_id
from svdicl.store import Cell, CellKey, Store
from svdicl.targets import family_of, layer_stack, parse_layers, resolve
from svdicl.tasks import METRICS, get_task
from svdicl.tasks.data import TaskSplits, load_splits

CONTROL_NAMES = {"random-subspace": "random subspace", "matched-noise": "norm-matched noise"}
TIE = 1e-12  # validation values this close to the best count as ties (seed means are floating-point sums)


@dataclass(frozen=True)
class LayerChoice:
    """Steps 1-2: one condition number per layer, the top-k layers (largest first), the chosen layer."""

    module: str
    per_layer: dict[int, float]
    top_k: int
    top_layers: tuple[int, ...]

    @property
    def layer(self) -> int:
        """The largest condition number among the top k (ties: the lower layer, as `top_layers` orders them)."""
        return self.top_layers[0]


def choose_layer(conditions: Sequence[MatrixCondition], module: str, top_k: int = 3) -> LayerChoice:
    """Algorithm 1 steps 1-2 on condition numbers already computed (`condition_numbers`)."""
    return LayerChoice(module, layer_conditions(conditions, module), top_k, tuple(top_layers(conditions, module, top_k)))


def candidate_rates(rates: str | Sequence[float | str] = PAPER_RATES) -> tuple[float, ...]:
    """The candidates in increasing order with 0 added: the unpruned model is always a candidate."""
    return tuple(sorted(set(parse_rates(rates)) | {0.0}))


def choose_rate(rates: Sequence[float], values: Sequence[float]) -> float:
    """Step 3: the rate with the best validation value; ties go to the smaller rate (less pruning)."""
    if len(rates) != len(values) or not rates:
        raise SvdiclError(f"need one validation value per rate, got {len(values)} values for {len(rates)} rates")
    best = max(values)
    return min(rate for rate, value in zip(rates, values, strict=True) if value >= best - TIE)


def module_spec(module: str) -> str:
    """One module spec for a search: a group (mlp, attn) or matrices joined with + (q+k); never a regex."""
    specs = module_sets(module)
    if len(specs) != 1:
        raise SvdiclError(f"one search prunes one module spec, got {module!r}; join matrices with + (q+k) to prune them together")
    if specs[0].startswith("re:"):
        raise SvdiclError("search ranks layers by condition numbers of named modules; use mlp, attn or matrices like k, not re:")
    return specs[0]


def conditions_for(
    loaded: LoadedModel,
    modules: Sequence[str],
    directory: str | Path | None = None,
    *,
    progress: bool = False,
) -> list[MatrixCondition]:
    """Condition numbers of every layer's `modules`, reusing DIR/conditions.csv where it holds these weights'.

    Computed rows are merged into DIR/conditions.csv (and .json), which `svdicl report` draws as fig 3.
    """
    if family_of(loaded.model) is None:
        raise SvdiclError(f"search needs a model family svdicl knows (got {loaded.model_type!r}); fix the layer with --layer")
    folder = Path(directory) if directory is not None else None
    found = stored_conditions(folder, loaded.fingerprint) if folder is not None else []
    layers = set(range(len(layer_stack(loaded.model)[1])))
    missing = [m for m in dict.fromkeys(modules) if not _covers(found, m, layers)]
    for module in missing:
        known = {(c.module, c.matrix) for c in found}
        fresh = condition_numbers(
            loaded.model, "all", module, progress=progress, fingerprint=loaded.fingerprint, cache=default_cache_dir()
        )
        found += [c for c in fresh if (c.module, c.matrix) not in known]
    found.sort(key=lambda c: (c.layer, c.group or "", c.matrix))
    if missing and folder is not None:
        write_conditions(found, folder, model_name=loaded.source, fingerprint=loaded.fingerprint)
    return found


def _covers(conditions: Sequence[MatrixCondition], module: str, layers: set[int]) -> bool:
    try:
        return set(layer_conditions(conditions, module)) == layers
    except SvdiclError:
        return False


@dataclass(frozen=True)
class SearchConfig:
    """One Algorithm 1 search.  `layer` fixes the layer and skips steps 1-2 (the paper's tables fix 26/27/30);
    `metric` None is the task's own (accuracy; macro-F1 for COPA); the limits cap examples per split."""

    task: str
    module: str = "mlp"
    rates: tuple[float, ...] = PAPER_RATES
    top_k: int = 3
    layer: int | None = None
    shots: int | None = None
    seeds: tuple[int, ...] = (0,)
    limit_validation: int | None = None
    limit_test: int | None = None
    metric: str | None = None
    arms: tuple[str, ...] = GROUPS  # optional arm groups beside unpruned and pruned (experiments/arms.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rates", candidate_rates(self.rates))
        object.__setattr__(self, "arms", parse_arms(self.arms))
        object.__setattr__(self, "module", module_spec(self.module))
        if self.top_k < 1:
            raise SvdiclError(f"--top-k must be at least 1, got {self.top_k}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise SvdiclError("give at least one seed, each once")
        for name in ("limit_validation", "limit_test"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SvdiclError(f"--limit must be at least 1, got {getattr(self, name)}")
        if self.metric is not None and self.metric not in METRICS:
            raise SvdiclError(f"unknown metric {self.metric!r}; use {' or '.join(METRICS)} (or leave it out for the task's own)")
        if self.shots is not None and self.shots < 0:
            raise SvdiclError("shots must be >= 0 (demonstrations per class)")

    def examples(self, splits: TaskSplits) -> int:
        """Examples scored by a search from scratch, counting rate*'s test cell (for a progress bar's total)."""
        task = splits.task
        validation = len(limit_examples(splits.validation, self.limit_validation, task.split_seed))
        test = len(limit_examples(splits.test, self.limit_test, task.split_seed))
        calibration = applicable(task, calibration_methods((), self.arms))  # with it, every seed is scored
        seeds = scored_seeds(task.shots if self.shots is None else self.shots, self.seeds, calibration)
        controls = 2 * len(self.seeds) * ("controls" in self.arms)  # null controls are seeded per seed
        return len(seeds) * (validation * len(self.rates) + 2 * test) + controls * test


def search(
    loaded: LoadedModel,
    config: SearchConfig,
    store: Store,
    *,
    conditions: Sequence[MatrixCondition] | None = None,
    scoring: Scoring | None = None,
    splits: TaskSplits | None = None,
    data_dir: str | Path | None = None,
    model_name: str = "",
    progress: Progress | None = None,
    executor: Executor | None = None,
) -> dict:
    """Run Algorithm 1 and return its result in the `svdicl.search/1` schema (docs/experiments.md).

    Cells already in `store` are read back, not rescored.  `conditions` defaults to computing
    them; `progress` counts examples (its total: `SearchConfig.examples`, summed over searches);
    `executor` scores the cells (default: this process; the seeds' jobs run side by side on Ray).
    """
    started = time.perf_counter()
    scoring = scoring or Scoring()
    task = get_task(config.task)
    scoring = dataclasses.replace(scoring, calibration=applicable(task, calibration_methods(scoring.calibration, config.arms)))
    splits = splits if splits is not None else load_splits(task, data_dir)
    metric = config.metric or task.metric
    choice = None
    if config.layer is None:
        found = conditions if conditions is not None else conditions_for(loaded, [config.module])
        choice = choose_layer(found, config.module, config.top_k)
        layer = choice.layer
    else:
        (layer,) = parse_layers(str(config.layer), len(layer_stack(loaded.model)[1]))
    resolve(loaded.model, str(layer), config.module, allow_tied=scoring.allow_tied)
    shots = task.shots if config.shots is None else config.shots
    sample_demonstrations(task, splits.demonstrations, shots, 0)  # refuses an impossible shot count before any scoring
    limits = {"validation": config.limit_validation, "test": config.limit_test}
    sizes = {split: len(limit_examples(splits.split(split), limits[split], task.split_seed)) for split in limits}
    scored = 0  # cells scored by this search (not those read back, nor those another process stored)
    bar = progress is not None and not progress.bar.disable  # a bar while a run is tokenized, too

    def evaluate(split: str, edits: Sequence[tuple[float, str | None]]) -> dict[int, list[Cell]]:
        """The cells of `edits` (rate, null control or None for the truncation; a control is seeded by the
        demonstration seed) on `split` for every seed, each seed's as one job: the layers below the edited one
        run once per job, for every rate and control together.  The seeds' jobs go to the executor together."""
        calls = {}
        data = data_digest(splits, split, limits[split])
        for seed in config.seeds:
            base = run_key(loaded, splits, split, shots, seed, limits[split], scoring, data)

            def prepare(seed: int = seed) -> EvalRun:
                return prepare_run(
                    loaded, task, split=split, shots=shots, seed=seed, limit=limits[split], splits=splits,
                    calibration=scoring.calibration, progress=bar,
                )  # fmt: skip

            calls[seed] = (prepare, [_edit_cell(base, str(layer), config.module, rate, control) for rate, control in edits])
        note_other_data(store, [key for _, cells in calls.values() for key, _ in cells])
        # 0 shots: the first seed stands for all, except for null controls (seeded per seed)
        nonlocal scored
        first = scored_seeds(shots, config.seeds, scoring.calibration)
        todo = [
            (prepare, [cell for cell, (_, control) in zip(cells, edits, strict=True) if seed in first or control])
            for seed, (prepare, cells) in calls.items()
        ]
        scored += evaluate_calls(
            loaded, [call for call in todo if call[1]], store, scoring=scoring, model_name=model_name, progress=progress,
            executor=executor,
        )  # fmt: skip
        for seed in config.seeds[len(first) :]:
            reuse_cells(store, [key for (key, _), (_, c) in zip(calls[seed][1], edits, strict=True) if not c], first[0])
        return {seed: [store.get(key) for key, _ in cells] for seed, (_, cells) in calls.items()}

    validation = evaluate("validation", [(rate, None) for rate in config.rates])
    curves = {seed: [c.value(metric) for c in found] for seed, found in validation.items()}
    values = [statistics.fmean(curve[i] for curve in curves.values()) for i in range(len(config.rates))]
    rate_star = choose_rate(config.rates, values)
    calibrated = {m: _seed_means(validation, metric_key(m, metric)) for m in scoring.calibration}
    stars = {m: choose_rate(config.rates, v) for m, v in calibrated.items()}
    test_rates = sorted({0.0, rate_star, *stars.values()})
    if progress is not None:  # `SearchConfig.examples` counted two test cells per scored seed
        per_cell = len(scored_seeds(shots, config.seeds, scoring.calibration)) * sizes["test"]
        if rate_star == 0:
            progress.add(per_cell)  # the pruned test cell is the unpruned one
        progress.grow((len(test_rates) - 2 + (rate_star == 0)) * per_cell)  # the calibrated rates* may add cells
    control_rates = sorted({r for r in (rate_star, *stars.values()) if r > 0}) if "controls" in config.arms else []
    if "controls" in config.arms and not control_rates and progress is not None:
        progress.add(2 * len(config.seeds) * sizes["test"])  # nothing was pruned, so there is nothing to control for
    elif control_rates and progress is not None:  # counted at one rate; they run at every pruned arm's rate
        progress.grow(2 * len(config.seeds) * (len(control_rates) - 1) * sizes["test"])
    controls = [(rate, control) for control in (CONTROLS if control_rates else ()) for rate in control_rates]
    test = evaluate("test", [(rate, None) for rate in test_rates] + controls)  # one job per seed: every arm at once
    at = {rate: tuple(test[seed][test_rates.index(rate)] for seed in config.seeds) for rate in test_rates}
    pairs = {seed: [at[0.0][i], at[rate_star][i]] for i, seed in enumerate(config.seeds)}
    arms = [Arm("unpruned", 0.0, at[0.0])]
    arms += [Arm(arm_name(m), 0.0, at[0.0], calibration=m) for m in scoring.calibration]
    arms += [Arm("pruned", rate_star, at[rate_star])]
    arms += [Arm(arm_name(m, pruned=True), stars[m], at[stars[m]], calibration=m) for m in scoring.calibration]
    for control in CONTROLS if control_rates else ():  # each pruned arm gets both null controls at its rate, read the same way
        for arm in [arm for arm in arms if arm.rate > 0 and arm.control is None]:
            k = len(test_rates) + controls.index((arm.rate, control))
            found = tuple(test[seed][k] for seed in config.seeds)
            name = arm_name(arm.calibration, CONTROL_NAMES[control])
            arms.append(Arm(name, arm.rate, found, calibration=arm.calibration, control=control))
    every = [c for found in (*validation.values(), *test.values()) for c in found]
    return {
        "format": SEARCH_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model_name or loaded.source, "fingerprint": loaded.fingerprint, "dtype": loaded.dtype},
        "task": task.name,
        "task_source": config.task,
        "module": config.module,
        "metric": metric,
        "shots": shots,
        "shots_per_class": shots,
        "shots_total": shots * task.num_classes,
        "limit": {split: cell_limit(limits[split], len(splits.split(split))) for split in limits},
        "data": splits.origin,
        "condition": None if choice is None else {"aggregate": AGGREGATE, "per_layer": _per_layer(choice)},
        "top_k": None if choice is None else choice.top_k,
        "top_layers": [] if choice is None else list(choice.top_layers),
        "layer": layer,
        "layer_from": "given" if choice is None else "condition numbers",
        "rates": list(config.rates),
        "validation": {
            "split": "validation",
            "n": sizes["validation"],
            "values": values,
            "calibrated": {m: {"values": v, "rate_star": stars[m]} for m, v in calibrated.items()},
        },
        "rate_star": rate_star,
        "test": _test_summary(store, pairs, metric, task.num_classes),
        "arms": summarize(store, arms, metric, task.num_classes),
        "seeds": [_seed_entry(store, seed, curves[seed], validation[seed], pairs[seed], metric) for seed in config.seeds],
        "scoring": {
            "options": scoring.key_options(),
            "paths": sorted({str(c.info.get("scoring", {}).get("path")) for c in every}),
            "fallbacks": sorted({c.info["scoring"]["fallback"] for c in every if c.info.get("scoring", {}).get("fallback")}),
        },
        "timing": {"wall_s": round(time.perf_counter() - started, 3), "cells_scored": scored},
    }


def _edit_cell(
    key: CellKey, layers: str, modules: str, rate: float, control: str | None
) -> tuple[CellKey, tuple[PruneSpec, ...]]:
    """`edit_cell`, or with `control` that null control's edit at `rate` seeded by the demonstration seed."""
    if control is None:
        return edit_cell(key, layers, modules, rate)
    spec = PruneSpec(layers, modules, rate, control=control, seed=key.seed)
    return dataclasses.replace(key, edit=str(spec)), (spec,)


def _seed_means(cells: dict[int, list[Cell]], metric: str) -> list[float]:
    """Per rate, `metric` averaged over the seeds' cells."""
    return [statistics.fmean(found[i].value(metric) for found in cells.values()) for i in range(len(next(iter(cells.values()))))]


def _per_layer(choice: LayerChoice) -> dict[str, float | None]:
    """JSON has no infinity: an exactly singular matrix's condition number is written as null."""
    return {str(layer): value if np.isfinite(value) else None for layer, value in choice.per_layer.items()}


def _cell_estimate(cell: Cell, metric: str) -> dict:
    entry = cell.metrics[metric]
    return {"value": entry["value"], "ci_low": entry.get("ci_low"), "ci_high": entry.get("ci_high")}


def _seed_entry(store: Store, seed: int, curve: list[float], validation: list[Cell], test: list[Cell], metric: str) -> dict:
    baseline, pruned = test[0], test[-1]
    paired = compare(_correct(store, baseline), _correct(store, pruned))
    return {
        "seed": seed,
        "validation": curve,
        "baseline": _cell_estimate(baseline, metric),
        "pruned": _cell_estimate(pruned, metric),
        "mcnemar_p": paired.p_value,
        "discordant": {"only_baseline_correct": paired.only_a, "only_pruned_correct": paired.only_b},
        "cells": {"validation": [c.id for c in validation], "baseline": baseline.id, "pruned": pruned.id},
    }


def _correct(store: Store, cell: Cell, prefix: str = "") -> list[tuple[str, bool]]:
    return [(prefix + s["id"], bool(s["correct"])) for s in store.samples(cell)]


def _test_summary(store: Store, test: dict[int, list[Cell]], metric: str, num_classes: int) -> dict:
    """Test metric of the unpruned and the pruned model: one seed as is; several as mean, sd and a CI of the mean;
    their example-level paired comparison (each example's correctness averaged over seeds)."""
    seeds = list(test)
    baselines, pruneds = [test[s][0] for s in seeds], [test[s][-1] for s in seeds]
    paired = paired_by_id([_correct(store, c) for c in baselines], [_correct(store, c) for c in pruneds])
    summary = {"split": "test", "n": baselines[0].n}
    for name, found in (("baseline", baselines), ("pruned", pruneds)):
        if len(found) == 1:
            summary[name] = {**_cell_estimate(found[0], metric), "std": None}
            continue
        interval = seed_mean_ci([store.samples(c) for c in found], metric, num_classes)
        values = [c.value(metric) for c in found]
        summary[name] = {"value": statistics.fmean(values), "ci_low": interval.low, "ci_high": interval.high,
                         "std": statistics.stdev(values)}  # fmt: skip
    summary["p_value"] = paired.p_value
    summary["paired"] = paired.to_dict()
    return summary


def result_stem(result: dict) -> str:
    """`sst2-mlp`, `rte-q+k`: the file name of a search result, without suffix."""
    return f"{result['task']}-{result['module'].replace(',', '+')}"


def card_notes(result: dict) -> str:
    """The model card's account of a search's export: how Algorithm 1 chose the edit and what it measured."""
    test, metric = result["test"], result["metric"]
    layer = (
        f"layer {result['layer']}, the largest condition number among the top {result['top_k']} ({result['top_layers']})"
        if result["top_layers"]
        else f"layer {result['layer']} (given)"
    )
    curve = ", ".join(f"{r:g}: {v:.4f}" for r, v in zip(result["rates"], result["validation"]["values"], strict=True))
    return (
        f"Algorithm 1 (svdicl search) on task `{result['task']}`, module `{result['module']}`, "
        f"{result['shots_total']} demonstrations, seeds {[s['seed'] for s in result['seeds']]}, model "
        f"`{result['model']['name']}`:\n\n"
        f"- {layer};\n"
        f"- validation {metric} per clipping rate (n = {result['validation']['n']}): {curve};\n"
        f"- rate* = {result['rate_star']:g} (the validation argmax, ties to the smaller rate);\n"
        f"- test {metric} (n = {test['n']}): unpruned {_card_estimate(test['baseline'])}, this model "
        f"{_card_estimate(test['pruned'])}, paired p = {test['p_value']:.3g} ({test['paired'].get('method', 'paired test')}).\n"
    )


def _card_estimate(entry: dict) -> str:
    return f"{entry['value']:.4f} [{entry['ci_low']:.4f}, {entry['ci_high']:.4f}]"


def write_search(result: dict, directory: str | Path, *, data_dir: str | Path | None = None) -> list[Path]:
    """DIR/search/<task>-<module>.json plus replayable configs: `.yaml` for `svdicl eval --config` (the
    test evaluation of the chosen model) and, when rate* > 0, `.prune.yaml` for `svdicl prune --config`.

    Returns the paths written, the JSON first and the eval config second."""
    folder = Path(directory) / SEARCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = result_stem(result)
    spec = f"{result['layer']}:{result['module']}:{result['rate_star']:g}"
    prune = [spec] if result["rate_star"] > 0 else []
    common = {"model": result["model"]["name"], "dtype": result["model"]["dtype"], "prune": prune,
              "svd_dtype": result["scoring"]["options"]["svd"]}  # fmt: skip
    evaluation = {
        "task": result["task_source"],
        "shots_per_class": result["shots"],
        "seed": [s["seed"] for s in result["seeds"]],
        "split": "test",
        "limit": result["limit"]["test"],
        "length_normalize": result["scoring"]["options"]["length_normalize"],
        **({"data_dir": str(Path(data_dir).resolve())} if data_dir is not None else {}),
        **common,
    }
    where = f"{result['task']}, {result['module']} of layer {result['layer']}, rate* {result['rate_star']:g}"
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
    written = [_write(folder / name, text + yaml.safe_dump(values, sort_keys=False)) for name, (text, values) in files.items()]
    result = {
        **result,
        "config": f"{SEARCH_DIR}/{stem}.yaml",
        "prune_config": f"{SEARCH_DIR}/{stem}.prune.yaml" if prune else None,
    }
    written.insert(0, _write(folder / f"{stem}.json", json.dumps(result, indent=2, allow_nan=False) + "\n"))
    return written


def _write(path: Path, text: str) -> Path:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path
