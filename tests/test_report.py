"""Report: the figures draw the store's numbers, the tables equal them, the Algorithm 1 table follows the schema."""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import fill, two_arms, write_eval
from matplotlib.collections import PathCollection, PolyCollection

from svdicl.cli import main
from svdicl.errors import SvdiclError
from svdicl.experiments.condition import MatrixCondition, write_conditions
from svdicl.experiments.search_output import read_search
from svdicl.report import (
    algorithm1_markdown,
    algorithm1_seed_markdown,
    algorithm1_seed_rows,
    answer_share,
    build_report,
    plot_conditions,
    plot_rates,
    plot_search,
    plot_shots,
    sweep_points,
)
from svdicl.store import CellKey, Result, Store

RATES = (0.1, 0.5, 0.9, 0.995)
LAYERS = (0, 29)
MODULES = ("mlp", "attn")


def accuracy(task: str, shots: int, seed: int, edit: str) -> float:
    """A distinct, known value per cell."""
    if edit == "none":
        return {"sst2": 0.80, "copa": 0.60}[task] + shots / 100 + seed / 1000
    layer, module, rate = edit.split(":")
    return 0.5 + int(layer) / 100 + (0.05 if module == "mlp" else 0.0) + float(rate) / 10 + shots / 100 + seed / 1000


def collapsed(key: CellKey) -> bool:
    """Cells that answer one label to every example: layer 0 at rate 0.995, and layer 29 at 0.995 for seed 0 only."""
    return key.edit.endswith(":0.995") and (key.edit.startswith("0:") or (key.seed == 0 and key.edit.startswith("29:")))


def result(key: CellKey) -> Result:
    value = accuracy(key.task, key.shots, key.seed, key.edit)
    metrics = {
        "accuracy": {"value": value, "ci_low": value - 0.03, "ci_high": value + 0.02},
        "macro_f1": {"value": value - 0.1, "ci_low": value - 0.15, "ci_high": value - 0.05},
    }
    answers = [1, 1, 1, 1] if collapsed(key) else [0, 1, 1, 0]
    samples = [{"id": f"e{i}", "prediction": a, "correct": a == 1} for i, a in enumerate(answers)]
    return Result(metrics, n=200, samples=samples, model_name="tiny")


def make_store(folder: Path, seeds=(0,), shots=(5,), tasks=("sst2", "copa"), model="fp") -> Store:
    keys = [
        CellKey(model, task, "test", k, seed, edit)
        for task in tasks
        for k in shots
        for seed in seeds
        for edit in ["none", *(f"{layer}:{module}:{rate}" for module in MODULES for layer in LAYERS for rate in RATES)]
    ]
    store = Store(folder)
    fill(store, keys, result)
    return store


def seed_entry(seed: int, rates: list[float]) -> dict:
    """A seed's part of a search result: its own curve and test cells at the shared rate*."""
    return {
        "seed": seed,
        "validation": [0.7 + seed / 100 + i / 1000 for i in range(len(rates))],
        "baseline": {"value": 0.75 + seed / 100},
        "pruned": {"value": 0.80 - seed / 50},
        "mcnemar_p": 0.01 * (seed + 1),
        "discordant": {"only_baseline_correct": seed, "only_pruned_correct": 5},
        "cells": {"baseline": f"base{seed}", "pruned": f"pruned{seed}"},
    }


def search_result(task: str, module: str, layer: int, seeds: int = 1, model: str = "tiny") -> dict:
    rates = [0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 0.995]
    return {
        "format": "svdicl.search/1",
        "model": {"name": model, "fingerprint": "fp-" + model},
        "task": task,
        "module": module,
        "metric": "accuracy" if task != "copa" else "macro_f1",
        "shots": 5,
        "condition": {"aggregate": "max", "per_layer": {"28": 20.0, "29": 31.3}},
        "top_k": 3,
        "top_layers": [layer, 28, 17],
        "layer": layer,
        "rates": rates,
        "validation": {"split": "validation", "n": 300, "values": [0.70, 0.71, 0.71, 0.73, 0.75, 0.75, 0.60]},
        "rate_star": 0.95,
        "test": {
            "split": "test",
            "n": 1000,
            "baseline": {"value": 0.7527, "ci_low": 0.7251, "ci_high": 0.7803, "std": 0.01 if seeds > 1 else None},
            "pruned": {"value": 0.8437, "ci_low": 0.8212, "ci_high": 0.8661, "std": 0.02 if seeds > 1 else None},
            "mcnemar_p": 0.0031,
        },
        "seeds": [seed_entry(s, rates) for s in range(seeds)],
    }


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def dashed(ax) -> list:
    return [line for line in ax.get_lines() if line.get_linestyle() == "--"]


