"""Several Algorithm 1 searches into one result store, and the export of the models they chose.

`svdicl search --tasks sst2,rte --modules mlp,attn` and `svdicl.search` both run through
`run_searches`: one search per task and module (experiments/search.py), the condition numbers
computed once for all of them, one progress bar and one executor, each result written to
DIR/search/.  `export_folders` checks where the chosen models go before anything is scored, and
`export_rate_star` saves one of them with a model card saying how it was chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svdicl.errors import SvdiclError
from svdicl.experiments.calls import Progress
from svdicl.experiments.cells import Scoring
from svdicl.experiments.grid import PAPER_RATES
from svdicl.experiments.launch import ExecutorOptions, start_executor
from svdicl.experiments.search import SearchConfig, conditions_for, search
from svdicl.experiments.search_output import SearchRecord, card_notes, write_search
from svdicl.experiments.sweep import load_task_splits
from svdicl.export import save_pruned
from svdicl.models import LoadedModel
from svdicl.outputs import check_output
from svdicl.prompts import shot_counts
from svdicl.specs import PruneSpec
from svdicl.store import Store
from svdicl.tasks import get_task


def search_configs(
    tasks: Sequence[str],
    modules: Sequence[str],
    *,
    rates: str | Sequence[float] = PAPER_RATES,
    top_k: int = 3,
    layer: int | str | None = None,
    shots: int | None = None,
    shots_total: bool = False,
    seeds: Sequence[int] = (0,),
    metric: str | None = None,
    arms: str | Sequence[str] = "all",
    limit: int | None = None,
    limit_validation: int | None = None,
    limit_test: int | None = None,
    validation_sampling: str = "random",
) -> list[SearchConfig]:
    """One search per task and module, in that order, each once.  `shots` counts per class, or in all with
    `shots_total` (lm-eval's --num_fewshot, drawn as balanced as it allows); `limit` caps both splits unless
    `limit_validation`/`limit_test` do;
    `validation_sampling` "balanced" draws the validation limit per class (the authors' code)."""
    return list(
        dict.fromkeys(
            SearchConfig(
                task=task,
                module=module,
                rates=rates,
                top_k=top_k,
                layer=_layer(layer),
                **_shots(task, shots, shots_total),
                seeds=tuple(seeds),
                metric=metric,
                arms=arms,
                limit_validation=limit if limit_validation is None else limit_validation,
                limit_test=limit if limit_test is None else limit_test,
                validation_sampling=validation_sampling,
            )
            for task in tasks
            for module in modules
        )
    )


def _shots(task: str, shots: int | None, total: bool) -> dict[str, int | None]:
    """A search's `shots` per class and `extra_shots` (`shot_counts`); None keeps the task's paper setting."""
    if shots is None:
        return {"shots": None, "extra_shots": 0}
    per_class, extra = shot_counts(get_task(task), shots, total)
    return {"shots": per_class, "extra_shots": extra}


def _layer(value: int | str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise SvdiclError(f"--layer takes one layer index such as 26 or -1, not {value!r}") from None


def export_folders(
    configs: Sequence[SearchConfig], export: str | Path | None, overwrite: bool = False
) -> dict[SearchConfig, Path]:
    """Where each search's rate*-pruned model goes (SearchConfig -> folder): `export` itself for one search, else
    a subfolder per task and module.  Each is checked now, before the searches run; `overwrite` lets svdicl replace
    what it wrote there (cleared only when the model is saved)."""
    if not export:
        return {}
    folders = {}
    for config in configs:
        where = Path(export) / f"{Path(config.task).stem}-{config.module.replace(',', '+')}"
        folders[config] = check_output(export if len(configs) == 1 else where, overwrite)
    return folders


@dataclass(frozen=True)
class Searched:
    """One search of `run_searches`: its config, its result and the files written (the JSON first, then the
    replayable eval config)."""

    config: SearchConfig
    result: SearchRecord
    files: tuple[Path, ...]


def run_searches(
    loaded: LoadedModel,
    configs: Sequence[SearchConfig],
    folder: str | Path,
    *,
    scoring: Scoring | None = None,
    executor: ExecutorOptions | None = None,
    model: Mapping[str, Any] | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[Searched]:
    """Run every search into the result store in `folder` (cells already there are read back) and write each
    result to `folder`/search/.  Condition numbers are computed once, for the searches that choose their layer.

    `executor` scores the cells (None: this process, on `loaded`); its worker processes or Ray actors load `model`
    (load_model's keyword arguments).  `log`, if given, receives status lines (what runs where)."""
    log = log or (lambda line: None)
    folder = Path(folder)
    store = Store(folder)
    splits = load_task_splits([c.task for c in configs], data_dir)
    conditions = None
    ranked = [c.module for c in configs if c.layer is None]
    if ranked:
        log("condition numbers of every layer (reused from --output when already there) ...")
        conditions = conditions_for(loaded, ranked, folder, progress=progress)
    pool = None
    if executor is not None:
        pool, plan = start_executor(executor, loaded, model)
        log(plan)
    bar = Progress(sum(c.examples(splits[get_task(c.task).name]) for c in configs), "search", enabled=progress)
    searched = []
    try:
        for config in configs:
            result = search(
                loaded, config, store, conditions=conditions, scoring=scoring, splits=splits[get_task(config.task).name],
                model_name=loaded.source, progress=bar, executor=pool,
            )  # fmt: skip
            searched.append(Searched(config, result, tuple(write_search(result, folder, data_dir=data_dir))))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
    return searched


def export_rate_star(
    loaded: LoadedModel,
    result: SearchRecord,
    folder: str | Path,
    *,
    format: str = "dense",
    svd: str = "float32",
    allow_tied: bool = False,
    overwrite: bool = False,
) -> PruneSpec:
    """Save the rate*-pruned model a search chose to `folder` (svdicl prune's formats), with a model card telling
    how Algorithm 1 chose the edit; returns the edit."""
    spec = PruneSpec(str(result.layer), result.module, result.rate_star)
    save_pruned(
        loaded, [spec], folder, format=format, svd=svd, allow_tied=allow_tied, overwrite=overwrite, notes=card_notes(result)
    )
    return spec
