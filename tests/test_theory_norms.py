"""Examples 1-4: the implicit gradient per head (GQA), its Frobenius bound, and what truncation does to both."""

import json
from dataclasses import replace

import pytest
import torch

from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.prompts import demonstrations_text, sample_demonstrations
from svdicl.svd import kept_rank
from svdicl.tasks import get_task
from svdicl.tasks.data import load_splits
from svdicl.theory.checks import NormsSettings, norms_check
from svdicl.theory.lemma1 import LinearAttention, implicit_update
from svdicl.theory.norms import (
    EXAMPLES,
    implicit_gradient,
    layer_inputs,
    model_block,
    model_sweep,
    monotone,
    norms,
    random_block,
    random_sweep,
    truncated,
)


def _gqa_block(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return random_block(12, generator=gen, heads=6, kv_heads=2), torch.randn(7, 12, generator=gen, dtype=torch.float64)


def test_implicit_gradient_with_gqa_matches_a_per_head_sum_of_outer_products():
    block, demos = _gqa_block()
    head_dim, per_group = 2, 3
    heads = []
    for h in range(6):
        g = h // per_group
        w_v, w_k = block.w_v[g * head_dim : (g + 1) * head_dim], block.w_k[g * head_dim : (g + 1) * head_dim]
        w_q = block.w_q[h * head_dim : (h + 1) * head_dim]
        heads.append(sum(torch.outer(w_v @ x, w_k @ x) for x in demos) @ w_q)
    assert torch.allclose(implicit_gradient(block, demos), torch.cat(heads), rtol=1e-12, atol=0)


def test_single_head_implicit_gradient_is_lemma1s_update():
    gen = torch.Generator().manual_seed(1)
    block, demos = random_block(8, generator=gen), torch.randn(5, 8, generator=gen, dtype=torch.float64)
    layer = LinearAttention(w_q=block.w_q, w_k=block.w_k, w_v=block.w_v)
    assert torch.allclose(implicit_gradient(block, demos), implicit_update(layer, demos), rtol=1e-12, atol=0)


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_bound_holds_and_never_rises_with_the_rate_gqa(example):
    block, demos = _gqa_block(seed=2)
    previous = None
    for rate in (0.0, 0.1, 0.5, 0.75, 0.9, 0.99):
        edited = truncated(block, example, rate) if rate else block
        value = norms(edited, demos, example)
        assert value.exact <= value.bound * (1 + 1e-12)
        if previous is not None:
            assert value.bound <= previous * (1 + 1e-12)
        previous = value.bound
    assert previous < norms(block, demos, example).bound * 0.9  # and it does fall


def test_truncation_keeps_the_rank_svdicl_asks_for():
    block, _ = _gqa_block()
    for name in EXAMPLES["mlp"]:
        matrix = getattr(truncated(block, "mlp", 0.75), name)
        assert torch.linalg.matrix_rank(matrix).item() == kept_rank(tuple(matrix.shape), 0.75)


def test_random_sweep_bound_always_falls_exact_norm_only_where_the_projection_is_outside():
    rows = random_sweep(30, seed=0, dim=12, demos=8, rates=(0.0, 0.1, 0.5, 0.75, 0.9))
    assert set(monotone(rows, "bound").values()) == {1.0}
    exact = monotone(rows, "exact")
    assert exact["q"] == 1.0 and exact["v"] == 1.0  # dW_k = dW V_k V_k^T and U_k U_k^T dW: projections outside
    assert exact["k"] < 1.0  # the projection sits inside the product: the exact norm can rise
    assert all(r.exact <= r.bound * (1 + 1e-12) for r in rows)


def test_norms_scale_with_the_demonstrations_and_vanish_with_w_q():
    block, demos = _gqa_block()
    for example in EXAMPLES:
        once, twice = norms(block, demos, example), norms(block, 2 * demos, example)
        assert twice.bound == pytest.approx(4 * once.bound, rel=1e-12)  # quadratic in X'
        assert twice.exact == pytest.approx(4 * once.exact, rel=1e-12)
    silent = norms(replace(block, w_q=torch.zeros_like(block.w_q)), demos, "q")
    assert (silent.exact, silent.bound) == (0.0, 0.0)


@pytest.mark.slow
def test_real_model_norms_on_sst2_demonstrations(real_model, data_dir):
    model, tokenizer = real_model.model, real_model.tokenizer
    task = get_task("sst2")
    demos = sample_demonstrations(task, load_splits(task, data_dir).demonstrations, 2, seed=0)
    ids = torch.tensor([tokenizer(demonstrations_text(task, demos), add_special_tokens=True)["input_ids"]])
    acts = layer_inputs(model, ids, [0, 29])
    with torch.no_grad():  # slow reference: hidden states entering the layer, through its input norm
        hidden = model(ids, output_hidden_states=True).hidden_states
        for layer in (0, 29):
            expected = model.model.layers[layer].input_layernorm(hidden[layer])[0].double()
            assert torch.allclose(acts[layer], expected, rtol=1e-5, atol=1e-5)
    block = model_block(model, 29)
    assert (block.heads, block.kv_heads, block.w_k.shape, block.w_in.shape) == (9, 3, (192, 576), (1536, 576))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = model_sweep(model, ids, [29], rates=(0.0, 0.5, 0.99), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # pruned(...) restored everything
    assert len(rows) == len(EXAMPLES) * 3
    assert set(monotone(rows, "bound").values()) == {1.0}
    assert all(r.exact <= r.bound * (1 + 1e-9) for r in rows)
    for example in EXAMPLES:
        strong = [r for r in rows if r.example == example and r.rate == 0.99]
        assert all(r.bound_ratio < 0.95 for r in strong), example


def test_cli_norms_random_only(tmp_path):
    args = ["-q", "theory", "norms", "--random-only", "--draws", "4", "--dim", "8", "--demos", "5", "--rates", "0.5", "0.9"]
    assert main([*args, "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "norms.json").read_text())
    assert result["settings"]["rates"] == [0.0, 0.5, 0.9]
    assert set(result["summary"]["random"]["bound_non_increasing"].values()) == {1.0}
    lines = (tmp_path / "norms.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 * len(EXAMPLES) * 3
    assert (tmp_path / "norms.png").stat().st_size > 0
    assert main(["-q", "theory", "norms", "--random-only", "--rates", "1.5", "--output", str(tmp_path)]) == 2


def test_norms_settings_refuse_an_empty_demonstrations_block_before_any_work():
    with pytest.raises(SvdiclError, match="--shots must be at least 1: the norms need a demonstrations block"):
        NormsSettings(shots=0)
    assert NormsSettings(task=None, shots=0, rates=(0.9, 0.5)).rates == (0.0, 0.5, 0.9)  # random blocks only: no shots
    with pytest.raises(SvdiclError, match="the norms of a real model need the model"):
        norms_check(NormsSettings(draws=1, dim=4, demos=2))
    check = norms_check(NormsSettings(draws=2, dim=4, demos=3, rates=(0.5,), task=None))
    assert check.ok and list(check.summary) == ["random"] and len(check.rows) == 2 * len(EXAMPLES) * 2