def test_fig1_draws_the_store_values_and_a_dashed_baseline(tmp_path):
    store = make_store(tmp_path)
    points = sweep_points(store.cells(), metric="accuracy")
    fig = plot_rates(points)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["SST-2 · MLP", "SST-2 · ATTN", "COPA · MLP", "COPA · ATTN"]
    for ax in axes:
        task = "sst2" if ax.get_title().startswith("SST-2") else "copa"
        module = ax.get_title().split(" · ")[1].lower()
        baseline = accuracy(task, 5, 0, "none")
        (line,) = dashed(ax)
        assert set(line.get_ydata()) == {baseline}
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.1", "0.5", "0.9", "0.995"]  # ordinal axis
        curves = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines() if line.get_linestyle() == "-"}
        assert curves == {
            f"layer {layer}": [baseline, *(accuracy(task, 5, 0, f"{layer}:{module}:{r}") for r in RATES)] for layer in LAYERS
        }
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == len(LAYERS)  # one CI band per line
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["layer 0", "layer 29", "unpruned"]


def test_tables_equal_the_store(tmp_path):
    store = make_store(tmp_path)
    report = build_report(tmp_path, metric="accuracy")
    rows = read_csv(tmp_path / "tables" / "sweep-test.csv")
    assert len(rows) == 2 * (1 + len(MODULES) * len(LAYERS) * len(RATES))
    for row in rows:
        edit = "none" if not row["layers"] else f"{row['layers']}:{row['modules']}:{row['rate']}"
        (cell,) = store.cells(task=row["task"], edit=CellKey("fp", "t", "s", 0, 0, edit).edit)
        assert float(row["value"]) == cell.value("accuracy")
        assert float(row["low"]) == cell.metrics["accuracy"]["ci_low"]
        assert row["model_name"] == "tiny" and row["seeds"] == "1" and row["n"] == "200"
    cells = read_csv(tmp_path / "tables" / "cells.csv")
    assert {r["id"]: float(r["macro_f1"]) for r in cells} == {c.id: c.value("macro_f1") for c in store.cells()}
    markdown = (tmp_path / "tables" / "sweep-test.md").read_text()
    sst2_row = next(line for line in markdown.splitlines() if line.startswith("| SST-2 | accuracy | MLP | 29 |"))
    expected = [accuracy("sst2", 5, 0, "none")] + [accuracy("sst2", 5, 0, f"29:mlp:{r}") for r in RATES]
    assert [float(x.strip(" *ᶜ")) for x in sst2_row.split("|")[5:-1]] == pytest.approx(expected, abs=5e-5)
    assert {p.suffix for p in report.files} == {".csv", ".md", ".png", ".svg"}
    page = report.page.read_text()
    assert "figures/fig1-rates-test.png" in page and "tables" not in page.split("figures/fig1")[0].splitlines()[-1]


def test_collapsed_cells_are_marked_in_every_seed_only(tmp_path):
    assert answer_share([]) is None and answer_share([{"prediction": 2}] * 3 + [{"prediction": 0}]) == 0.75
    store = make_store(tmp_path, seeds=(0, 1), tasks=("sst2",))
    build_report(tmp_path, metric="accuracy")
    shares = {r["id"]: float(r["answer_share"]) for r in read_csv(tmp_path / "tables" / "cells.csv")}
    assert shares == {c.id: 1.0 if collapsed(c.key) else 0.5 for c in store.cells()}
    constant = {(r["layers"], r["rate"]) for r in read_csv(tmp_path / "tables" / "sweep-test.csv") if r["constant"] == "True"}
    assert constant == {("0", "0.995")}  # layer 29 at 0.995 collapsed for seed 0 alone
    markdown = (tmp_path / "tables" / "sweep-test.md").read_text().splitlines()
    row = next(line for line in markdown if line.startswith("| SST-2 | accuracy | MLP | 0 |"))
    assert row.split("|")[-2].strip().endswith("ᶜ") and "ᶜ" not in "".join(row.split("|")[:-2])
    assert "ᶜ" not in next(line for line in markdown if line.startswith("| SST-2 | accuracy | MLP | 29 |"))
    assert any(line.startswith("ᶜ: every example got the same answer") for line in markdown)


