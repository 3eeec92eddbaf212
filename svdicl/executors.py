"""Where cells are computed: in this process (local, the default) or on Ray worker actors.

The unit of work is a `Line`: the missing cells of one prepared run under the edits of one
layer/module line, which one evaluate_edits call scores so that the layer cache pays.  An
executor takes lines and a work function `work(loaded, line, progress)` that yields one output
per cell, in order, and yields those outputs to the driver as they finish.  The driver alone
writes the store, so a store filled by Ray workers holds what the local executor writes, and
resume works the same way.

    local   the work function in this process, line after line
    ray     N actors, each loads the model once and scores many lines; the line of an actor
            that dies goes to a fresh actor with only the cells not yet received
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from svdicl.errors import SvdiclError
from svdicl.experiments.evaluate import EvalRun
from svdicl.models import ALIASES, LoadedModel, load_model
from svdicl.prune import PruneSpec
from svdicl.store import CellKey

EXECUTORS = ("local", "ray")
DEATHS = 3  # a line whose actor died this often is not resubmitted again (it is what kills them)


@dataclass(frozen=True)
class Line:
    """The cells of one prepared run that one evaluate_edits call scores, in order."""

    run: EvalRun
    cells: tuple[tuple[CellKey, tuple[PruneSpec, ...]], ...]

    def rest(self, done: int) -> Line:
        """The line without its first `done` cells (those already received)."""
        return replace(self, cells=self.cells[done:])


Work = Callable[[LoadedModel, Line, Any], Iterator[Any]]  # (loaded, line, progress bar or None) -> one output per cell


class Executor(Protocol):
    """What scores lines of cells: the local process, or Ray worker actors that each hold a model."""

    def map(self, work: Work, lines: Iterable[Line], progress: Any = None) -> Iterator[Any]:
        """Every output of `work` over `lines`, each as soon as it is there (lines are pulled lazily)."""
        ...

    def close(self) -> None:
        """Release the workers (nothing for the local executor)."""


@dataclass(frozen=True)
class LocalExecutor:
    """Lines one after another in this process, on the driver's model; the progress bar moves per batch."""

    loaded: LoadedModel

    def map(self, work: Work, lines: Iterable[Line], progress: Any = None) -> Iterator[Any]:
        """Run `work` on each line in this process, in order."""
        for line in lines:
            yield from work(self.loaded, line, progress)

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""


