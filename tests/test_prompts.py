"""Demonstrations: class-balanced (a total as balanced as it allows), seeded, drawn from the pool only; prompts keep
the separators."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from svdicl.errors import SvdiclError
from svdicl.prompts import build_prompt, demonstration_text, demonstrations_text, sample_demonstrations, shot_counts
from svdicl.tasks import TASKS, get_task
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


def balanced_reference(task, pool, shots, seed):
    """The class-balanced draw as svdicl made it before uneven totals: per class in label order, then shuffled."""
    rng = random.Random(seed)
    chosen = []
    for cls in range(task.num_classes):
        chosen += rng.sample([e for e in pool if e.label == cls], shots)
    rng.shuffle(chosen)
    return tuple(chosen)


@pytest.mark.parametrize("name", TASKS)
def test_a_total_is_drawn_as_balanced_as_it_allows(name, data_dir):
    task = get_task(name)
    pool = load_splits(task, data_dir).demonstrations
    classes = task.num_classes
    for total in range(3 * classes + 2):
        shots, extra = shot_counts(task, total, total=True)
        assert shots * classes + extra == total and 0 <= extra < classes
        for seed in range(4):
            chosen = sample_demonstrations(task, pool, shots, seed, extra)
            counts = Counter(e.label for e in chosen)
            assert len(chosen) == total and len({e.id for e in chosen}) == total
            assert all(counts[c] in (shots, shots + 1) for c in range(classes)), counts  # differ by at most 1
            assert sample_demonstrations(task, pool, shots, seed, extra) == chosen  # the seed fixes the draw
            if not extra:  # a total the classes divide: exactly the per-class draw, as before
                assert shot_counts(task, shots) == (shots, 0)  # what --shots-per-class asks for
                assert chosen == sample_demonstrations(task, pool, shots, seed)
                assert chosen == balanced_reference(task, pool, shots, seed)


@pytest.mark.parametrize(("name", "total"), [("rte", 5), ("copa", 5), ("cb", 5), ("cb", 4)])
def test_the_seed_picks_which_classes_get_the_extra_demonstrations(name, total, data_dir):
    task = get_task(name)
    pool = load_splits(task, data_dir).demonstrations
    shots, extra = shot_counts(task, total, total=True)
    lucky = set()
    for seed in range(20):
        counts = Counter(e.label for e in sample_demonstrations(task, pool, shots, seed, extra))
        lucky.add(frozenset(c for c in range(task.num_classes) if counts[c] == shots + 1))
    assert all(len(classes) == extra for classes in lucky)
    assert len(lucky) > 1 and set().union(*lucky) == set(range(task.num_classes))


def test_a_total_beyond_the_pool_or_below_zero_is_one_line_naming_the_fix(data_dir):
    task = get_task("cb")  # 5 demonstration candidates of each class
    pool = load_splits(task, data_dir).demonstrations
    with pytest.raises(SvdiclError, match=r"5 shots per class plus 1 extra, .*only 5.*--num_fewshot 15 or fewer"):
        sample_demonstrations(task, pool, 5, 0, extra=1)
    assert shot_counts(task, 16, total=True) == (5, 1) and len(sample_demonstrations(task, pool, 5, 0)) == 15
    with pytest.raises(SvdiclError, match=r"--num_fewshot must be >= 0 \(demonstrations in all\), not -1"):
        shot_counts(task, -1, total=True)
    with pytest.raises(SvdiclError, match="extra demonstrations must be 0 to 2"):
        sample_demonstrations(task, pool, 1, 0, extra=3)