def test_several_seeds_are_mean_and_spread(tmp_path):
    store = make_store(tmp_path, seeds=(0, 1, 2), tasks=("sst2",))
    points = sweep_points(store.cells(), metric="accuracy")
    values = [accuracy("sst2", 5, s, "29:mlp:0.9") for s in (0, 1, 2)]
    (point,) = [p for p in points if p.layers == "29" and p.modules == "mlp" and p.rate == 0.9]
    assert point.seeds == 3 and point.value == pytest.approx(statistics.fmean(values))
    assert point.high - point.value == pytest.approx(statistics.stdev(values))
    fig = plot_rates(points)
    (line,) = dashed(fig.axes[0])
    assert line.get_ydata()[0] == pytest.approx(statistics.fmean(accuracy("sst2", 5, s, "none") for s in (0, 1, 2)))


def test_task_metric_is_each_tasks_headline(tmp_path):
    make_store(tmp_path)
    build_report(tmp_path)  # default --metric task
    metrics = {(r["task"], r["metric"]) for r in read_csv(tmp_path / "tables" / "sweep-test.csv")}
    assert metrics == {("sst2", "accuracy"), ("copa", "macro_f1")}
    with pytest.raises(SvdiclError, match="no stored cell has metric 'f1'"):
        build_report(tmp_path, metric="f1")


def test_fig2_has_a_row_per_shot_count(tmp_path):
    store = make_store(tmp_path, shots=(0, 4, 10), tasks=("sst2",))
    fig = plot_shots(sweep_points(store.cells(), metric="accuracy"))
    assert len(fig.axes) == 3 * len(MODULES)
    for row, shots in enumerate((10, 4, 0)):
        for ax in fig.axes[row * len(MODULES) : (row + 1) * len(MODULES)]:
            assert ax.get_title().endswith(f"{shots}-shot")
            (line,) = dashed(ax)
            assert line.get_ydata()[0] == accuracy("sst2", shots, 0, "none")
    build_report(tmp_path, metric="accuracy")
    assert (tmp_path / "figures" / "fig2-shots-test.svg").is_file()
    fig1 = plot_rates(sweep_points(store.cells(), metric="accuracy"))  # fig 1 shows the most shots
    assert dashed(fig1.axes[0])[0].get_ydata()[0] == accuracy("sst2", 10, 0, "none")


def test_an_uneven_total_is_a_shot_count_of_its_own_in_points_tables_and_figures(tmp_path):
    store = make_store(tmp_path, shots=(2,), tasks=("sst2",))
    uneven = [replace(c.key, extra_shots=1) for c in store.cells()]  # --num_fewshot 5: 2 per class + 1
    fill(store, uneven, lambda key: result(replace(key, shots=7)))  # values no cell of 2 per class has
    points = sweep_points(store.cells(), metric="accuracy")
    baselines = {p.shot_count: p.value for p in points if p.rate == 0}
    assert baselines == {(2, 0): accuracy("sst2", 2, 0, "none"), (2, 1): accuracy("sst2", 7, 0, "none")}  # never averaged
    fig = plot_shots(points)
    assert [ax.get_title().rsplit(" · ", 1)[1] for ax in fig.axes[:: len(MODULES)]] == ["2+1-shot", "2-shot"]
    build_report(tmp_path, metric="accuracy")
    assert {"**2+1-shot**", "**2-shot**"} <= set((tmp_path / "tables" / "sweep-test.md").read_text().splitlines())
    rows = read_csv(tmp_path / "tables" / "sweep-test.csv")
    assert {(r["shots"], r["extra_shots"]) for r in rows} == {("2", "0"), ("2", "1")}


def conditions() -> list[MatrixCondition]:
    rows = []
    for layer in range(4):
        for matrix, group, sigma_min in [("q", "attn", 1e-3), ("k", "attn", 0.1), ("up", "mlp", 0.05 * (layer + 1))]:
            tiny = 1e-9 if (layer, matrix) == (2, "q") else sigma_min
            rows.append(MatrixCondition(layer, group, matrix, f"l{layer}.{matrix}", (64, 96), 10.0 + layer, tiny, 96 * 1.19e-7))
    return rows


