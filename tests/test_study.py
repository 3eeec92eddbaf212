"""studies/study.py, the powered study's runner: its parts are valid svdicl commands, and the oracle layer is the
argmax of the layer sweep's validation accuracy over rates > 0."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from svdicl.cli import parse_args
from svdicl.store import CellKey, Result, Store

ROOT = Path(__file__).resolve().parents[1]


def load_study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "studies" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module
    spec.loader.exec_module(module)
    return module


def put(store: Store, task: str, edit: str, accuracy: float, *, split: str = "validation", seed: int = 0) -> None:
    store.put(CellKey("fp", task, split, 5, seed, edit), Result(metrics={"accuracy": accuracy}, n=4, samples=None))


def test_every_part_is_a_command_svdicl_accepts(monkeypatch):
    study = load_study()
    monkeypatch.setattr(study, "oracle_layer", lambda out, task, module: 7)
    parts = study.parts()
    assert len({p.name for p in parts}) == len(parts)
    for part in parts:
        args = parse_args(["-q", *part.argv()])  # argparse exits on a misspelt flag or a bad choice
        assert args.output.startswith(str(study.HERE))
        if args.command == "search":
            assert (args.limit_validation, args.limit_test, args.validation_sampling) == (200, 1000, "balanced")
    oracle = next(p for p in parts if p.name == "smollm2-135m/layer-oracle/rte-attn")
    args = parse_args(oracle.argv())
    assert (args.layer, args.seeds, args.tasks, args.modules) == ("7", ["0"], "rte", "attn")


def test_the_oracle_layer_is_the_best_validation_accuracy_over_rates_above_zero(tmp_path):
    study = load_study()
    store = Store(tmp_path)
    put(store, "rte", "none", 0.9)  # the unpruned cell is no layer's
    put(store, "rte", "3:mlp:0.5", 0.6)
    put(store, "rte", "3:mlp:0.9", 0.7)
    put(store, "rte", "5:mlp:0.1", 0.7)  # ties with layer 3: the shallower wins
    put(store, "rte", "8:attn:0.5", 0.95)  # another module
    put(store, "sst2", "9:mlp:0.5", 0.99)  # another task
    put(store, "rte", "9:mlp:0.5", 0.99, split="test")  # another split
    put(store, "rte", "9:mlp:0.5", 0.99, seed=1)  # another seed
    assert study.oracle_layer(tmp_path, "rte", "mlp") == 3
    put(store, "rte", "4:mlp:0.99", 0.71)
    assert study.oracle_layer(tmp_path, "rte", "mlp") == 4
    with pytest.raises(SystemExit, match="no layer sweep of cb mlp"):
        study.oracle_layer(tmp_path, "cb", "mlp")


class FakeRun:
    """Stands in for study.Running: ends after `polls` polls with the part's planned exit code."""

    events: ClassVar[list[str]] = []
    codes: ClassVar[dict[str, int]] = {}
    polls = 2

    def __init__(self, part) -> None:
        self.part, self.left, self.child = part, self.polls, self
        FakeRun.events.append(f"start {part.name}")

    @classmethod
    def start(cls, part, workers):
        return cls(part)

    def poll(self) -> int | None:
        self.left -= 1
        if self.left > 0:
            return None
        FakeRun.events.append(f"end {self.part.name}")
        return FakeRun.codes.get(self.part.name, 0)

    def send_signal(self, sig) -> None:
        FakeRun.events.append(f"interrupt {self.part.name}")
        self.left = 1


