"""Nothing mixed, nothing lost, nothing written outside --output: results keyed on the data and task
definition actually scored, data read from the files' content, names from user files checked before
they reach a path, --overwrite that deletes only what svdicl wrote, concurrent runs that share cells."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import write_toy_task
from test_sweep import grid, save_model, toy_loaded

from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.experiments.sweep import sweep
from svdicl.store import Store
from svdicl.tasks import get_task, parse_task
from svdicl.tasks.data import load_splits

pytestmark = pytest.mark.usefixtures("one_thread")


def flip_labels(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**row, "label": 1 - row["label"]}) + "\n" for row in rows))


def small_grid(toy: Path):
    return grid(toy, layers=("0",), modules=("mlp",), rates=(0, 0.5), shots=(1,), limit=10)


def accuracies(result) -> list[float]:
    return [cell.value("accuracy") for cell in result.cells]


def test_flipped_labels_in_another_data_dir_are_scored_anew(toy, tmp_path):
    flipped = tmp_path / "flipped"
    write_toy_task(flipped)
    flip_labels(flipped / "data" / "toy" / "test.jsonl")
    loaded, store = toy_loaded(), Store(tmp_path / "out")
    first = sweep(loaded, small_grid(toy), store, data_dir=toy.parent / "data", progress=False)
    with pytest.warns(UserWarning, match=r"holds 2 cell\(s\) of task toy scored on other data"):
        again = sweep(loaded, small_grid(toy), store, data_dir=flipped / "data", progress=False)
    fresh = sweep(loaded, small_grid(toy), Store(tmp_path / "fresh"), data_dir=flipped / "data", progress=False)
    assert again.computed == 2 and accuracies(again) == accuracies(fresh)
    assert accuracies(again) == [pytest.approx(1 - a) for a in accuracies(first)]  # every gold label flipped
    assert len(Store(tmp_path / "out")) == 4  # both kept, apart
    assert sweep(loaded, small_grid(toy), store, data_dir=toy.parent / "data", progress=False).computed == 0


def test_a_user_task_named_like_a_builtin_with_another_template_is_scored_anew(toy, tmp_path):
    other = toy.parent / "other" / "toy.yaml"  # same name (the file stem), another template
    other.parent.mkdir()
    other.write_text(toy.read_text().replace('"q: {text} a:"', '"question: {text} answer:"'))
    assert get_task(other).name == get_task(toy).name
    loaded, store = toy_loaded(), Store(tmp_path / "out")
    sweep(loaded, small_grid(toy), store, data_dir=toy.parent / "data", progress=False)
    with pytest.warns(UserWarning, match="another definition"):
        again = sweep(loaded, small_grid(other), store, data_dir=toy.parent / "data", progress=False)
    fresh = sweep(loaded, small_grid(other), Store(tmp_path / "fresh"), data_dir=toy.parent / "data", progress=False)
    assert again.computed == 2
    assert [store.samples(c) for c in again.cells] == [Store(tmp_path / "fresh").samples(c) for c in fresh.cells]


def test_the_task_digest_sees_what_is_scored_and_only_that(toy):
    task = get_task(toy)
    text = toy.read_text()
    assert parse_task(text + "description: words\nname: toy\n", default_name="other").digest == task.digest
    for old, new in (('"q: {text} a:"', '"q: {text}  a:"'), ('"Yes", "No"', '"yes", "No"'), ("size: 30", "size: 29")):
        assert parse_task(text.replace(old, new), default_name="toy").digest != task.digest, new


def test_a_rewritten_data_file_with_its_mtime_kept_is_read_anew(toy):
    path = toy.parent / "data" / "toy" / "test.jsonl"
    before = load_splits(get_task(toy), toy.parent / "data")
    stamp = os.stat(path)
    flip_labels(path)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # as `cp -p` or a normalising archiver leaves it
    assert os.stat(path).st_mtime_ns == stamp.st_mtime_ns and os.stat(path).st_size == stamp.st_size
    after = load_splits(get_task(toy), toy.parent / "data")
    assert [e.label for e in after.test] == [1 - e.label for e in before.test]


def test_blank_lines_in_jsonl_are_skipped(toy):
    path = toy.parent / "data" / "toy" / "test.jsonl"
    before = load_splits(get_task(toy), toy.parent / "data")
    path.write_text(path.read_text() + "\n  \n")
    assert load_splits(get_task(toy), toy.parent / "data") == before


def test_eval_into_a_folder_of_other_data_refuses_instead_of_resuming(toy, tmp_path, capsys):
    model = save_model(toy_loaded(), tmp_path / "model")
    argv = ["-q", "eval", "--model", str(model), "--task", str(toy), "--data-dir", str(toy.parent / "data"), "--limit", "8"]
    assert main([*argv, "--output", str(tmp_path / "e")]) == 0
    flip_labels(toy.parent / "data" / "toy" / "test.jsonl")
    capsys.readouterr()
    assert main([*argv, "--output", str(tmp_path / "e")]) == 2
    assert "holds a different evaluation" in capsys.readouterr().err
    assert main([*argv, "--output", str(tmp_path / "e"), "--overwrite"]) == 0
    assert main([*argv, "--output", str(tmp_path / "fresh")]) == 0
    scored = [json.loads((tmp_path / name / "results.json").read_text())["runs"][0]["metrics"] for name in ("e", "fresh")]
    assert scored[0] == scored[1]


@pytest.mark.parametrize("name", ["../../ESCAPED", "a/b", "..", ".hidden", "", "x" * 65])
def test_a_task_name_that_is_not_a_file_name_is_refused(toy, name):
    with pytest.raises(SvdiclError, match=r"name .* cannot name a file") as raised:
        parse_task(toy.read_text() + f"name: {json.dumps(name)}\n", origin="t.yaml")
    assert "\n" not in str(raised.value)


def test_data_folder_and_split_sources_are_checked_too(toy):
    with pytest.raises(SvdiclError, match=r"data_folder '\.\./x' cannot name a file"):
        parse_task(toy.read_text() + "data_folder: ../x\n")
    with pytest.raises(SvdiclError, match=r"splits\.test\.source '\.\./\.\./etc/passwd' cannot name a file"):
        parse_task(toy.read_text().replace("test: {source: test", "test: {source: ../../etc/passwd"))


def test_an_escaping_task_name_writes_nothing_outside_output(toy, tmp_path, capsys):
    model = save_model(toy_loaded(), tmp_path / "model")
    bad = toy.parent / "bad.yaml"
    bad.write_text(toy.read_text() + 'name: "../../ESCAPED"\ndata_folder: toy\n')
    out = tmp_path / "deep" / "er" / "out"
    data = str(toy.parent / "data")
    for argv in (
        ["eval", "--model", str(model), "--task", f"{toy},{bad}", "--data-dir", data, "--limit", "4", "--output", str(out)],
        ["search", "--model", str(model), "--tasks", str(bad), "--layer", "0", "--rates", "0.5", "--data-dir", data,
         "--limit", "4", "--output", str(out)],
    ):  # fmt: skip
        assert main(["-q", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "'../../ESCAPED' cannot name a file" in err and "\n" not in err
    assert not list(tmp_path.rglob("ESCAPED*"))
