"""Evaluation orchestration: results.json/samples.jsonl agree with each other, runs resume after an
interruption without rescoring, edits are scored on the same prepared requests, the CLI works."""

from __future__ import annotations

import json
import random

import pytest
from conftest import tiny_model, tiny_tokenizer, write_toy_task

import svdicl.experiments.run_scoring as evaluation
from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.experiments.evaluate import evaluate
from svdicl.experiments.run_scoring import evaluate_run
from svdicl.experiments.runs import balanced_examples, limit_examples, prepare_run
from svdicl.models import LoadedModel, fingerprint
from svdicl.prune import pruned
from svdicl.scoring import choose
from svdicl.specs import PruneSpec
from svdicl.store import Store
from svdicl.tasks import get_task
from svdicl.tasks.data import Example

N_TEST = 100


def tiny_loaded(family: str = "llama") -> LoadedModel:
    model = tiny_model(family)
    return LoadedModel(
        model=model, tokenizer=tiny_tokenizer(), source=f"tiny-{family}", fingerprint=fingerprint(model), dtype="float32"
    )


@pytest.fixture
def task_dir(tmp_path):
    """A task YAML and its data folder: 40 train rows, N_TEST test rows of short random text."""
    write_toy_task(tmp_path, N_TEST, validation=10)
    return tmp_path


def read_samples(folder):
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def test_results_and_samples_agree(task_dir):
    loaded = tiny_loaded()
    out = task_dir / "out"
    results = evaluate(
        loaded, get_task(str(task_dir / "toy.yaml")), seeds=(0, 1), data_dir=task_dir / "data", output=out, quiet=True
    ).to_json()
    assert json.loads((out / "results.json").read_text()) == results
    assert len(Store(out / "store")) == 2 and not list((out / "store").rglob("*.unfinished"))
    samples = read_samples(out)
    n = N_TEST - 10
    assert len(samples) == 2 * n
    config = results["config"]
    assert config["model"]["fingerprint"] == loaded.fingerprint and config["edit"]["key"] == "none"
    assert (config["shots_per_class"], config["shots_total"], config["seeds"]) == (2, 4, [0, 1])
    assert results["versions"]["torch"]
    for run in results["runs"]:
        mine = [s for s in samples if s["seed"] == run["seed"]]
        assert len(mine) == run["n_examples"] == n
        for s in mine:
            best = max(range(2), key=lambda k: s["logprobs"][k])
            assert s["prediction"] == best and s["correct"] == (best == s["gold"])
            assert s["prompt"].endswith(" a:") and s["candidates"] == [" Yes", " No"]
        accuracy = run["metrics"]["accuracy"]
        assert accuracy["value"] == pytest.approx(sum(s["correct"] for s in mine) / n)
        assert accuracy["ci_low"] <= accuracy["value"] <= accuracy["ci_high"]
        assert run["n_ties"] == sum(s["tie"] for s in mine)
        assert sum(map(sum, run["confusion"]["rows_gold_columns_predicted"])) == n
        assert len(run["demonstrations"]) == 4
    assert results["summary"]["accuracy"]["mean"] == pytest.approx(
        sum(r["metrics"]["accuracy"]["value"] for r in results["runs"]) / 2
    )
    assert results["summary"]["accuracy"]["n"] == 2


