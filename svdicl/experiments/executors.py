"""Where cells are computed: in this process (local, the default) or on Ray worker actors.

The unit of work is a `Job`: the missing cells of one prepared run under the edits of one
layer/module line of a sweep, which one evaluate_edits call scores so that the layer cache pays.  An
executor takes jobs and a work function `work(loaded, job, progress)` that yields one output
per cell, in order, and yields those outputs to the driver as they finish.  The driver alone
writes the store, so a store filled by Ray workers holds what the local executor writes, and
resume works the same way.

    local   N single-threaded worker processes (default: the free cores, svdicl.threads), each
            loads the model once and scores many jobs; with one worker (or a model only in
            memory) the jobs run in this process, on the driver's model
    ray     N actors, each loads the model once and scores many jobs

Either way the job of a worker that dies goes to a fresh worker with only the cells not yet
received (`_Redo`), and a job that killed DEATHS workers stops the run.
"""

from __future__ import annotations

import multiprocessing
import pickle
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from multiprocessing import connection
from pathlib import Path
from typing import Any, Protocol

from svdicl.aliases import ALIASES
from svdicl.errors import SvdiclError
from svdicl.experiments.runs import EvalRun
from svdicl.export import load_any
from svdicl.models import LoadedModel
from svdicl.specs import PruneSpec
from svdicl.store import CellKey
from svdicl.threads import ThreadPlan, apply_torch_threads, thread_plan

EXECUTORS = ("local", "ray")
DEATHS = 3  # a job whose actor died this often is not resubmitted again (it is what kills them)


@dataclass(frozen=True)
class Job:
    """The cells of one prepared run that one evaluate_edits call scores, in order."""

    run: EvalRun
    cells: tuple[tuple[CellKey, tuple[PruneSpec, ...]], ...]

    def rest(self, done: int) -> Job:
        """The job without its first `done` cells (those already received)."""
        return replace(self, cells=self.cells[done:])


Work = Callable[[LoadedModel, Job, Any], Iterator[Any]]  # (loaded, job, progress bar or None) -> one output per cell


class Executor(Protocol):
    """What scores jobs (groups of cells): the local process, or Ray worker actors that each hold a model."""

    def map(self, work: Work, jobs: Iterable[Job], progress: Any = None) -> Iterator[Any]:
        """Every output of `work` over `jobs`, each as soon as it is there (jobs are pulled lazily)."""
        ...

    def close(self) -> None:
        """Release the workers (nothing for the local executor)."""


