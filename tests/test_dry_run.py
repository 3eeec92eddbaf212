"""Long work tells the user: --dry-run lists the cells a command scores and writes nothing, zero-shot cells
are scored once for all seeds, and only the examples that will be scored are tokenized."""

from __future__ import annotations

import json
import re

import pytest
from conftest import grid, save_model, toy_loaded

from svdicl.cli import main
from svdicl.experiments.evaluate import evaluate
from svdicl.experiments.runs import prepare_run
from svdicl.experiments.sweep import load_task_splits, sweep
from svdicl.requests import forwarded_tokens
from svdicl.store import Store
from svdicl.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")

ROW = re.compile(r"^(\S+) (\w+) (\d+)-shot seed (\d+) (\S+)\s+([\d,]+)\s+(≈?)([\d,]+)\s+(score|stored|reuse seed \d+)\s+(\S+.*)$")


def dry_rows(text: str) -> list[tuple]:
    """(task, split, shots, seed, edit, examples, exact, tokens, status) of every cell row the dry run printed."""
    rows = []
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            task, split, shots, seed, edit, examples, approx, tokens, status, _ = match.groups()
            rows.append((task, split, int(shots), int(seed), edit, int(examples.replace(",", "")), not approx,
                         int(tokens.replace(",", "")), status))  # fmt: skip
    return rows


class LayerCalls:
    """Counts forward passes through the model's last decoder layer: every scoring path runs it."""

    def __init__(self, model) -> None:
        self.count = 0
        model.model.layers[-1].register_forward_hook(self._hook)

    def _hook(self, *_) -> None:
        self.count += 1


def test_sweep_dry_run_lists_the_cells_the_sweep_then_scores_and_writes_nothing(toy, tmp_path, capsys):
    model, out, data = save_model(toy_loaded(), tmp_path / "model"), tmp_path / "out", str(toy.parent / "data")
    argv = ["-q", "sweep", "--model", str(model), "--tasks", str(toy), "--layers", "last1", "--modules", "mlp", "--rates", "0.5"]
    argv += ["--shots", "0,1", "--seeds", "0,1", "--limit", "6", "--data-dir", data, "--output", str(out), "--no-report"]
    assert main([*argv, "--dry-run"]) == 0
    planned = dry_rows(capsys.readouterr().out)
    assert not out.exists()  # nothing written
    assert sorted((shots, seed, edit) for _, _, shots, seed, edit, *_ in planned) == sorted(
        (shots, seed, edit) for shots in (0, 1) for seed in (0, 1) for edit in ("none", "2:mlp:0.5")
    )
    status = {(shots, seed, edit): s for _, _, shots, seed, edit, _, _, _, s in planned}
    assert {k: s for k, s in status.items() if s != "score"} == {
        (0, 1, "none"): "reuse seed 0",
        (0, 1, "2:mlp:0.5"): "reuse seed 0",
    }
    loaded, splits = toy_loaded(), load_task_splits([str(toy)], data)
    for _, split, shots, seed, _, examples, exact, tokens, _ in planned:  # exact counts: 6 examples, all tokenized
        run = prepare_run(loaded, get_task(str(toy)), split=split, shots=shots, seed=seed, limit=6, splits=splits["toy"])
        assert (examples, exact, tokens) == (6, True, forwarded_tokens(run.requests))

    assert main(argv) == 0
    capsys.readouterr()
    cells = Store(out).cells()
    assert sorted((c.key.shots, c.key.seed, c.key.edit) for c in cells) == sorted(status)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert main([*argv, "--dry-run"]) == 0
    assert {row[-1] for row in dry_rows(capsys.readouterr().out)} == {"stored"}
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before  # the store is read, not touched


def test_zero_shot_sweep_scores_once_and_copies_for_every_seed(toy):
    counts, stores = [], []
    for seeds in ((0,), (0, 1, 2)):
        loaded = toy_loaded()
        calls = LayerCalls(loaded.model)
        store = Store(toy.parent / f"out-{len(seeds)}")
        sweep(loaded, grid(toy, shots=(0,), seeds=seeds, limit=8), store, data_dir=toy.parent / "data", progress=False)
        counts.append(calls.count)
        stores.append(store)
    assert counts[0] == counts[1] > 0  # three seeds cost one seed's forward passes
    store = stores[1]
    for cell in store.cells(seed=0):
        for seed in (1, 2):
            copy = store.cells(seed=seed, edit=cell.key.edit)[0]
            assert copy.info["reused_from"] == cell.id and copy.metrics == cell.metrics
            assert [s["seed"] for s in store.samples(copy)] == [seed] * cell.n
            assert [{**s, "seed": 0} for s in store.samples(copy)] == store.samples(cell)


def test_zero_shot_eval_scores_once_and_records_the_reuse(toy):
    counts, results = [], []
    for seeds in ((0,), (0, 1, 2)):
        loaded = toy_loaded()
        calls = LayerCalls(loaded.model)
        out = toy.parent / f"eval-{len(seeds)}"
        results.append(
            evaluate(
                loaded, str(toy), shots=0, seeds=seeds, limit=9, data_dir=toy.parent / "data", output=out, quiet=True
            ).to_json()
        )
        counts.append(calls.count)
    assert counts[0] == counts[1] > 0
    runs = results[1]["runs"]
    assert [r["seed"] for r in runs] == [0, 1, 2] and [r.get("timing", {}).get("reused_from_seed") for r in runs] == [None, 0, 0]
    assert runs[1]["metrics"] == runs[2]["metrics"] == runs[0]["metrics"] == results[0]["runs"][0]["metrics"]
    samples = [json.loads(line) for line in (toy.parent / "eval-3" / "samples.jsonl").read_text().splitlines()]
    assert sorted(s["seed"] for s in samples) == [0] * 9 + [1] * 9 + [2] * 9