def test_fig3_draws_condition_numbers_and_rings_near_singular(tmp_path):
    found = conditions()
    fig = plot_conditions(found)
    attn, mlp = fig.axes
    assert (attn.get_title(), mlp.get_title(), attn.get_yscale()) == ("ATTN", "MLP", "log")
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    for matrix in ("q", "k", "up"):
        expected = [c.condition_number for c in found if c.matrix == matrix]
        assert list(lines[matrix].get_ydata()) == pytest.approx(expected)
    (rings,) = [c for c in attn.collections if isinstance(c, PathCollection)]
    assert rings.get_offsets().tolist() == [[2.0, 12.0 / 1e-9]]
    write_conditions(found, tmp_path)
    build_report(tmp_path)
    table = (tmp_path / "tables" / "conditions.md").read_text()
    assert "| 2 | 1.2e+10† | 120 | 80 | 1.2e+10 | 80 |" in table


def test_algorithm1_table_follows_the_search_schema(tmp_path):
    folder = tmp_path / "search"
    folder.mkdir()
    for task in ("sst2", "copa"):
        for module, layer in (("mlp", 29), ("attn", 12)):
            (folder / f"{task}-{module}.json").write_text(json.dumps(search_result(task, module, layer)))
    report = build_report(tmp_path)
    rows = read_csv(tmp_path / "tables" / "algorithm1.csv")
    assert len(rows) == 4
    for row in rows:
        assert (float(row["baseline"]), float(row["pruned"]), float(row["rate_star"])) == (0.7527, 0.8437, 0.95)
        assert float(row["mcnemar_p"]) == 0.0031 and row["top_layers"].split()[0] == row["layer"]
    markdown = (tmp_path / "tables" / "algorithm1.md").read_text()
    lines = markdown.splitlines()
    assert lines[0] == "| task | tiny L29 MLP | tiny L12 ATTN |"
    assert lines[2].startswith("| SST-2 | 0.7527 [0.725, 0.780] → 0.8437 [0.821, 0.866] (ξ*=0.95, p=0.003) |")
    assert lines[3].startswith("| COPA (macro-F1) |")
    assert any(p.name == "algorithm1-validation.svg" for p in report.files)


def test_algorithm1_several_seeds_show_spread():
    text = algorithm1_markdown([search_result("rte", "mlp", 29, seeds=3)])
    assert "0.7527±0.0100 [0.725, 0.780] → 0.8437±0.0200 [0.821, 0.866] (ξ*=0.95, p=0.003, 3 seeds)" in text


def test_algorithm1_per_seed_rows_are_each_seeds_cells_at_the_shared_rate(tmp_path):
    (tmp_path / "search").mkdir()
    data = search_result("rte", "attn", 12, seeds=3)
    (tmp_path / "search" / "rte-attn.json").write_text(json.dumps(data))
    build_report(tmp_path)
    rows = read_csv(tmp_path / "tables" / "algorithm1-seeds.csv")
    star = data["rates"].index(0.95)
    assert [int(r["seed"]) for r in rows] == [0, 1, 2]
    for row, seed in zip(rows, data["seeds"], strict=True):
        assert float(row["validation_unpruned"]) == seed["validation"][0]
        assert float(row["validation_at_rate_star"]) == seed["validation"][star]
        assert float(row["delta"]) == pytest.approx(seed["pruned"]["value"] - seed["baseline"]["value"])
        assert (row["layer"], row["rate_star"], float(row["mcnemar_p"])) == ("12", "0.95", seed["mcnemar_p"])
    markdown = (tmp_path / "tables" / "algorithm1-seeds.md").read_text().splitlines()
    assert markdown[2] == "| tiny | RTE | ATTN | 12 | 0.95 | 0 | 0.700 → 0.704 | 0.750 → 0.800 | +0.050 | 0.010 | – → – |"
    assert markdown[4].endswith("| 2 | 0.720 → 0.724 | 0.770 → 0.760 | -0.010 | 0.030 | – → – |")
    with_shares = algorithm1_seed_markdown(algorithm1_seed_rows([data], {"base1": 0.5, "pruned1": 1.0})).splitlines()
    assert with_shares[3].endswith("| 1 | 0.710 → 0.714 | 0.760 → 0.780 | +0.020 | 0.020 | 0.50 → 1.00 |")