@dataclass(frozen=True)
class RaySettings:
    """How the Ray executor runs; None fields are chosen from the cluster's resources (`ray_plan`)."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise SvdiclError(f"--workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise SvdiclError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker:g}")


@dataclass(frozen=True)
class RayPlan:
    """Actors and what each asks of the cluster: `threads` torch threads on `cpus` CPUs and `gpus` GPUs."""

    workers: int
    threads: int
    cpus: float
    gpus: float


def ray_plan(settings: RaySettings, cpus: float, gpus: float, node_cpus: float, device: str) -> RayPlan:
    """Workers: as given, else one per `gpus_per_worker` GPUs, else one per CPU; each gets an equal share of the
    CPUs (at most one node's) as torch threads, so workers sharing a machine do not fight over its cores."""
    per_worker_gpus = settings.gpus_per_worker
    if per_worker_gpus is None:
        per_worker_gpus = 1.0 if device.startswith("cuda") else 0.0
    if per_worker_gpus > gpus:
        raise SvdiclError(
            f"Ray workers would need {per_worker_gpus:g} GPUs each (--gpus-per-worker, 1 by default with --device cuda) "
            f"but the cluster has {gpus:g}; lower --gpus-per-worker or use --device cpu"
        )
    workers = settings.workers or (int(gpus // per_worker_gpus) if per_worker_gpus else max(1, int(cpus)))
    if per_worker_gpus * workers > gpus:
        raise SvdiclError(f"{workers} workers x {per_worker_gpus:g} GPUs exceed the cluster's {gpus:g} GPUs; use fewer --workers")
    share = min(cpus / workers, node_cpus)
    threads = max(1, int(share))
    return RayPlan(workers, threads, float(threads) if share >= 1 else share, per_worker_gpus)


def import_ray():
    """The ray module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise SvdiclError('the Ray executor needs ray: pip install "svdicl[ray]"') from None
    return ray


class _Worker:
    """A Ray actor: loads the model once, then scores the lines it is sent (a generator per line).

    A load failure is kept and raised by `score`, so the driver sees the error itself rather than
    an actor that died in its constructor (which would read as a lost worker and be retried)."""

    def __init__(self, model: Mapping[str, Any], fingerprint: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.failure: Exception | None = None
        try:
            self.loaded = load_model(**model)
            if self.loaded.fingerprint != fingerprint:
                raise SvdiclError(
                    f"a Ray worker loaded other weights from {model['source']!r} than the driver (fingerprint "
                    f"{self.loaded.fingerprint[:12]} vs {fingerprint[:12]}); give a model every node reads the same"
                )
        except Exception as exc:
            self.failure = exc

    def ready(self) -> None:
        if self.failure is not None:
            raise self.failure

    def score(self, work: Work, line: Line) -> Iterator[Any]:
        self.ready()
        yield from work(self.loaded, line, None)


@dataclass
class _Task:
    actor: Any
    line: Line
    received: int = 0


@dataclass
class RayExecutor:
    """Lines spread over worker actors that each hold the model; outputs stream back cell by cell.

    `model` holds the keyword arguments of `load_model` (the same alias, path or Hub id the driver
    loaded); `fingerprint` is the driver's, which every worker's weights must match.  Connects to
    `settings.address` or starts a local cluster, unless Ray is already initialised (then it uses
    that and leaves it running on close).
    """

    model: Mapping[str, Any]
    fingerprint: str
    settings: RaySettings = field(default_factory=RaySettings)
    plan: RayPlan = field(init=False)
    actors: list[Any] = field(init=False, default_factory=list)
    running: dict[Any, _Task] = field(init=False, default_factory=dict)  # streaming generator -> its task
    restarts: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        ray = import_ray()
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            options = {"address": self.settings.address} if self.settings.address else {"include_dashboard": False}
            ray.init(**options, logging_level="ERROR", log_to_driver=False)  # errors come back as exceptions
        try:
            self._plan(ray)
        except SvdiclError:
            self.close()
            raise
        self.actors = [self._start() for _ in range(self.plan.workers)]

    def _plan(self, ray) -> None:
        resources = ray.cluster_resources()
        node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=0.0)
        paths = {
            k: str(Path(v).resolve())
            for k in ("source", "cache_dir", "offload_folder")
            if (v := self.model.get(k)) and v not in ALIASES and Path(v).exists()
        }
        self.model = {**self.model, **paths}  # workers need not share the driver's working directory
        device = str(self.model.get("device", "cpu"))
        self.plan = ray_plan(self.settings, resources.get("CPU", 1.0), resources.get("GPU", 0.0), node_cpus or 1.0, device)
        if self.plan.gpus:  # each actor sees only its own GPUs, so `cuda:1` would name one it does not have
            self.model = {**self.model, "device": "cuda" if device.startswith("cuda") else device}
        self._actor_class = ray.remote(num_cpus=self.plan.cpus, num_gpus=self.plan.gpus, max_restarts=0)(_Worker)

    def _start(self) -> Any:
        return self._actor_class.remote(self.model, self.fingerprint, self.plan.threads)

    def map(self, work: Work, lines: Iterable[Line], progress: Any = None) -> Iterator[Any]:
        """Run `work` on the lines across the worker actors, resubmitting a dead worker's unfinished lines."""
        ray = import_ray()
        for index, actor in enumerate(self.actors):  # the workers load at once; a model they cannot load stops here
            try:
                ray.get(actor.ready.remote())
            except ray.exceptions.RayTaskError as exc:
                raise exc.cause from None
            except ray.exceptions.RayActorError:  # lost since the last call: a fresh one takes its place
                self.actors[index] = self._start()
                self.restarts += 1
        lines, queue, deaths = iter(lines), deque(), {}
        self.running = {}  # what an abandoned earlier call left is not this call's

        def submit(actor: Any) -> None:
            line = queue.popleft() if queue else next(lines, None)
            if line is not None:
                self.running[actor.score.remote(work, line)] = _Task(actor, line)

        for actor in self.actors:
            submit(actor)
        while self.running:
            (generator,), _ = ray.wait(list(self.running), num_returns=1)
            task = self.running[generator]
            try:
                output = ray.get(next(generator))
            except StopIteration:
                del self.running[generator]
                submit(task.actor)
                continue
            except ray.exceptions.RayActorError:
                del self.running[generator]
                rest = task.line.rest(task.received)
                if rest.cells:
                    first = rest.cells[0][0]
                    deaths[first] = deaths.get(first, 0) + 1
                    if deaths[first] >= DEATHS:
                        raise SvdiclError(
                            f"Ray workers died {DEATHS} times scoring {first.task} {first.split} {first.edit}; "
                            "check the workers' memory (a larger --gpus-per-worker or fewer --workers)"
                        ) from None
                    queue.appendleft(rest)
                self.restarts += 1
                self.actors[self.actors.index(task.actor)] = replacement = self._start()
                submit(replacement)
                continue
            except ray.exceptions.RayTaskError as exc:
                raise exc.cause from None
            task.received += 1
            yield output

    def close(self) -> None:
        """Kill the worker actors and shut Ray down if this executor started it."""
        ray = import_ray()
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.running = [], {}
        if self._owns_ray:
            ray.shutdown()


def open_executor(
    name: str,
    loaded: LoadedModel,
    model: Mapping[str, Any] | None = None,
    settings: RaySettings | None = None,
) -> Executor:
    """The executor `name`: local on `loaded`, or Ray workers that load `model` (load_model's keyword arguments)."""
    if name == "local":
        return LocalExecutor(loaded)
    if name == "ray":
        model = dict(model or {"source": loaded.source, "dtype": loaded.dtype})
        return RayExecutor(model, loaded.fingerprint, settings or RaySettings())
    raise SvdiclError(f"unknown executor {name!r}; use {' or '.join(EXECUTORS)}")
