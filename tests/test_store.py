"""Result store: keys, crash safety (torn lines, kill -9), resume without recomputation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import contents, fake_result, fill, sweep_keys

from svdicl.errors import SvdiclError
from svdicl.store import CELLS_FILE, CellKey, Result, Store


def test_key_id_is_stable_and_sees_every_field():
    key = CellKey("fp", "sst2", "test", 5, 0, "26:mlp:0.95", limit=100, options={"length_norm": False, "calibrate": "none"})
    same = CellKey("fp", "sst2", "test", "5", 0, "26:mlp:0.950", limit=100, options={"calibrate": "none", "length_norm": False})
    assert key == same and key.id == same.id and len(key.id) == 16
    changed = [
        replace(key, model="fp2"),
        replace(key, task="rte"),
        replace(key, split="validation"),
        replace(key, shots=4),
        replace(key, seed=1),
        replace(key, edit="26:attn:0.95"),
        replace(key, edit="26:mlp:0.9"),
        replace(key, edit="none"),
        replace(key, limit=None),
        replace(key, options={"length_norm": True, "calibrate": "none"}),
    ]
    assert len({k.id for k in changed} | {key.id}) == len(changed) + 1
    assert CellKey("fp", "sst2", "test", 5, 0, "26:mlp:0").edit == "none"  # rate 0 is the unpruned model
    assert CellKey.from_dict(json.loads(json.dumps(key.to_dict()))) == key


def test_bad_keys_are_refused():
    with pytest.raises(SvdiclError, match="prune spec"):
        CellKey("fp", "sst2", "test", 5, 0, "26-mlp-0.9")
    with pytest.raises(SvdiclError, match="shots"):
        CellKey("fp", "sst2", "test", "five", 0)
    with pytest.raises(SvdiclError, match="scoring option"):
        CellKey("fp", "sst2", "test", 5, 0, options={"weights": [1, 2]})


def test_edited_model_never_reads_unedited_results(tmp_path):
    store = Store(tmp_path)
    unpruned = CellKey("fp", "sst2", "test", 5, 0)
    store.put(unpruned, fake_result(unpruned))
    pruned = replace(unpruned, edit="29:mlp:0.9")
    assert store.get(pruned) is None and not store.has(pruned)
    calls = []
    fill(store, [unpruned, pruned], lambda k: calls.append(k) or fake_result(k))
    assert calls == [pruned]
    assert store.get(pruned).metrics != store.get(unpruned).metrics


def test_put_then_reopen_roundtrips_cell_and_samples(tmp_path):
    store = Store(tmp_path)
    key = CellKey("fp", "sst2", "test", 5, 0, "29:mlp:0.9", options={"length_norm": True})
    result = Result({"accuracy": {"value": 0.75, "ci_low": 0.5, "ci_high": 0.9}, "macro_f1": float("nan")}, 4, [{"p": 1.0}])
    cell = store.put(key, result, seconds=1.5)
    assert (cell.layers, cell.modules, cell.rate) == ("29", "mlp", 0.9)
    assert cell.metrics["macro_f1"] == {"value": None}  # JSON has no NaN
    assert (tmp_path / cell.samples).is_file() and cell.samples.startswith("samples/sst2/")
    again = Store(tmp_path)
    assert again.get(key) == cell
    assert again.samples(again.get(key)) == [{"p": 1.0}]
    record = json.loads((tmp_path / CELLS_FILE).read_text())
    assert record["id"] == key.id and record["rate"] == 0.9 and record["layers"] == "29"


def test_interrupted_run_resumes_without_recomputing(tmp_path):
    keys = sweep_keys()
    reference = Store(tmp_path / "reference")
    fill(reference, keys, fake_result)
    unique = len(set(keys))
    assert len(reference) == unique  # the rate-0 keys of both layers are one unpruned cell

    calls: Counter[str] = Counter()

    def interrupted(key: CellKey) -> Result:
        calls[key.id] += 1
        if sum(calls.values()) == 9:
            raise KeyboardInterrupt
        return fake_result(key)

    store = Store(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        fill(store, keys, interrupted)
    finished = {c.id for c in Store(tmp_path / "run").cells()}
    assert len(finished) == 8

    resumed: Counter[str] = Counter()
    fill(Store(tmp_path / "run"), keys, lambda k: resumed.update([k.id]) or fake_result(k))
    assert not finished & set(resumed)  # no finished cell recomputed
    assert set(resumed) | finished == {k.id for k in keys} and max(resumed.values()) == 1
    assert contents(Store(tmp_path / "run")) == contents(reference)


SIGKILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import fake_result, fill, sweep_keys
from svdicl.store import Store

log = open({log!r}, "a")

def compute(key):
    log.write(key.id + "\\n"); log.flush()
    if sum(1 for _ in open({log!r})) == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 with this cell in flight
    return fake_result(key)

fill(Store({store!r}), sweep_keys(), compute)
"""


