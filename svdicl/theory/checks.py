"""The three theory checks as library calls: settings checked first, then the numbers computed and returned.

`svdicl theory lemma1 | norms | linreg` builds the settings from its flags, calls `lemma1_check`,
`norms_check` or `linreg_check`, prints what they return and writes it (each result has `ok`,
`to_json()` for its JSON file and its CSV tables; the figures are theory/figures.py's).  Every
settings class refuses a bad value when it is made, before any folder is touched or any model
loaded.  A linreg run lives in its folder (checkpoints, state.json): `linreg_folder` holds it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from svdicl.errors import SvdiclError
from svdicl.specs import check_rate
from svdicl.theory.lemma1 import PERTURBED, Draw, draw_one
from svdicl.theory.lemma1 import summarize as summarize_lemma1
from svdicl.theory.linreg import Curve, LinRegConfig, PruneResult
from svdicl.theory.norms import RATES, NormRow, random_sweep
from svdicl.theory.norms import summarize as summarize_norms

Log = Callable[[str], None]
Table = tuple[list[str], list[list]]  # a CSV's headers and rows


def _quiet(line: str) -> None:
    """A log that drops its lines."""


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise SvdiclError(f"--{name.replace('_', '-')} must be at least 1, not {value}")


def _rates(rates: Sequence[float]) -> tuple[float, ...]:
    """Checked clipping rates, sorted, with 0 (the unpruned reference) always in."""
    return tuple(sorted({0.0, *(check_rate(r) for r in rates)}))


def output_folder(path: str | Path) -> Path:
    """The folder a check writes to, created; a one-line error if it is a file."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SvdiclError(f"--output {folder} is a file; give a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass(frozen=True)
class Lemma1Settings:
    """Random draws of Lemma 1 / Theorem 1: how many, their seed, width d, stack depth, demonstrations, tolerance."""

    draws: int = 100
    seed: int = 0
    dim: int = 8
    layers: int = 4
    max_demos: int = 16
    tolerance: float = 1e-10

    def __post_init__(self) -> None:
        _positive(draws=self.draws, dim=self.dim, layers=self.layers, max_demos=self.max_demos)
        if not 0 <= self.tolerance < float("inf"):  # NaN fails this too: every comparison with it is false
            raise SvdiclError(f"--tolerance must be a finite number >= 0, not {self.tolerance}")


@dataclass(frozen=True)
class Lemma1Check:
    """Every draw's errors and ranks, and the summary of each claim."""

    settings: Lemma1Settings
    draws: tuple[Draw, ...]
    summary: dict

    @property
    def ok(self) -> bool:
        """Lemma 1, Theorem 1, the rank bound and locality hold, and every perturbed construction fails."""
        s = self.summary
        return (
            s["lemma1_holds"]
            and s["theorem1_holds"]
            and s["perturbed_all_fail"]
            and s["rank_bound_holds"]
            and s["locality_holds"]
        )

    def to_json(self) -> dict:
        """lemma1.json: the settings, the summary and every draw."""
        return {
            "check": "lemma1",
            "settings": asdict(self.settings),
            "summary": self.summary,
            "draws": [asdict(d) for d in self.draws],
        }

    def table(self) -> Table:
        """lemma1.csv: a row per draw, with every perturbed construction's errors."""
        names = list(PERTURBED)
        headers = ["draw", "n_demos", "query_tokens", "lemma1_error", "theorem1_error"]
        headers += [f"perturbed_{kind}_{n}" for kind in ("lemma1", "theorem1") for n in names] + ["ranks", "pruned_layer"]
        rows = [
            [
                d.draw, d.n_demos, d.query_tokens, d.lemma1_error, d.theorem1_error,
                *(d.perturbed_lemma1[n] for n in names), *(d.perturbed_theorem1[n] for n in names),
                " ".join(map(str, d.ranks)), d.pruned_layer,
            ]
            for d in self.draws
        ]  # fmt: skip
        return headers, rows


