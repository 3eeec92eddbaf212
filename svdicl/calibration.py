"""Calibration of label-word scores: contextual, domain-context and batch calibration.

Small models answer one label far more often than the data hold it, and an edit to the weights
can move that bias without changing what the model knows.  These methods remove a label prior
without touching any weight, so a pruning gain can be told apart from a bias shift.  Each one
estimates a prior p_cf over the label words and predicts argmax_y log p(y|x) - log p_cf(y):

- contextual (Zhao et al. 2021): p_cf = the mean label distribution after the run's own
  demonstrations followed by content-free queries ("N/A", "", "[MASK]" in every template field);
- domain (Fei et al. 2023): the same after 20 queries of random words of the task's own text
  (each field as many words as that field has on average), drawn with the run's seed;
- batch (Zhou et al. 2024): p_cf = the mean label distribution over the run's evaluated examples
  (no extra forward).

A label distribution is the softmax over the label words of their scores (summed log-probs, or
the mean per token with length normalisation), so p_cf and the calibrated scores are in the
same space as the uncalibrated prediction.  The arithmetic is `calibrate`, a pure function of
score arrays; `probe_queries` writes the content-free and domain queries.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

from svdicl.errors import SvdiclError
from svdicl.tasks import TaskConfig
from svdicl.tasks.data import Example

METHODS = ("contextual", "domain", "batch")
CONTENT_FREE = ("N/A", "", "[MASK]")
DOMAIN_QUERIES = 20
PROBES = ("contextual", "domain")  # the methods that score extra queries


def parse_calibration(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """`none`, `all`, or a comma list of methods (also a list), in canonical order without repeats."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = {str(item).strip().lower() for item in items if str(item).strip()}
    if names <= {"none"}:
        return ()
    if "all" in names:
        names = (names - {"all"}) | set(METHODS)
    unknown = sorted(names - set(METHODS))
    if unknown or "none" in names:
        bad = unknown[0] if unknown else "none"
        raise SvdiclError(f"unknown calibration {bad!r}; use none, all or a comma list of {', '.join(METHODS)}")
    return tuple(m for m in METHODS if m in names)


def applicable(task: TaskConfig, methods: Sequence[str]) -> tuple[str, ...]:
    """The methods that apply to `task`: none for multiple choice (its candidates differ per example)."""
    return () if task.kind == "multiple_choice" else tuple(methods)


def label_distribution(scores: np.ndarray) -> np.ndarray:
    """Rows of label scores (log space, examples x labels) -> probabilities normalised over the labels."""
    return special.softmax(np.asarray(scores, dtype=np.float64), axis=1)


def prior(scores: np.ndarray) -> np.ndarray:
    """p_cf: the mean over rows of the normalised label distributions."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or len(scores) == 0:
        raise SvdiclError("a calibration prior needs at least one row of label scores")
    return label_distribution(scores).mean(axis=0)


def calibrate(scores: np.ndarray, p_cf: np.ndarray) -> np.ndarray:
    """log p(y|x) - log p_cf(y), p normalised over the labels: argmax of a row = argmax p(y|x) / p_cf(y)."""
    return special.log_softmax(np.asarray(scores, dtype=np.float64), axis=1) - np.log(np.asarray(p_cf, dtype=np.float64))[None]


def predict(calibrated: np.ndarray) -> np.ndarray:
    """argmax per row; an exact tie goes to the lowest label index, as uncalibrated predictions do."""
    return np.argmax(np.asarray(calibrated), axis=1)


@dataclass(frozen=True)
class Calibrated:
    """One method applied to a run: its prior, per-example calibrated scores and predictions."""

    method: str
    prior: tuple[float, ...]
    scores: tuple[tuple[float, ...], ...]
    predictions: tuple[int, ...]


def apply(method: str, example_scores: np.ndarray, probe_scores: np.ndarray | None = None) -> Calibrated:
    """Calibrate a run's scores: batch takes its prior from the examples, the others from their probe rows."""
    source = example_scores if method == "batch" else probe_scores
    if source is None:
        raise SvdiclError(f"{method} calibration needs the scores of its content-free queries")
    p_cf = prior(source)
    values = calibrate(example_scores, p_cf)
    return Calibrated(method, tuple(p_cf.tolist()), tuple(map(tuple, values.tolist())), tuple(predict(values).tolist()))


def probe_queries(task: TaskConfig, method: str, pool: Sequence[Example], seed: int) -> tuple[str, ...]:
    """The queries a method scores after the demonstrations (none for batch).

    contextual: the template with each content-free string in every field.  domain: 20
    templates whose every field holds random words drawn (seeded by `seed`) from that field's
    words in `pool`, as many as the field's mean length in words (at least one).
    """
    fields = _placeholders(task.template)
    if method == "contextual":
        return tuple(task.template.format(**dict.fromkeys(fields, value)) for value in CONTENT_FREE)
    if method != "domain":
        return ()
    words = {name: [w for e in pool for w in e.fields[name].split()] for name in fields}
    empty = [name for name, found in words.items() if not found]
    if empty:
        raise SvdiclError(f"task {task.name}: field {empty[0]!r} has no words in the demonstration pool for domain calibration")
    lengths = {name: max(1, round(len(words[name]) / len(pool))) for name in fields}
    rng = random.Random(f"domain:{seed}")
    return tuple(
        task.template.format(**{name: " ".join(rng.choice(words[name]) for _ in range(lengths[name])) for name in fields})
        for _ in range(DOMAIN_QUERIES)
    )


def _placeholders(template: str) -> list[str]:
    return list(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(template) if name))


def metric_key(method: str, metric: str) -> str:
    """`contextual:accuracy`: a calibrated metric's name in results and store cells."""
    return f"{method}:{metric}"