def test_several_folders_make_one_report_with_a_column_per_model(tmp_path, capsys):
    for model, layer in (("small", 17), ("large", 5)):
        folder = tmp_path / model
        (folder / "search").mkdir(parents=True)
        for module in ("mlp", "attn"):
            data = search_result("sst2", module, layer, seeds=3, model=model)
            (folder / "search" / f"sst2-{module}.json").write_text(json.dumps(data))
        write_conditions(conditions(), folder, model_name=model)
    make_store(tmp_path / "small", tasks=("sst2",))
    out = tmp_path / "combined"
    assert main(["-q", "report", str(tmp_path / "small"), str(tmp_path / "large"), "--output", str(out)]) == 0
    header = (out / "tables" / "algorithm1.md").read_text().splitlines()[0]
    assert header == "| task | large L5 MLP | large L5 ATTN | small L17 MLP | small L17 ATTN |"
    assert {r["model_name"] for r in read_csv(out / "tables" / "algorithm1-seeds.csv")} == {"small", "large"}
    assert (out / "figures" / "fig3-conditions-small.png").is_file() and (out / "tables" / "conditions-large.md").is_file()
    assert (out / "figures" / "fig1-rates-test.png").is_file()
    assert not (tmp_path / "small" / "figures").exists()  # the inputs are only read
    capsys.readouterr()
    assert main(["report", str(tmp_path / "small"), str(tmp_path / "large")]) == 2
    assert "2 report folders need --output" in capsys.readouterr().err


def test_bad_search_result_is_refused(tmp_path):
    data = search_result("sst2", "mlp", 29)
    del data["test"]["pruned"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(SvdiclError, match=r"has no 'test\.pruned\.value'"):
        read_search(tmp_path / "bad.json")
    data = search_result("sst2", "mlp", 29) | {"rate_star": 0.42}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(SvdiclError, match="rate_star among the rates"):
        read_search(tmp_path / "bad.json")


def test_cli_report_writes_images_and_rerun_is_identical(tmp_path, capsys):
    make_store(tmp_path, tasks=("sst2",))
    assert main(["-q", "report", str(tmp_path)]) == 0
    png = tmp_path / "figures" / "fig1-rates-test.png"
    svg = tmp_path / "figures" / "fig1-rates-test.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "<svg" in svg.read_text()[:500]
    first = svg.read_bytes()
    assert main(["-q", "report", str(tmp_path), "--format", "svg"]) == 0
    assert svg.read_bytes() == first  # no timestamps or random ids: reruns are byte-identical
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["report", str(empty)]) == 2
    assert "nothing to report" in capsys.readouterr().err


def write_search(folder: Path, data: dict, name: str = "sst2-mlp.json") -> Path:
    (folder / "search").mkdir(parents=True, exist_ok=True)
    path = folder / "search" / name
    path.write_text(json.dumps(data))
    return path


def test_searches_sharing_a_key_get_a_column_and_a_panel_each(tmp_path):
    """The same alias in float32 and bfloat16: the table and the figure both show each search, in its own column."""
    searches = {}
    for dtype, shift in (("float32", 0.0), ("bfloat16", 0.1)):
        data = search_result("sst2", "mlp", 29)
        data["model"] = {"name": "tiny", "fingerprint": f"fp-{dtype}", "dtype": dtype}
        data["validation"]["values"] = [round(v + shift, 4) for v in data["validation"]["values"]]
        data["test"]["pruned"]["value"] = 0.8 + shift
        write_search(tmp_path / dtype, data)
        searches[dtype] = data
    out = tmp_path / "out"
    assert main(["-q", "report", str(tmp_path / "float32"), str(tmp_path / "bfloat16"), "--output", str(out)]) == 0
    lines = (out / "tables" / "algorithm1.md").read_text().splitlines()
    assert lines[0] == "| task | tiny bfloat16 L29 MLP | tiny float32 L29 MLP |"
    cells = lines[2].split(" | ")[1:]
    assert "→ 0.9000 [" in cells[0] and "→ 0.8000 [" in cells[1]
    rows = {r["dtype"]: r for r in read_csv(out / "tables" / "algorithm1.csv")}
    assert {d: float(r["pruned"]) for d, r in rows.items()} == {"float32": 0.8, "bfloat16": 0.9}
    fig = plot_search([read_search(p) for p in sorted(tmp_path.glob("*/search/*.json"))])
    curves = {ax.get_title().split("\n")[0]: list(ax.get_lines()[0].get_ydata()) for ax in fig.axes}
    assert curves == {f"SST-2 · tiny {d} L29 MLP": searches[d]["validation"]["values"] for d in searches}
    svg = (out / "figures" / "algorithm1-validation.svg").read_text()
    assert "tiny float32 L29 MLP" in svg and "tiny bfloat16 L29 MLP" in svg


