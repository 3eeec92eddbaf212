"""Demonstrations: class-balanced, seeded, drawn from the pool only; prompts keep the separators."""

from __future__ import annotations

from collections import Counter

import pytest

from svdicl.errors import SvdiclError
from svdicl.prompts import build_prompt, demonstration_text, demonstrations_text, sample_demonstrations
from svdicl.tasks import get_task
from svdicl.tasks.data import load_splits


@pytest.fixture(scope="module")
def sst2(data_dir):
    task = get_task("sst2")
    return task, load_splits(task, data_dir)


def test_demonstrations_are_class_balanced_and_from_the_pool(sst2):
    task, splits = sst2
    pool = {e.id for e in splits.demonstrations}
    held_out = {e.id for e in splits.validation} | {e.id for e in splits.test}
    for seed in range(5):
        chosen = sample_demonstrations(task, splits.demonstrations, 3, seed)
        assert Counter(e.label for e in chosen) == {0: 3, 1: 3}
        ids = {e.id for e in chosen}
        assert len(ids) == 6 and ids <= pool and not ids & held_out


def test_the_seed_fixes_which_demonstrations_and_their_order(sst2):
    task, splits = sst2
    first = sample_demonstrations(task, splits.demonstrations, 5, seed=3)
    assert sample_demonstrations(task, splits.demonstrations, 5, seed=3) == first
    other = sample_demonstrations(task, splits.demonstrations, 5, seed=4)
    assert {e.id for e in other} != {e.id for e in first}
    orders = {tuple(e.label for e in sample_demonstrations(task, splits.demonstrations, 5, s)) for s in range(10)}
    assert len(orders) > 1  # classes are interleaved differently, not always grouped


def test_prompt_is_demonstrations_joined_by_newlines_then_the_query(sst2):
    task, splits = sst2
    chosen = sample_demonstrations(task, splits.demonstrations, 2, seed=0)
    block = demonstrations_text(task, chosen)
    lines = [demonstration_text(task, d).removesuffix("\n") for d in chosen]
    example = splits.test[5]
    prompt = build_prompt(task, block, example)
    assert prompt.text == "\n".join(lines) + "\n" + prompt.query
    assert prompt.query == f"text: {example.fields['text']} sentiment:"
    assert prompt.candidates == (" negative", " positive")
    for line, d in zip(lines, chosen, strict=True):
        assert line == f"text: {d.fields['text']} sentiment: {task.labels[d.label]}"


def test_zero_shot_prompt_is_the_query_alone(sst2):
    task, splits = sst2
    assert sample_demonstrations(task, splits.demonstrations, 0, seed=0) == ()
    prompt = build_prompt(task, demonstrations_text(task, ()), splits.test[0])
    assert prompt.demonstrations == "" and prompt.text == prompt.query


def test_copa_demonstrations_show_the_gold_choice(data_dir):
    task = get_task("copa")
    splits = load_splits(task, data_dir)
    for d in sample_demonstrations(task, splits.demonstrations, 2, seed=1):
        gold = d.choices[d.label]
        assert demonstration_text(task, d) == f"{d.fields['premise']} {d.fields['question']} {gold}\n"


def test_more_shots_than_a_class_has_is_a_clear_error(data_dir):
    task = get_task("cb")
    splits = load_splits(task, data_dir)
    with pytest.raises(SvdiclError, match=r"6 shots per class, but class 'Yes' has only 5.*--shots 5"):
        sample_demonstrations(task, splits.demonstrations, 6, seed=0)
    with pytest.raises(SvdiclError, match="shots must be >= 0"):
        sample_demonstrations(task, splits.demonstrations, -1, seed=0)
