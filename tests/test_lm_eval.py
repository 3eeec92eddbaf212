"""A dense export evaluates unchanged with lm-evaluation-harness (`lm_eval --model hf`), offline.

The run uses examples/lm_eval/svdicl_sst2.yaml over the local JSONL data.  Its answers are checked
against a direct computation with svdicl's in-memory pruned model: the prompts follow svdicl's
SST-2 template, every log-likelihood matches, and so does the accuracy.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import svdicl
from svdicl.prune import PruneSpec

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
    train = {json.loads(line)["sentence"]: json.loads(line)["label"] for line in (data_dir / "sst2" / "train.jsonl").open()}
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))
    contexts = []
    for sample, row in zip(samples, rows, strict=True):
        assert [args["arg_1"] for args in sample["arguments"].values()] == [" negative", " positive"]
        (context,) = {args["arg_0"] for args in sample["arguments"].values()}
        *demonstrations, query = context.split("\n")
        assert query == f"text: {row['sentence']} sentiment:"  # svdicl's template, character for character
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