def test_kill_9_mid_sweep_loses_only_the_cell_in_flight(tmp_path):
    keys = sweep_keys()
    reference = Store(tmp_path / "reference")
    fill(reference, keys, fake_result)
    log = tmp_path / "calls.log"
    script = SIGKILL_SCRIPT.format(tests=str(Path(__file__).parent), log=str(log), kill_at=6, store=str(tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    started = log.read_text().split()
    finished = {c.id for c in Store(tmp_path / "run").cells()}
    assert len(started) == 6 and finished == set(started[:5])

    resumed: list[str] = []
    fill(Store(tmp_path / "run"), keys, lambda k: resumed.append(k.id) or fake_result(k))
    assert started[5] in resumed and not finished & set(resumed) and len(resumed) == len(set(resumed))
    assert contents(Store(tmp_path / "run")) == contents(reference)


def _three_cells(folder: Path) -> tuple[bytes, int]:
    """A store of three cells; returns the file bytes and where the last line starts."""
    store = Store(folder)
    for key in sweep_keys()[1:4]:
        store.put(key, fake_result(key))
    data = (folder / CELLS_FILE).read_bytes()
    return data, data.rstrip(b"\n").rfind(b"\n") + 1


def test_torn_last_line_is_cut_at_every_byte(tmp_path):
    data, last = _three_cells(tmp_path / "full")
    expected = {c.id: c for c in Store(tmp_path / "full").cells()}
    case = tmp_path / "case"
    shutil.copytree(tmp_path / "full", case)
    for cut in range(last + 1, len(data)):  # every prefix of the last line, the one without its newline included
        (case / CELLS_FILE).write_bytes(data[:cut])
        with pytest.warns(UserWarning, match=rf"{CELLS_FILE}: line 3 was cut short"):
            store = Store(case)
        assert [c.id for c in store.cells()] == list(expected)[:2]
        assert (case / CELLS_FILE).read_bytes() == data[:last]
    third = sweep_keys()[3]
    store.put(third, fake_result(third))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {c.id: c.metrics for c in Store(case).cells()} == {i: c.metrics for i, c in expected.items()}


def test_garbage_tail_from_a_crash_is_cut(tmp_path):
    data, _ = _three_cells(tmp_path)
    (tmp_path / CELLS_FILE).write_bytes(data + b"\x00\x00\x00\x00\n")  # a crash can leave zeros after the end
    with pytest.warns(UserWarning, match="line 4 was cut short"):
        assert len(Store(tmp_path)) == 3
    assert (tmp_path / CELLS_FILE).read_bytes() == data


def test_damaged_line_in_the_middle_is_refused(tmp_path):
    data, _ = _three_cells(tmp_path)
    lines = data.split(b"\n")
    lines[1] = lines[1][:40]
    (tmp_path / CELLS_FILE).write_bytes(b"\n".join(lines))
    with pytest.raises(SvdiclError, match=rf"{CELLS_FILE} line 2 is not a valid cell record.*delete that line"):
        Store(tmp_path)
    assert (tmp_path / CELLS_FILE).read_bytes() == b"\n".join(lines)  # nothing repaired behind the user's back


def test_record_from_a_newer_svdicl_is_refused_even_last(tmp_path):
    data, last = _three_cells(tmp_path)
    record = json.loads(data[last:])
    record["format"] = 99
    (tmp_path / CELLS_FILE).write_bytes(data[:last] + json.dumps(record).encode() + b"\n")
    with pytest.raises(SvdiclError, match=r"line 3 .*upgrade svdicl"):
        Store(tmp_path)


def test_duplicate_keys_keep_the_first(tmp_path):
    data, last = _three_cells(tmp_path)
    record = json.loads(data[last:])
    first_value = record["metrics"]["accuracy"]["value"]
    record["metrics"]["accuracy"]["value"] = -1.0
    (tmp_path / CELLS_FILE).write_bytes(data + json.dumps(record).encode() + b"\n")
    store = Store(tmp_path)
    assert len(store) == 3
    assert store.get(CellKey.from_dict(record)).value("accuracy") == first_value


def test_two_writers_share_one_store(tmp_path):
    first, second = Store(tmp_path), Store(tmp_path)
    key = sweep_keys()[1]
    kept = first.put(key, fake_result(key))
    other = Result({"accuracy": 0.0}, 1)
    assert second.put(key, other) == kept  # the second writer sees the first's cell and keeps it
    assert len((tmp_path / CELLS_FILE).read_text().splitlines()) == 1
    later = sweep_keys()[2]
    second.put(later, fake_result(later))
    first.put(sweep_keys()[3], fake_result(sweep_keys()[3]))  # reads second's line before appending
    assert [c.id for c in Store(tmp_path).cells()] == [key.id, later.id, sweep_keys()[3].id]


def test_cells_filters(tmp_path):
    store = Store(tmp_path)
    fill(store, sweep_keys(), fake_result)
    deep = store.cells(task="sst2", layers="29", seed=0)
    assert sorted(c.rate for c in deep) == [0.5, 0.9, 0.995]
    assert all(c.modules == "mlp" for c in deep)
    assert len(store.cells(edit="none")) == 4  # 2 tasks x 2 seeds
    assert len(store.cells(rate=[0.9, 0.995], task="rte")) == 2 * 2 * 2
    with pytest.raises(TypeError, match="unknown cell filter"):
        store.cells(layer=29)


def test_store_path_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SvdiclError, match="is a file"):
        Store(tmp_path / "file")


def test_missing_samples_file_is_reported(tmp_path):
    store = Store(tmp_path)
    key = sweep_keys()[1]
    cell = store.put(key, fake_result(key))
    os.remove(tmp_path / cell.samples)
    with pytest.raises(SvdiclError, match=r"samples file .* is missing"):
        store.samples(cell)


def test_a_deleted_samples_file_is_recomputed_and_its_new_line_wins(tmp_path):
    keys = sweep_keys()[1:4]
    fill(Store(tmp_path), keys, fake_result)
    gone = Store(tmp_path).get(keys[1])
    os.remove(tmp_path / gone.samples)
    store = Store(tmp_path)
    assert not store.has(keys[1]) and [k for k in keys if not store.has(k)] == [keys[1]]
    recomputed: list[str] = []

    def other(key: CellKey) -> Result:  # a different answer, so the test sees which line is read back
        recomputed.append(key.id)
        return replace(fake_result(key), metrics={"accuracy": 0.25}, samples=[{"id": "new"}])

    fill(store, keys, other)
    assert recomputed == [keys[1].id]
    reopened = Store(tmp_path)
    assert [c.id for c in reopened.cells()] == [k.id for k in keys] and all(reopened.has(k) for k in keys)
    assert reopened.get(keys[1]).value("accuracy") == 0.25 and reopened.samples(reopened.get(keys[1])) == [{"id": "new"}]
    assert reopened.get(keys[0]).value("accuracy") == fake_result(keys[0]).metrics["accuracy"]["value"]


def test_packed_samples_read_back_the_same_and_count_as_finished(tmp_path):
    keys = sweep_keys()[1:4]
    fill(Store(tmp_path), keys[:2], fake_result)
    before = contents(Store(tmp_path))
    plain = [tmp_path / Store(tmp_path).get(k).samples for k in keys[:2]]
    store = Store(tmp_path)
    assert store.pack() == 2 and store.pack() == 0  # packed once; nothing left to pack
    assert not any(p.exists() for p in plain) and all(p.with_name(p.name + ".gz").is_file() for p in plain)
    reopened = Store(tmp_path)
    assert all(reopened.has(k) for k in keys[:2]) and contents(reopened) == before
    computed: list[str] = []
    fill(reopened, keys, lambda key: computed.append(key.id) or fake_result(key))
    assert computed == [keys[2].id]  # a packed cell is finished: only the new one is scored
    packed = plain[0].with_name(plain[0].name + ".gz")
    packed.write_bytes(packed.read_bytes()[:20])  # a truncated archive is a damaged file, named, not a traceback
    with pytest.raises(SvdiclError, match="is damaged"):
        Store(tmp_path).samples(Store(tmp_path).get(keys[0]))


CONCURRENT_SCRIPT = """
import os, sys, time
sys.path.insert(0, {tests!r})
from conftest import fake_result, fill, sweep_keys
from svdicl.store import Store

def compute(key):
    with open({log!r}, "a") as log:
        log.write(f"{{os.getpid()}} {{key.id}}\\n")
    time.sleep(0.05)
    return fake_result(key)

while len(os.listdir({gate!r})) < 1:
    time.sleep(0.01)
cells = fill(Store({store!r}), sweep_keys(), compute)
assert len(cells) == len(set(sweep_keys())) and all(c is not None for c in cells)
"""


def test_concurrent_runs_compute_each_cell_once(tmp_path):
    log, gate = tmp_path / "calls.log", tmp_path / "gate"
    gate.mkdir()
    script = CONCURRENT_SCRIPT.format(tests=str(Path(__file__).parent), log=str(log), store=str(tmp_path / "run"), gate=str(gate))
    command = [sys.executable, "-c", textwrap.dedent(script)]
    procs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    (gate / "go").touch()  # all three start on the same store at once
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    calls = [line.split() for line in log.read_text().splitlines()]
    unique = {k.id for k in sweep_keys()}
    assert sorted(cell for _, cell in calls) == sorted(unique)  # every cell once, across the three
    assert len({pid for pid, _ in calls}) > 1  # and the work was shared
    assert {c.id for c in Store(tmp_path / "run").cells()} == unique


CLAIM_AND_DIE = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
from conftest import sweep_keys
from svdicl.store import Store

store = Store({store!r})
assert store.claim(sweep_keys()[{index}])
open({claimed!r}, "w").close()
if {die}:
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(1.0)
store.release()
"""


@pytest.mark.parametrize("die", [True, False])
def test_a_claim_held_elsewhere_is_waited_for_and_a_dead_ones_is_recovered(tmp_path, die):
    claimed = tmp_path / "claimed"
    script = CLAIM_AND_DIE.format(tests=str(Path(__file__).parent), store=str(tmp_path), index=2, claimed=str(claimed), die=die)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)])
    while not claimed.exists():
        assert proc.poll() is None or die
    if not die:
        assert not Store(tmp_path).claim(sweep_keys()[2])  # another live process computes it
    computed: list[str] = []
    fill(Store(tmp_path), sweep_keys()[:4], lambda k: computed.append(k.id) or fake_result(k))
    proc.wait(timeout=60)
    assert sorted(computed) == sorted(k.id for k in sweep_keys()[:4])  # the released or dead claim's cell too
    assert len(Store(tmp_path)) == 4


def test_rows_of_a_cell_in_flight_are_kept_cut_when_torn_and_dropped_when_it_is_stored(tmp_path):
    store, key = Store(tmp_path), sweep_keys()[1]
    assert store.claim(key) and store.unfinished_rows(key) == []
    store.keep_unfinished(key, [{"id": "a", "x": 1}, {"id": "b", "x": float("nan")}])
    with open(store.unfinished(key), "a") as handle:
        handle.write('{"id": "c", "x"')  # a kill mid-write
    assert store.unfinished_rows(key) == [{"id": "a", "x": 1}, {"id": "b", "x": None}]
    store.keep_unfinished(key, [{"id": "c", "x": 3}])  # appended after the cut: every line whole
    assert [row["id"] for row in Store(tmp_path).unfinished_rows(key)] == ["a", "b", "c"]
    store.put(key, fake_result(key))
    assert not store.unfinished(key).exists() and store.has(key)
    other = sweep_keys()[2]
    store.keep_unfinished(other, [{"id": "a"}])
    with open(store.unfinished(other), "a") as handle:
        handle.write("not json\n" + '{"id": "b"}\n')
    with pytest.raises(SvdiclError, match=r"\.unfinished, line 2 is damaged; delete the file"):
        store.unfinished_rows(other)
