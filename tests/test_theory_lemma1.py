"""Lemma 1 and Theorem 1 in float64: the direct and dual forms agree, and wrong constructions fail the same check."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.theory.checks import Lemma1Settings, lemma1_check
from svdicl.theory.lemma1 import (
    PERTURBED,
    LinearAttention,
    attention,
    draw_one,
    implicit_update,
    lemma1_error,
    random_layer,
    rank,
    stack_forward,
    summarize,
    theorem1_error,
    trajectory,
    update_changes,
)

TOLERANCE = 1e-10


def _draw(seed: int, dim: int, key_dim: int, n_demos: int, query_tokens: int, layers: int):
    gen = torch.Generator().manual_seed(seed)
    stack = [random_layer(dim, key_dim, generator=gen) for _ in range(layers)]
    tokens = torch.randn(n_demos + query_tokens, dim, generator=gen, dtype=torch.float64) * dim**-0.5
    return stack, tokens


def test_direct_attention_matches_a_token_by_token_loop():
    stack, tokens = _draw(seed=3, dim=5, key_dim=4, n_demos=4, query_tokens=2, layers=1)
    layer = stack[0]
    expected = torch.stack(
        [
            tokens[t] + sum(((layer.w_q @ tokens[t]) @ (layer.w_k @ tokens[s])) * (layer.w_v @ tokens[s]) for s in range(t + 1))
            for t in range(len(tokens))
        ]
    )
    assert torch.allclose(attention(layer, tokens), expected, rtol=1e-13, atol=0)


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    dim=st.integers(2, 9),
    key_dim=st.integers(1, 9),
    n_demos=st.integers(1, 14),
    query_tokens=st.integers(1, 3),
    layers=st.integers(1, 4),
)
def test_lemma1_and_theorem1_hold_and_perturbed_constructions_fail(seed, dim, key_dim, n_demos, query_tokens, layers):
    stack, tokens = _draw(seed, dim, key_dim, n_demos, query_tokens, layers)
    assert lemma1_error(stack[0], tokens, n_demos) <= TOLERANCE
    assert theorem1_error(stack, tokens, n_demos) <= TOLERANCE
    for name, construction in PERTURBED.items():
        assert lemma1_error(stack[0], tokens, n_demos, construction) > 1e-6, name
        assert theorem1_error(stack, tokens, n_demos, construction) > 1e-6, name
    for dw in trajectory(stack, tokens, n_demos).updates:
        assert rank(dw) <= n_demos


def test_hundred_seeded_draws_pass_and_the_summary_would_flag_a_failure():
    draws = [draw_one(i, seed=0, dim=6, layers=3, max_demos=12) for i in range(100)]
    summary = summarize(draws, dim=6, tolerance=TOLERANCE)
    assert summary["lemma1_holds"] and summary["theorem1_holds"] and summary["perturbed_all_fail"]
    assert summary["lemma1_max_error"] <= TOLERANCE and summary["theorem1_max_error"] <= TOLERANCE
    assert summary["rank_bound_holds"] and summary["rank_equals_min_n_d"] == 100  # generic draws reach min(n, d)
    assert summary["locality_holds"]
    assert {d.n_demos for d in draws} >= {1, 5, 6, 7, 12}  # both n < d and n > d were drawn
    strict = summarize(draws, dim=6, tolerance=1e-20)
    assert not strict["lemma1_holds"] or not strict["theorem1_holds"]  # the verdicts depend on the errors


def test_implicit_update_is_a_sum_of_rank_one_terms_with_wq_on_the_right():
    stack, tokens = _draw(seed=1, dim=6, key_dim=6, n_demos=3, query_tokens=1, layers=1)
    layer, demos = stack[0], tokens[:3]
    expected = sum(torch.outer(layer.w_v @ x, layer.w_k @ x) for x in demos) @ layer.w_q
    assert torch.allclose(implicit_update(layer, demos), expected, rtol=1e-13, atol=0)
    assert rank(implicit_update(layer, demos)) == 3


def test_trajectory_is_the_product_of_per_layer_maps_and_matches_the_direct_stack():
    stack, tokens = _draw(seed=2, dim=4, key_dim=4, n_demos=5, query_tokens=2, layers=3)
    traj = trajectory(stack, tokens, 5)
    manual = tokens[-1]
    for w0, dw in zip(traj.zero_shot, traj.updates, strict=True):
        manual = (w0 + dw) @ manual
    assert torch.allclose(manual, stack_forward(stack, tokens)[-1], rtol=1e-12, atol=0)
    assert torch.allclose(traj.effective_map() @ tokens[-1], manual, rtol=1e-12, atol=0)


def test_truncating_a_layer_changes_only_its_own_and_later_updates():
    stack, tokens = _draw(seed=4, dim=6, key_dim=6, n_demos=8, query_tokens=1, layers=4)
    changes = update_changes(stack, tokens, 8, layer=2, rate=0.5)
    assert changes[:2] == [0.0, 0.0]
    assert all(c > 1e-3 for c in changes[2:])


def test_query_without_tokens_is_refused():
    layer = random_layer(3, generator=torch.Generator().manual_seed(0))
    tokens = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(SvdiclError, match="the query needs at least one token"):
        lemma1_error(layer, tokens, n_demos=4)


def test_a_layer_whose_query_ignores_w_q_fails_the_check():
    stack, tokens = _draw(seed=5, dim=5, key_dim=5, n_demos=4, query_tokens=1, layers=1)
    broken = LinearAttention(w_q=torch.eye(5, dtype=torch.float64), w_k=stack[0].w_k, w_v=stack[0].w_v)
    assert lemma1_error(stack[0], tokens, 4, lambda _, demos: implicit_update(broken, demos)) > 1e-3


def test_cli_lemma1_writes_results_and_exits_zero(tmp_path, capsys):
    assert main(["-q", "theory", "lemma1", "--draws", "12", "--dim", "5", "--layers", "2", "--output", str(tmp_path)]) == 0
    import json

    result = json.loads((tmp_path / "lemma1.json").read_text())
    assert result["summary"]["draws"] == 12 and len(result["draws"]) == 12
    assert result["summary"]["theorem1_max_error"] <= TOLERANCE
    assert {p.name for p in tmp_path.iterdir()} == {"lemma1.json", "lemma1.csv", "lemma1.png", "lemma1.svg"}
    assert "fails the check, as it must" in capsys.readouterr().out
    assert main(["-q", "theory", "lemma1", "--draws", "0", "--output", str(tmp_path)]) == 2


def test_lemma1_settings_refuse_bad_values_and_the_check_returns_its_numbers():
    with pytest.raises(SvdiclError, match="--max-demos must be at least 1, not 0"):
        Lemma1Settings(max_demos=0)
    with pytest.raises(SvdiclError, match="--tolerance must be a finite number >= 0, not nan"):
        Lemma1Settings(tolerance=float("nan"))
    check = lemma1_check(Lemma1Settings(draws=3, dim=4, layers=2))
    assert check.ok and len(check.draws) == 3 and check.summary["draws"] == 3
    headers, rows = check.table()
    assert len(rows) == 3 and len(headers) == len(rows[0]) and check.to_json()["settings"]["dim"] == 4
