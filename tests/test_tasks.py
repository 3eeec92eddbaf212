"""Task configs: the paper's templates character for character, the split protocol on the real
data, label-word tokenization as documented, and one-line errors for bad configs and data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from svdicl.errors import SvdiclError
from svdicl.prompts import build_prompt, demonstration_text
from svdicl.tasks import TASKS, get_task, parse_task
from svdicl.tasks.data import load_splits

# docs/paper.md section 3, verbatim.
PAPER_TEMPLATES = {
    "sst2": "text: <text> sentiment: <label>",
    "agnews": "text: <text> classification: <label>",
    "emoc": "text: <text> sentiment: <label>",
    "mrpc": "sentence1: <s1> sentence2: <s2> label : <label>",
    "rte": "<premise> Does this mean that <hypothesis> is true? select Yes or No? <label>",
    "cb": "Suppose <premise> Can we infer that <hypothesis>? Yes, No, or Maybe? <label>",
    "copa": "<premise> <question> <choice>",
}
# The label word of each data label (EmoC: happy vs others; COPA: the gold choice's text).
LABEL_WORDS = {
    "sst2": ["negative", "positive"],
    "agnews": ["World", "Sports", "Business", "Technology"],
    "emoc": ["others", "happy", "others", "others"],
    "mrpc": ["No", "Yes"],
    "rte": ["Yes", "No"],
    "cb": ["Yes", "No", "Maybe"],
}
# Paper: total demonstrations; per class is what the configs store.
PAPER_TOTAL_SHOTS = {"sst2": 10, "agnews": 8, "emoc": 10, "mrpc": 10, "rte": 10, "cb": 15, "copa": 10}
# (demonstration pool, validation, test) on ../shared/data; see each YAML for the protocol.
SPLIT_SIZES = {
    "sst2": (100, 8000, 67349 - 8000 - 100),
    "agnews": (9776 - 8000, 8000, 7600),  # local train is a 9,776-row subset of 120,000
    "emoc": (30160 - 5000, 5000, 5509),
    "mrpc": (3668, 408, 1725),
    "rte": (100, 2490 - 100, 277),
    "cb": (15, 235, 56),
    "copa": (200, 200, 100),
}


def fill_paper_template(name: str, row: dict) -> str:
    """The paper's template filled from a raw data row (each value stripped, EmoC turns joined by a space)."""
    s = {k: v.strip() for k, v in row.items() if isinstance(v, str)}
    values = {
        "sst2": {"text": s.get("sentence")},
        "agnews": {"text": s.get("text")},
        "emoc": {"text": " ".join(s.get(t, "") for t in ("turn1", "turn2", "turn3"))},
        "mrpc": {"s1": s.get("sentence1"), "s2": s.get("sentence2")},
        "rte": s,
        "cb": s,
        "copa": {**s, "choice": s.get(f"choice{row['label'] + 1}")},
    }[name]
    if name != "copa":
        values = {**values, "label": LABEL_WORDS[name][row["label"]]}
    return re.sub(r"<(\w+)>", lambda m: values[m.group(1)], PAPER_TEMPLATES[name])


def raw_row(data_dir: Path, name: str, example_id: str) -> dict:
    """The data line an example id (`<source>:<row>`) points at, read without svdicl."""
    source, index = example_id.split(":")
    with open(data_dir / name / f"{source}.jsonl", encoding="utf-8") as handle:
        return json.loads(next(line for i, line in enumerate(handle) if i == int(index)))


def test_the_seven_tasks_exist_with_the_papers_shots():
    assert set(TASKS) == set(PAPER_TEMPLATES)
    for name in TASKS:
        task = get_task(name)
        assert task.shots * task.num_classes == PAPER_TOTAL_SHOTS[name]