def lemma1_check(settings: Lemma1Settings) -> Lemma1Check:
    """Check Lemma 1 / Theorem 1 (and the perturbed constructions) on `settings.draws` random draws."""
    s = settings
    draws = tuple(draw_one(i, seed=s.seed, dim=s.dim, layers=s.layers, max_demos=s.max_demos) for i in range(s.draws))
    return Lemma1Check(settings, draws, summarize_lemma1(draws, s.dim, s.tolerance))


@dataclass(frozen=True)
class NormsSettings:
    """Examples 1-4: random blocks (`draws` of width `dim` over `demos` tokens) and, unless `task` is None, a real
    model's `layers` with X' = a demonstrations block of `task` (`shots` per class, default the task's; seed `seed`)."""

    draws: int = 100
    seed: int = 0
    dim: int = 64
    demos: int = 32
    rates: tuple[float, ...] = RATES
    task: str | None = "sst2"
    shots: int | None = None
    layers: str = "all"
    data_dir: str | Path | None = None
    device: str = "cpu"  # where the demonstration tokens go: the model's --device

    def __post_init__(self) -> None:
        from svdicl.tasks import get_task

        _positive(draws=self.draws, dim=self.dim, demos=self.demos)
        object.__setattr__(self, "rates", _rates(self.rates))
        if self.task is not None:
            shots = get_task(self.task).shots if self.shots is None else self.shots
            if shots < 1:
                raise SvdiclError("--shots must be at least 1: the norms need a demonstrations block")


@dataclass(frozen=True)
class NormsCheck:
    """Every (source, layer or draw, example, rate) row, the summary per source and the settings recorded."""

    rows: tuple[NormRow, ...]
    rates: tuple[float, ...]
    summary: dict  # source -> norms.summarize of its rows
    settings: dict  # NormsSettings' numbers and, for a real model, what identifies it and its demonstrations

    @property
    def ok(self) -> bool:
        """Every bound curve never rises and every exact norm is within its bound, in every source."""
        return all(
            all(f == 1.0 for f in s["bound_non_increasing"].values()) and s["exact_within_bound"] for s in self.summary.values()
        )

    def to_json(self) -> dict:
        """norms.json: the settings and the summary per source."""
        return {"check": "norms", "settings": self.settings, "summary": self.summary}

    def table(self) -> Table:
        """norms.csv: every row."""
        columns = list(NormRow.__dataclass_fields__)
        return columns, [[getattr(r, c) for c in columns] for r in self.rows]


def norms_check(
    settings: NormsSettings, *, load: Callable[[], object] | None = None, progress: bool = True, log: Log = _quiet
) -> NormsCheck:
    """Check Examples 1-4 on random blocks and (with a `task`) on the model `load` returns, called once the
    demonstrations are ready."""
    s = settings
    log(f"random blocks: {s.draws} draws, d = {s.dim}, {s.demos} demonstration tokens")
    rows = random_sweep(s.draws, seed=s.seed, dim=s.dim, demos=s.demos, rates=s.rates)
    recorded = {"seed": s.seed, "draws": s.draws, "dim": s.dim, "demos": s.demos, "rates": list(s.rates)}
    if s.task is not None:
        if load is None:
            raise SvdiclError("the norms of a real model need the model: give `load`, or no task for random blocks only")
        found, details = _model_norms(s, load, progress, log)
        rows += found
        recorded |= details
    sources = list(dict.fromkeys(r.source for r in rows))
    summary = {source: summarize_norms([r for r in rows if r.source == source], s.rates) for source in sources}
    return NormsCheck(tuple(rows), s.rates, summary, recorded)