def test_searches_of_other_shots_and_limits_are_told_apart_by_what_differs():
    a, b, c = (search_result("sst2", "mlp", 29) for _ in range(3))
    b["shots"], c["limit"] = 2, {"validation": 100, "test": None}
    from svdicl.report import search_columns

    assert search_columns([a, b, c]) == [
        ("tiny 5-shot all examples", "mlp"),
        ("tiny 2-shot all examples", "mlp"),
        ("tiny 5-shot vali 100 test all", "mlp"),
    ]
    assert search_columns([a, search_result("cb", "mlp", 29)]) == [("tiny", "mlp"), ("tiny", "mlp")]  # one column, two rows


def test_the_same_search_twice_is_refused_in_one_line(tmp_path, capsys):
    for folder in ("a", "b"):
        write_search(tmp_path / folder, search_result("sst2", "mlp", 29))
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "are the same search" in err
    assert str(tmp_path / "a" / "search" / "sst2-mlp.json") in err and str(tmp_path / "b" / "search" / "sst2-mlp.json") in err


def test_two_models_with_one_name_get_their_own_files(tmp_path):
    """One alias in float32 and bfloat16 (two fingerprints, one name) into one folder: a table, figure and heading each."""
    make_store(tmp_path, tasks=("sst2",), model="f32aaaaaaaaa")
    make_store(tmp_path, tasks=("sst2",), model="bf16bbbbbbbb", seeds=(0, 1))
    report = build_report(tmp_path, metric="accuracy")
    for fp in ("f32aaaaa", "bf16bbbb"):
        rows = read_csv(tmp_path / "tables" / f"sweep-tiny_{fp}-test.csv")
        assert {r["model"][:8] for r in rows} == {fp}
        assert (tmp_path / "figures" / f"fig1-rates-tiny_{fp}-test.png").is_file()
    page = report.page.read_text()
    figures = [line for line in page.splitlines() if line.startswith("![fig 1]")]
    assert len(figures) == len(set(figures)) == 2
    assert "## Sweep: tiny f32aaaaa, test split" in page and "## Sweep: tiny bf16bbbb, test split" in page
    for folder, fp in (("a", "fp-aaaa"), ("b", "fp-bbbb")):
        write_conditions(conditions(), tmp_path / folder, model_name="tiny", fingerprint=fp)
    write_conditions(conditions(), tmp_path / "c", model_name="tiny", fingerprint="fp-aaaa")  # the same weights again
    build_report([tmp_path / f for f in "abc"], output=tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "tables").glob("conditions*")) == [
        "conditions-tiny_fp-aaaa.md",
        "conditions-tiny_fp-bbbb.md",
    ]


def test_figures_carry_the_model_name_and_n(tmp_path):
    store = make_store(tmp_path, shots=(0, 5), tasks=("sst2",))
    points = sweep_points(store.cells(), metric="accuracy")
    assert plot_rates(points).get_suptitle() == "tiny · test split · n=200"
    assert plot_shots(points).get_suptitle() == "tiny · test split · n=200"
    assert plot_conditions(conditions(), title="tiny").get_suptitle() == "tiny"
    fig = plot_search([search_result("sst2", "mlp", 29)])
    assert fig.axes[0].get_title() == "SST-2 · tiny L29 MLP\nvalidation n=300"
    build_report(tmp_path, formats=["svg"])
    assert "tiny · test split · n=200" in (tmp_path / "figures" / "fig1-rates-test.svg").read_text()


def test_seed_counts_are_per_column(tmp_path):
    """Seed 1 ran only the unpruned model and layer 29: no heading says "mean of 2 seeds" over single-seed cells."""
    store = make_store(tmp_path, tasks=("sst2",))
    keys = [CellKey("fp", "sst2", "test", 5, 1, edit) for edit in ("none", *(f"29:mlp:{r}" for r in RATES[:2]))]
    fill(store, keys, result)
    build_report(tmp_path, metric="accuracy")
    lines = (tmp_path / "tables" / "sweep-test.md").read_text().splitlines()
    assert lines[0] == "**5-shot**"
    headers = [x.strip() for x in lines[2].split("|")[5:-1]]
    assert headers == ["ξ=0 (unpruned), 2 seeds", "0.1, 1-2 seeds", "0.5, 1-2 seeds", "0.9, 1 seed", "0.995, 1 seed"]
    seeds = {
        (r["layers"], r["rate"]): r["seeds"] for r in read_csv(tmp_path / "tables" / "sweep-test.csv") if r["modules"] == "mlp"
    }
    assert seeds[("29", "0.1")] == "2" and seeds[("0", "0.1")] == "1"


