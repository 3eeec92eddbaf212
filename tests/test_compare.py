"""`svdicl compare`: example-level paired comparison of two eval folders, checked against scipy and a direct
computation from the samples; unpaired folders are refused in one line; the docs' snippet runs on a 2-seed run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model, tiny_tokenizer, write_toy_task
from scipy import stats

from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.experiments.compare import compare_evals, read_eval
from svdicl.experiments.evaluate import evaluate
from svdicl.models import LoadedModel, fingerprint
from svdicl.specs import PruneSpec
from svdicl.tasks import get_task

DOCS = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"


def write_eval(folder: Path, correct: np.ndarray, *, task="sst2", edit="none", gold=None, ids=None) -> Path:
    """An eval folder in the svdicl-eval/1 layout: `correct` is (seeds x examples) of 0/1."""
    folder.mkdir(parents=True, exist_ok=True)
    seeds, n = correct.shape
    gold = [i % 2 for i in range(n)] if gold is None else gold
    ids = [f"test:{i}" for i in range(n)] if ids is None else ids
    samples = [
        {"seed": s, "id": ids[i], "gold": gold[i], "prediction": gold[i] if correct[s, i] else 1 - gold[i],
         "correct": bool(correct[s, i])}
        for s in range(seeds)
        for i in range(n)
    ]  # fmt: skip
    (folder / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in samples))
    config = {"model": {"source": "tiny", "fingerprint": "fp", "dtype": "float32"}, "task": {"name": task}, "split": "test",
              "seeds": list(range(seeds)), "limit": None, "edit": {"key": edit}}  # fmt: skip
    summary = {"metric": "macro_f1" if task == "copa" else "accuracy"}
    (folder / "results.json").write_text(
        json.dumps({"format": "svdicl-eval/1", "config": config, "runs": [], "summary": summary})
    )
    return folder


def two_arms(rng: np.random.Generator, n: int = 14, seeds: int = 2) -> tuple[np.ndarray, np.ndarray]:
    return (rng.random((seeds, n)) < 0.55).astype(int), (rng.random((seeds, n)) < 0.75).astype(int)


def test_comparison_is_example_level_and_equals_references(tmp_path):
    a, b = two_arms(np.random.default_rng(3))
    result = compare_evals(write_eval(tmp_path / "a", a), write_eval(tmp_path / "b", b, edit="29:mlp:0.9"))
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)  # each example averaged over its seeds
    d = mean_b - mean_a
    assert (result.n, result.paired.n, result.paired.seeds) == (14, 14, 2)  # n counts examples, never examples x seeds
    assert (result.a.accuracy.value, result.b.accuracy.value) == pytest.approx((a.mean(), b.mean()))
    assert result.paired.difference == pytest.approx(d.mean())
    exact = stats.permutation_test(
        (mean_a, mean_b), lambda x, y: np.mean(y - x), permutation_type="samples", n_resamples=np.inf, alternative="two-sided"
    )
    assert result.paired.p_value == pytest.approx(exact.pvalue, rel=1e-9)
    interval = stats.ttest_rel(mean_b, mean_a).confidence_interval(0.95)
    assert (result.paired.low, result.paired.high) == pytest.approx((interval.low, interval.high))
    t = stats.t.ppf(0.975, 13) + stats.t.ppf(0.8, 13)
    assert result.paired.mde == pytest.approx(t * d.std(ddof=1) / np.sqrt(14))
    assert result.b.edit == "29:mlp:0.9" and result.a.seeds == (0, 1)


def test_one_seed_arm_interval_is_wilson(tmp_path):
    a, b = two_arms(np.random.default_rng(4), n=30, seeds=1)
    result = compare_evals(write_eval(tmp_path / "a", a), write_eval(tmp_path / "b", b))
    k, n = int(a.sum()), 30
    low, high = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert (result.a.accuracy.low, result.a.accuracy.high) == pytest.approx((low, high))


def test_unpaired_folders_are_refused_naming_the_mismatch(tmp_path, capsys):
    a, b = two_arms(np.random.default_rng(5))
    write_eval(tmp_path / "a", a)
    write_eval(tmp_path / "fewer", b[:, :10])
    write_eval(tmp_path / "cb", b, task="cb")
    write_eval(tmp_path / "gold", b, gold=[1 - i % 2 for i in range(14)])
    expected = {
        "fewer": "scored different examples: 4 only in A (e.g. test:10, test:11, test:12), 0 only in B",
        "cb": "are sst2 test and cb test; compare evaluations of one task and split",
        "gold": "give 14 examples other gold labels",
    }
    for folder, message in expected.items():
        assert main(["compare", str(tmp_path / "a"), str(tmp_path / folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_damaged_or_missing_eval_output_is_one_line(tmp_path, capsys):
    a, b = two_arms(np.random.default_rng(6))
    write_eval(tmp_path / "a", a)
    broken = write_eval(tmp_path / "b", b)
    lines = (broken / "samples.jsonl").read_text().splitlines()
    (broken / "samples.jsonl").write_text("\n".join([*lines[:3], '{"seed": 0, "id"', *lines[3:]]) + "\n")
    (tmp_path / "multi" / "sst2").mkdir(parents=True)
    write_eval(tmp_path / "multi" / "sst2", a)
    write_eval(tmp_path / "multi" / "cb", a, task="cb")
    expected = {"b": f"{broken / 'samples.jsonl'} line 4 is damaged", "multi": "holds evaluations of several tasks (cb, sst2)"}
    for folder, message in expected.items():
        assert main(["compare", str(tmp_path / "a"), str(tmp_path / folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    with pytest.raises(SvdiclError, match=r"holds no results\.json"):
        read_eval(tmp_path / "nothing")


def test_docs_compare_snippet_runs_on_a_two_seed_run(tmp_path, monkeypatch):
    """The snippet of docs/evaluation.md, run as written on 2-seed folders (the old one failed: "id appears twice")."""
    text = DOCS.read_text()
    (snippet,) = [s for s in re.findall(r"```python\n(.*?)```", text, re.S) if "compare_evals" in s]
    a, b = two_arms(np.random.default_rng(7))
    write_eval(tmp_path / "out" / "base", a)
    write_eval(tmp_path / "out" / "pruned", b)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, str(DOCS), "exec"), scope)
    assert scope["comparison"].paired.difference == pytest.approx(b.mean() - a.mean())


def test_cli_compare_of_two_real_eval_runs(tmp_path, capsys, one_thread):
    """End to end: `svdicl eval` twice (unpruned, pruned; 2 seeds) on a tiny model, then `svdicl compare`."""
    write_toy_task(tmp_path, 40, validation=10)
    model = tiny_model("llama")
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer(), source="tiny", fingerprint=fingerprint(model), dtype="float32")
    task = get_task(str(tmp_path / "toy.yaml"))
    for name, specs in (("base", ()), ("pruned", (PruneSpec.parse("2:mlp:0.99"),))):
        evaluate(loaded, task, seeds=(0, 1), specs=specs, data_dir=tmp_path / "data", output=tmp_path / name, quiet=True)
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "pruned"), "--json"]) == 0
    (found,) = json.loads(capsys.readouterr().out)["comparisons"]
    correct = {}
    for name in ("base", "pruned"):
        rows = [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
        table = {}
        for row in rows:
            table.setdefault(row["id"], []).append(row["correct"])
        correct[name] = {i: np.mean(v) for i, v in table.items()}
    d = np.array([correct["pruned"][i] - correct["base"][i] for i in correct["base"]])
    assert found["n"] == len(d) == 30 and found["paired"]["seeds"] == 2
    assert found["paired"]["difference"] == pytest.approx(d.mean())
    assert found["b"]["edit"] == "2:mlp:0.99" and found["a"]["seeds"] == [0, 1]
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "pruned")]) == 0
    out = capsys.readouterr().out
    assert f"on the same {len(d)} examples" in out and f"{d.mean():+.4f}" in out and "p = " in out


def test_copa_says_the_comparison_is_on_accuracy(tmp_path, capsys):
    a, b = two_arms(np.random.default_rng(8))
    write_eval(tmp_path / "a", a, task="copa")
    write_eval(tmp_path / "b", b, task="copa")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "(paired on accuracy; the task's headline metric is macro_f1" in capsys.readouterr().out
    assert compare_evals(tmp_path / "a", tmp_path / "b").to_dict()["metric"] == "accuracy"


def test_multi_task_folders_are_compared_per_task_with_holm(tmp_path, capsys):
    from svdicl.experiments.compare import compare_tasks

    rng = np.random.default_rng(9)
    arms = {task: two_arms(rng, n=20) for task in ("sst2", "cb")}
    for task, (a, b) in arms.items():
        write_eval(tmp_path / "base" / task, a, task=task)
        write_eval(tmp_path / "pruned" / task, b, task=task)
    found = compare_tasks(tmp_path / "base", tmp_path / "pruned")
    assert [c.task for c in found] == ["cb", "sst2"]
    raw = [compare_evals(tmp_path / "base" / c.task, tmp_path / "pruned" / c.task).paired.p_value for c in found]
    low, high = sorted(range(2), key=raw.__getitem__)
    expected = [0.0, 0.0]
    expected[low] = min(1.0, 2 * raw[low])
    expected[high] = min(1.0, max(expected[low], raw[high]))  # Holm's step-down for two tests
    assert [c.p_holm for c in found] == pytest.approx(expected)
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "pruned")]) == 0
    assert capsys.readouterr().out.count("Holm over 2 tasks") == 2
    write_eval(tmp_path / "more" / "sst2", arms["sst2"][1])
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "more")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds tasks cb, sst2 and B" in err and "sst2; compare folders of the same tasks" in err