def _model_norms(settings: NormsSettings, load: Callable[[], object], progress: bool, log: Log) -> tuple[list[NormRow], dict]:
    """Examples 1-4 on a real model's layers, X' = the hidden states of one demonstrations block; and what to record."""
    import torch

    from svdicl.prompts import demonstrations_text, sample_demonstrations
    from svdicl.targets import layer_stack, parse_layers
    from svdicl.tasks import get_task
    from svdicl.tasks.data import load_splits
    from svdicl.theory.norms import model_sweep

    task = get_task(settings.task)
    shots = task.shots if settings.shots is None else settings.shots
    splits = load_splits(task, settings.data_dir)
    text = demonstrations_text(task, sample_demonstrations(task, splits.demonstrations, shots, settings.seed))
    loaded = load()
    _, stack = layer_stack(loaded.model)
    layers = parse_layers(settings.layers, len(stack))
    input_ids = torch.tensor([loaded.tokenizer(text, add_special_tokens=True)["input_ids"]], device=settings.device)
    log(f"{loaded.source}: {input_ids.shape[1]} demonstration tokens of {task.name} ({shots} per class, seed {settings.seed})")
    rows = model_sweep(loaded.model, input_ids, layers, settings.rates, source=loaded.source, progress=progress)
    details = {
        "model": loaded.source,
        "fingerprint": loaded.fingerprint,
        "task": task.name,
        "shots_per_class": shots,
        "demonstration_tokens": int(input_ids.shape[1]),
        "layers": layers,
        "demonstrations": text,
    }
    return rows, details


@dataclass(frozen=True)
class LinRegSettings:
    """A linreg run: the training `config`, held-out prompts, the ridge baseline's lambda, what to prune (each layer
    of `prune_layers` x each module group of `prune_modules` x each rate) and at how many shots the table reads it."""

    config: LinRegConfig = field(default_factory=LinRegConfig)
    eval_prompts: int = 2000
    ridge: float = 0.1
    prune_layers: str = "first2,last2"
    prune_modules: str = "attn,mlp"
    rates: tuple[float, ...] = RATES
    shots: int | None = None  # None: the most there are, points - 1
    threads: int = 1  # torch CPU threads: one is fastest for a model this small
    layers: tuple[int, ...] = field(init=False)  # prune_layers, resolved
    modules: tuple[str, ...] = field(init=False)  # prune_modules, split

    def __post_init__(self) -> None:
        from svdicl.targets import parse_layers, resolve
        from svdicl.theory.linreg import build

        config = self.config.check()
        _positive(eval_prompts=self.eval_prompts, threads=self.threads)
        object.__setattr__(self, "rates", _rates(self.rates))
        object.__setattr__(self, "layers", tuple(parse_layers(self.prune_layers, config.layers)))
        object.__setattr__(self, "modules", tuple(m.strip() for m in self.prune_modules.split(",") if m.strip()))
        shots = config.points - 1 if self.shots is None else self.shots
        if not 0 <= shots < config.points:
            raise SvdiclError(f"--shots {shots} is outside 0..{config.points - 1} (prompts hold {config.points} points)")
        object.__setattr__(self, "shots", shots)
        for module in self.modules:
            resolve(build(config), ",".join(map(str, self.layers)), module)


