"""A dense export evaluates unchanged with lm-evaluation-harness (`lm_eval --model hf`), offline.

The run uses examples/lm_eval/svdicl_sst2.yaml over the local JSONL data.  Its answers are checked
against a direct computation with svdicl's in-memory pruned model: the prompts follow svdicl's
SST-2 template, every log-likelihood matches, and so does the accuracy.  All seven task YAMLs load
in lm-eval's TaskManager without a warning and prompt every test row exactly as svdicl does.
"""

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import svdicl
from svdicl.prompts import candidate_texts, demonstration_text, query_text
from svdicl.specs import PruneSpec
from svdicl.stats import macro_f1
from svdicl.tasks import TASKS as SVDICL_TASKS
from svdicl.tasks import get_task
from svdicl.tasks.data import load_splits

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra svdicl[lm-eval]")

TASKS = Path(__file__).resolve().parents[1] / "examples" / "lm_eval"
SPECS = [PruneSpec("-1", "mlp", 0.9)]
LABELS = ("negative", "positive")
LIMIT, SHOTS = 16, 4


def label_loglikelihoods(loaded: svdicl.LoadedModel, contexts: list[str]) -> list[list[float]]:
    """log P(" negative" | context) and log P(" positive" | context): one unbatched forward per context."""
    label_ids = [loaded.tokenizer(" " + label, add_special_tokens=False).input_ids for label in LABELS]
    assert all(len(ids) == 1 for ids in label_ids)  # single tokens, so the last position scores both
    scores = []
    for context in contexts:
        ids = torch.tensor([loaded.tokenizer(context, add_special_tokens=False).input_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(loaded.model(ids).logits[0, -1].double(), dim=-1)
        scores.append([logprobs[token].item() for (token,) in label_ids])
    return scores


def run_lm_eval(export: Path, output: Path, data_dir: Path) -> tuple[dict, list[dict]]:
    argv = ["--model", "hf", "--model_args", f"pretrained={export},dtype=float32", "--include_path", str(TASKS)]
    argv += ["--tasks", "svdicl_sst2", "--num_fewshot", str(SHOTS), "--limit", str(LIMIT), "--batch_size", "8"]
    argv += ["--output_path", str(output), "--log_samples"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(output / "datasets"))
    done = subprocess.run([sys.executable, "-m", "lm_eval", *argv], cwd=data_dir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(output.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(output.rglob("samples_svdicl_sst2_*.jsonl")).read_text().splitlines()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


@pytest.mark.slow
def test_lm_eval_scores_a_dense_export_like_svdicl(real_model, data_dir, tmp_path):
    svdicl.save_pruned(real_model, SPECS, tmp_path / "export")
    results, samples = run_lm_eval(tmp_path / "export", tmp_path / "lm_eval", data_dir)
    rows = [json.loads(line) for line in (data_dir / "sst2" / "validation.jsonl").read_text().splitlines()[:LIMIT]]
    train = {
        json.loads(line)["sentence"].strip(): json.loads(line)["label"] for line in (data_dir / "sst2" / "train.jsonl").open()
    }
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))
    contexts = []
    for sample, row in zip(samples, rows, strict=True):
        assert [args["arg_1"] for args in sample["arguments"].values()] == [" negative", " positive"]
        (context,) = {args["arg_0"] for args in sample["arguments"].values()}
        *demonstrations, query = context.split("\n")
        assert query == f"text: {row['sentence'].strip()} sentiment:"  # svdicl's template, character for character
        assert len(demonstrations) == SHOTS
        for line in demonstrations:
            sentence, label = line.removeprefix("text: ").rsplit(" sentiment: ", 1)
            assert LABELS[train[sentence]] == label  # a train example with its gold label word
        contexts.append(context)
    with svdicl.pruned(real_model.model, specs=SPECS):
        direct = label_loglikelihoods(real_model, contexts)
    reported = [[float(resp[0]) for resp in sample["filtered_resps"]] for sample in samples]
    assert max(abs(a - b) for d, r in zip(direct, reported, strict=True) for a, b in zip(d, r, strict=True)) < 1e-3
    unpruned = label_loglikelihoods(real_model, contexts[:1])[0]
    assert max(abs(a - b) for a, b in zip(unpruned, reported[0], strict=True)) > 1e-2  # lm-eval ran the pruned weights
    correct = [float(scores.index(max(scores)) == row["label"]) for scores, row in zip(direct, rows, strict=True)]
    assert [sample["acc"] for sample in samples] == correct
    assert results["results"]["svdicl_sst2"]["acc,none"] == pytest.approx(sum(correct) / LIMIT, abs=1e-12)


def svdicl_task(name: str):
    """svdicl's task over the rows the lm-eval YAML scores: its own, or for SST-2 the same task on GLUE validation."""
    return get_task(TASKS / "sst2_glue_validation.yaml" if name == "sst2" else name)


def row(example_id: str) -> int:
    return int(example_id.split(":")[1])


def test_every_task_yaml_loads_without_warnings_and_prompts_as_svdicl_does(data_dir, tmp_path):
    tasks = {name: svdicl_task(name) for name in SVDICL_TASKS}
    splits = {name: load_splits(task, data_dir) for name, task in tasks.items()}
    demonstrations = {name: sorted(split.demonstrations, key=lambda e: row(e.id))[:20] for name, split in splits.items()}
    assert all(e.id.startswith("train:") for found in demonstrations.values() for e in found)
    rows = json.dumps({f"svdicl_{name}": [row(e.id) for e in found] for name, found in demonstrations.items()})
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    probe = [sys.executable, str(Path(__file__).with_name("lm_eval_probe.py")), str(TASKS), rows]
    done = subprocess.run(probe, cwd=data_dir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["warnings"] == []
    assert sorted(report["tasks"]) == sorted(f"svdicl_{name}" for name in SVDICL_TASKS)
    f1 = macro_f1([0, 1, 1, 0, 1], [0, 1, 0, 0, 1], 2)
    for name, task in tasks.items():
        found = report["tasks"][f"svdicl_{name}"]
        test = sorted(splits[name].test, key=lambda e: row(e.id))
        assert [row(e.id) for e in test] == list(range(len(found["queries"])))  # svdicl's test split is that whole file
        assert found["queries"] == [query_text(task, e) for e in test]
        candidates = [[found["target_delimiter"] + choice for choice in choices] for choices in found["choices"]]
        assert candidates == [list(candidate_texts(task, e)) for e in test]
        assert found["targets"] == [e.label for e in test]
        assert found["demonstrations"] == [demonstration_text(task, e) for e in demonstrations[name]]
        assert found["higher_is_better"] == {"acc": True, "f1": True}
        assert found["f1_of_sample"] == pytest.approx(f1, abs=1e-12)


def test_the_yamls_macro_f1_is_svdicls():
    spec = importlib.util.spec_from_file_location("svdicl_metrics", TASKS / "svdicl_metrics.py")
    metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(metrics)
    rng = random.Random(0)
    for classes in (2, 3, 4):
        for n in (classes, 10, 200):
            gold = [i % classes for i in range(n)]  # every class is gold at least once, as on a real test split
            predicted = [rng.randrange(classes) for _ in range(n)]
            expected = macro_f1(gold, predicted, classes)
            assert metrics.macro_f1(list(zip(gold, predicted, strict=True))) == pytest.approx(expected, abs=1e-12)