def test_interrupted_run_resumes_without_rescoring(task_dir, monkeypatch):
    loaded, task = tiny_loaded(), get_task(str(task_dir / "toy.yaml"))
    options = dict(seeds=(0,), data_dir=task_dir / "data", quiet=True)
    reference = evaluate(loaded, task, output=task_dir / "reference", **options).to_json()

    real_score, calls = evaluation.score_requests, []

    def interrupted(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_score(*args, **kwargs)

    monkeypatch.setattr(evaluation, "score_requests", interrupted)
    out = task_dir / "out"
    with pytest.raises(KeyboardInterrupt):
        evaluate(loaded, task, output=out, **options)
    (unfinished,) = (out / "store").rglob("*.unfinished")  # the rows of the seed in flight, kept every CHUNK examples
    kept = [json.loads(line) for line in unfinished.read_text().splitlines()]
    assert len(kept) == evaluation.CHUNK and len(Store(out / "store")) == 0 and not (out / "results.json").exists()
    with open(unfinished, "a") as handle:
        handle.write('{"id": "te')  # a line torn by the interruption

    monkeypatch.setattr(evaluation, "score_requests", real_score)
    results = evaluate(loaded, task, output=out, **options).to_json()
    assert results["runs"][0]["timing"]["examples_reused"] == evaluation.CHUNK
    assert results["runs"][0]["timing"]["examples_scored"] == N_TEST - 10 - evaluation.CHUNK
    resumed, fresh = read_samples(out), read_samples(task_dir / "reference")
    assert [s["id"] for s in resumed] == [s["id"] for s in fresh]
    for a, b in zip(resumed, fresh, strict=True):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
    assert results["runs"][0]["metrics"]["accuracy"]["value"] == reference["runs"][0]["metrics"]["accuracy"]["value"]


def test_finished_output_is_reused_and_a_different_run_is_refused(task_dir, monkeypatch):
    loaded, task = tiny_loaded(), get_task(str(task_dir / "toy.yaml"))
    options = dict(data_dir=task_dir / "data", output=task_dir / "out", quiet=True)
    first = evaluate(loaded, task, **options).to_json()

    def no_scoring(*args, **kwargs):
        raise AssertionError("a finished evaluation must not be scored again")

    monkeypatch.setattr(evaluation, "score_requests", no_scoring)
    assert evaluate(loaded, task, **options).to_json() == first
    with pytest.raises(SvdiclError, match=r"holds a different evaluation.*--overwrite"):
        evaluate(loaded, task, shots=1, **options)
    monkeypatch.undo()
    assert evaluate(loaded, task, shots=1, overwrite=True, **options).shots_per_class == 1


def test_one_prepared_run_is_scored_under_an_edit_and_restored(task_dir):
    loaded, task = tiny_loaded(), get_task(str(task_dir / "toy.yaml"))
    run = prepare_run(loaded, task, limit=12, data_dir=task_dir / "data")
    before = evaluate_run(loaded, run)
    with pruned(loaded.model, layers=1, modules="mlp", rate=0.9):
        edited = evaluate_run(loaded, run)
    after = evaluate_run(loaded, run)
    assert after.scores == before.scores
    assert edited.scores != before.scores
    results = evaluate(
        loaded, task, limit=12, specs=[PruneSpec.parse("1:mlp:0.9")], data_dir=task_dir / "data", quiet=True
    ).to_json()
    assert results["config"]["edit"]["key"] == "1:mlp:0.9"
    assert results["runs"][0]["metrics"]["accuracy"]["value"] == pytest.approx(edited.accuracy.value)
    assert [choose(s)[0] for s in edited.scores] == list(edited.predictions)


def test_limit_is_the_same_subset_for_every_seed(task_dir):
    loaded, task = tiny_loaded(), get_task(str(task_dir / "toy.yaml"))
    runs = [prepare_run(loaded, task, limit=20, seed=s, data_dir=task_dir / "data") for s in (0, 1)]
    ids = [[e.id for e in r.examples] for r in runs]
    assert ids[0] == ids[1] and len(ids[0]) == 20
    assert ids[0] == sorted(ids[0], key=lambda i: int(i.split(":")[1]))  # file order
    assert ids[0] != [f"test:{i}" for i in range(10, 30)]  # a shuffled subset, not the head
    assert [e.id for e in runs[0].demonstrations] != [e.id for e in runs[1].demonstrations]
    assert runs[0].requests[0].prefix != runs[1].requests[0].prefix


def test_prompt_longer_than_the_context_is_a_clear_error(task_dir):
    loaded = tiny_loaded("gpt2")  # 256 positions
    task = get_task(str(task_dir / "toy.yaml"))
    with pytest.raises(SvdiclError, match=r"reads at most 256.*fewer --shots"):
        prepare_run(loaded, task, shots=20, data_dir=task_dir / "data")


def test_cli_eval_end_to_end(task_dir, capsys):
    model_dir = task_dir / "model"
    loaded = tiny_loaded()
    loaded.model.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    out = task_dir / "cli"
    argv = ["-q", "eval", "--model", str(model_dir), "--task", str(task_dir / "toy.yaml"), "--data-dir", str(task_dir / "data")]
    assert main([*argv, "--seed", "0", "--seed", "3", "--limit", "10", "--num-fewshot", "2", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert (config["limit"], config["seeds"], config["shots_per_class"], config["shots_total"]) == (10, [0, 3], 1, 2)
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "over 2 seeds" in printed
    assert main([*argv, "--shots", "30", "--output", str(task_dir / "bad")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("svdicl: error:") and "only 20 demonstration candidates" in error and "\n" not in error
    assert main(["-q", "eval", "--task", "nope", "--output", str(out)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_each_seed_is_a_cell_keyed_as_a_sweep_keys_it(task_dir):
    """One results layer: an eval folder's store holds one cell per seed under the key a sweep of the same run uses."""
    from svdicl.experiments.cells import Scoring, run_key
    from svdicl.tasks.data import load_splits

    loaded, task = tiny_loaded(), get_task(str(task_dir / "toy.yaml"))
    out = task_dir / "out"
    evaluation = evaluate(loaded, task, seeds=(0, 3), limit=12, data_dir=task_dir / "data", output=out, quiet=True)
    splits = load_splits(task, task_dir / "data")
    keys = [run_key(loaded, splits, "test", task.shots, seed, 12, Scoring()) for seed in (0, 3)]
    store = Store(out / "store")
    assert [cell.key for cell in store.cells()] == keys
    rows = read_samples(out)
    for run, key in zip(evaluation.runs, keys, strict=True):
        cell = store.get(key)
        assert cell.n == run.n_examples == 12 and cell.value("accuracy") == run.accuracy.value
        assert store.samples(cell) == [row for row in rows if row["seed"] == run.seed]


def test_balanced_examples_take_each_class_in_the_random_subsets_order_and_give_a_short_classes_share_to_the_rest():
    labels = [0] * 30 + [1] * 8 + [2] * 62
    examples = [Example(f"test:{i}", {"text": str(i)}, label) for i, label in enumerate(labels)]
    picked = balanced_examples(examples, 30, split_seed=3)
    counts = [sum(e.label == c for e in picked) for c in range(3)]
    assert counts == [11, 8, 11]  # 10 each, class 1 has only 8: its 2 go one each to the others
    order = list(range(100))
    random.Random("limit:3").shuffle(order)  # the seeded shuffle --limit draws its random subset from
    reference = [i for c, n in enumerate(counts) for i in [i for i in order if labels[i] == c][:n]]
    assert [e.id for e in picked] == [f"test:{i}" for i in sorted(reference)]  # file order
    assert limit_examples(examples, 30, 3) != picked  # not the random subset
    assert balanced_examples(examples, 100, 3) == tuple(examples)  # a limit that covers the split keeps it whole
    assert balanced_examples(examples, 30, 4) != picked  # the split seed draws another subset
