"""The prefix and layer paths through the public evaluation API, against the plain batched path.

The plain path is itself checked against a one-prompt-at-a-time reference (test_scoring.py);
here every fast result must give the plain path's predictions and log-probs within 1e-4,
for tiny models of every supported family and for the real SmolLM2-135M (SST-2 and COPA).
"""

from __future__ import annotations

import json

import pytest
from conftest import (
    LABEL_TASKS,
    assert_same,
    build,
    edits_at,
    label_eval_argv,
    moved,
    save_model,
    tiny_loaded,
    tiny_run,
)

from svdicl import forward as fw
from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.experiments.edits import evaluate_edits
from svdicl.experiments.run_scoring import evaluate_run
from svdicl.experiments.runs import prepare_run
from svdicl.memory import cache_cost
from svdicl.prune import pruned
from svdicl.requests import Request, plan_suffixes, shared_prefix
from svdicl.scoring import SharedPrefix, choose_path, score_requests
from svdicl.specs import PruneSpec

# Labels of several characters are several tokens for the character-level tokenizer; "+"/"-" are one.
CASES = [*sorted(fw.SUPPORTED), "gemma3_text-window", "mistral-window"]


@pytest.mark.parametrize("case", CASES)
def test_layer_and_prefix_paths_match_plain_for_every_family(case, label_tasks):
    loaded = tiny_loaded(case)
    for task in LABEL_TASKS:
        run = tiny_run(loaded, label_tasks, task)
        for layer in (0, 1, 2):  # first, middle, last
            edits = edits_at(layer)
            plain = list(evaluate_edits(loaded, run, edits, path="plain"))
            assert moved(plain) > 1e-3  # the edits change the answer
            fast = list(evaluate_edits(loaded, run, edits))
            assert {(r.timing["path"], r.timing["start_layer"], r.timing["fallback"]) for _, r in fast} == {
                ("layer", layer, None)
            }
            assert_same(fast, plain)
        prefix = list(evaluate_edits(loaded, run, edits, path="prefix"))
        assert {r.timing["path"] for _, r in prefix} == {"prefix"}
        assert_same(prefix, plain)


def test_one_call_caches_below_the_lowest_edited_layer(label_tasks):
    loaded = tiny_loaded("llama")
    run = tiny_run(loaded, label_tasks, "words")
    edits = [
        (PruneSpec("2", "mlp", 0.9),),
        (),
        (PruneSpec("1", "attn", 0.5), PruneSpec("2", "mlp", 0.5)),
        (PruneSpec("0", "q", 0),),
    ]
    fast = list(evaluate_edits(loaded, run, edits))
    assert {r.timing["start_layer"] for _, r in fast} == {1}  # a rate-0 spec changes nothing
    assert_same(fast, list(evaluate_edits(loaded, run, edits, path="plain")))


