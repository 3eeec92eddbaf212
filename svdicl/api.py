"""The library's front door: `svdicl.evaluate` and `svdicl.search` on any model, with typed results.

They run the same code as `svdicl eval` and `svdicl search` (svdicl.experiments.evaluate.evaluate
and svdicl.experiments.search.search), write the same files when given `output`, and return
frozen dataclasses instead of JSON-shaped dicts (the dict stays available as `.results`, or `to_json()`).
`model` is what `svdicl.load_model` returns, or a transformers model already in memory together
with its `tokenizer` (svdicl.wrap fingerprints its weights):

    model = AutoModelForCausalLM.from_pretrained(...); tokenizer = AutoTokenizer.from_pretrained(...)
    result = svdicl.evaluate(model, "sst2", tokenizer=tokenizer, limit=200, prune=["-1:mlp:0.9"])
    result.accuracy, result.runs[0].accuracy.low
    found = svdicl.search(model, "sst2", tokenizer=tokenizer, module="mlp", limit=200)
    found.layer, found.rate_star, found.baseline.value, found.pruned.value, found.p_value
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from svdicl.experiments.eval_result import Evaluation
from svdicl.models import LoadedModel, wrap
from svdicl.specs import PruneSpec
from svdicl.stats import Estimate
from svdicl.tasks import TaskConfig


@dataclass(frozen=True)
class SearchResult:
    """What `svdicl.search` returns: Algorithm 1's layer, validation curve, rate* and the test comparison.

    `baseline` and `pruned` are the test metric of the unpruned and the rate*-pruned model (several
    seeds: the mean, with an interval of the mean); `p_value` is the example-level paired sign-flip
    test on the same examples (each example's correctness averaged over seeds; svdicl.stats.paired_comparison),
    and `arms` the side-by-side arms (calibrations, null controls; svdicl.experiments.arms), as dicts.
    `results` is the full svdicl.search/1 dict (docs/experiments.md).
    """

    task: str
    module: str
    metric: str
    layer: int
    top_layers: tuple[int, ...]  # empty when the layer was given
    rates: tuple[float, ...]
    validation: tuple[float, ...]  # the metric at each rate, mean over seeds
    rate_star: float
    baseline: Estimate
    pruned: Estimate
    p_value: float
    arms: tuple[dict, ...]
    folder: Path | None  # the result store and search/ folder, if `output` was given
    results: dict

    @classmethod
    def from_results(cls, results: dict, folder: str | Path | None = None) -> SearchResult:
        """Read the typed view of a svdicl.search/1 dict (e.g. `json.load` of DIR/search/sst2-mlp.json)."""
        test = results["test"]
        return cls(
            task=results["task"],
            module=results["module"],
            metric=results["metric"],
            layer=results["layer"],
            top_layers=tuple(results["top_layers"]),
            rates=tuple(results["rates"]),
            validation=tuple(results["validation"]["values"]),
            rate_star=results["rate_star"],
            baseline=Estimate.from_dict(test["baseline"]),
            pruned=Estimate.from_dict(test["pruned"]),
            p_value=test["p_value"],
            arms=tuple(results.get("arms", ())),
            folder=None if folder is None else Path(folder),
            results=results,
        )


def _loaded(model: LoadedModel | torch.nn.Module, tokenizer, name: str | None) -> LoadedModel:
    """A LoadedModel as is; a transformers model with its tokenizer wrapped (and fingerprinted)."""
    if isinstance(model, LoadedModel):
        return model
    return wrap(model, tokenizer, name=name)


def _specs(prune: Sequence[PruneSpec | str] | str) -> list[PruneSpec]:
    items = [prune] if isinstance(prune, str) else list(prune)
    return [item if isinstance(item, PruneSpec) else PruneSpec.parse(item) for item in items]


def evaluate(
    model: LoadedModel | torch.nn.Module,
    task: TaskConfig | str,
    *,
    tokenizer=None,
    name: str | None = None,
    split: str = "test",
    shots: int | None = None,
    seeds: Sequence[int] = (0,),
    limit: int | None = None,
    prune: Sequence[PruneSpec | str] | str = (),
    data_dir: str | Path | None = None,
    output: str | Path | None = None,
    quiet: bool = True,
    **options,
) -> Evaluation:
    """ICL accuracy and macro-F1 of `task` for every seed, under the edit `prune` (e.g. "-1:mlp:0.9").

    The weights are restored bit-identically afterwards.  `shots` counts demonstrations as `svdicl
    eval --shots` does (default: the paper's; with `shots_total=True` in all, as `--num_fewshot`);
    `output` writes results.json and samples.jsonl there and resumes an interrupted run.  Other
    keywords (batch_size, path, cache_memory, length_normalize, svd, overwrite, ...) go to
    svdicl.experiments.evaluate.evaluate, the function `svdicl eval` calls.
    """
    from svdicl.experiments.evaluate import evaluate as run_evaluation

    loaded = _loaded(model, tokenizer, name)
    return run_evaluation(
        loaded, task, split=split, shots=shots, seeds=tuple(seeds), limit=limit, specs=_specs(prune),
        data_dir=data_dir, output=output, quiet=quiet, **options,
    )  # fmt: skip


@contextlib.contextmanager
def _folder(output: str | Path | None) -> Iterator[Path]:
    """`output`, or a temporary folder for a search whose cells need not outlive the call."""
    if output is not None:
        yield Path(output)
        return
    with tempfile.TemporaryDirectory(prefix="svdicl-search-") as folder:
        yield Path(folder)


def search(
    model: LoadedModel | torch.nn.Module,
    task: str,
    *,
    tokenizer=None,
    name: str | None = None,
    module: str = "mlp",
    rates: Sequence[float] | str | None = None,
    top_k: int = 3,
    layer: int | None = None,
    shots: int | None = None,
    seeds: Sequence[int] = (0,),
    limit: int | None = None,
    limit_validation: int | None = None,
    limit_test: int | None = None,
    validation_sampling: str = "random",
    metric: str | None = None,
    data_dir: str | Path | None = None,
    output: str | Path | None = None,
    quiet: bool = True,
    **scoring,
) -> SearchResult:
    """Algorithm 1: the layer with the largest condition number among the top k (or `layer`), rate* on
    validation (0 included, ties to the smaller rate), then unpruned vs rate*-pruned on test.

    `task` is a built-in task name or a task YAML path; `rates` default to the paper's candidates.
    `limit` caps the examples of both splits (`limit_validation`/`limit_test` override it);
    `validation_sampling="balanced"` draws the validation limit per class, as the authors' code does.  With
    `output`, the result store, conditions.csv and search/<task>-<module>.json go there, as `svdicl
    search --output` writes them, and a rerun resumes; without it they live in a temporary folder.
    Other keywords (batch_size, length_normalize, svd, allow_tied, path, cache_memory) make the
    svdicl.experiments.cells.Scoring that `svdicl search` builds from its flags.
    """
    from svdicl.experiments.cells import Scoring
    from svdicl.experiments.grid import PAPER_RATES
    from svdicl.experiments.searches import run_searches, search_configs

    loaded = _loaded(model, tokenizer, name)
    (config,) = search_configs(
        [str(task)], [module], rates=PAPER_RATES if rates is None else rates, top_k=top_k, layer=layer, shots=shots,
        seeds=seeds, limit=limit, limit_validation=limit_validation, limit_test=limit_test, metric=metric,
        validation_sampling=validation_sampling,
    )  # fmt: skip
    with _folder(output) as folder:
        (searched,) = run_searches(loaded, [config], folder, scoring=Scoring(**scoring), data_dir=data_dir, progress=not quiet)
    return SearchResult.from_results(searched.result.to_json(), output)