def test_stale_report_files_are_removed_and_only_those(tmp_path):
    write_search(tmp_path, search_result("sst2", "mlp", 29))
    build_report(tmp_path)
    assert (tmp_path / "tables" / "algorithm1.md").is_file()
    (tmp_path / "tables" / "my-notes.md").write_text("mine")
    (tmp_path / "search" / "sst2-mlp.json").unlink()  # the search is gone; a sweep is there now
    make_store(tmp_path, tasks=("sst2",))
    report = build_report(tmp_path)
    left = {p.relative_to(tmp_path).as_posix() for p in (tmp_path / "tables").iterdir()} | {
        p.relative_to(tmp_path).as_posix() for p in (tmp_path / "figures").iterdir()
    }
    assert left == {p.relative_to(tmp_path).as_posix() for p in report.files} | {"tables/my-notes.md"}
    assert "algorithm1" not in report.page.read_text()


def test_corrupted_samples_file_is_a_one_line_error(tmp_path, capsys):
    store = make_store(tmp_path, tasks=("sst2",))
    path = tmp_path / store.cells()[3].samples
    path.write_bytes(path.read_bytes()[:-30] + b"\xff\xfe}\n")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"samples file {path} line 4 is damaged" in err


def test_report_of_a_read_only_store(tmp_path, monkeypatch):
    """A finished store in a read-only folder (simulated: every open for writing there fails) is reported elsewhere."""
    import errno
    import os

    store = make_store(tmp_path / "store", tasks=("sst2",))
    expected = {c.id: c.value("accuracy") for c in store.cells()}
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "store")) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    build_report(tmp_path / "store", output=tmp_path / "out", metric="accuracy")
    cells = read_csv(tmp_path / "out" / "tables" / "cells.csv")
    assert {r["id"]: float(r["accuracy"]) for r in cells} == expected
    with pytest.raises(SvdiclError, match="opened read-only"):
        Store(tmp_path / "store", readonly=True).put(
            CellKey("fp", "sst2", "test", 5, 9), result(CellKey("fp", "sst2", "test", 5, 9))
        )


def test_report_reads_eval_folders_and_pairs_each_with_its_unpruned_eval(tmp_path):
    import numpy as np

    from svdicl.experiments.compare import compare_evals
    from svdicl.stats import holm

    rng = np.random.default_rng(11)
    a, b = two_arms(rng)
    c, _ = two_arms(rng)
    write_eval(tmp_path / "base", a)
    write_eval(tmp_path / "pruned", b, edit="29:mlp:0.9")
    write_eval(tmp_path / "other" / "pruned2", c, edit="29:mlp:0.5")
    write_eval(tmp_path / "other" / "cb", c[:1], task="cb")  # a multi-task eval folder: one subfolder per task
    out = tmp_path / "out"
    report = build_report([tmp_path / "base", tmp_path / "pruned", tmp_path / "other"], output=out)
    rows = {(r["task"], r["edit"]): r for r in read_csv(out / "tables" / "evals.csv")}
    assert set(rows) == {("sst2", "none"), ("sst2", "29:mlp:0.9"), ("sst2", "29:mlp:0.5"), ("cb", "none")}
    base = rows[("sst2", "none")]
    assert float(base["accuracy"]) == pytest.approx(a.mean()) and base["seeds"] == "0 1" and base["n"] == "14"
    assert float(base["accuracy_std"]) == pytest.approx(statistics.stdev(a.mean(axis=1)))
    gold = np.arange(14) % 2
    predictions = np.where(b == 1, gold, 1 - gold)
    share = statistics.fmean(max(np.mean(p == 0), np.mean(p == 1)) for p in predictions)
    assert float(rows[("sst2", "29:mlp:0.9")]["answer_share"]) == pytest.approx(share)
    direct = [compare_evals(tmp_path / "base", tmp_path / f).paired for f in ("pruned", "other/pruned2")]
    for edit, paired, adjusted in zip(("29:mlp:0.9", "29:mlp:0.5"), direct, holm([p.p_value for p in direct]), strict=True):
        row = rows[("sst2", edit)]
        assert float(row["delta_accuracy"]) == pytest.approx(paired.difference)
        assert (float(row["p_value"]), float(row["p_holm"])) == pytest.approx((paired.p_value, adjusted))
    assert rows[("cb", "none")]["p_value"] == ""  # nothing to pair with
    assert "## Evaluations (svdicl eval)" in report.page.read_text()
    svg = (out / "figures" / "evals.svg").read_text()
    assert "SST-2 · test · n=14" in svg and "tiny · mean over seeds" in svg