def test_evaluate_run_takes_the_prefix_path_and_reports_it(label_tasks):
    loaded = tiny_loaded("qwen2")
    run = tiny_run(loaded, label_tasks, "words")
    with pruned(loaded.model, layers=1, modules="mlp", rate=0.9):
        fast = evaluate_run(loaded, run)
        plain = evaluate_run(loaded, run, path="plain")
    assert (fast.timing["path"], fast.timing["fallback"], plain.timing["path"]) == ("prefix", None, "plain")
    assert fast.predictions == plain.predictions
    for a, b in zip(fast.scores, plain.scores, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert fast.timing["prompt_tokens"] == plain.timing["tokens_forwarded"] == plain.timing["prompt_tokens"]
    assert fast.timing["tokens_forwarded"] < fast.timing["prompt_tokens"] / 2  # the demonstrations ran once


def test_unsupported_family_falls_back_to_plain_with_the_reason(label_tasks):
    loaded = tiny_loaded("gpt2")
    run = tiny_run(loaded, label_tasks, "signs")
    for _, result in evaluate_edits(loaded, run, edits_at(1, rates=(0.5,))):
        assert result.timing["path"] == "plain" and "gpt2" in result.timing["fallback"]
    assert "gpt2" in evaluate_run(loaded, run, path="prefix").timing["fallback"]


def test_memory_budget_chunks_or_falls_back_with_identical_results(label_tasks):
    loaded = tiny_loaded("gemma2")
    run = tiny_run(loaded, label_tasks, "words")
    edits = edits_at(1, rates=(0.9,))
    plain = list(evaluate_edits(loaded, run, edits, path="plain"))
    prefix = shared_prefix(run.requests)
    plan = plan_suffixes(run.requests, prefix, batch_size=4)
    cost = cache_cost(loaded.model, len(prefix))
    working = max(cost.working(rows, n, len(prefix)) for rows, n in plan.shapes)
    biggest = max(rows * n for rows, n in plan.shapes) * cost.per_token
    budgets = {
        "layer": cost.fixed + working + biggest,  # one batch per pass
        "prefix": cost.fixed + working + 1,  # not one cached batch, but the shared prefix fits
        "plain": 0,
    }
    for name, budget in budgets.items():
        results = list(evaluate_edits(loaded, run, edits, batch_size=4, cache_memory=budget))
        assert {r.timing["path"] for _, r in results} == {name}
        if name == "layer":
            assert results[0][1].timing["passes"] > 1
        else:
            assert "--cache-memory" in results[0][1].timing["fallback"]
        assert_same(results, plain)
    assert evaluate_run(loaded, run, cache_memory=0).timing["path"] == "plain"


def test_edit_outside_the_layers_falls_back_to_the_prefix_path(label_tasks):
    loaded = tiny_loaded("llama")  # untied head
    run = tiny_run(loaded, label_tasks, "signs")
    edits = [(), (PruneSpec("all", "re:^lm_head$", 0.5),)]
    fast = list(evaluate_edits(loaded, run, edits))
    assert fast[1][1].timing["path"] == "prefix" and "lm_head" in fast[1][1].timing["fallback"]
    assert_same(fast, list(evaluate_edits(loaded, run, edits, path="plain")))


def test_layer_cache_refuses_an_edit_below_it_and_rebuilds_per_call(label_tasks):
    loaded = tiny_loaded("llama")
    run = tiny_run(loaded, label_tasks, "words")
    edits = [(PruneSpec("2", "mlp", 0.5),), (PruneSpec("2", "mlp", 0.9),)]
    results = evaluate_edits(loaded, run, edits)
    next(results)
    with pruned(loaded.model, layers=0, modules="mlp", rate=0.5), pytest.raises(SvdiclError, match="below layer 2"):
        next(results)  # the cached inputs of layer 2 were computed before this edit of layer 0
    with pruned(loaded.model, layers=0, modules="mlp", rate=0.5):  # a new call caches under the current weights
        assert_same(list(evaluate_edits(loaded, run, edits)), list(evaluate_edits(loaded, run, edits, path="plain")))


def test_shared_prefix_moves_its_last_token_into_suffixes_when_a_context_is_empty():
    model = build("llama")
    requests = [
        Request((1, 5, 6, 7), (), ((10,), (11,))),
        Request((1, 5, 6, 7), (8, 9), ((10, 12), (11,))),
        Request((1, 5, 6, 7), (9,), ((12, 3, 4), (13, 14))),
    ]
    assert shared_prefix(requests) == (1, 5, 6)
    assert shared_prefix(requests[1:]) == (1, 5, 6, 7)
    opening = [Request((1, 5), (8, 9, 4), ((10,), (11,))), Request((1, 5), (8, 9, 3, 2), ((12,), (13,)))]
    assert shared_prefix(opening) == (1, 5, 8, 9)  # the contexts' common opening runs once too
    assert shared_prefix(opening[:1] * 2) == (1, 5, 8, 9)  # each keeps its last context token, which predicts the answer
    fast = score_requests(model, opening, batch_size=2, prefix=SharedPrefix(model, shared_prefix(opening)))
    for a, b in zip(fast, score_requests(model, opening, batch_size=2), strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    plain = score_requests(model, requests, batch_size=2)
    fast = score_requests(model, requests, batch_size=2, prefix=SharedPrefix(model, shared_prefix(requests)))
    for a, b in zip(fast, plain, strict=True):
        assert a.n_tokens == b.n_tokens and a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    with pytest.raises(SvdiclError, match="shared prefix"):
        score_requests(model, requests, prefix=SharedPrefix(model, (1, 5, 9)))
    other = [requests[1], Request((1, 5), (8, 9), ((10,), (11,)))]
    assert shared_prefix(other) is None
    assert "do not share" in choose_path(model, other).fallback


def test_bad_paths_and_budgets_are_one_line_errors(label_tasks):
    loaded = tiny_loaded("llama")
    run = tiny_run(loaded, label_tasks, "signs")
    with pytest.raises(SvdiclError, match="unknown scoring path 'fast'"):
        list(evaluate_edits(loaded, run, [()], path="fast"))
    with pytest.raises(SvdiclError, match="evaluate_edits"):
        evaluate_run(loaded, run, path="layer")
    with pytest.raises(SvdiclError, match="--cache-memory must be >= 0"):
        evaluate_run(loaded, run, cache_memory=-1)


def test_cli_eval_records_the_path(label_tasks, tmp_path, capsys):
    loaded = tiny_loaded("llama")
    argv = label_eval_argv(save_model(loaded, tmp_path / "model"), label_tasks, "words")
    scores = {}
    for path, memory, used in (("auto", "512MiB", "prefix"), ("plain", "4GiB", "plain"), ("prefix", "0", "plain")):
        out = tmp_path / path
        assert main([*argv, "--path", path, "--cache-memory", memory, "--output", str(out)]) == 0
        results = json.loads((out / "results.json").read_text())
        scores[path] = [json.loads(line)["logprobs"] for line in (out / "samples.jsonl").read_text().splitlines()]
        assert results["config"]["scoring"]["path"] == results["runs"][0]["timing"]["path"] == used
        assert (memory == "0") == ("--cache-memory 0.0 MiB" in (results["config"]["scoring"]["fallback"] or ""))
    for a, b in zip(scores["auto"], scores["plain"], strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    capsys.readouterr()
    assert main([*argv, "--cache-memory", "lots", "--output", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err.strip()
    assert "cannot read memory size 'lots'" in error and "\n" not in error


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "limit", "modules"), [("sst2", 6, ("attn", "mlp", "attn")), ("copa", 3, ("mlp", "attn", "mlp"))]
)
def test_real_model_fast_paths_match_plain(real_model, data_dir, task, limit, modules):
    """SmolLM2-135M, one demonstration per class: the layer path at the first, a middle and the last layer
    (attn and mlp across the two tasks), and the prefix path."""
    run = prepare_run(real_model, task, split="validation", shots=1, limit=limit, data_dir=data_dir)
    edits = [(PruneSpec(str(layer), module, 0.9),) for layer, module in zip((0, 15, 29), modules, strict=True)]
    plain = list(evaluate_edits(real_model, run, [(), *edits], path="plain"))
    assert min(moved([plain[0], edited]) for edited in plain[1:]) > 1e-3
    for layer, edit, want in zip((0, 15, 29), edits, plain[1:], strict=True):
        fast = list(evaluate_edits(real_model, run, [(), edit]))
        assert {(r.timing["path"], r.timing["start_layer"]) for _, r in fast} == {("layer", layer)}
        assert_same(fast, [plain[0], want])
    prefix = list(evaluate_edits(real_model, run, [()], path="prefix"))
    assert prefix[0][1].timing["path"] == "prefix"
    assert_same(prefix, plain[:1])