@pytest.mark.parametrize("name", sorted(PAPER_TEMPLATES))
def test_rendered_demonstration_equals_the_papers_template(name, data_dir):
    task = get_task(name)
    for example in load_splits(task, data_dir).test[:3]:
        expected = fill_paper_template(name, raw_row(data_dir, name, example.id))
        assert demonstration_text(task, example) == expected + "\n"
        prompt = build_prompt(task, "", example)
        assert prompt.query + prompt.candidates[example.label] == expected


@pytest.mark.parametrize("name", sorted(SPLIT_SIZES))
def test_split_sizes_follow_the_protocol_and_never_overlap(name, data_dir):
    task = get_task(name)
    splits = load_splits(task, data_dir)
    sizes = (len(splits.demonstrations), len(splits.validation), len(splits.test))
    assert sizes == SPLIT_SIZES[name]
    ids = [{e.id for e in part} for part in (splits.demonstrations, splits.validation, splits.test)]
    assert sum(map(len, ids)) == sum(sizes)  # ids are unique
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    rule = task.splits["demonstrations"]
    if rule.per_class:
        counts = [sum(e.label == c for e in splits.demonstrations) for c in range(task.num_classes)]
        assert counts == [rule.per_class] * task.num_classes


# CB's demonstration pool under split_seed 0, pinned from the documented protocol (docs/evaluation.md, "Split
# protocol"): the rows of cb/train.jsonl shuffled by random.Random("0:train"), the first 5 of each class in that order.
CB_POOL_SPLIT_SEED_0 = [40, 57, 67, 71, 78, 96, 105, 131, 136, 149, 152, 210, 219, 224, 230]


def test_splits_are_fixed_by_the_split_seed(data_dir):
    task = get_task("cb")
    first, again = load_splits(task, data_dir), load_splits(task, data_dir)
    pinned = [f"train:{i}" for i in CB_POOL_SPLIT_SEED_0]
    assert [e.id for e in first.demonstrations] == [e.id for e in again.demonstrations] == pinned
    other = parse_task(Path(_task_path("cb")).read_text() + "split_seed: 1\n", default_name="cb")
    assert [e.id for e in load_splits(other, data_dir).demonstrations] != [e.id for e in first.demonstrations]


def test_emoc_is_happy_vs_others(data_dir):
    splits = load_splits(get_task("emoc"), data_dir)
    raw = [json.loads(line)["label"] for line in (data_dir / "emoc" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e.label for e in splits.test] == [int(label == 1) for label in raw]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LABEL_WORDS))
def test_label_words_tokenize_as_documented(name, real_model):
    """Each YAML documents its label words' SmolLM2 token ids; they must be single, distinct tokens."""
    text = Path(_task_path(name)).read_text()
    documented = {word: int(i) for word, i in re.findall(r'" (\w+)" \[(\d+)\]', text)}
    task = get_task(name)
    assert set(documented) == set(task.labels)
    tokenizer = real_model.tokenizer
    for word in task.labels:
        assert tokenizer(task.answer_delimiter + word, add_special_tokens=False)["input_ids"] == [documented[word]]


def _task_path(name: str) -> str:
    import svdicl.tasks

    return str(Path(svdicl.tasks.__file__).parent / f"{name}.yaml")


GOOD = """
kind: classification
template: "q: {text} a:"
labels: ["Yes", "No"]
shots: 1
splits:
  demonstrations: {source: train}
  validation: {source: validation}
  test: {source: test}
"""


def write_data(folder: Path, task: str, source: str, rows: list) -> None:
    (folder / task).mkdir(parents=True, exist_ok=True)
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    (folder / task / f"{source}.jsonl").write_text(text)