def test_an_eval_at_an_uneven_total_is_paired_only_with_an_unpruned_eval_of_the_same_draw(tmp_path):
    import numpy as np

    a, b = two_arms(np.random.default_rng(3))
    folders = {"base": ("none", 0), "five": ("29:mlp:0.9", 1), "four": ("29:mlp:0.5", 0)}
    for name, (edit, extra) in folders.items():
        results = write_eval(tmp_path / name, b if extra else a, edit=edit) / "results.json"
        data = json.loads(results.read_text())
        data["config"].update(shots_per_class=2, shots_total=4 + extra, **({"extra_shots": extra} if extra else {}))
        results.write_text(json.dumps(data))
    build_report([tmp_path / name for name in folders], output=tmp_path / "out")
    rows = {r["edit"]: r for r in read_csv(tmp_path / "out" / "tables" / "evals.csv")}
    assert (rows["29:mlp:0.9"]["extra_shots"], rows["29:mlp:0.9"]["p_value"]) == ("1", "")  # no unpruned eval of 2 + 1
    assert rows["29:mlp:0.5"]["extra_shots"] == "0" and rows["29:mlp:0.5"]["p_value"] != ""
    assert "| 2+1 |" in (tmp_path / "out" / "tables" / "evals.md").read_text()


def test_an_unwritable_report_folder_is_a_one_line_error(tmp_path, capsys):
    make_store(tmp_path / "store", tasks=("sst2",))
    (tmp_path / "file").write_text("not a folder")
    assert main(["report", str(tmp_path / "store"), "--output", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write report file" in err and "give --output a writable folder" in err


def test_a_cell_in_two_folders_counts_once(tmp_path):
    """A sweep's and a search's store of one model share the unpruned cells: no duplicate rows, no doubled seeds."""
    for folder in ("sweep", "search"):
        make_store(tmp_path / folder, seeds=(0, 1), tasks=("sst2",))
    build_report([tmp_path / "sweep", tmp_path / "search"], output=tmp_path / "out", metric="accuracy")
    ids = [r["id"] for r in read_csv(tmp_path / "out" / "tables" / "cells.csv")]
    assert len(ids) == len(set(ids)) == len(Store(tmp_path / "sweep").cells())
    (row,) = [r for r in read_csv(tmp_path / "out" / "tables" / "sweep-test.csv") if r["layers"] == ""]
    values = [accuracy("sst2", 5, s, "none") for s in (0, 1)]
    assert float(row["high"]) - float(row["value"]) == pytest.approx(statistics.stdev(values))


def test_a_folder_given_twice_is_read_once(tmp_path):
    write_search(tmp_path / "a", search_result("sst2", "mlp", 29))
    report = build_report([tmp_path / "a", tmp_path / "a" / ".." / "a"], output=tmp_path / "out")
    assert len(read_csv(tmp_path / "out" / "tables" / "algorithm1.csv")) == 1 and report.page.is_file()


def test_read_only_store_skips_a_torn_last_line_without_repairing_it(tmp_path):
    store = make_store(tmp_path, tasks=("sst2",))
    with open(tmp_path / "cells.jsonl", "ab") as handle:
        handle.write(b'{"format": 1, "id": "torn')
    size = (tmp_path / "cells.jsonl").stat().st_size
    with pytest.warns(UserWarning, match="cut short by an interrupted write; skipped it"):
        reader = Store(tmp_path, readonly=True)
    assert [c.id for c in reader.cells()] == [c.id for c in store.cells()]
    assert (tmp_path / "cells.jsonl").stat().st_size == size  # nothing written into a folder opened read-only
