"""In-context linear regression (Garg et al. 2022; the paper's Fig. 5): train, evaluate, prune.

A prompt holds k pairs (x_i, y_i) with x_i ~ N(0, I_d), w ~ N(0, I_d), y_i = w . x_i (+ noise),
as 2k interleaved tokens x_1, y_1, x_2, y_2, ... of width d + 1: [x_i, 0] and [y_i, 0, ..., 0, 1]
(Garg et al.'s layout plus a last coordinate that flags labels).  A GPT-2 backbone with a
linear read-in and read-out predicts y_i at the token x_i, so the prediction at x_i has seen
i shots.  The loss is the squared error at every x position.

Everything the run needs is on disk: checkpoints as safetensors and a JSON state.  The training
batch of step s is drawn from its own seed (run seed, "train", s), so a run resumed from any
checkpoint makes exactly the same steps as one that never stopped.  The held-out prompts come
from a separate stream of the same seed.

Errors are reported as squared error / d, so the zero predictor scores about 1 at every shot.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from svdicl.errors import SvdiclError
from svdicl.files import replaced, write_atomic
from svdicl.prune import pruned
from svdicl.theory.norms import RATES

STATE_FILE = "state.json"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class LinRegConfig:
    """Everything that decides the trained weights; a rerun resumes only under the same config."""

    dim: int = 5
    points: int = 11  # (x, y) pairs per prompt: predictions after 0 .. points-1 shots
    layers: int = 6
    width: int = 64
    heads: int = 4
    batch_size: int = 64
    steps: int = 8000
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    noise: float = 0.0  # std of the label noise
    checkpoint_every: int = 500
    seed: int = 0

    def check(self) -> LinRegConfig:
        """Raise a one-line error for a setting that cannot train."""
        positive = ("dim", "points", "layers", "width", "heads", "batch_size", "steps", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise SvdiclError(f"linreg {name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.width % self.heads:
            raise SvdiclError(f"width {self.width} is not divisible by {self.heads} heads; pick e.g. --width {self.heads * 32}")
        if not 0 < self.lr < 1 or min(self.warmup, self.noise, self.weight_decay, self.seed) < 0:
            raise SvdiclError("lr must be in (0, 1) and warmup, noise, weight-decay and seed non-negative")
        return self


class InContextRegressor(nn.Module):
    """GPT-2 backbone between linear read-in/read-out layers.

    `.config` (a GPT2Config, model_type "gpt2") and `.transformer` (the GPT2Model) follow the
    layout of transformers' GPT-2 models, so svdicl's targets and `pruned(...)` work on it as on
    any GPT-2: `transformer.h.<l>.attn.c_attn`, `...mlp.c_fc`, ...
    """

    def __init__(self, config: LinRegConfig) -> None:
        from transformers import GPT2Config, GPT2Model

        super().__init__()
        self.config = GPT2Config(
            vocab_size=1,  # inputs come through read_in, never through token ids
            n_positions=2 * config.points,
            n_embd=config.width,
            n_layer=config.layers,
            n_head=config.heads,
            activation_function="gelu",  # torch's own kernel; GPT-2's default tanh approximation runs in Python
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.transformer = GPT2Model(self.config)
        with torch.no_grad():  # sinusoidal start for the learned positions: a previous-token head is then easy to learn
            self.transformer.wpe.weight.copy_(sinusoidal_positions(2 * config.points, config.width))
        self.read_in = nn.Linear(config.dim + 1, config.width)
        self.read_out = nn.Linear(config.width, 1)

    def forward(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Predictions (B, k) of every y_i from x_1, y_1, ..., x_i.

        Tokens have d + 1 coordinates: x tokens are [x, 0]; y tokens are [y, 0, ..., 0, 1], the
        last coordinate flagging a label so the model need not learn to tell them apart by position.
        """
        batch, points, dim = xs.shape
        x_tokens = torch.cat([xs, xs.new_zeros(batch, points, 1)], dim=-1)
        y_tokens = xs.new_zeros(batch, points, dim + 1)
        y_tokens[..., 0] = ys
        y_tokens[..., -1] = 1.0
        tokens = torch.stack([x_tokens, y_tokens], dim=2).reshape(batch, 2 * points, dim + 1)  # x_1, y_1, x_2, ...
        hidden = self.transformer(inputs_embeds=self.read_in(tokens)).last_hidden_state
        return self.read_out(hidden[:, ::2]).squeeze(-1)


