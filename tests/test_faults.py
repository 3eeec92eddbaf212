"""Fault injection: kill -9 at each write step of the store, torn lines, a full disk, a read-only folder and
concurrent writers lose nothing and mix nothing; every hostile input or environment is one line, never a traceback.

Faults are injected by patching the write calls (a process killed between two steps, a write that fails
with ENOSPC or EROFS), so the suite needs no special file system and runs the same as root, where
chmod does not stop writes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import transformers
from conftest import contents, fake_result, fill, sweep_keys, tiny_model, tiny_tokenizer

from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.store import CELLS_FILE, Store
from svdicl.store import folder as store_module

# ----- kill -9 at each write step of Store.put -----

# Puts the first two keys, then kills itself at `step` while putting the third.
KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import fake_result, sweep_keys
from svdicl import files
from svdicl.store import Store, folder

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

step = {step!r}
s = Store({folder!r})
keys = sweep_keys()[:3]
for key in keys[:2]:
    s.put(key, fake_result(key))
if step == "samples written, not renamed":
    os.replace = die
elif step == "samples renamed, no line":
    files.fsync_dir = die
elif step == "half a line":
    folder._write_all = lambda fd, data: os.write(fd, data[: len(data) // 2]) and die()
elif step == "line written, not synced":
    folder._write_all = lambda fd, data: os.write(fd, data) and die()
s.put(keys[2], fake_result(keys[2]))
"""

STEPS = ("samples written, not renamed", "samples renamed, no line", "half a line", "line written, not synced")


