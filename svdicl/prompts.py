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


def sample_demonstrations(task: TaskConfig, pool: Sequence[Example], shots: int, seed: int) -> tuple[Example, ...]:
    """`shots` examples of every class from `pool`, drawn with `seed`, then shuffled with it.

    Shots count per class, as the authors' code does (SST-2's 10 demonstrations are 5 per class).
    """
    if shots < 0:
        raise SvdiclError(f"shots must be >= 0 (demonstrations per class), not {shots}")
    rng = random.Random(seed)
    chosen: list[Example] = []
    for cls, name in enumerate(task.labels):
        of_class = [e for e in pool if e.label == cls]
        if shots > len(of_class):
            raise SvdiclError(
                f"task {task.name}: {shots} shots per class, but class {name!r} has only {len(of_class)} "
                f"demonstration candidates; use --shots {len(of_class)} or fewer"
            )
        chosen += rng.sample(of_class, shots)
    rng.shuffle(chosen)
    return tuple(chosen)


def shots_per_class(task: TaskConfig, total: int) -> int:
    """lm-eval's `--num_fewshot` (demonstrations in all) as the shots per class `sample_demonstrations` draws.

    Demonstrations are class-balanced, so a total the number of classes does not divide is refused
    rather than rounded: `--num_fewshot 4` is 2 per class on SST-2 and an error on CB (3 classes).
    """
    classes = task.num_classes
    if total < 0:
        raise SvdiclError(f"--num_fewshot must be >= 0 (demonstrations in all), not {total}")
    per_class, rest = divmod(total, classes)
    if rest:
        below, above = per_class * classes, (per_class + 1) * classes
        raise SvdiclError(
            f"--num_fewshot {total} on {task.name}: svdicl draws the same number of demonstrations from each of its "
            f"{classes} classes, so the total must be a multiple of {classes}; use --num_fewshot {below} or {above}, "
            "or --shots-per-class K"
        )
    return per_class
