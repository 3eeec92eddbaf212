"""A small real sweep (SmolLM2-135M, real SST-2 rows) through the store and the report, in CI-sized time:
every cell equals a direct plain-path evaluation of the same edit, and the fig 1 table is the store."""

from __future__ import annotations

import csv

import pytest

from svdicl.experiments.run_scoring import evaluate_run
from svdicl.experiments.runs import prepare_run
from svdicl.experiments.sweep import SweepGrid, sweep
from svdicl.prune import pruned
from svdicl.report import build_report
from svdicl.specs import PruneSpec
from svdicl.store import Store

pytestmark = pytest.mark.slow


def test_real_sweep_cells_equal_direct_evaluations_and_draw_fig1(real_model, data_dir, tmp_path):
    grid = SweepGrid(tasks=("sst2",), layers=("0", "-1"), modules=("mlp",), rates=(0, 0.99), shots=(1,), limit=12)
    store = Store(tmp_path)
    result = sweep(real_model, grid, store, data_dir=data_dir, model_name="smollm2-135m", progress=False)
    assert result.computed == len(result.cells) == 3  # unpruned, layer 0 at 0.99, layer 29 at 0.99
    run = prepare_run(real_model, "sst2", split="test", shots=1, seed=0, limit=12, data_dir=data_dir)
    for cell in result.cells:
        specs = [] if cell.key.edit == "none" else [PruneSpec.parse(cell.key.edit)]
        with pruned(real_model.model, specs=specs):
            direct = evaluate_run(real_model, run, path="plain")
        assert [s["prediction"] for s in store.samples(cell)] == list(direct.predictions), cell.key.edit
        assert cell.metrics["accuracy"]["value"] == direct.accuracy.value
    assert {c.info["scoring"]["path"] for c in result.cells if c.key.edit != "none"} == {"layer"}

    report = build_report(tmp_path, formats=["png"])
    assert (tmp_path / "figures" / "fig1-rates-test.png").is_file(), report.files
    with open(tmp_path / "tables" / "sweep-test.csv") as file:
        rows = list(csv.DictReader(file))
    stored = {(c.layers, c.rate): c.metrics["accuracy"]["value"] for c in result.cells}
    assert len(rows) == len(stored)
    for row in rows:
        assert row["metric"] == "accuracy" and row["n"] == "12"
        assert float(row["value"]) == pytest.approx(stored[(row["layers"] or None, float(row["rate"]))])
