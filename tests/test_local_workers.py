"""The local executor's worker processes: the same cells as the sequential executor, a killed worker's
unfinished cells redone, and the thread policy (free cores = cores - load average) under faked loads."""

from __future__ import annotations

import pytest
from conftest import KillingStore, assert_same_contents, contents, grid, one_line_error, save_model, toy_loaded, write_toy_task

from svdicl.errors import SvdiclError
from svdicl.experiments.executors import LocalExecutor, ProcessExecutor, open_executor
from svdicl.experiments.launch import ExecutorOptions, start_executor
from svdicl.experiments.sweep import sweep
from svdicl.models import load_model
from svdicl.store import Store
from svdicl.threads import default_torch_threads, free_cores, thread_plan, workers_that_fit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    return write_toy_task(root), save_model(toy_loaded(), root / "model")


@pytest.fixture(scope="module")
def processes(toy):
    """Two single-threaded worker processes holding the toy model, shared by the tests below."""
    _, folder = toy
    executor = open_executor("local", load_model(str(folder)), {"source": str(folder)}, plan=thread_plan(2, 1))
    assert isinstance(executor, ProcessExecutor)
    yield executor
    executor.close()


def sequential(toy, tmp_path, **changes) -> dict:
    task, folder = toy
    store = Store(tmp_path / "sequential")
    sweep(load_model(str(folder)), grid(task, **changes), store, data_dir=task.parent / "data", progress=False)
    return contents(store)


def test_worker_processes_fill_the_store_the_sequential_executor_fills(toy, processes, tmp_path):
    task, folder = toy
    store = Store(tmp_path / "processes")
    result = sweep(load_model(str(folder)), grid(task), store, data_dir=task.parent / "data", progress=False, executor=processes)
    assert result.computed == len(result.cells) == 1 * 2 + 2 * 2 * 2 * 2  # rate 0 once per shots, 2 layers x 2 modules x 2 rates
    assert_same_contents(sequential(toy, tmp_path), contents(store))


def test_a_killed_worker_process_loses_no_finished_cell_and_its_cells_are_redone(toy, processes, tmp_path):
    task, folder = toy
    changes = {"rates": (0, 0.5, 0.9, 0.99), "shots": (1,)}  # jobs of 3-4 cells, so the kill lands mid-job
    store = KillingStore(tmp_path / "killed", processes, kill=_kill_process)
    restarts = processes.restarts
    result = sweep(load_model(str(folder)), grid(task, **changes), store, data_dir=task.parent / "data", progress=False,
                   executor=processes)  # fmt: skip
    assert store.killed[0] < store.killed[1] and processes.restarts == restarts + 1
    assert len(result.cells) == result.computed == 1 + 4 * 3
    assert set(store.puts.values()) == {1} and len(store.puts) == len(result.cells)  # every cell stored once
    assert_same_contents(sequential(toy, tmp_path, **changes), contents(Store(tmp_path / "killed")))


class Stop(Exception):
    pass


class StoppingStore(Store):
    """Stops the sweep (as Ctrl-C would) at its first put, while the workers are still scoring."""

    def put(self, key, result, seconds=0.0):
        raise Stop


def test_a_sweep_resumed_on_the_same_workers_ignores_what_the_stopped_call_still_sends(toy, processes, tmp_path):
    task, folder = toy
    with pytest.raises(Stop):
        sweep(load_model(str(folder)), grid(task), StoppingStore(tmp_path / "resumed"), data_dir=task.parent / "data",
              progress=False, executor=processes)  # fmt: skip
    store = Store(tmp_path / "resumed")
    sweep(load_model(str(folder)), grid(task), store, data_dir=task.parent / "data", progress=False, executor=processes)
    assert_same_contents(sequential(toy, tmp_path), contents(store))


def test_a_worker_error_reaches_the_driver_as_itself(toy, tmp_path):
    _, folder = toy
    executor = open_executor("local", load_model(str(folder)), {"source": str(tmp_path / "nowhere")}, plan=thread_plan(2, 1))
    try:
        task, _ = toy
        with pytest.raises(SvdiclError, match="nowhere"):
            sweep(load_model(str(folder)), grid(task), Store(tmp_path / "s"), data_dir=task.parent / "data", progress=False,
                  executor=executor)  # fmt: skip
    finally:
        executor.close()