@dataclass(frozen=True)
class LocalExecutor:
    """Lines one after another in this process, on the driver's model; the progress bar moves per batch."""

    loaded: LoadedModel
    threads: int | None = None  # torch threads while scoring (None: leave torch's setting)

    def map(self, work: Work, jobs: Iterable[Job], progress: Any = None) -> Iterator[Any]:
        """Run `work` on each job in this process, in order."""
        if self.threads:
            apply_torch_threads(self.threads)
        for job in jobs:
            yield from work(self.loaded, job, progress)

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
    """A Ray actor or a local worker process: loads the model once, then scores the jobs it is sent (a generator per job).

    A load failure is kept and raised by `run`, so the driver sees the error itself rather than
    an actor that died in its constructor (which would read as a lost worker and be retried)."""

    def __init__(self, model: Mapping[str, Any], fingerprint: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.failure: Exception | None = None
        try:
            self.loaded = load_any(**model)
            if self.loaded.fingerprint != fingerprint:
                raise SvdiclError(
                    f"a worker loaded other weights from {model['source']!r} than the driver (fingerprint "
                    f"{self.loaded.fingerprint[:12]} vs {fingerprint[:12]}); give a model every node reads the same"
                )
        except Exception as exc:
            self.failure = exc

    def ready(self) -> None:
        if self.failure is not None:
            raise self.failure

    def run(self, work: Work, job: Job) -> Iterator[Any]:
        self.ready()
        yield from work(self.loaded, job, None)


@dataclass
class _Task:
    actor: Any
    job: Job
    received: int = 0


class _Redo:
    """The jobs still to score: the caller's, after the unfinished rest of jobs whose worker died.

    Shared by both executors, so a lost Ray actor and a killed worker process are handled alike."""

    def __init__(self, jobs: Iterable[Job], hint: str) -> None:
        self.jobs, self.queue, self.deaths, self.hint = iter(jobs), deque(), {}, hint

    def next(self) -> Job | None:
        """The next job to send to a free worker, or None when all are sent."""
        return self.queue.popleft() if self.queue else next(self.jobs, None)

    def lost(self, task: _Task) -> None:
        """`task`'s worker died: its cells not yet received go first to the next worker, unless they killed DEATHS."""
        rest = task.job.rest(task.received)
        if not rest.cells:
            return
        first = rest.cells[0][0]
        self.deaths[first] = self.deaths.get(first, 0) + 1
        if self.deaths[first] >= DEATHS:
            raise SvdiclError(f"workers died {DEATHS} times scoring {first.task} {first.split} {first.edit}; {self.hint}")
        self.queue.appendleft(rest)


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

    def map(self, work: Work, jobs: Iterable[Job], progress: Any = None) -> Iterator[Any]:
        """Run `work` on the jobs across the worker actors, resubmitting a dead worker's unfinished jobs."""
        ray = import_ray()
        for index, actor in enumerate(self.actors):  # the workers load at once; a model they cannot load stops here
            try:
                ray.get(actor.ready.remote())
            except ray.exceptions.RayTaskError as exc:
                raise exc.cause from None
            except ray.exceptions.RayActorError:  # lost since the last call: a fresh one takes its place
                self.actors[index] = self._start()
                self.restarts += 1
        todo = _Redo(jobs, "check the workers' memory (a larger --gpus-per-worker or fewer --workers)")
        self.running = {}  # what an abandoned earlier call left is not this call's

        def submit(actor: Any) -> None:
            job = todo.next()
            if job is not None:
                self.running[actor.run.remote(work, job)] = _Task(actor, job)

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
                todo.lost(task)
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


def _serve(model: Mapping[str, Any], fingerprint: str, threads: int, inbox: Any, outbox: Any) -> None:
    """A local worker process: load the model once, then score each (ticket, work, job) from `inbox` until None.

    Every message to the driver, on this worker's own pipe `outbox`, is (ticket, kind, payload): "out"
    per cell, "end" per job, "error" with the exception (or its traceback as text where it does not
    pickle)."""
    worker = _Worker(model, fingerprint, threads)
    while (message := inbox.get()) is not None:
        ticket, work, job = message
        try:
            for output in worker.run(work, job):
                outbox.send((ticket, "out", output))
        except Exception as exc:
            try:
                pickle.dumps(exc)
            except Exception:
                exc = RuntimeError(traceback.format_exc())
            outbox.send((ticket, "error", exc))
            continue
        outbox.send((ticket, "end", None))


@dataclass(eq=False)
class _Process:
    process: Any
    inbox: Any
    outbox: Any  # the read end of this worker's own result pipe


@dataclass
class ProcessExecutor:
    """Lines spread over local worker processes (spawned, `plan.threads` torch threads each) that each hold the model.

    The multi-core local executor: separate processes, not threads in one, so a busy machine slows
    each worker alone instead of stalling every thread at torch's barriers.  `model` holds
    `load_model`'s keyword arguments; each worker's fingerprint must equal `fingerprint`.  Each job
    sent gets a ticket number, so what a dead worker or an abandoned earlier call still sends is ignored."""

    model: Mapping[str, Any]
    fingerprint: str
    plan: ThreadPlan
    workers: list[_Process] = field(init=False, default_factory=list)
    running: dict[int, _Task] = field(init=False, default_factory=dict)  # ticket number -> its task
    restarts: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools mid-state
        self._tickets = iter(range(1 << 62))
        self.workers = [self._start() for _ in range(self.plan.workers)]

    def _start(self) -> _Process:
        """A worker with its own result pipe: one shared queue could be left locked or torn by a worker killed
        mid-write, stalling the driver for good; a pipe of its own only ends, and its end reads as EOF here."""
        inbox = self._context.Queue()
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_serve, args=(dict(self.model), self.fingerprint, self.plan.threads, inbox, writer), daemon=True
        )
        process.start()
        writer.close()  # the worker holds the only write end
        return _Process(process, inbox, reader)

    def _busy(self) -> set[int]:
        return {id(task.actor) for task in self.running.values()}

    def map(self, work: Work, jobs: Iterable[Job], progress: Any = None) -> Iterator[Any]:
        """Run `work` on the jobs across the worker processes, redoing a dead worker's unfinished cells."""
        todo = _Redo(jobs, "check the workers' memory (fewer --workers)")
        self.running = {}  # what an abandoned earlier call left is not this call's (its tickets' messages are ignored)

        def submit(worker: _Process) -> None:
            job = todo.next()
            if job is not None:
                ticket = next(self._tickets)
                worker.inbox.put((ticket, work, job))
                self.running[ticket] = _Task(worker, job)

        for worker in self.workers:
            submit(worker)
        while self.running:
            ready = connection.wait([worker.outbox for worker in self.workers], timeout=0.5)
            if not ready:
                self._replace_dead(todo, submit)
            for outbox in ready:
                try:
                    ticket, kind, payload = outbox.recv()
                except (EOFError, OSError):  # its worker died, perhaps mid-message: let it finish exiting
                    for worker in self.workers:
                        if worker.outbox is outbox:
                            worker.process.join(timeout=5)
                    self._replace_dead(todo, submit)
                    continue
                task = self.running.get(ticket)
                if task is None:  # from a worker given up as dead, or from an abandoned call
                    continue
                if kind == "error":
                    raise payload
                if kind == "end":
                    del self.running[ticket]
                    submit(task.actor)
                    continue
                task.received += 1
                yield payload

    def _replace_dead(self, todo: _Redo, submit: Callable[[_Process], None]) -> None:
        """Each worker that died: its unfinished cells go back to `todo`, a fresh worker takes its place."""
        for index, worker in enumerate(self.workers):
            if worker.process.is_alive():
                continue
            worker.outbox.close()
            for ticket, task in list(self.running.items()):
                if task.actor is worker:
                    del self.running[ticket]
                    todo.lost(task)
            self.restarts += 1
            self.workers[index] = replacement = self._start()
            submit(replacement)

    def close(self) -> None:
        """Stop the worker processes: idle ones are asked to exit, busy ones (an error, Ctrl-C) are killed."""
        busy = self._busy()
        for worker in self.workers:
            if id(worker) not in busy:
                worker.inbox.put(None)
        for worker in self.workers:
            worker.process.join(timeout=0 if id(worker) in busy else 10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.inbox.close()
            worker.outbox.close()
        self.workers, self.running = [], {}


def open_executor(
    name: str,
    loaded: LoadedModel,
    model: Mapping[str, Any] | None = None,
    settings: RaySettings | None = None,
    plan: ThreadPlan | None = None,
) -> Executor:
    """The executor `name`: local, or Ray workers that load `model` (load_model's keyword arguments).

    Local runs `plan` (default: `thread_plan()`, the free cores): worker processes that load `model`
    when it has more than one worker and `model` is given, else this process on `loaded`."""
    if name == "local":
        plan = plan or thread_plan()
        if plan.workers > 1 and model is not None:
            return ProcessExecutor(dict(model), loaded.fingerprint, plan)
        return LocalExecutor(loaded, plan.threads if plan.workers == 1 else None)
    if name == "ray":
        model = dict(model or {"source": loaded.source, "dtype": loaded.dtype})
        return RayExecutor(model, loaded.fingerprint, settings or RaySettings())
    raise SvdiclError(f"unknown executor {name!r}; use {' or '.join(EXECUTORS)}")