@dataclass(frozen=True)
class LinRegCheck:
    """A finished linreg run: the curve of every checkpoint, the baselines and the pruned curves."""

    settings: LinRegSettings
    training: dict  # step, train_seconds, loss, checkpoints: from the run's state.json
    checkpoints: tuple[tuple[int, Curve], ...]  # (step, curve), the last one the final model
    baselines: tuple[Curve, ...]
    results: tuple[PruneResult, ...]
    seconds: float  # this call's, training included

    @property
    def final(self) -> Curve:
        """The trained model's curve."""
        return self.checkpoints[-1][1]

    def baseline(self, name: str) -> Curve:
        """The baseline curve `name`: least_squares, ridge, averaging or zero."""
        return next(c for c in self.baselines if c.name == name)

    @property
    def learned(self) -> bool:
        """Has training left the plateau (linreg.learned)?  If not, the pruning table says little."""
        from svdicl.theory.linreg import learned

        return learned(self.final, self.baseline("zero"))

    def to_json(self) -> dict:
        """linreg.json: the config, training, every curve and the pruning results."""
        settings = self.settings
        return {
            "check": "linreg",
            "config": asdict(settings.config),
            "metric": "squared error / d on held-out prompts; stderr = std / sqrt(prompts); 95% CI = mean +- 1.96 stderr",
            "eval_prompts": settings.eval_prompts,
            "ridge": settings.ridge,
            "training": self.training,
            "checkpoints": [{"step": step, **asdict(c)} for step, c in self.checkpoints],
            "baselines": [asdict(c) for c in self.baselines],
            "learned": self.learned,
            "pruning": {"shots": settings.shots, "rates": list(settings.rates), "results": [asdict(r) for r in self.results]},
        }

    def tables(self) -> dict[str, Table]:
        """curves.csv (every checkpoint and baseline per shot) and pruning.csv (every pruned curve per shot)."""
        points = range(self.settings.config.points)
        curves = [[f"step {step}", "model", k, c.mean[k], c.stderr[k]] for step, c in self.checkpoints for k in points]
        curves += [[c.name, "baseline", k, c.mean[k], c.stderr[k]] for c in self.baselines for k in points]
        pruning = [
            [r.layer, r.depth, r.module, r.rate, k, r.curve.mean[k], r.curve.stderr[k]] for r in self.results for k in points
        ]
        return {
            "curves.csv": (["curve", "kind", "shots", "mean_sq_error_over_d", "stderr"], curves),
            "pruning.csv": (["layer", "depth", "module", "rate", "shots", "mean_sq_error_over_d", "stderr"], pruning),
        }


@contextlib.contextmanager
def linreg_folder(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Hold `output` for one linreg run (a second one at the same time is refused): created, or resumed, or with
    `overwrite` cleared of what svdicl wrote there (refused before it is touched when it holds anything else).
    When the block ends without an error, every file in it is recorded as svdicl's."""
    from svdicl.outputs import check_clearable, clear_output, exclusive, finish_output, is_empty, reopen_output

    if overwrite and not is_empty(output):
        check_clearable(Path(output))
    with exclusive(output, "theory linreg") as folder:
        if overwrite and not is_empty(folder):
            clear_output(folder)  # only what svdicl wrote there (its manifest); never a folder it did not write
        yield reopen_output(folder)
        finish_output(folder)


def linreg_check(settings: LinRegSettings, folder: str | Path, *, progress: bool = True, log: Log = _quiet) -> LinRegCheck:
    """Train (or resume) the in-context linear regression model in `folder` (see `linreg_folder`), evaluate every
    checkpoint and the baselines on held-out prompts, and prune the trained model."""
    import torch

    from svdicl.theory.linreg import baseline_curves, held_out, load_checkpoint, model_curve, prune_sweep, train

    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    config, folder = settings.config, Path(folder)
    model, state = train(config, folder, progress=progress)
    log(f"training: {state['step']} steps, {state['train_seconds']:.0f} s of training time in total")
    prompts = held_out(config, settings.eval_prompts)
    baselines = baseline_curves(prompts, settings.ridge)
    checkpoints = [
        (step, model_curve(f"step {step}", load_checkpoint(config, folder, step), prompts)) for step in state["checkpoints"]
    ]
    results = prune_sweep(model, prompts, settings.layers, settings.modules, settings.rates, progress=progress)
    training = {k: state[k] for k in ("step", "train_seconds", "loss", "checkpoints")}
    seconds = time.perf_counter() - started
    return LinRegCheck(settings, training, tuple(checkpoints), tuple(baselines), tuple(results), seconds)


def spread(items: Sequence, count: int) -> list:
    """At most `count` items, evenly spaced, always with the last."""
    if len(items) <= count:
        return list(items)
    picks = sorted({round(i * (len(items) - 1) / (count - 1)) for i in range(count)})
    return [items[i] for i in picks]
