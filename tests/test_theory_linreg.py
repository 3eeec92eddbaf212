"""In-context linear regression: baselines, the prunable GPT-2 wrapper, resumable training, the CLI."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import svdicl
from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.targets import resolve
from svdicl.theory import linreg
from svdicl.theory.checks import LinRegSettings
from svdicl.theory.linreg import (
    Curve,
    LinRegConfig,
    baseline_curves,
    baseline_predictions,
    build,
    held_out,
    learned,
    model_curve,
    predict,
    prune_sweep,
    read_state,
    sample_prompts,
    train,
)

TINY = LinRegConfig(dim=3, points=5, layers=2, width=16, heads=2, batch_size=8, steps=6, warmup=2, checkpoint_every=2)


def test_baselines_match_numpy_least_squares_and_ridge():
    prompts = sample_prompts(6, points=7, dim=4, noise=0.1, seed=0)
    found = baseline_predictions(prompts, ridge=0.5)
    xs, ys = prompts.xs.double().numpy(), prompts.ys.double().numpy()
    for n in range(6):
        for i in range(1, 7):
            w_ls = np.linalg.lstsq(xs[n, :i], ys[n, :i], rcond=None)[0]  # minimum-norm when i < d
            w_ridge = np.linalg.solve(xs[n, :i].T @ xs[n, :i] + 0.5 * np.eye(4), xs[n, :i].T @ ys[n, :i])
            assert found["least_squares"][n, i].item() == pytest.approx(xs[n, i] @ w_ls, rel=1e-9, abs=1e-9)
            assert found["ridge"][n, i].item() == pytest.approx(xs[n, i] @ w_ridge, rel=1e-9, abs=1e-9)
            assert found["averaging"][n, i].item() == pytest.approx(xs[n, i] @ (xs[n, :i].T @ ys[n, :i]) / i, rel=1e-9)
    assert torch.all(found["zero"] == 0)


def test_least_squares_is_exact_from_d_shots_on_noiseless_prompts():
    prompts = sample_prompts(400, points=9, dim=4, noise=0.0, seed=1)
    curves = {c.name: c for c in baseline_curves(prompts, ridge=0.1)}
    ls, zero = curves["least_squares"], curves["zero"]
    assert max(ls.mean[4:]) < 1e-10  # k >= d determines w
    assert 0.1 < ls.mean[3] < zero.mean[3]  # below d it guesses the unseen directions as 0
    assert all(0.7 < z < 1.3 for z in zero.mean)  # E[(w.x)^2] / d = 1
    assert ls.mean[1] == pytest.approx(1 - 1 / 4, abs=0.1)  # one shot explains ~1/d of the variance


def test_wrapper_is_a_gpt2_for_svdicl_and_causal():
    model = build(TINY).eval()
    names = [t.module_name for t in resolve(model, "0", "attn,mlp")]
    assert names == [f"transformer.h.0.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    prompts = sample_prompts(3, TINY.points, TINY.dim, 0.0, seed=2)
    before = predict(model, prompts)
    xs, ys = prompts.xs.clone(), prompts.ys.clone()
    xs[:, 3:] += 1.0
    ys[:, 2:] += 1.0  # y_2 comes after x_2, so the prediction at x_2 must not see it
    after = predict(model, linreg.Prompts(xs, prompts.ws, ys))
    assert torch.equal(before[:, :3], after[:, :3])
    assert not torch.allclose(before[:, 3:], after[:, 3:])


def test_training_writes_checkpoints_and_resumes_bit_identically(tmp_path, monkeypatch):
    model, state = train(TINY, tmp_path / "straight", progress=False)
    assert state["step"] == 6 and state["checkpoints"] == [2, 4, 6]
    files = sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir())
    assert files == [*(f"model-000000{s}.safetensors" for s in (2, 4, 6)), "optimizer-0000006.safetensors"]

    real_sample = linreg.sample_prompts
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # step 3 fails: the checkpoint of step 2 is on disk
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(linreg, "sample_prompts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, tmp_path / "resumed", progress=False)
    assert read_state(tmp_path / "resumed")["step"] == 2
    monkeypatch.setattr(linreg, "sample_prompts", real_sample)
    resumed, state = train(TINY, tmp_path / "resumed", progress=False)
    assert state["step"] == 6 and state["checkpoints"] == [2, 4, 6]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    optimizer = load_file(str(tmp_path / "resumed" / "checkpoints" / "optimizer-0000006.safetensors"))
    assert optimizer.keys() == load_file(str(tmp_path / "straight" / "checkpoints" / "optimizer-0000006.safetensors")).keys()
    first = load_file(str(tmp_path / "straight" / "checkpoints" / "model-0000002.safetensors"))
    assert any(not torch.equal(first[n], t) for n, t in model.state_dict().items())  # training moved the weights


def test_a_different_config_in_the_same_folder_is_refused(tmp_path):
    train(TINY, tmp_path, progress=False)
    with pytest.raises(SvdiclError, match=r"different config \(lr\)"):
        train(replace(TINY, lr=0.01), tmp_path, progress=False)
    with pytest.raises(SvdiclError, match="divisible"):
        LinRegConfig(width=10, heads=4).check()


def test_prune_sweep_goes_through_svdicl_and_restores_the_model():
    model = build(TINY).eval()
    prompts = held_out(TINY, 50)
    reference = model_curve("unpruned", model, prompts)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    results = prune_sweep(model, prompts, [0, 1], ["attn", "mlp"], [0.0, 0.9], progress=False)
    assert [(r.layer, r.depth, r.module, r.rate) for r in results[:2]] == [(0, "shallow", "attn", r) for r in (0.0, 0.9)]
    assert results[0].curve.mean == reference.mean  # rate 0 is the unpruned model
    assert results[1].curve.mean != reference.mean
    assert {r.depth for r in results if r.layer == 1} == {"deep"}
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    with svdicl.pruned(model, layers=0, modules="attn", rate=0.9):
        assert model_curve("again", model, prompts).mean == results[1].curve.mean


def test_learned_compares_the_error_at_the_most_shots_with_the_zero_predictor():
    zero = Curve("zero", (1.0, 1.0, 0.9), (0.0, 0.0, 0.0))
    assert learned(Curve("good", (1.0, 0.5, 0.1), (0.0, 0.0, 0.0)), zero)
    assert not learned(Curve("plateau", (1.0, 0.5, 0.8), (0.0, 0.0, 0.0)), zero)


def test_held_out_prompts_are_fixed_by_the_seed_and_apart_from_training():
    a, b = held_out(TINY, 20), held_out(TINY, 20)
    assert torch.equal(a.xs, b.xs)
    other = held_out(replace(TINY, seed=1), 20)
    assert not torch.equal(a.xs, other.xs)
    first_batch = sample_prompts(20, TINY.points, TINY.dim, 0.0, linreg.stream_seed(TINY.seed, "train", 0))
    assert not torch.equal(a.xs, first_batch.xs)


def test_cli_linreg_end_to_end_with_a_yaml_config_then_resume(tmp_path, capsys):
    config = tmp_path / "linreg.yaml"
    settings = {"dim": 3, "points": 5, "layers": 2, "width": 16, "heads": 2, "batch-size": 8, "steps": 4, "warmup": 1}
    config.write_text("\n".join(f"{k}: {v}" for k, v in settings.items()) + "\ncheckpoint_every: 2\n")
    out = tmp_path / "run"
    args = ["-q", "theory", "linreg", "--config", str(config), "--eval-prompts", "30", "--rates", "0.5", "--output", str(out)]
    assert main(args) == 0
    result = json.loads((out / "linreg.json").read_text())
    assert result["config"]["steps"] == 4 and result["config"]["width"] == 16
    assert [c["step"] for c in result["checkpoints"]] == [2, 4]
    assert {b["name"] for b in result["baselines"]} == {"least_squares", "ridge", "averaging", "zero"}
    assert len(result["pruning"]["results"]) == 2 * 2 * 2  # layers 0, 1 x attn, mlp x rates 0, 0.5
    for name in ("curves.csv", "pruning.csv", "linreg-curves.png", "linreg-curves.svg", "linreg-pruning.png", "state.json"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr()
    assert "least_squares" in printed.out
    assert result["learned"] is False and "still on a plateau" in printed.err  # 4 steps learn nothing
    seconds = read_state(out)["train_seconds"]
    assert main(args) == 0  # finished run: nothing to train again
    assert read_state(out)["train_seconds"] == seconds
    assert main([*args, "--steps", "6"]) == 2  # another config in the same folder
    assert main([*args, "--steps", "6", "--overwrite"]) == 0
    assert read_state(out)["step"] == 6


def test_linreg_settings_resolve_the_table_and_refuse_what_cannot_run():
    settings = LinRegSettings(TINY, prune_layers="all", prune_modules="attn, mlp", rates=(0.9,))
    assert (settings.shots, settings.layers, settings.modules, settings.rates) == (
        TINY.points - 1,
        (0, 1),
        ("attn", "mlp"),
        (0.0, 0.9),
    )
    with pytest.raises(SvdiclError, match=rf"--shots {TINY.points} is outside 0..{TINY.points - 1}"):
        LinRegSettings(TINY, shots=TINY.points)
    with pytest.raises(SvdiclError, match="--eval-prompts must be at least 1, not 0"):
        LinRegSettings(TINY, eval_prompts=0)
    with pytest.raises(SvdiclError, match="unknown module 'gate'"):
        LinRegSettings(TINY, prune_modules="gate")
