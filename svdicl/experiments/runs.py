"""A run: one task, split, shot count and demonstration seed, prepared once and scored under any weights.

    run = prepare_run(loaded, task, split="validation", shots=5, seed=0)   # data, prompts, token ids
    with svdicl.pruned(loaded.model, layers=26, modules="mlp", rate=0.95):
        result = evaluate_run(loaded, run)                                  # svdicl.experiments.run_scoring
    result.accuracy.value, result.accuracy.low, result.accuracy.high

`EvalRun` is everything fixed before any forward pass; `finish_run` turns a run's scores into a
`RunResult`: predictions, ties, metrics with their CIs, the same under each calibration method,
and the rows of results.json and samples.jsonl.
"""

from __future__ import annotations

import functools
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from svdicl import calibration as cal
from svdicl.bias import bias_metrics
from svdicl.errors import SvdiclError
from svdicl.models import LoadedModel, as_loaded
from svdicl.prompts import Prompt, build_prompt, demonstrations_text, sample_demonstrations, shots_in_all
from svdicl.requests import Request, Scores, build_requests, context_length
from svdicl.scoring import choose
from svdicl.stats import Estimate, accuracy_ci, macro_f1_ci
from svdicl.tasks import TaskConfig, get_task
from svdicl.tasks.data import Example, TaskSplits, load_splits


@dataclass(frozen=True)
class EvalRun:
    """Everything fixed before any forward pass: examples, demonstrations, prompts, token ids."""

    task: TaskConfig
    split: str
    shots: int  # per class
    seed: int
    limit: int | None
    examples: tuple[Example, ...]
    demonstrations: tuple[Example, ...]
    prompts: tuple[Prompt, ...]
    requests: tuple[Request, ...]
    data: str  # where the rows came from
    calibration: tuple[str, ...] = ()  # methods applied to this run's scores (svdicl.calibration)
    probes: tuple[tuple[str, str], ...] = ()  # (method, query) of every content-free / domain query
    probe_requests: tuple[Request, ...] = ()  # scored after the examples, on the same path
    extra_shots: int = 0  # demonstrations beyond `shots` per class, one each from as many classes (prompts.shot_counts)

    @property
    def shots_total(self) -> int:
        """The demonstrations in all."""
        return shots_in_all(self.task, self.shots, self.extra_shots)

    @property
    def demonstrations_per_class(self) -> dict[str, int]:
        """How many demonstrations of each class the seed drew (with extra shots, some classes have one more)."""
        return {name: sum(d.label == cls for d in self.demonstrations) for cls, name in enumerate(self.task.labels)}

    @property
    def gold(self) -> tuple[int, ...]:
        """The gold class index of every example, in order."""
        return tuple(e.label for e in self.examples)

    @property
    def scored_requests(self) -> tuple[Request, ...]:
        """What the model scores: the examples' requests, then the calibration queries'."""
        return self.requests + self.probe_requests


def _limit_order(examples: Sequence[Example], limit: int | None, split_seed: int) -> list[int] | None:
    """The seeded shuffle a --limit draws from; None when the limit covers the split (it stays whole)."""
    if limit is None or limit >= len(examples):
        return None
    if limit < 1:
        raise SvdiclError(f"--limit must be >= 1, not {limit}")
    order = list(range(len(examples)))
    random.Random(f"limit:{split_seed}").shuffle(order)
    return order


def limit_examples(examples: Sequence[Example], limit: int | None, split_seed: int) -> tuple[Example, ...]:
    """The --limit subset: the first `limit` of a seeded shuffle, returned in file order."""
    order = _limit_order(examples, limit, split_seed)
    return tuple(examples) if order is None else tuple(examples[i] for i in sorted(order[:limit]))


SAMPLINGS = ("random", "balanced")  # how a --limit draws its subset: the paper's sizes only, or the authors' per class


def balanced_examples(examples: Sequence[Example], limit: int | None, split_seed: int) -> tuple[Example, ...]:
    """`limit` examples with the classes as even as the split allows, as the authors' code samples validation
    (SST-2 4,000/4,000): `limit_examples`' seeded shuffle taken class by class, a class short of its share
    leaving the rest to the others; returned in file order.  A limit that covers the split keeps it whole."""
    order = _limit_order(examples, limit, split_seed)
    if order is None:
        return tuple(examples)
    by_class: dict[int, list[int]] = {}
    for i in order:
        by_class.setdefault(examples[i].label, []).append(i)
    quota = dict.fromkeys(sorted(by_class), 0)
    left = limit
    while left:  # equal shares, capped at each class's size, until the limit is spent
        open_classes = [c for c in quota if quota[c] < len(by_class[c])]
        share, extra = divmod(left, len(open_classes))
        for rank, c in enumerate(open_classes):
            take = min(share + (rank < extra), len(by_class[c]) - quota[c])
            quota[c] += take
            left -= take
    return tuple(examples[i] for i in sorted(i for c, n in quota.items() for i in by_class[c][:n]))


