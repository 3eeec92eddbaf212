"""Which executor a sweep or search runs on, checked when asked for, planned and started when needed.

`ExecutorOptions` holds what `--executor` and its flags ask for and refuses a combination that
cannot run (a Ray address for the local executor) before any model is loaded; `start_executor`
plans the workers for the loaded model (local: the free cores and the copies memory holds; Ray:
the cluster's resources) and opens it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from svdicl.errors import SvdiclError
from svdicl.experiments.executors import EXECUTORS, Executor, RaySettings, open_executor
from svdicl.models import LoadedModel
from svdicl.threads import thread_plan, workers_that_fit


@dataclass(frozen=True)
class ExecutorOptions:
    """Where cells are computed: `kind` local or ray; None fields are planned from the machine or cluster."""

    kind: str = "local"
    workers: int | None = None
    threads_per_worker: int | None = None  # local only
    address: str | None = None  # Ray only
    gpus_per_worker: float | None = None  # Ray only

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise SvdiclError(f"unknown executor {self.kind!r}; use {' or '.join(EXECUTORS)}")
        if self.kind == "local":
            given = [name for name in ("address", "gpus_per_worker") if getattr(self, name) is not None]
            if given:
                raise SvdiclError(f"--{given[0].replace('_', '-')} is for the Ray executor; add --executor ray")
        elif self.threads_per_worker is not None:
            raise SvdiclError("--threads-per-worker is for the local executor; Ray workers share the CPUs they reserve")


def start_executor(options: ExecutorOptions, loaded: LoadedModel, model: Mapping[str, Any] | None = None) -> tuple[Executor, str]:
    """The executor `options` names and one line saying how its workers were planned (for a status line).

    Its worker processes (local) or actors (Ray) load `model` (load_model's keyword arguments; None: local work
    stays in this process, Ray loads `loaded`'s source); a local run on a GPU or a device map keeps one process
    unless `workers` says otherwise.
    """
    given = dict(model or {})
    if options.kind == "local":
        on_cpu = (given.get("device") or "cpu") == "cpu" and not given.get("device_map")
        size = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
        workers = options.workers if options.workers is not None or on_cpu else 1  # one process owns a GPU
        plan = thread_plan(workers, options.threads_per_worker, fits=workers_that_fit(size))  # each worker holds a copy
        return open_executor("local", loaded, model, plan=plan), f"local: {plan.describe()}"
    settings = RaySettings(address=options.address, workers=options.workers, gpus_per_worker=options.gpus_per_worker)
    executor = open_executor("ray", loaded, model, settings)
    plan = executor.plan
    source = given.get("source", loaded.source)
    return executor, f"ray: {plan.workers} worker(s) loading {source}, each with {plan.threads} thread(s), {plan.gpus:g} GPU(s)"