@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_write_step_loses_only_the_cell_in_flight(tmp_path, step):
    folder = tmp_path / "run"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), step=step, folder=str(folder))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    keys = sweep_keys()[:3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = Store(folder)
    written = step == "line written, not synced"  # the line reached the file before the kill: the cell is done
    assert [c.id for c in store.cells()] == [k.id for k in keys[: 3 if written else 2]]
    cut = [str(w.message) for w in caught if "cut short" in str(w.message)]
    assert len(cut) == (step == "half a line")  # only a torn line needs cutting
    fill(store, keys, fake_result)  # the rerun finishes the cell in flight
    reference = Store(tmp_path / "reference")
    fill(reference, keys, fake_result)
    assert contents(Store(folder)) == contents(reference)  # nothing lost, nothing mixed
    assert not list(folder.rglob("*.partial"))  # the rerun replaced the temp file a kill left


def test_torn_line_then_more_cells_leave_every_line_whole(tmp_path):
    store = Store(tmp_path)
    keys = sweep_keys()[:4]
    for key in keys[:2]:
        store.put(key, fake_result(key))
    with open(tmp_path / CELLS_FILE, "ab") as handle:
        handle.write(b'{"format": 1, "id": "0123", "model": "fp-a')  # a writer killed mid-line
    with pytest.warns(UserWarning, match="line 3 was cut short"):
        reopened = Store(tmp_path)
    fill(reopened, keys, fake_result)
    lines = (tmp_path / CELLS_FILE).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [k.id for k in keys]


# ----- a full disk -----


def _enospc(path: object = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([str(path)] if path else []))


def test_full_disk_mid_line_keeps_the_store_as_it_was(tmp_path, monkeypatch):
    store = Store(tmp_path)
    keys = sweep_keys()[:3]
    store.put(keys[0], fake_result(keys[0]))
    before = (tmp_path / CELLS_FILE).read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise _enospc()

    monkeypatch.setattr(store_module.os, "write", half_then_full)
    with pytest.raises(SvdiclError, match=rf"cannot write {tmp_path / CELLS_FILE}: no space left on the device"):
        store.put(keys[1], fake_result(keys[1]))
    monkeypatch.undo()
    assert (tmp_path / CELLS_FILE).read_bytes() == before  # the half line is cut again
    assert [p.name for p in (tmp_path / "samples").rglob("*.jsonl")] == [Path(store.get(keys[0]).samples).name]
    fill(store, keys, fake_result)  # space freed: the same store goes on
    reference = Store(tmp_path / "reference")
    fill(reference, keys, fake_result)
    assert contents(Store(tmp_path)) == contents(reference)


class _FullFile:
    """A text file whose writes fail with ENOSPC after `room` characters, like a disk filling up."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, text: str) -> int:
        if len(text) > self.room:
            self.handle.write(text[: self.room])
            raise _enospc()
        self.room -= len(text)
        return self.handle.write(text)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_full_disk_writing_samples_leaves_no_partial_file(tmp_path, monkeypatch):
    store = Store(tmp_path)
    key = sweep_keys()[0]
    monkeypatch.setattr(store_module, "open", lambda *a, **k: _FullFile(open(*a, **k), 50), raising=False)  # noqa: SIM115
    with pytest.raises(SvdiclError, match=r"cannot write .*samples.*\.jsonl: no space left on the device"):
        store.put(key, fake_result(key))
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != CELLS_FILE]
    assert (tmp_path / CELLS_FILE).read_bytes() == b""


# ----- concurrent writers -----

WRITER_SCRIPT = """
import os, random, sys, time
sys.path.insert(0, {tests!r})
from conftest import sweep_keys
from svdicl.store import Result, Store

writer = int(sys.argv[1])
open(os.path.join({ready!r}, str(writer)), "w").close()
while len(os.listdir({ready!r})) < {writers}:
    time.sleep(0.01)
keys = sweep_keys()
random.Random(writer).shuffle(keys)
store = Store({folder!r})
for key in keys:
    samples = [{{"writer": writer, "key": key.id, "i": i}} for i in range(20)]
    store.put(key, Result({{"accuracy": writer}}, 20, samples))
"""


def test_concurrent_writers_store_each_cell_once_and_never_mix_them(tmp_path):
    writers, folder, ready = 3, tmp_path / "shared", tmp_path / "ready"
    ready.mkdir()
    script = WRITER_SCRIPT.format(tests=str(Path(__file__).parent), ready=str(ready), writers=writers, folder=str(folder))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(w)], stderr=subprocess.PIPE, text=True, env=env)
             for w in range(writers)]  # fmt: skip
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * writers, errors
    lines = [json.loads(line) for line in (folder / CELLS_FILE).read_text().splitlines()]
    keys = {key.id for key in sweep_keys()}
    assert sorted(line["id"] for line in lines) == sorted(keys)  # every cell once: nothing lost, nothing twice
    store = Store(folder)
    for cell in store.cells():
        writer = cell.value("accuracy")
        assert {(s["writer"], s["key"]) for s in store.samples(cell)} == {(writer, cell.id)}  # line and samples agree
    assert len(list((folder / "samples").rglob("*.jsonl"))) == len(keys) and not list(folder.rglob("*.partial"))


# ----- the command line: one line naming the problem and the fix -----


def one_line_error(capsys, *argv: str) -> str:
    code = main(["--quiet", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("svdicl: warning: ")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("svdicl: error: "), err
    return lines[0]


def sweep_args(tiny_dir: Path, toy: Path, output: Path) -> list[str]:
    return ["sweep", "--model", str(tiny_dir), "--tasks", str(toy), "--data-dir", str(toy.parent / "data"),
            "--layers", "0", "--modules", "mlp", "--rates", "0,0.5", "--shots", "1", "--limit", "4",
            "--split", "validation", "--no-report", "--output", str(output)]  # fmt: skip


def test_sweep_into_a_read_only_folder(capsys, tiny_dir, toy, tmp_path, monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(output)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(store_module.os, "open", read_only)
    message = one_line_error(capsys, *sweep_args(tiny_dir, toy, output))
    assert message == f"svdicl: error: cannot write {output / CELLS_FILE}: the file system is read-only; write to another folder"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="as root, chmod does not stop writes (patched above)")
def test_sweep_into_a_folder_without_write_permission(capsys, tiny_dir, toy, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    output.chmod(0o500)
    try:
        assert "permission denied" in one_line_error(capsys, *sweep_args(tiny_dir, toy, output))
    finally:
        output.chmod(0o700)


def test_sweep_on_a_full_disk(capsys, tiny_dir, toy, tmp_path, monkeypatch):
    def full(fd, data):
        raise _enospc()

    monkeypatch.setattr(store_module.os, "write", full)
    message = one_line_error(capsys, *sweep_args(tiny_dir, toy, tmp_path / "out"))
    assert f"cannot write {tmp_path / 'out' / CELLS_FILE}: no space left on the device; free disk space" in message
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != CELLS_FILE]


def test_a_full_disk_where_the_error_names_no_file_names_the_output_folder(capsys, tiny_dir, toy, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a flush at close raises it: no file name

    monkeypatch.setattr("svdicl.report.build.write_csv", full)
    output = tmp_path / "out"
    message = one_line_error(capsys, *[a for a in sweep_args(tiny_dir, toy, output) if a != "--no-report"])
    assert (
        message == f"svdicl: error: cannot write {output}: no space left on the device; free disk space or write somewhere else"
    )


@pytest.mark.parametrize("fmt", ["dense", "factorized"])
def test_export_on_a_full_disk_leaves_no_half_written_model(capsys, tiny_dir, tmp_path, monkeypatch, fmt):
    from safetensors import SafetensorError

    def fill_up(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 100)  # what a writer leaves when the disk fills mid-file
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", fill_up)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fill_up)
    output = tmp_path / "export"
    message = one_line_error(capsys, "prune", "--model", str(tiny_dir), "--prune", "0:mlp:0.9", "--format", fmt,
                             "--output", str(output))  # fmt: skip
    assert (
        message == f"svdicl: error: cannot write {output}: no space left on the device; free disk space or write somewhere else"
    )
    assert not output.exists()  # the folder it made is removed again: nothing a later --model could half-load


def test_export_into_a_read_only_folder(capsys, tiny_dir, tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    message = one_line_error(capsys, "prune", "--model", str(tiny_dir), "--prune", "0:mlp:0.9", "--output", str(tmp_path / "x"))
    assert message == f"svdicl: error: cannot write {tmp_path / 'x'}: the file system is read-only; write to another folder"


def test_an_interrupted_export_used_as_model(capsys, tiny_dir, tmp_path):
    output = tmp_path / "export"
    assert main(["--quiet", "prune", "--model", str(tiny_dir), "--prune", "0:mlp:0.9", "--output", str(output)]) == 0
    weights = output / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # killed while writing the weights
    message = one_line_error(capsys, "inspect", "--model", str(output))
    assert f"weights file {weights} is truncated or damaged" in message and "export the model again" in message


@pytest.mark.parametrize("size", ["0", "-2"])
def test_eval_batch_size_below_one(capsys, tiny_dir, toy, tmp_path, size):
    data = str(toy.parent / "data")
    message = one_line_error(capsys, "eval", "--model", str(tiny_dir), "--tasks", str(toy), "--data-dir", data,
                             "--limit", "4", "--batch-size", size, "--output", str(tmp_path / "e"))  # fmt: skip
    assert re.search(r"--batch-size.*(at least 1|>= 1)", message), message


def test_library_batch_size_below_one_is_one_line():
    from svdicl.requests import Request
    from svdicl.scoring import choose_path

    requests = [Request((1, 5), (6,), ((7,), (8,)))]
    with pytest.raises(SvdiclError, match=r"--batch-size must be at least 1, got 0"):
        choose_path(tiny_model("llama"), requests, batch_size=0)


def test_non_utf8_data_names_file_and_line(capsys, tiny_dir, toy, tmp_path):
    data = toy.parent / "data" / "toy" / "test.jsonl"
    lines = data.read_bytes().split(b"\n")
    lines[4] = lines[4].replace(b'"text": "', b'"text": "caf\xe9 ', 1)  # Latin-1, as a spreadsheet exports it
    data.write_bytes(b"\n".join(lines))
    message = one_line_error(capsys, *sweep_args(tiny_dir, toy, tmp_path / "out"))
    assert message == f"svdicl: error: {data}, line 5: not UTF-8 text (byte 0xe9 at column 14); save the file as UTF-8"


def test_non_utf8_task_and_config_files_name_file_and_line(capsys, tmp_path):
    from svdicl.errors import read_text

    task = tmp_path / "mine.yaml"
    task.write_bytes(b'kind: classification\ntemplate: "\xabq\xbb {text}"\n')
    with pytest.raises(SvdiclError, match=rf"{task}, line 2: not UTF-8 text \(byte 0xab at column 12\)"):
        read_text(task)
    config = tmp_path / "run.yaml"
    config.write_bytes(b"model: caf\xe9\n")
    message = one_line_error(capsys, "inspect", "--config", str(config))
    assert message == f"svdicl: error: {config}, line 1: not UTF-8 text (byte 0xe9 at column 11); save the file as UTF-8"


def test_cuda_without_cuda_and_a_bad_device_string(capsys, tiny_dir, monkeypatch):
    import torch

    assert "is not a torch device" in one_line_error(capsys, "inspect", "--model", str(tiny_dir), "--device", "gpu0")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    message = one_line_error(capsys, "inspect", "--model", str(tiny_dir), "--device", "cuda")
    assert message.endswith("is built without CUDA; use --device cpu")


@pytest.mark.parametrize("tolerance", ["nan", "inf", "-1e-10"])
def test_lemma1_tolerance_must_be_finite_and_not_negative(capsys, tmp_path, tolerance):
    message = one_line_error(capsys, "theory", "lemma1", "--draws", "2", "--tolerance", tolerance, "--output", str(tmp_path))
    assert message == f"svdicl: error: --tolerance must be a finite number >= 0, not {float(tolerance)}"


def test_force_with_a_dense_export_is_refused(capsys, tiny_dir, tmp_path):
    message = one_line_error(
        capsys, "prune", "--model", str(tiny_dir), "--prune", "0:mlp:0.9", "--force", "--output", str(tmp_path / "x")
    )
    assert "--force only applies to --format factorized" in message


def test_a_too_long_example_is_told_apart_from_too_many_shots():
    from svdicl.requests import build_requests

    tokenizer = tiny_tokenizer()
    demos = "q: ab a: Yes\n" * 5
    with pytest.raises(SvdiclError, match=r"the prompt has \d+ tokens but the model reads at most 40; use fewer --shots"):
        build_requests(tokenizer, demos, ["q: ab a:"], [[" Yes", " No"]], max_length=40)
    with pytest.raises(
        SvdiclError,
        match=r"example #0: the example alone has \d+ tokens but the model reads at most 40, even without demonstrations",
    ):
        build_requests(tokenizer, demos, ["q: " + "ab " * 13 + "a:"], [[" Yes", " No"]], max_length=40)


def test_write_error_reads_errno_and_rust_messages():
    from svdicl.errors import write_error

    assert write_error(ValueError("x")) is None
    assert write_error(OSError(errno.ENOENT, "gone")) is None
    assert "read-only" in str(write_error(OSError(errno.EROFS, "ro", "/a/b"), "/a"))
    assert str(write_error(RuntimeError("I/O error: Disk quota exceeded (os error 122)"), "/m")).startswith(
        "cannot write /m: the disk quota"
    )
    assert str(write_error(PermissionError(errno.EACCES, "no", "/f"), writing=False)).startswith("cannot access /f")