class CountingTokenizer:
    """A tokenizer that counts the prompt texts it is asked to tokenize (build_requests sends them in batches)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.texts = tokenizer, 0

    def __call__(self, text, **options):
        self.texts += 0 if isinstance(text, str) else len(text)  # batches of prompts (a lone string: the demonstrations)
        return self.tokenizer(text, **options)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_only_the_examples_to_score_are_tokenized(toy):
    loaded = toy_loaded()
    counting = CountingTokenizer(loaded.tokenizer)
    loaded.tokenizer = counting
    prepare_run(loaded, str(toy), limit=5, data_dir=toy.parent / "data")
    assert counting.texts == 5 * 2  # 5 examples x 2 label words
    options = dict(seeds=(0, 1), limit=5, data_dir=toy.parent / "data", output=toy.parent / "out", quiet=True)
    first = evaluate(loaded, str(toy), **options).to_json()
    counting.texts = 0
    assert evaluate(loaded, str(toy), **options).to_json() == first
    assert counting.texts == 0  # a finished evaluation is returned without tokenizing its prompts again


def test_eval_dry_run_lists_one_cell_per_task_and_seed_and_writes_nothing(toy, tmp_path, capsys):
    model, out = save_model(toy_loaded(), tmp_path / "model"), tmp_path / "out"
    argv = ["-q", "eval", "--model", str(model), "--task", str(toy), "--data-dir", str(toy.parent / "data"), "--output", str(out)]
    assert main([*argv, "--seed", "0", "--seed", "4", "--shots", "0", "--limit", "7", "--prune", "-1:mlp:0.5", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    rows = dry_rows(printed)
    assert [(r[2], r[3], r[4], r[5], r[-1]) for r in rows] == [
        (0, 0, "-1:mlp:0.5", 7, "score"),
        (0, 4, "-1:mlp:0.5", 7, "reuse seed 0"),
    ]
    assert "1 to score" in printed and "estimated time ~" in printed and "an estimate" in printed
    assert not out.exists()
    assert main([*argv, "--seed", "0", "--seed", "4", "--dry-run"]) == 0  # 1 shot per class: both seeds scored
    assert [r[-1] for r in dry_rows(capsys.readouterr().out)] == ["score", "score"]


def test_search_dry_run_lists_validation_and_test_cells(toy, tmp_path, capsys):
    model, out, data = save_model(toy_loaded(), tmp_path / "model"), tmp_path / "out", str(toy.parent / "data")
    argv = ["-q", "search", "--model", str(model), "--tasks", str(toy), "--layer", "-1", "--rates", "0.5,0.9", "--seeds", "0,1"]
    argv += ["--limit-validation", "5", "--limit-test", "6", "--data-dir", data, "--output", str(out), "--no-report"]
    assert main([*argv, "--dry-run", "--export", str(tmp_path / "export")]) == 0
    rows = dry_rows(capsys.readouterr().out)
    assert not out.exists() and not (tmp_path / "export").exists()
    expected = [("validation", seed, edit, 5) for seed in (0, 1) for edit in ("none", "2:mlp:0.5", "2:mlp:0.9")]
    expected += [("test", seed, edit, 6) for seed in (0, 1) for edit in ("none", "2:mlp:rate*")]
    assert [(r[1], r[3], r[4], r[5]) for r in rows] == expected and {r[-1] for r in rows} == {"score"}
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--dry-run"]) == 0
    status = {(r[1], r[3], r[4]): r[-1] for r in dry_rows(capsys.readouterr().out)}
    assert {k for k, s in status.items() if s != "stored"} == {("test", 0, "2:mlp:rate*"), ("test", 1, "2:mlp:rate*")}


def test_a_balanced_search_dry_run_finds_the_cells_the_search_stored(toy, tmp_path, capsys):
    model, out, data = save_model(toy_loaded(), tmp_path / "model"), tmp_path / "out", str(toy.parent / "data")
    argv = ["-q", "search", "--model", str(model), "--tasks", str(toy), "--layer", "-1", "--rates", "0.9"]
    argv += ["--limit-validation", "6", "--validation-sampling", "balanced", "--limit-test", "6"]
    argv += ["--data-dir", data, "--output", str(out), "--no-report"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--dry-run"]) == 0
    status = {(r[1], r[4]): r[-1] for r in dry_rows(capsys.readouterr().out)}
    assert {k for k, s in status.items() if s != "stored"} == {("test", "2:mlp:rate*")}  # the balanced validation cells too


def test_zero_shot_search_scores_once_for_all_seeds(toy):
    from svdicl.experiments.search import SearchConfig, search

    counts, results = [], []
    for seeds in ((0,), (0, 1)):
        loaded = toy_loaded()
        calls = LayerCalls(loaded.model)
        config = SearchConfig(
            task=str(toy), layer=-1, rates=(0.5, 0.9), shots=0, seeds=seeds, limit_validation=5, limit_test=6, arms=()
        )  # no calibration and no null controls: those are seeded per seed, so every seed is scored
        store = Store(toy.parent / f"search-{len(seeds)}")
        results.append((search(loaded, config, store, data_dir=toy.parent / "data"), store))
        counts.append(calls.count)
    assert counts[0] == counts[1] > 0
    (one, _), (two, store) = results
    assert two.validation.values == one.validation.values and two.rate_star == one.rate_star
    assert {c.info.get("reused_from") is not None for c in store.cells(seed=1)} == {True} and store.cells(seed=1)