@pytest.mark.parametrize(
    ("cores", "load", "free"),
    [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.4, 1), (2, 8.0, 1), (2, 10.0, 1), (16, 3.2, 13), (4, -1.0, 4)],
)
def test_free_cores_are_the_cores_less_the_rounded_load(cores, load, free):
    assert free_cores(cores, load) == free == max(1, min(cores, cores - round(load)))


def test_the_thread_plan_follows_the_free_cores_unless_given():
    assert (thread_plan(total=2, load=8.0).workers, thread_plan(total=2, load=8.0).threads) == (1, 1)  # busy: one process
    assert thread_plan(total=2, load=0.1).workers == 2
    assert (thread_plan(threads_per_worker=4, total=16, load=0.0).workers) == 4  # 16 free cores / 4 threads
    assert (thread_plan(threads_per_worker=4, total=2, load=0.0).workers) == 1
    assert (thread_plan(3, 2, total=2, load=9.0).workers, thread_plan(3, 2, total=2, load=9.0).threads) == (3, 2)  # as given
    assert thread_plan(total=16, load=0.0, fits=3).workers == 3  # memory for three copies of the model: three workers
    assert thread_plan(5, total=16, load=0.0, fits=3).workers == 5  # as given
    assert workers_that_fit(2 * 2**30, available=10 * 2**30) == 3 and workers_that_fit(8 * 2**30, available=2**30) == 1
    with pytest.raises(SvdiclError, match="--threads-per-worker must be at least 1"):
        thread_plan(1, 0)


def test_one_worker_runs_in_this_process_with_its_threads(toy):
    _, folder = toy
    loaded = load_model(str(folder))
    executor = open_executor("local", loaded, {"source": str(folder)}, plan=thread_plan(1, 1, total=2, load=0.0))
    assert isinstance(executor, LocalExecutor) and executor.loaded is loaded and executor.threads == 1
    assert isinstance(open_executor("local", loaded, None, plan=thread_plan(2, 1)), LocalExecutor)  # no model to load: here


def test_executor_options_refuse_the_other_executor_flags_before_a_model_loads_and_plan_one_process_per_gpu(toy):
    for options, problem in (
        ({"address": "auto"}, "--address is for the Ray executor; add --executor ray"),
        ({"gpus_per_worker": 1.0}, "--gpus-per-worker is for the Ray executor"),
        ({"kind": "ray", "threads_per_worker": 2}, "--threads-per-worker is for the local executor"),
        ({"kind": "dask"}, "unknown executor 'dask'; use local or ray"),
    ):
        with pytest.raises(SvdiclError, match=problem):
            ExecutorOptions(**options)
    _, folder = toy
    loaded = load_model(str(folder))
    executor, line = start_executor(ExecutorOptions(), loaded, {"source": str(folder), "device": "cuda:0"})
    assert isinstance(executor, LocalExecutor) and executor.threads == 1 and line.startswith("local: 1 worker(s) x 1 thread(s)")
    executor, line = start_executor(ExecutorOptions(workers=2), loaded)  # no model to load: this process
    assert isinstance(executor, LocalExecutor) and executor.loaded is loaded and line.startswith("local: 2 worker(s)")


def test_torch_threads_default_to_the_free_cores_unless_omp_says(monkeypatch):
    monkeypatch.setattr("svdicl.threads.cores", lambda: 2)
    monkeypatch.setattr("svdicl.threads.load_average", lambda: 8.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_torch_threads() == 1  # a busy two-core machine: never two threads
    monkeypatch.setattr("svdicl.threads.load_average", lambda: 0.2)
    assert default_torch_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_torch_threads() == 3


def test_the_worker_flags_come_from_the_command_line_or_a_config(toy, capsys, tmp_path):
    task, folder = toy
    base = ["sweep", "--model", str(folder), "--tasks", str(task), "--data-dir", str(task.parent / "data")]
    base += ["--output", str(tmp_path / "o")]
    assert "--threads-per-worker must be at least 1, got 0" in one_line_error(capsys, *base, "--threads-per-worker", "0")
    config = tmp_path / "sweep.yaml"
    config.write_text("workers: 0\nthreads_per_worker: 1\n")
    assert "--workers must be at least 1, got 0" in one_line_error(capsys, *base, "--config", str(config))


def _kill_process(task) -> None:
    task.actor.process.kill()
    task.actor.process.join()