def balance_split(splits: TaskSplits, split: str, limit: int | None) -> TaskSplits:
    """`splits` with `split` cut to its class-balanced subset of `limit` examples (`balanced_examples`).

    Scored whole afterwards (limit None): the cells' data digest holds the subset's content, so they never
    mix with cells of the seeded random subset of the same size."""
    return replace(splits, **{split: balanced_examples(splits.split(split), limit, splits.task.split_seed)})


def prepare_run(
    loaded: LoadedModel,
    task: TaskConfig | str,
    *,
    split: str = "test",
    shots: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    splits: TaskSplits | None = None,
    calibration: Sequence[str] = (),
    progress: bool = False,
    extra_shots: int = 0,
) -> EvalRun:
    """Draw the demonstrations for `seed`, render every prompt and tokenize it into Requests.

    `shots` counts demonstrations per class (default: the paper's, `task.shots`), `extra_shots` those beyond
    (one each from as many classes: a total the classes do not divide, `svdicl.prompts.shot_counts`).  Pass
    `splits` to reuse data already loaded for another seed.  `calibration` names methods of
    svdicl.calibration (those that apply to the task): their queries become extra requests
    after the same demonstrations.  Only the `limit` examples are tokenized;
    `progress` shows a bar on stderr while they are (a whole split takes a while).
    """
    from tqdm.auto import tqdm

    loaded = as_loaded(loaded, "prepare_run")
    task = get_task(task) if isinstance(task, str) else task
    splits = splits if splits is not None else load_splits(task, data_dir)
    shots = task.shots if shots is None else shots
    examples = limit_examples(splits.split(split), limit, task.split_seed)
    demonstrations = sample_demonstrations(task, splits.demonstrations, shots, seed, extra_shots)
    block = demonstrations_text(task, demonstrations)
    prompts = tuple(build_prompt(task, block, e) for e in examples)
    desc = f"tokenizing {task.name} {split} seed {seed}"
    with tqdm(total=len(prompts), desc=desc, unit="ex", file=sys.stderr, disable=not progress, leave=False) as bar:
        requests = build_requests(
            loaded.tokenizer,
            block,
            [p.query for p in prompts],
            [p.candidates for p in prompts],
            ids=[e.id for e in examples],
            max_length=context_length(loaded.model, loaded.tokenizer),
            progress=bar,
        )
    methods = cal.applicable(task, cal.parse_calibration(calibration))
    probes = tuple((m, q) for m in methods for q in cal.probe_queries(task, m, splits.demonstrations, seed))
    probe_requests = build_requests(
        loaded.tokenizer,
        block,
        [q for _, q in probes],
        [tuple(task.answer_delimiter + w for w in task.labels)] * len(probes),
        ids=[f"{m} calibration query {q!r}" for m, q in probes],
        max_length=context_length(loaded.model, loaded.tokenizer),
    )
    return EvalRun(
        task, split, shots, seed, limit, examples, demonstrations, prompts, tuple(requests), splits.origin,
        methods, probes, tuple(probe_requests), extra_shots,
    )  # fmt: skip


@dataclass(frozen=True)
class CalibratedRun:
    """A run's predictions under one calibration method, with their metrics."""

    calibrated: cal.Calibrated
    accuracy: Estimate
    macro_f1: Estimate


def scored_seeds(shots: int, seeds: Sequence[int], calibration: Sequence[str] = (), extra_shots: int = 0) -> tuple[int, ...]:
    """The seeds whose runs are scored: with no demonstrations every seed has the same prompts, so the first stands
    for all; calibration (its domain queries are drawn per seed) keeps every seed."""
    return tuple(seeds[:1]) if shots == 0 and extra_shots == 0 and not calibration else tuple(seeds)


