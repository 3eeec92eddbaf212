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
evaluation is a store cell (experiments/calls.py's `evaluate_calls`), so a search resumes after
an interruption and shares cells with sweeps written to the same folder.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from svdicl.cachedir import default_cache_dir
from svdicl.calibration import applicable, metric_key
from svdicl.errors import SvdiclError
from svdicl.experiments.arms import GROUPS, Arm, arm_name, calibration_methods, parse_arms, samples_ci, summarize
from svdicl.experiments.calls import Progress, evaluate_calls
from svdicl.experiments.cells import Scoring, cell_limit, data_digest, edit_cell, note_other_data, reuse_cells, run_key
from svdicl.experiments.condition import (
    MatrixCondition,
    condition_numbers,
    layer_conditions,
    stored_conditions,
    top_layers,
    write_conditions,
)
from svdicl.experiments.executors import Executor
from svdicl.experiments.grid import PAPER_RATES, module_sets, parse_rates
from svdicl.experiments.runs import SAMPLINGS, EvalRun, balance_split, limit_examples, prepare_run, scored_seeds
from svdicl.experiments.search_output import (
    CalibratedCurve,
    ScoringInfo,
    SearchModel,
    SearchRecord,
    SeedResult,
    TestMetric,
    TestSummary,
    Validation,
)
from svdicl.models import LoadedModel
from svdicl.prompts import sample_demonstrations, shots_in_all
from svdicl.specs import CONTROLS, PruneSpec
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
    validation_sampling: str = "random"  # "balanced": the validation limit drawn per class, as the authors' code does
    extra_shots: int = 0  # demonstrations beyond `shots` per class, one each from as many classes (prompts.shot_counts)

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
        if self.extra_shots < 0 or (self.extra_shots and self.shots is None):
            raise SvdiclError("extra_shots must be >= 0, beside a number of shots per class")
        if self.validation_sampling not in SAMPLINGS:
            raise SvdiclError(f"unknown validation sampling {self.validation_sampling!r}; use {' or '.join(SAMPLINGS)}")

    def scored_splits(self, splits: TaskSplits) -> tuple[TaskSplits, dict[str, int | None]]:
        """The splits and the limit per split the search scores: with `validation_sampling` "balanced", the validation
        split is its class-balanced subset, scored whole (one place, so `search` and its dry run key the same cells)."""
        limits = {"validation": self.limit_validation, "test": self.limit_test}
        if self.validation_sampling == "balanced":
            return balance_split(splits, "validation", self.limit_validation), {**limits, "validation": None}
        return splits, limits

    def examples(self, splits: TaskSplits) -> int:
        """Examples scored by a search from scratch, counting rate*'s test cell (for a progress bar's total)."""
        task = splits.task
        validation = len(limit_examples(splits.validation, self.limit_validation, task.split_seed))
        test = len(limit_examples(splits.test, self.limit_test, task.split_seed))
        calibration = applicable(task, calibration_methods((), self.arms))  # with it, every seed is scored
        seeds = scored_seeds(task.shots if self.shots is None else self.shots, self.seeds, calibration, self.extra_shots)
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
) -> SearchRecord:
    """Run Algorithm 1 and return its result: the `svdicl.search/1` record (docs/experiments.md; `to_json()`).

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
    shots, extra = (task.shots if config.shots is None else config.shots), config.extra_shots
    sample_demonstrations(task, splits.demonstrations, shots, 0, extra)  # refuses an impossible shot count before any scoring
    limits = {"validation": config.limit_validation, "test": config.limit_test}
    recorded = {split: cell_limit(limits[split], len(splits.split(split))) for split in limits}
    splits, limits = config.scored_splits(splits)
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
            base = run_key(loaded, splits, split, shots, seed, limits[split], scoring, data, extra)

            def prepare(seed: int = seed) -> EvalRun:
                return prepare_run(
                    loaded, task, split=split, shots=shots, seed=seed, limit=limits[split], splits=splits,
                    calibration=scoring.calibration, progress=bar, extra_shots=extra,
                )  # fmt: skip

            calls[seed] = (prepare, [_edit_cell(base, str(layer), config.module, rate, control) for rate, control in edits])
        note_other_data(store, [key for _, cells in calls.values() for key, _ in cells])
        # 0 shots: the first seed stands for all, except for null controls (seeded per seed)
        nonlocal scored
        first = scored_seeds(shots, config.seeds, scoring.calibration, extra)
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
        per_cell = len(scored_seeds(shots, config.seeds, scoring.calibration, extra)) * sizes["test"]
        if rate_star == 0:
            progress.add(per_cell)  # the pruned test cell is the unpruned one
        progress.grow((len(test_rates) - 2 + (rate_star == 0)) * per_cell)  # the calibrated rates* may add cells
    calibrated_rates = stars.values() if "calibrated-controls" in config.arms else ()
    control_rates = sorted({r for r in (rate_star, *calibrated_rates) if r > 0}) if "controls" in config.arms else []
    if "controls" in config.arms and not control_rates and progress is not None:
        progress.add(2 * len(config.seeds) * sizes["test"])  # nothing was pruned, so there is nothing to control for
    elif control_rates and progress is not None:  # counted at one rate; calibrated-controls may add more
        progress.grow(2 * len(config.seeds) * (len(control_rates) - 1) * sizes["test"])
    controls = [(rate, control) for control in (CONTROLS if control_rates else ()) for rate in control_rates]
    test = evaluate("test", [(rate, None) for rate in test_rates] + controls)  # one job per seed: every arm at once
    at = {rate: tuple(test[seed][test_rates.index(rate)] for seed in config.seeds) for rate in test_rates}
    pairs = {seed: [at[0.0][i], at[rate_star][i]] for i, seed in enumerate(config.seeds)}
    arms = [Arm("unpruned", 0.0, at[0.0])]
    arms += [Arm(arm_name(m), 0.0, at[0.0], calibration=m) for m in scoring.calibration]
    arms += [Arm("pruned", rate_star, at[rate_star])]
    arms += [Arm(arm_name(m, pruned=True), stars[m], at[stars[m]], calibration=m) for m in scoring.calibration]
    for control in CONTROLS if control_rates else ():  # each pruned arm at a control rate: both controls, read the same way
        for arm in [arm for arm in arms if arm.rate in control_rates and arm.control is None]:
            k = len(test_rates) + controls.index((arm.rate, control))
            found = tuple(test[seed][k] for seed in config.seeds)
            name = arm_name(arm.calibration, CONTROL_NAMES[control])
            arms.append(Arm(name, arm.rate, found, calibration=arm.calibration, control=control))
    every = [c for found in (*validation.values(), *test.values()) for c in found]
    return SearchRecord(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=SearchModel(model_name or loaded.source, loaded.fingerprint, loaded.dtype),
        task=task.name,
        task_source=config.task,
        module=config.module,
        metric=metric,
        shots=shots,
        shots_total=shots_in_all(task, shots, extra),
        limit=recorded,
        data=splits.origin,
        per_layer=None if choice is None else _per_layer(choice),
        top_k=None if choice is None else choice.top_k,
        top_layers=() if choice is None else choice.top_layers,
        layer=layer,
        rates=config.rates,
        validation=Validation(
            sizes["validation"], tuple(values), {m: CalibratedCurve(tuple(v), stars[m]) for m, v in calibrated.items()}
        ),
        rate_star=rate_star,
        test=_test_summary(store, pairs, metric, task.num_classes),
        arms=tuple(summarize(store, arms, metric, task.num_classes)),
        seeds=tuple(_seed_result(store, seed, curves[seed], validation[seed], pairs[seed], metric) for seed in config.seeds),
        scoring=ScoringInfo(
            options=scoring.key_options(),
            paths=tuple(sorted({str(c.info.get("scoring", {}).get("path")) for c in every})),
            fallbacks=tuple(sorted({c.info["scoring"]["fallback"] for c in every if c.info.get("scoring", {}).get("fallback")})),
        ),
        wall_s=round(time.perf_counter() - started, 3),
        cells_scored=scored,
        validation_sampling=config.validation_sampling,
        extra_shots=extra,
    )


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


def _test_metric(cell: Cell, metric: str) -> TestMetric:
    entry = cell.metrics[metric]
    return TestMetric(entry["value"], entry.get("ci_low"), entry.get("ci_high"))


def _seed_result(
    store: Store, seed: int, curve: list[float], validation: list[Cell], test: list[Cell], metric: str
) -> SeedResult:
    baseline, pruned = test[0], test[-1]
    paired = compare(_correct(store, baseline), _correct(store, pruned))
    return SeedResult(
        seed=seed,
        validation=tuple(curve),
        baseline=_test_metric(baseline, metric),
        pruned=_test_metric(pruned, metric),
        mcnemar_p=paired.p_value,
        only_baseline_correct=paired.only_a,
        only_pruned_correct=paired.only_b,
        validation_cells=tuple(c.id for c in validation),
        baseline_cell=baseline.id,
        pruned_cell=pruned.id,
    )


def _correct(store: Store, cell: Cell, prefix: str = "") -> list[tuple[str, bool]]:
    return [(prefix + s["id"], bool(s["correct"])) for s in store.samples(cell)]


def _test_summary(store: Store, test: dict[int, list[Cell]], metric: str, num_classes: int) -> TestSummary:
    """Test metric of the unpruned and the pruned model: one seed as is; several as mean, sd and a CI of the mean;
    their example-level paired comparison (each example's correctness averaged over seeds)."""
    seeds = list(test)
    baselines, pruneds = [test[s][0] for s in seeds], [test[s][-1] for s in seeds]
    paired = paired_by_id([_correct(store, c) for c in baselines], [_correct(store, c) for c in pruneds])
    summary = {}
    for name, found in (("baseline", baselines), ("pruned", pruneds)):
        if len(found) == 1:
            summary[name] = _test_metric(found[0], metric)
            continue
        interval = samples_ci([store.samples(c) for c in found], metric, num_classes)
        values = [c.value(metric) for c in found]
        summary[name] = TestMetric(statistics.fmean(values), interval.low, interval.high, statistics.stdev(values))
    return TestSummary(baselines[0].n, summary["baseline"], summary["pruned"], paired)