def test_a_user_task_is_one_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(GOOD)
    rows = [{"text": f" t{i} ", "label": i % 2} for i in range(6)]
    for source in ("train", "validation", "test"):
        write_data(tmp_path, "mine", source, rows)
    task = get_task(str(path))
    assert task.name == "mine"
    splits = load_splits(task, tmp_path)
    assert [e.id for e in splits.test] == [f"test:{i}" for i in range(6)]
    assert splits.test[1].fields == {"text": "t1"} and splits.test[1].label == 1


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda y: y.replace("kind: classification", "kind: regression"), "kind 'regression'"),
        (lambda y: y + "colour: red\n", "unknown key 'colour'"),
        (lambda y: y.replace("shots: 1\n", ""), "missing key 'shots'"),
        (lambda y: y + "fields: {unused: '{text}'}\n", "fields unused are not used by the template"),
        (lambda y: y.replace('["Yes", "No"]', '["Yes", "Yes"]'), "distinct"),
        (lambda y: y.replace("{source: validation}", "{source: train}"), "share source 'train'"),
        (lambda y: y.replace("test: {source: test}", "test: {source: test, size: 3, rest: true}"), "more than one"),
        (lambda y: y + "  extra: {source: test}\n", "exactly"),
        (lambda y: y + "label_map: {0: 0, 1: 0}\n", "label_map"),
        (lambda y: y.replace("test: {source: test}", "test: {source: test, size: -2}"), "whole number >= 1"),
    ],
)
def test_bad_task_files_are_one_line_errors(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(change(GOOD))
    with pytest.raises(SvdiclError, match=message) as info:
        get_task(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_unknown_task_names_the_choices():
    with pytest.raises(SvdiclError, match=r"unknown task 'sst3'.*sst2"):
        get_task("sst3")
    with pytest.raises(SvdiclError, match="does not exist"):
        get_task("/nowhere/task.yaml")


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"text": "a", "label": 0', "line 3: not valid JSON"),
        ('["text", 0]', "line 3: each line must be a JSON object"),
        ('{"label": 0}', "line 3: missing field 'text'"),
        ('{"text": 5, "label": 0}', "line 3: field 'text' must be a string"),
        ('{"text": "a", "label": 7}', r"line 3: label 7 is not one of \[0, 1\]"),
    ],
)
def test_bad_data_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "mine.yaml"
    path.write_text(GOOD)
    good = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    for source in ("train", "validation"):
        write_data(tmp_path, "mine", source, good)
    write_data(tmp_path, "mine", "test", [*good, line])
    with pytest.raises(SvdiclError, match=message) as info:
        load_splits(get_task(str(path)), tmp_path)
    assert str(tmp_path / "mine" / "test.jsonl") in str(info.value)


def test_missing_and_empty_files_are_one_line_errors(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(GOOD)
    write_data(tmp_path, "mine", "train", [{"text": "a", "label": 0}])
    with pytest.raises(SvdiclError, match=r"\.jsonl does not exist.*--data-dir"):
        load_splits(get_task(str(path)), tmp_path)
    write_data(tmp_path, "mine", "validation", [])
    write_data(tmp_path, "mine", "test", [{"text": "a", "label": 0}])
    with pytest.raises(SvdiclError, match="is empty"):
        load_splits(get_task(str(path)), tmp_path)


def test_sized_split_larger_than_its_source_is_an_error(tmp_path):
    spec = GOOD.replace("validation: {source: validation}", "validation: {source: train, size: 50}").replace(
        "demonstrations: {source: train}", "demonstrations: {source: train, rest: true}"
    )
    path = tmp_path / "mine.yaml"
    path.write_text(spec)
    for source in ("train", "test"):
        write_data(tmp_path, "mine", source, [{"text": "a", "label": i % 2} for i in range(10)])
    with pytest.raises(SvdiclError, match="wants 50 rows of train but only 10"):
        load_splits(get_task(str(path)), tmp_path)


def test_without_a_data_folder_offline_the_error_says_how_to_fix_it(monkeypatch):
    monkeypatch.delenv("SVDICL_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SvdiclError, match=r"no local data folder given and the Hugging Face Hub is unreachable.*SVDICL_DATA"):
        load_splits(get_task("rte"))