@dataclass(frozen=True)
class RunResult:
    """One run scored under one set of weights: per-example scores, predictions and metrics with CIs."""

    run: EvalRun
    scores: tuple[Scores, ...]
    predictions: tuple[int, ...]
    ties: tuple[bool, ...]
    accuracy: Estimate
    macro_f1: Estimate
    timing: dict
    length_normalize: bool
    calibrated: tuple[CalibratedRun, ...] = ()
    probe_scores: tuple[Scores, ...] = ()  # of run.probes, in order

    @property
    def correct(self) -> tuple[bool, ...]:
        """Whether each example's prediction equals its gold class."""
        return tuple(p == g for p, g in zip(self.predictions, self.run.gold, strict=True))

    @functools.cached_property
    def bias(self) -> dict:
        """Bias-aware metrics of the uncalibrated predictions, then of each calibration's (by method); computed once,
        though results, metrics and the calibration summary all read them."""
        k, gold = self.run.task.num_classes, self.run.gold
        found = {None: bias_metrics(gold, self.predictions, ranking_scores(self.scores, self.length_normalize), k)}
        for c in self.calibrated:
            found[c.calibrated.method] = bias_metrics(gold, c.calibrated.predictions, c.calibrated.scores, k)
        return found

    def metrics(self) -> dict:
        """Every metric as {"value", ...}: accuracy and macro-F1 with CIs, the bias-aware ones, each
        again per calibration method as `<method>:<metric>`."""
        bias = self.bias
        found = {}
        for method, accuracy, macro in [(None, self.accuracy, self.macro_f1)] + [
            (c.calibrated.method, c.accuracy, c.macro_f1) for c in self.calibrated
        ]:
            prefix = f"{method}:" if method else ""
            found[prefix + "accuracy"] = accuracy.to_dict()
            found[prefix + "macro_f1"] = macro.to_dict()
            for name in BIAS_METRICS:
                found[prefix + name] = {"value": bias[method][name]}
        return found

    def summary(self) -> dict:
        """The run's entry in results.json."""
        k = self.run.task.num_classes
        confusion = [[0] * k for _ in range(k)]
        for g, p in zip(self.run.gold, self.predictions, strict=True):
            confusion[g][p] += 1
        return {
            "seed": self.run.seed,
            "demonstrations": [e.id for e in self.run.demonstrations],
            "demonstrations_per_class": self.run.demonstrations_per_class,
            "n_examples": len(self.predictions),
            "n_ties": sum(self.ties),
            "metrics": self.metrics(),
            "prediction_counts": self.bias[None]["prediction_counts"],
            "confusion": {"labels": list(self.run.task.labels), "rows_gold_columns_predicted": confusion},
            "calibration": self.calibration_summary(),
            "timing": self.timing,
        }

    def calibration_summary(self) -> dict:
        """Per method: its prior p_cf, its prediction counts and (contextual, domain) the queries with their raw scores."""
        bias = self.bias
        found = {}
        for c in self.calibrated:
            method = c.calibrated.method
            queries = [
                {"query": q, "logprobs": list(s.logprobs), "n_tokens": list(s.n_tokens)}
                for (m, q), s in zip(self.run.probes, self.probe_scores, strict=True)
                if m == method
            ]
            found[method] = {"prior": list(c.calibrated.prior), "prediction_counts": bias[method]["prediction_counts"],
                             **({"queries": queries} if method in cal.PROBES else {})}  # fmt: skip
        return found

    def samples(self) -> list[dict]:
        """The run's samples.jsonl rows: prompt, per-candidate scores, prediction, correctness (and calibrated ones)."""
        return [
            _sample(self.run, i, s, self.length_normalize, {c.calibrated.method: c.calibrated for c in self.calibrated})
            for i, s in enumerate(self.scores)
        ]


BIAS_METRICS = ("balanced_accuracy", "top_answer_share", "auc")


def ranking_scores(scores: Sequence[Scores], length_normalize: bool) -> list[list[float]]:
    """The values candidates are ranked by: summed log-probs, or the mean per token with length normalisation."""
    return [[lp / n if length_normalize else lp for lp, n in zip(s.logprobs, s.n_tokens, strict=True)] for s in scores]


def _sample(run: EvalRun, index: int, scores: Scores, length_normalize: bool, calibrated: Mapping | None = None) -> dict:
    prediction, tie = choose(scores, length_normalize)
    prompt, gold = run.prompts[index], run.examples[index].label
    return {
        "seed": run.seed,
        "id": run.examples[index].id,
        "prompt": prompt.text,
        "candidates": list(prompt.candidates),
        "gold": gold,
        "logprobs": list(scores.logprobs),
        "n_tokens": list(scores.n_tokens),
        "prediction": prediction,
        "correct": prediction == gold,
        "tie": tie,
        **({"calibrated": {
            method: {"scores": list(c.scores[index]), "prediction": c.predictions[index], "correct": c.predictions[index] == gold}
            for method, c in calibrated.items()
        }} if calibrated else {}),
    }  # fmt: skip


def finish_run(run: EvalRun, scores: Sequence[Scores], length_normalize: bool, timing: dict) -> RunResult:
    """Predictions, ties and metrics with their CIs (Wilson for accuracy, BCa bootstrap for macro-F1) from a run's
    scores (the examples', then any calibration queries'), and the same under each of the run's calibration methods."""
    n = len(run.examples)
    scores, probe_scores = tuple(scores[:n]), tuple(scores[n:])
    chosen = [choose(s, length_normalize) for s in scores]
    predictions = tuple(p for p, _ in chosen)
    gold = run.gold
    calibrated = []
    values = np.array(ranking_scores(scores, length_normalize))
    for method in run.calibration:
        probes = [s for (m, _), s in zip(run.probes, probe_scores, strict=True) if m == method]
        result = cal.apply(method, values, np.array(ranking_scores(probes, length_normalize)) if probes else None)
        calibrated.append(
            CalibratedRun(
                result,
                accuracy_ci(gold, result.predictions),
                macro_f1_ci(gold, result.predictions, run.task.num_classes),
            )
        )
    return RunResult(
        run=run,
        scores=tuple(scores),
        predictions=predictions,
        ties=tuple(t for _, t in chosen),
        accuracy=accuracy_ci(gold, predictions),
        macro_f1=macro_f1_ci(gold, predictions, run.task.num_classes),
        timing=timing,
        length_normalize=length_normalize,
        calibrated=tuple(calibrated),
        probe_scores=probe_scores,
    )