class Clock:
    """study.time for the runner: each reading one second later, sleeping takes no time."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        self.now += 1
        return self.now

    def sleep(self, seconds: float) -> None:
        pass


def run_fake(monkeypatch, parts, *, slots=2, codes=None, deadline=None, finished=(), polls=2):
    study = load_study()
    monkeypatch.setattr(study, "Running", FakeRun)
    monkeypatch.setattr(study, "time", Clock())
    FakeRun.events, FakeRun.codes, FakeRun.polls = [], dict(codes or {}), polls
    plan = [study.Part(name, lambda: [], after) for name, after in parts]
    return study.run_parts(plan, set(finished), slots, 1, deadline), FakeRun.events


def test_the_runner_keeps_two_parts_going_and_a_part_waits_for_the_one_it_needs(monkeypatch):
    code, events = run_fake(monkeypatch, [("a", ""), ("a+", "a"), ("b", ""), ("c", ""), ("d", "done")], finished=["done"])
    assert code == 0 and sorted(e for e in events if e.startswith("start")) == ["start a", "start a+", "start b",
                                                                              "start c", "start d"]  # fmt: skip
    assert events[:2] == ["start a", "start b"]  # a+ waits for a: b takes the second slot
    assert events.index("start a+") > events.index("end a")
    for i in range(len(events)):  # never more than two at once
        assert sum(e.startswith("start") for e in events[: i + 1]) - sum(e.startswith("end") for e in events[: i + 1]) <= 2
    code, events = run_fake(monkeypatch, [("a", ""), ("b", ""), ("c", "")], slots=1)
    assert events == ["start a", "end a", "start b", "end b", "start c", "end c"]


def test_the_runner_starts_nothing_after_a_failure_or_the_deadline(monkeypatch):
    code, events = run_fake(monkeypatch, [("a", ""), ("b", ""), ("c", "")], codes={"a": 2})
    assert code == 2 and "start c" not in events and "end b" in events  # b, already running, finishes
    code, events = run_fake(monkeypatch, [("a", ""), ("b", ""), ("c", "")], deadline=3, polls=5)
    assert code == 0 and events[:2] == ["start a", "start b"]
    assert {"interrupt a", "interrupt b"} <= set(events) and "start c" not in events


def test_a_bad_until_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as stop:
        load_study().main(["run", "--until", "25:00"])
    assert stop.value.code == 2 and "'25:00' is not a time of day; give HH:MM" in capsys.readouterr().err


def test_list_shows_each_part_done_started_or_todo_with_its_logged_cpu_hours(tmp_path, monkeypatch):
    study = load_study()
    first, second, third = (dataclasses.replace(p, out=tmp_path / "store") for p in study.parts()[:3])  # no store yet
    log = tmp_path / "cpu-time.tsv"
    log.write_text(
        f"part\texit\tuser_s\tsys_s\n{first.name}\t130\t3000\t600\n{first.name}\t0\t3400\t200\n{second.name}\t130\t1700\t100\n"
    )
    monkeypatch.setattr(study, "CPU_LOG", log)
    lines = study.listing([first, second, third])
    assert lines[0].split() == ["done", "2.00", "h", first.name]
    assert lines[1].split() == ["started", "0.50", "h", second.name]
    assert lines[2].split() == ["todo", third.name]
    assert lines[3] == "1 of 3 parts done, 0 cut; 2.50 CPU hours logged (cpu-time.tsv)"
    assert study.done([first, second, third]) == {first.name}


def test_cut_parts_are_the_pre_registered_ones_listed_as_cut_and_run_only_when_named(tmp_path, monkeypatch):
    study = load_study()
    parts = study.parts()
    cut = [p.name for p in parts if p.cut]
    assert cut[:2] == ["qwen2.5-coder-1.5b/algorithm1/mlp", "qwen2.5-coder-1.5b/algorithm1/attn"]
    assert len(cut) == 10 and all(name.endswith("/seeds-0,1,2,3,4") for name in cut[2:])  # seeds 3 and 4 of all
    monkeypatch.setattr(study, "CPU_LOG", tmp_path / "cpu-time.tsv")  # nothing logged
    lines = study.listing(parts)
    assert [line.split()[0] for line in lines[:-1]] == ["cut" if p.cut else "todo" for p in parts]
    assert lines[-1] == f"0 of {len(parts)} parts done, 10 cut; 0.00 CPU hours logged (cpu-time.tsv)"
    monkeypatch.setenv("SVDICL_DATA", "data")
    monkeypatch.setattr(study, "not_installed", lambda *args: [])
    ran = []
    monkeypatch.setattr(study, "run_parts", lambda chosen, *args: ran.append([p.name for p in chosen]) or 0)
    assert study.main(["run"]) == 0 and study.main(["run", "--parts", cut[0]]) == 0
    assert ran == [[p.name for p in parts if not p.cut], [cut[0]]]


def test_run_stops_before_starting_anything_when_a_model_it_needs_is_not_installed(monkeypatch, capsys):
    study = load_study()
    import svdicl.aliases as aliases

    monkeypatch.setenv("SVDICL_DATA", "data")
    monkeypatch.setattr(aliases, "installed", lambda alias: alias.name != "gemma3-270m")
    monkeypatch.setattr(study, "done", lambda chosen: set())
    monkeypatch.setattr(study, "run_parts", lambda *a: pytest.fail("started parts"))
    with pytest.raises(SystemExit) as stop:
        study.main(["run"])
    assert str(stop.value) == (
        "study: 1 model(s) not installed: run `make models` or " + aliases.install_command(aliases.ALIASES["gemma3-270m"])
    )
    everything_but_gemma = [p.name for p in study.parts() if not p.name.startswith("gemma3-270m/")]
    assert study.not_installed(study.parts(), set(everything_but_gemma)) == [
        aliases.install_command(aliases.ALIASES["gemma3-270m"])
    ]
    gemma_done = {p.name for p in study.parts() if p.name.startswith("gemma3-270m/")}
    assert study.not_installed(study.parts(), gemma_done) == []


def test_the_runner_packs_samples_as_it_goes_and_a_done_part_whose_store_lost_some_is_redone(tmp_path, monkeypatch):
    study = load_study()
    out = tmp_path / "store"
    for seed in (0, 1):
        key = CellKey("fp", "sst2", "test", 5, seed, "none")
        Store(out).put(key, Result(metrics={"accuracy": 0.5}, n=1, samples=[{"i": seed}]))
    part = study.Part("m/algorithm1/mlp", lambda: [], out=out)
    monkeypatch.setattr(study, "CPU_LOG", tmp_path / "cpu-time.tsv")
    study.CPU_LOG.write_text(f"part\texit\tuser_s\tsys_s\n{part.name}\t0\t3000\t600\n")
    assert study.done([part]) == {part.name}
    monkeypatch.setattr(study, "Running", FakeRun)
    monkeypatch.setattr(study, "time", Clock())
    monkeypatch.setattr(study, "PACK_S", 2.5)
    packs = []
    monkeypatch.setattr(study, "pack", lambda folders, pack=study.pack: packs.append(FakeRun.events[-1]) or pack(folders))
    FakeRun.events, FakeRun.codes, FakeRun.polls = [], {}, 4
    assert study.run_parts([part], set(), 1, 1, None) == 0
    assert packs == [f"start {part.name}", f"end {part.name}"]  # every PACK_S while it runs, and when it ends
    files = sorted((out / "samples").rglob("*"))
    assert [f.name.endswith(".jsonl.gz") for f in files if f.is_file()] == [True, True]  # what git does not ignore
    assert [Store(out).samples(cell) for cell in Store(out).cells()] == [[{"i": 0}], [{"i": 1}]]
    next(f for f in files if f.is_file()).unlink()  # a checkout that lacks one
    assert study.done([part]) == set()
    assert study.listing([part])[0].split() == ["redo", "1.00", "h", part.name]
    (out / "search").mkdir()  # with search records, only the cells they name count
    kept = next(cell for cell in Store(out).cells() if Store(out).has(cell.key))
    record = {"format": "svdicl.search/1", "task": "sst2", "module": "mlp", "layer": 1, "rates": [0], "rate_star": 0,
              "validation": {"values": [0.5]}, "test": {"baseline": {"value": 0.5}, "pruned": {"value": 0.5}},
              "arms": [{"name": "unpruned", "cells": [kept.id]}]}  # fmt: skip
    (out / "search" / "sst2-mlp.json").write_text(json.dumps(record))
    assert study.done([part]) == {part.name}
    next((out / "samples").rglob("*.gz")).unlink()
    assert study.done([part]) == set()