def sinusoidal_positions(count: int, width: int) -> torch.Tensor:
    """Vaswani et al.'s position codes (count, width): sin and cos of position / 10000^(2i / width)."""
    position = torch.arange(count, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(-math.log(10000.0) * torch.arange(0, width, 2, dtype=torch.float32) / width)
    codes = torch.zeros(count, width)
    codes[:, 0::2] = torch.sin(position * frequency)
    codes[:, 1::2] = torch.cos(position * frequency[: width // 2])
    return codes


def stream_seed(seed: int, stream: str, index: int = 0) -> int:
    """A torch seed for (run seed, stream, index), statistically independent across all three."""
    words = [seed, int.from_bytes(stream.encode(), "little") % (1 << 32), index]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Prompts:
    """A batch of regression prompts: inputs xs, the task vectors ws, targets ys = xs @ ws (+ noise)."""

    xs: torch.Tensor  # (N, k, d)
    ws: torch.Tensor  # (N, d)
    ys: torch.Tensor  # (N, k)


def sample_prompts(count: int, points: int, dim: int, noise: float, seed: int) -> Prompts:
    """`count` regression prompts from one generator seed (float32)."""
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(count, points, dim, generator=gen)
    ws = torch.randn(count, dim, generator=gen)
    ys = torch.einsum("nkd,nd->nk", xs, ws) + noise * torch.randn(count, points, generator=gen)
    return Prompts(xs, ws, ys)


def held_out(config: LinRegConfig, count: int) -> Prompts:
    """The fixed evaluation prompts of a run: a stream no training step draws from."""
    return sample_prompts(count, config.points, config.dim, config.noise, stream_seed(config.seed, "eval"))


def learning_rate(config: LinRegConfig, step: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak; a function of the step only (resumable)."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def build(config: LinRegConfig) -> InContextRegressor:
    """A freshly initialised model: the init is drawn from the run seed's "init" stream (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(config.seed, "init"))
        return InContextRegressor(config)


def _optimizer(model: nn.Module, config: LinRegConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with replaced(path) as partial:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(partial))


def checkpoint_path(output: Path, step: int) -> Path:
    """The checkpoint file of training step `step`."""
    return output / CHECKPOINTS / f"model-{step:07d}.safetensors"


def _optimizer_path(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"optimizer-{step:07d}.safetensors"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"{index}.{name}": value for index, state in optimizer.state_dict()["state"].items() for name, value in state.items()}


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def read_state(output: str | Path) -> dict | None:
    """The run's JSON state, or None for a folder without a run."""
    path = Path(output) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _start(config: LinRegConfig, output: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Resume from the last checkpoint in `output`, or a fresh state; refuse a run of another config."""
    state = read_state(output)
    if state is None:
        seeds = {
            "rule": "torch seed of (stream, index) = SeedSequence([seed, int.from_bytes(stream, 'little') % 2**32, index])"
            ".generate_state(1, uint64)[0] >> 1; the training batch of step s is ('train', s)",
            "init": stream_seed(config.seed, "init"),
            "eval": stream_seed(config.seed, "eval"),
            "train_step_0": stream_seed(config.seed, "train", 0),
        }
        return {"config": asdict(config), "seeds": seeds, "step": 0, "checkpoints": [], "loss": [], "train_seconds": 0.0}
    if state["config"] != asdict(config):
        changed = sorted(k for k in state["config"] if state["config"][k] != asdict(config).get(k))
        raise SvdiclError(
            f"{output} holds a linreg run with a different config ({', '.join(changed)}); use a new --output or --overwrite"
        )
    step = state["step"]
    if step:
        model.load_state_dict(load_file(str(checkpoint_path(output, step))))
        _load_optimizer(optimizer, _optimizer_path(output, step))
    return state


def train(config: LinRegConfig, output: str | Path, *, progress: bool = True) -> tuple[InContextRegressor, dict]:
    """Train (or resume) the run in `output`; returns the final model and the JSON state.

    A checkpoint every `checkpoint_every` steps and at the end: the model, the optimizer (only
    the latest is kept) and state.json, written in that order, each atomically.
    """
    config.check()
    output = Path(output)
    (output / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    model = build(config).train()
    optimizer = _optimizer(model, config)
    state = _start(config, output, model, optimizer)
    bar = tqdm(total=config.steps, initial=state["step"], desc="linreg train", unit="step", file=sys.stderr, disable=not progress)
    started, running = time.perf_counter(), []
    for step in range(state["step"], config.steps):
        batch = sample_prompts(
            config.batch_size, config.points, config.dim, config.noise, stream_seed(config.seed, "train", step)
        )
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss = (model(batch.xs, batch.ys) - batch.ys).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running.append(loss.item())
        bar.update(1)
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            bar.set_postfix(loss=f"{np.mean(running) / config.dim:.4f}")
            state["loss"].append([done, float(np.mean(running)) / config.dim])
            running = []
            _checkpoint(output, model, optimizer, state, done, time.perf_counter() - started)
            started = time.perf_counter()
    bar.close()
    return model.eval(), state


def _checkpoint(output: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, step: int, seconds: float) -> None:
    previous = state["step"]
    _atomic_save(model.state_dict(), checkpoint_path(output, step))
    _atomic_save(_optimizer_tensors(optimizer), _optimizer_path(output, step))
    state.update(step=step, checkpoints=[*state["checkpoints"], step], train_seconds=state["train_seconds"] + seconds)
    write_atomic(output / STATE_FILE, json.dumps(state, indent=2) + "\n")
    if previous:
        _optimizer_path(output, previous).unlink(missing_ok=True)


def load_checkpoint(config: LinRegConfig, output: str | Path, step: int) -> InContextRegressor:
    """The model saved at `step`, in eval mode."""
    path = checkpoint_path(Path(output), step)
    if not path.is_file():
        raise SvdiclError(f"no checkpoint for step {step} in {output}; train first or pick a step from state.json")
    model = InContextRegressor(config)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@dataclass(frozen=True)
class Curve:
    """Squared error / d against the number of shots (index = shots), mean and standard error over prompts."""

    name: str
    mean: tuple[float, ...]
    stderr: tuple[float, ...]

    @classmethod
    def of(cls, name: str, errors: torch.Tensor) -> Curve:
        """From per-prompt errors (N, k)."""
        errors = errors.double()
        stderr = errors.std(dim=0) / math.sqrt(errors.shape[0])
        return cls(name, tuple(errors.mean(dim=0).tolist()), tuple(stderr.tolist()))


@torch.no_grad()
def predict(model: InContextRegressor, prompts: Prompts, batch_size: int = 1000) -> torch.Tensor:
    """Model predictions (N, k) at every shot count."""
    parts = [model(prompts.xs[i : i + batch_size], prompts.ys[i : i + batch_size]) for i in range(0, len(prompts.xs), batch_size)]
    return torch.cat(parts)


def model_curve(name: str, model: InContextRegressor, prompts: Prompts) -> Curve:
    """The model's squared error per shot, normalised by the dimension."""
    return Curve.of(name, (predict(model, prompts) - prompts.ys).square() / prompts.xs.shape[-1])


def baseline_predictions(prompts: Prompts, ridge: float) -> dict[str, torch.Tensor]:
    """Predictions (N, k) of least squares (minimum-norm below d shots), ridge, averaging and zero."""
    xs, ys = prompts.xs.double(), prompts.ys.double()
    count, points, dim = xs.shape
    found = {name: torch.zeros(count, points, dtype=torch.float64) for name in ("least_squares", "ridge", "averaging", "zero")}
    for i in range(1, points):
        x, y, query = xs[:, :i], ys[:, :i], xs[:, i]
        w_ls = torch.linalg.pinv(x) @ y.unsqueeze(-1)  # (N, d, 1), the minimum-norm solution when i < d
        gram = x.transpose(1, 2) @ x + ridge * torch.eye(dim, dtype=torch.float64)
        w_ridge = torch.linalg.solve(gram, x.transpose(1, 2) @ y.unsqueeze(-1))
        w_avg = (x * y.unsqueeze(-1)).mean(dim=1, keepdim=True).transpose(1, 2)
        for name, w in (("least_squares", w_ls), ("ridge", w_ridge), ("averaging", w_avg)):
            found[name][:, i] = (query.unsqueeze(1) @ w).reshape(count)
    return found


def baseline_curves(prompts: Prompts, ridge: float) -> list[Curve]:
    """Least squares, ridge and averaging baselines' squared error per shot, normalised by the dimension."""
    dim = prompts.xs.shape[-1]
    predictions = baseline_predictions(prompts, ridge)
    return [Curve.of(name, (pred - prompts.ys.double()).square() / dim) for name, pred in predictions.items()]


def learned(model: Curve, zero: Curve, fraction: float = 0.25) -> bool:
    """Has training left the plateau? Error at the most shots below `fraction` of the zero predictor's.

    Training in this setting sits on plateaus (first at the zero predictor, loss ~1) for a
    seed-dependent number of steps; a model still on one says nothing about pruning.
    """
    return model.mean[-1] < fraction * zero.mean[-1]


@dataclass(frozen=True)
class PruneResult:
    """The trained model's error curve with one layer's module truncated at one rate."""

    layer: int
    depth: str  # "shallow" (first half of the layers) or "deep"
    module: str
    rate: float
    curve: Curve


def prune_sweep(
    model: InContextRegressor,
    prompts: Prompts,
    layers: Sequence[int],
    modules: Sequence[str] = ("attn", "mlp"),
    rates: Sequence[float] = RATES,
    *,
    progress: bool = True,
) -> list[PruneResult]:
    """Error curves with each (layer, module) truncated at each rate, through svdicl's own `pruned`."""
    total = model.config.n_layer
    cells = [(layer, module, rate) for layer in layers for module in modules for rate in rates]
    results = []
    for layer, module, rate in tqdm(cells, desc="linreg prune", unit="cell", file=sys.stderr, disable=not progress):
        with pruned(model, layers=layer, modules=module, rate=rate):
            curve = model_curve(f"L{layer} {module} {rate:g}", model, prompts)
        results.append(PruneResult(layer, "shallow" if layer < total / 2 else "deep", module, rate, curve))
    return results
