"""Nothing mixed, nothing lost, nothing written outside --output: results keyed on the data and task
definition actually scored, data read from the files' content, names from user files checked before
they reach a path, --overwrite that deletes only what svdicl wrote, concurrent runs that share cells."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import grid, save_model, toy_loaded, write_toy_task

from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.experiments.sweep import load_task_splits, plan_sweep, sweep
from svdicl.report import sweep_points
from svdicl.store import Result, Store
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
    shown = [(p.rate, p.value) for p in sweep_points(Store(tmp_path / "out").cells())]
    assert shown == [(p.rate, p.value) for p in sweep_points(Store(tmp_path / "fresh").cells())]  # the report: current data
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


@pytest.fixture
def model(tmp_path) -> Path:
    return save_model(toy_loaded(), tmp_path / "model")


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["-q", *argv])
    return code, capsys.readouterr().err.strip()


def test_overwrite_never_deletes_before_the_inputs_are_valid(model, tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "thesis.txt").write_text("x")
    argv = ["prune", "--model", str(model), "--layers", "99", "--modules", "mlp", "--rate", "0.5", "--output", str(folder)]
    code, err = run(capsys, *argv, "--overwrite")  # the case: a folder svdicl did not write
    assert code == 2 and "\n" not in err
    assert [p.name for p in folder.iterdir()] == ["thesis.txt"]
    export = tmp_path / "export"  # a folder svdicl did write: still untouched while an input is bad
    assert run(capsys, "prune", "--model", str(model), "--prune", "0:mlp:0.5", "--output", str(export))[0] == 0
    before = {p: p.read_bytes() for p in export.rglob("*")}
    code, err = run(capsys, *argv[:-1], str(export), "--overwrite")
    assert code == 2 and "layer 99" in err and "\n" not in err
    assert {p: p.read_bytes() for p in export.rglob("*")} == before


def test_overwrite_refuses_a_folder_svdicl_did_not_write(model, tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "thesis.txt").write_text("x")
    code, err = run(capsys, "prune", "--model", str(model), "--prune", "0:mlp:0.5", "--output", str(folder), "--overwrite")
    assert code == 2 and "has no .svdicl-manifest.json" in err and "\n" not in err
    assert [p.name for p in folder.iterdir()] == ["thesis.txt"]


def test_overwrite_removes_only_what_svdicl_wrote(model, tmp_path, capsys):
    folder = tmp_path / "d"
    assert run(capsys, "prune", "--model", str(model), "--prune", "0:mlp:0.5", "--output", str(folder))[0] == 0
    written = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in written and ".svdicl-manifest.json" in written
    (folder / "thesis.txt").write_text("x")  # the user's file, added later
    (folder / "notes").mkdir()
    (folder / "notes" / "n.md").write_text("y")
    argv = ["prune", "--model", str(model), "--prune", "1:attn:0.5", "--format", "factorized", "--output", str(folder)]
    assert "pass --overwrite" in run(capsys, *argv)[1]
    assert run(capsys, *argv, "--overwrite")[0] == 0
    assert (folder / "thesis.txt").read_text() == "x" and (folder / "notes" / "n.md").read_text() == "y"
    assert not (folder / "model.safetensors").exists() and (folder / "model.factorized.safetensors").is_file()
    assert json.loads((folder / "svdicl_edit.json").read_text())["edit"]["key"] == "1:attn:0.5"
    manifest = json.loads((folder / ".svdicl-manifest.json").read_text())
    assert manifest["complete"] and sorted(manifest["kept"]) == ["notes/n.md", "thesis.txt"]


def test_overwrite_never_clears_the_current_folder(model, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "here"
    assert run(capsys, "prune", "--model", str(model), "--prune", "0:mlp:0.5", "--output", str(folder))[0] == 0
    monkeypatch.chdir(folder)
    before = sorted(p.name for p in folder.iterdir())
    code, err = run(capsys, "prune", "--model", str(model), "--prune", "0:mlp:0.9", "--output", ".", "--overwrite")
    assert code == 2 and "will not clear ." in err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_search_export_and_linreg_overwrite_keep_foreign_files(toy, model, tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "thesis.txt").write_text("x")
    search = ["search", "--model", str(model), "--tasks", str(toy), "--layer", "0", "--rates", "0.5", "--limit", "4",
              "--data-dir", str(toy.parent / "data"), "--output", str(tmp_path / "s"), "--no-report"]  # fmt: skip
    code, err = run(capsys, *search, "--export", str(folder), "--overwrite")
    assert code == 2 and "has no .svdicl-manifest.json" in err
    linreg = ["theory", "linreg", "--dim", "2", "--points", "3", "--layers", "2", "--width", "8", "--heads", "1",
              "--steps", "1", "--eval-prompts", "4", "--output", str(folder), "--overwrite"]  # fmt: skip
    code, err = run(capsys, *linreg)
    assert code == 2 and "has no .svdicl-manifest.json" in err
    code, err = run(capsys, *linreg[:-3], "--prune-modules", "nope", "--output", str(tmp_path / "l"))
    assert code == 2 and "nope" in err and not (tmp_path / "l").exists()
    assert [p.name for p in folder.iterdir()] == ["thesis.txt"]


def test_failed_runs_leave_no_empty_folders(toy, model, tmp_path, capsys):
    data, where = str(toy.parent / "data"), {name: str(tmp_path / name) for name in ("a", "b", "c", "c2", "e")}
    failing = [
        ["sweep", "--model", str(model), "--tasks", str(toy), "--layers", "9", "--data-dir", data, "--output", where["a"]],
        ["prune", "--model", str(model), "--prune", "99:mlp:0.5", "--output", where["b"]],
        ["search", "--model", str(model), "--tasks", str(toy), "--layer", "9", "--data-dir", data, "--output", where["c"],
         "--export", where["c2"]],
        ["eval", "--model", str(model), "--task", f"{toy},nope", "--data-dir", data, "--output", where["e"]],
    ]  # fmt: skip
    for argv in failing:
        assert run(capsys, *argv)[0] == 2, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "model", "toy.yaml"]


@pytest.mark.parametrize("finishes", [True, False])
def test_a_sweep_waits_for_a_cell_another_run_is_scoring(toy, tmp_path, finishes):
    """The other run holds one cell's claim (a second Store on the folder: flock claims conflict within a process
    too); the sweep scores the rest, waits, then reads that cell back -- or scores it when the other gives up."""
    loaded, chosen, data = toy_loaded(), small_grid(toy), toy.parent / "data"
    keys = [key for key, _ in plan_sweep(loaded, chosen, load_task_splits(chosen.tasks, data))[0].cells]
    key = keys[1]
    other = Store(tmp_path / "out")
    assert other.claim(key)
    theirs = Result({"accuracy": 0.125, "macro_f1": 0.0}, n=10, samples=[{"id": "theirs"}])
    timer = threading.Timer(1.0, (lambda: other.put(key, theirs)) if finishes else other.release)
    timer.start()
    result = sweep(loaded, chosen, Store(tmp_path / "out"), data_dir=data, progress=False)
    timer.join()
    assert [c.id for c in result.cells] == [k.id for k in keys]
    assert result.computed == (1 if finishes else 2)
    assert (result.cells[1].value("accuracy") == 0.125) is finishes


def test_a_second_eval_or_linreg_into_a_busy_folder_is_refused(toy, model, tmp_path, capsys):
    from svdicl.outputs import exclusive

    busy = tmp_path / "busy"
    evaluate = ["eval", "--model", str(model), "--task", str(toy), "--data-dir", str(toy.parent / "data"), "--limit", "4"]
    linreg = ["theory", "linreg", "--dim", "2", "--points", "3", "--layers", "2", "--width", "8", "--heads", "1",
              "--steps", "1", "--eval-prompts", "4"]  # fmt: skip
    with exclusive(busy, "eval"):  # another run holds it (flock conflicts between two descriptors of one process too)
        for argv in (evaluate, linreg):
            code, err = run(capsys, *argv, "--output", str(busy))
            assert code == 2 and "is writing" in err and "right now" in err and "\n" not in err
        assert sorted(p.name for p in busy.iterdir()) == [".svdicl-lock"]
    assert run(capsys, *evaluate, "--output", str(busy))[0] == 0  # free again once the holder is done


def test_cells_of_a_store_older_than_the_data_digest_are_not_reused(toy, tmp_path):
    loaded, chosen, data = toy_loaded(), small_grid(toy), toy.parent / "data"
    keys = [key for key, _ in plan_sweep(loaded, chosen, load_task_splits(chosen.tasks, data))[0].cells]
    store = Store(tmp_path / "out")
    store.put(replace(keys[0], data=""), Result({"accuracy": 0.0}, n=1))  # as svdicl wrote it before keys held data
    with pytest.warns(UserWarning, match="1 cell.* written before svdicl keyed cells on their data"):
        result = sweep(loaded, chosen, store, data_dir=data, progress=False)
    assert result.computed == 2 and result.cells[0].value("accuracy") != 0.0


@pytest.mark.parametrize("name", ["results.json", "samples.jsonl"])
def test_eval_overwrite_never_replaces_result_files_it_did_not_write(toy, model, tmp_path, capsys, name):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / name).write_text('{"accuracy": 0.99}\n')
    argv = ["eval", "--model", str(model), "--task", str(toy), "--data-dir", str(toy.parent / "data"), "--limit", "4"]
    code, err = run(capsys, *argv, "--output", str(folder), "--overwrite")
    assert code == 2 and "was not written by svdicl eval" in err and "\n" not in err
    assert (folder / name).read_text() == '{"accuracy": 0.99}\n'


def test_the_cli_says_in_one_line_that_cells_of_other_data_are_kept_apart(toy, model, tmp_path, capsys):
    flipped = tmp_path / "flipped"
    write_toy_task(flipped)
    flip_labels(flipped / "data" / "toy" / "test.jsonl")
    argv = ["sweep", "--model", str(model), "--tasks", str(toy), "--layers", "0", "--modules", "mlp", "--rates", "0,0.5",
            "--limit", "10", "--output", str(tmp_path / "out"), "--no-report"]  # fmt: skip
    assert run(capsys, *argv, "--data-dir", str(toy.parent / "data"))[0] == 0
    code, err = run(capsys, *argv, "--data-dir", str(flipped / "data"))
    said = [line for line in err.splitlines() if "kept apart and not reused" in line]
    assert code == 0 and len(said) == 1 and said[0].startswith("svdicl: warning: ") and "scored on other data" in said[0]
