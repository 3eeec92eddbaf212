"""Demonstration sampling and prompt assembly, with the paper's templates kept character-exact.

A prompt is two parts, kept apart because every example of a run shares the first:

    demonstrations  each demonstration is the query template filled with a train example,
                    the answer delimiter and its gold answer, followed by "\\n";
                    empty for 0 shots
    query           the template filled with the example, ending right before the answer

The model then continues the query with each candidate: the answer delimiter plus a label
word (classification) or plus a choice's text (multiple choice).  For SST-2 with one shot:

    text: a gripping film sentiment: positive\\n      <- demonstrations
    text: dull and long sentiment:                    <- query
     negative | positive                              <- candidates (" negative", " positive")
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from svdicl.errors import SvdiclError
from svdicl.tasks import TaskConfig
from svdicl.tasks.data import Example

DEMONSTRATION_END = "\n"


@dataclass(frozen=True)
class Prompt:
    """One example's prompt: the shared demonstrations, its query, and the candidate continuations."""

    demonstrations: str  # shared by every example of a run
    query: str
    candidates: tuple[str, ...]  # continuation texts, one per class / choice

    @property
    def text(self) -> str:
        """The prompt as the model reads it, before any candidate."""
        return self.demonstrations + self.query


def query_text(task: TaskConfig, example: Example) -> str:
    """The example rendered with the task's template, ending right before the answer."""
    return task.template.format(**example.fields)


def candidate_texts(task: TaskConfig, example: Example) -> tuple[str, ...]:
    """The continuations to score: the label words (or the example's choices) after the answer delimiter."""
    answers = example.choices if task.kind == "multiple_choice" else task.labels
    return tuple(task.answer_delimiter + answer for answer in answers)


def demonstration_text(task: TaskConfig, example: Example) -> str:
    """One filled-in demonstration: query, delimiter, gold answer, newline."""
    return query_text(task, example) + candidate_texts(task, example)[example.label] + DEMONSTRATION_END


def demonstrations_text(task: TaskConfig, demonstrations: Sequence[Example]) -> str:
    """The demonstrations, each rendered with its answer, joined into the block every prompt starts with."""
    return "".join(demonstration_text(task, d) for d in demonstrations)


def build_prompt(task: TaskConfig, demonstrations: str, example: Example) -> Prompt:
    """An example's Prompt after the demonstration block."""
    return Prompt(demonstrations=demonstrations, query=query_text(task, example), candidates=candidate_texts(task, example))


def sample_demonstrations(
    task: TaskConfig, pool: Sequence[Example], shots: int, seed: int, extra: int = 0
) -> tuple[Example, ...]:
    """`shots` examples of every class from `pool`, plus one more from each of `extra` classes, drawn with `seed`,
    then shuffled with it.

    Shots count per class, as the authors' code does (SST-2's 10 demonstrations are 5 per class).  `extra`
    (below the number of classes) is what a total the classes do not divide leaves over (`shot_counts`):
    lm-eval's `--num_fewshot 5` on RTE is 2 per class plus 1 of a class the seed picks, among the classes
    with a candidate to spare.  With no `extra` the draw is the class-balanced one, unchanged.
    """
    classes = task.num_classes
    if shots < 0:
        raise SvdiclError(f"shots must be >= 0 (demonstrations per class), not {shots}")
    if not 0 <= extra < classes:
        raise SvdiclError(f"extra demonstrations must be 0 to {classes - 1} ({task.name} has {classes} classes), not {extra}")
    by_class = [[e for e in pool if e.label == cls] for cls in range(classes)]
    spare = [cls for cls, found in enumerate(by_class) if len(found) > shots]
    short = min(range(classes), key=lambda cls: len(by_class[cls]))
    if len(by_class[short]) < shots or len(spare) < extra:
        most = len(by_class[short])
        total = most * classes + sum(len(found) > most for found in by_class)
        raise SvdiclError(
            f"task {task.name}: {shots} shots per class{f' plus {extra} extra' if extra else ''}, but class "
            f"{task.labels[short]!r} has only {most} demonstration candidates; "
            f"use --shots {most} or fewer (--num_fewshot {total} or fewer in all)"
        )
    rng = random.Random(seed)
    lucky = set(rng.sample(spare, extra)) if extra else set()  # nothing drawn here for a balanced count: its draw is as before
    chosen: list[Example] = []
    for cls, of_class in enumerate(by_class):
        chosen += rng.sample(of_class, shots + (cls in lucky))
    rng.shuffle(chosen)
    return tuple(chosen)


def shot_counts(task: TaskConfig, shots: int | None, total: bool = False) -> tuple[int, int]:
    """(shots per class, extra) for `sample_demonstrations`: the task's paper setting for None, `shots` per class,
    or with `total` `shots` demonstrations in all (lm-eval's `--num_fewshot`), as balanced as they allow.

    A total the classes divide is that many per class and no extra (`--num_fewshot 4` on SST-2 draws exactly
    the demonstrations of `--shots-per-class 2`); otherwise the rest are one each from as many classes:
    `--num_fewshot 5` is (2, 1) on RTE and (1, 2) on CB.
    """
    if shots is None:
        return task.shots, 0
    flag = "--num_fewshot" if total else "--shots"
    if shots < 0:
        raise SvdiclError(f"{flag} must be >= 0 (demonstrations {'in all' if total else 'per class'}), not {shots}")
    return divmod(shots, task.num_classes) if total else (shots, 0)


def shots_in_all(task: TaskConfig, shots: int, extra: int = 0) -> int:
    """The demonstrations in all of `shots` per class plus `extra` (the inverse of `shot_counts` with `total`)."""
    return shots * task.num_classes + extra
