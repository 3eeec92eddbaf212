"""Executors: a sweep (and a search) on Ray workers fills the store the local executor fills; a worker
killed mid-job loses no finished cell and the sweep completes; workers are planned from the cluster's
resources; a missing ray and Ray flags without it are one-line errors."""

from __future__ import annotations

import functools
import sys

import pytest
from conftest import KillingStore, assert_same_contents, contents, grid, one_line_error, save_model, toy_loaded, write_toy_task

from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.experiments.calls import score_job
from svdicl.experiments.cells import Scoring
from svdicl.experiments.executors import Job, RayExecutor, RaySettings, _Worker, open_executor, ray_plan
from svdicl.experiments.runs import prepare_run
from svdicl.experiments.search import SearchConfig, search
from svdicl.experiments.sweep import sweep
from svdicl.models import load_model
from svdicl.specs import PruneSpec
from svdicl.store import CellKey, Store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("executors")
    return write_toy_task(root), save_model(toy_loaded(), root / "model")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU cluster for the module (starting Ray takes seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def workers(ray_cluster, toy):
    """Two worker actors holding the toy model, shared by the tests below.  They take the cluster's
    2 CPUs, so a test that starts its own workers comes before the first test that uses these."""
    _, folder = toy
    executor = RayExecutor({"source": str(folder)}, load_model(str(folder)).fingerprint, RaySettings(workers=2))
    yield executor
    executor.close()


def local_reference(toy, tmp_path, **changes) -> dict:
    task, folder = toy
    store = Store(tmp_path / "local")
    sweep(load_model(str(folder)), grid(task, **changes), store, data_dir=task.parent / "data", progress=False)
    return contents(store)


def test_cli_sweep_on_ray_fills_the_store_the_local_executor_fills(toy, ray_cluster, capsys, tmp_path):
    task, folder = toy  # log-probs are compared to 1e-5: float32 (the mixed path guarantees decisions, not log-probs)
    argv = ["-q", "sweep", "--model", str(folder), "--tasks", str(task), "--data-dir", str(task.parent / "data"),
            "--layers", "0,last1", "--modules", "mlp,attn", "--rates", "0,0.5,0.9", "--shots", "0,1", "--limit", "12",
            "--no-report", "--precision", "float32"]  # fmt: skip
    assert main([*argv, "--output", str(tmp_path / "ray"), "--executor", "ray", "--workers", "2"]) == 0
    assert "18 cells, 18 scored now" in capsys.readouterr().out
    cells = Store(tmp_path / "ray").cells()
    assert {c.info["scoring"]["path"] for c in cells} == {"layer"}  # whole jobs shipped: the layer cache pays
    assert main([*argv, "--output", str(tmp_path / "local")]) == 0
    assert_same_contents(contents(Store(tmp_path / "local")), contents(Store(tmp_path / "ray")))
    assert main([*argv, "--output", str(tmp_path / "ray")]) == 0  # resume reads the store, whichever executor filled it
    assert "18 cells, 0 scored now and 18 from the store" in capsys.readouterr().out


def test_a_worker_killed_mid_job_loses_no_finished_cell_and_the_sweep_completes(toy, workers, tmp_path):
    task, folder = toy
    changes = {"rates": (0, 0.5, 0.9, 0.99), "shots": (1,)}  # jobs of 3-4 cells, so the kill lands mid-job
    store = KillingStore(tmp_path / "ray", workers, kill=_kill_ray_actor)
    restarts = workers.restarts
    loaded = load_model(str(folder))
    result = sweep(loaded, grid(task, **changes), store, data_dir=task.parent / "data", progress=False, executor=workers)
    assert store.killed[0] < store.killed[1] and workers.restarts == restarts + 1
    assert len(result.cells) == result.computed == 1 + 4 * 3
    assert set(store.puts.values()) == {1} and len(store.puts) == len(result.cells)  # every cell scored and stored once
    assert len((tmp_path / "ray" / "cells.jsonl").read_text().splitlines()) == len(result.cells)
    assert_same_contents(local_reference(toy, tmp_path, **changes), contents(Store(tmp_path / "ray")))


def test_ray_search_equals_the_local_search(toy, workers, tmp_path):
    task, folder = toy
    config = SearchConfig(str(task), "mlp", rates=(0.5, 0.9), layer=1, seeds=(0, 1), limit_validation=12, limit_test=12)
    data = task.parent / "data"
    local = search(load_model(str(folder)), config, Store(tmp_path / "local"), data_dir=data)
    on_ray = search(load_model(str(folder)), config, Store(tmp_path / "ray"), data_dir=data, executor=workers)
    for key in ("layer", "rates", "validation", "rate_star", "test", "seeds"):
        assert getattr(on_ray, key) == getattr(local, key)
    assert_same_contents(contents(Store(tmp_path / "local")), contents(Store(tmp_path / "ray")))


def test_a_worker_error_reaches_the_driver_as_itself(toy, workers):
    task, folder = toy
    loaded = load_model(str(folder))
    run = prepare_run(loaded, str(task), split="test", shots=0, limit=4, data_dir=task.parent / "data")
    job = Job(run, ((CellKey(loaded.fingerprint, "toy", "test", 0, 0, "9:mlp:0.5"), (PruneSpec("9", "mlp", 0.5),)),))
    with pytest.raises(SvdiclError, match="layer 9 is out of range"):
        list(workers.map(functools.partial(score_job, scoring=Scoring()), [job]))


def test_a_worker_with_other_weights_refuses_to_score(toy):
    _, folder = toy
    worker = _Worker({"source": str(folder)}, "0" * 32, threads=1)  # the actor's class, in this process
    with pytest.raises(SvdiclError, match="a worker loaded other weights"):
        worker.ready()


def test_workers_are_planned_from_the_cluster():
    plan = ray_plan(RaySettings(), cpus=2, gpus=0, node_cpus=2, device="cpu")
    assert (plan.workers, plan.threads, plan.cpus, plan.gpus) == (2, 1, 1.0, 0)
    plan = ray_plan(RaySettings(), cpus=32, gpus=4, node_cpus=16, device="cuda:0")
    assert (plan.workers, plan.threads, plan.gpus) == (4, 8, 1.0)  # one per GPU, the CPUs shared out
    plan = ray_plan(RaySettings(workers=1), cpus=32, gpus=0, node_cpus=16, device="cpu")
    assert (plan.workers, plan.threads) == (1, 16)  # never more threads than one node has
    plan = ray_plan(RaySettings(workers=4), cpus=2, gpus=0, node_cpus=2, device="cpu")
    assert (plan.workers, plan.threads, plan.cpus) == (4, 1, 0.5)  # more workers than CPUs: a share each
    plan = ray_plan(RaySettings(gpus_per_worker=2), cpus=16, gpus=4, node_cpus=16, device="cuda")
    assert (plan.workers, plan.gpus) == (2, 2.0)
    with pytest.raises(SvdiclError, match=r"would need 1 GPUs each .* but the cluster has 0; lower --gpus-per-worker"):
        ray_plan(RaySettings(), cpus=2, gpus=0, node_cpus=2, device="cuda")
    with pytest.raises(SvdiclError, match="3 workers x 1 GPUs exceed the cluster's 2 GPUs"):
        ray_plan(RaySettings(workers=3), cpus=8, gpus=2, node_cpus=8, device="cuda")
    with pytest.raises(SvdiclError, match="--workers must be at least 1"):
        RaySettings(workers=0)


def test_a_missing_ray_and_ray_flags_without_ray_are_one_line_errors(toy, monkeypatch, capsys, tmp_path):
    task, folder = toy
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(SvdiclError, match=r'the Ray executor needs ray: pip install "svdicl\[ray\]"'):
        open_executor("ray", toy_loaded())
    argv = ["sweep", "--model", str(folder), "--tasks", str(task), "--data-dir", str(task.parent / "data")]
    argv += ["--output", str(tmp_path / "o")]
    assert "pip install" in one_line_error(capsys, *argv, "--executor", "ray")
    assert "--address is for the Ray executor; add --executor ray" in one_line_error(capsys, *argv, "--address", "auto")
    assert "--threads-per-worker is for the local executor" in one_line_error(
        capsys, *argv, "--executor", "ray", "--threads-per-worker", "2"
    )


def _kill_ray_actor(task) -> None:
    import ray

    ray.kill(task.actor, no_restart=True)
