"""`svdicl sweep`: the grid, one evaluate_edits call per (layers, modules) line, cells equal to a direct
evaluation, resume after an interruption without rescoring, a torn store repaired, the CLI and its errors."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import (
    EXAMPLES,
    Calls,
    assert_same_contents,
    contents,
    grid,
    one_line_error,
    toy_loaded,
)

from svdicl.cli import main, parse_args
from svdicl.cli.common import seeds_from
from svdicl.errors import SvdiclError
from svdicl.experiments.grid import SweepGrid, layer_sets, module_sets, parse_ints, parse_list, parse_rates
from svdicl.experiments.run_scoring import evaluate_run
from svdicl.experiments.runs import prepare_run
from svdicl.experiments.sweep import load_task_splits, plan_sweep, sweep
from svdicl.prune import pruned
from svdicl.specs import PruneSpec
from svdicl.store import CELLS_FILE, Store

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lines_rates_and_their_errors():
    assert layer_sets("first2,last2", 30) == ["0", "1", "28", "29"]
    assert layer_sets(["0+1", "last1", "-1"], 30) == ["0,1", "29"]
    assert layer_sets("first2+last2", 30) == ["0,1,28,29"]
    assert module_sets("mlp,attn") == ["mlp", "attn"] and module_sets(["q+k", "mlp"]) == ["q,k", "mlp"]
    assert parse_rates("0.9, 0, 0.5,0.9") == (0.0, 0.5, 0.9)
    with pytest.raises(SvdiclError, match="layer 30 is out of range"):
        layer_sets("30", 30)
    with pytest.raises(SvdiclError, match=r"outside \[0, 1\)"):
        parse_rates("0.5,1.2")
    with pytest.raises(SvdiclError, match="not a number"):
        parse_rates("0.5,high")


def test_plan_shares_the_unpruned_cell_and_makes_one_call_per_line(toy):
    loaded = toy_loaded()
    chosen = grid(toy, seeds=(0, 3), limit=None)
    plan = plan_sweep(loaded, chosen, load_task_splits(chosen.tasks, toy.parent / "data"))
    assert [(g.shots, g.seed) for g in plan] == [(0, 0), (0, 3), (1, 0), (1, 3)]
    for group in plan:
        lines = [{(s[0].layers, s[0].modules) for _, s in call if s} for call in group.calls]
        assert lines == [{("0", "mlp")}, {("0", "attn")}, {("2", "mlp")}, {("2", "attn")}]
        edits = [key.edit for key, _ in group.cells]
        assert edits[0] == "none" and edits.count("none") == 1  # one unpruned cell per run, in the first call
        assert len(edits) == len(set(edits)) == 1 + 4 * 2
        assert all(key.limit is None and key.shots == group.shots and key.seed == group.seed for key, _ in group.cells)
        assert group.examples == 70 - 30
    limited = plan_sweep(loaded, grid(toy, limit=12), load_task_splits(chosen.tasks, toy.parent / "data"))
    assert {key.limit for group in limited for key, _ in group.cells} == {12}
    with pytest.raises(SvdiclError, match="class 'Yes' has only 20"):
        plan_sweep(loaded, grid(toy, shots=(25,)), load_task_splits(chosen.tasks, toy.parent / "data"))


def test_cells_equal_a_direct_evaluation_and_each_line_is_one_call(toy, monkeypatch):
    loaded, calls = toy_loaded(), Calls(monkeypatch)
    store = Store(toy.parent / "out")
    result = sweep(loaded, grid(toy), store, data_dir=toy.parent / "data", model_name="tiny", progress=False)
    assert result.computed == len(result.cells) == 2 * (1 + 4 * 2)
    assert calls.edits[0] == ["none", "0:mlp:0.5", "0:mlp:0.9"] and calls.edits[1] == ["0:attn:0.5", "0:attn:0.9"]
    assert len(calls.edits) == 2 * 4  # shots x lines
    values = {cell.key.edit: cell.value("accuracy") for cell in result.cells if cell.key.shots == 1}
    assert len(set(values.values())) > 1  # the edits change answers, so the comparison below means something
    for cell in [c for c in result.cells if c.key.shots == 1]:
        run = prepare_run(loaded, str(toy), split="test", shots=1, seed=0, limit=12, data_dir=toy.parent / "data")
        specs = [] if cell.key.edit == "none" else [PruneSpec.parse(cell.key.edit)]
        with pruned(loaded.model, specs=specs):
            direct = evaluate_run(loaded, run, path="plain")
        samples = store.samples(cell)
        assert [s["prediction"] for s in samples] == list(direct.predictions)
        for stored, scores in zip(samples, direct.scores, strict=True):
            assert stored["logprobs"] == pytest.approx(scores.logprobs, abs=1e-4)
        assert cell.metrics["accuracy"]["value"] == direct.accuracy.value
        assert (cell.metrics["accuracy"]["ci_low"], cell.metrics["accuracy"]["ci_high"]) == (
            direct.accuracy.low,
            direct.accuracy.high,
        )
        assert cell.n == 12 and cell.key.limit == 12 and cell.model_name == "tiny"
        assert cell.info["scoring"]["path"] in ("layer", "prefix", "plain") and cell.info["shots_total"] == 2
        assert len(cell.info["matrices"]) == (0 if not specs else 3 if specs[0].modules == "mlp" else 4)


def test_interrupted_sweep_resumes_without_recomputing_finished_cells(toy, monkeypatch):
    data = toy.parent / "data"
    reference = Store(toy.parent / "reference")
    sweep(toy_loaded(), grid(toy), reference, data_dir=data, progress=False)

    out = toy.parent / "out"
    Calls(monkeypatch, stop_after=6)  # interrupted inside the third call (0-shot, layer 2 mlp), after its first rate
    with pytest.raises(KeyboardInterrupt):
        sweep(toy_loaded(), grid(toy), Store(out), data_dir=data, progress=False)
    finished = {(cell.key.shots, cell.key.edit) for cell in Store(out).cells()}
    assert len(finished) == 6 and (0, "2:mlp:0.5") in finished

    monkeypatch.undo()
    calls = Calls(monkeypatch)
    resumed = sweep(toy_loaded(), grid(toy), Store(out), data_dir=data, progress=False)
    assert calls.edits[0] == ["2:mlp:0.9"]  # the interrupted call resumes with its missing rate only
    assert not set(calls.cells) & finished  # no finished cell is scored again
    assert resumed.computed == calls.yielded == len(calls.cells) == 18 - 6
    assert_same_contents(contents(reference), contents(Store(out)))


def test_a_store_torn_mid_write_is_repaired_and_only_that_cell_recomputed(toy, monkeypatch):
    data = toy.parent / "data"
    out = toy.parent / "out"
    sweep(toy_loaded(), grid(toy), Store(out), data_dir=data, progress=False)
    complete = contents(Store(out))
    lines = (out / CELLS_FILE).read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-1])
    (out / CELLS_FILE).write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a write cut short

    calls = Calls(monkeypatch)
    with pytest.warns(UserWarning, match=r"line 18 was cut short by an interrupted write; removed it"):
        sweep(toy_loaded(), grid(toy), Store(out), data_dir=data, progress=False)
    assert calls.requested == [last["edit"]]
    assert_same_contents(complete, contents(Store(out)))

    lines = (out / CELLS_FILE).read_bytes().splitlines(keepends=True)
    (out / CELLS_FILE).write_bytes(lines[0] + b'{"format": 1, "id": "x"\n' + b"".join(lines[2:]))
    with pytest.raises(SvdiclError, match=r"line 2 is not a valid cell record .*delete that line"):
        Store(out)


def test_cli_sweep_from_a_yaml_config_resumes_and_draws_the_report(toy, model_folder, capsys):
    config = toy.parent / "sweep.yaml"
    out = toy.parent / "out"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(model_folder),
                "tasks": [str(toy)],
                "layers": ["first1", "last1"],
                "modules": ["mlp"],
                "rates": [0, 0.5, 0.9],
                "shots": [0, 1],
                "seeds": [0],
                "limit": 10,
                "data_dir": str(toy.parent / "data"),
                "output": str(out),
                "format": ["svg"],
            }
        )
    )
    assert main(["-q", "sweep", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "10 cells, 10 scored now and 0 from the store" in printed and "ξ=0 (unpruned)" in printed
    cells = Store(out).cells()
    assert len(cells) == 10 and {c.key.limit for c in cells} == {10} and {c.n for c in cells} == {10}
    assert {c.layers for c in cells} == {None, "0", "2"}
    for name in ("fig1-rates-test.svg", "fig2-shots-test.svg"):
        assert (out / "figures" / name).is_file()
    rows = (out / "tables" / "sweep-test.csv").read_text().splitlines()
    assert len(rows) == 1 + 10
    assert main(["-q", "sweep", "--config", str(config), "--no-report"]) == 0
    assert "10 cells, 0 scored now and 10 from the store" in capsys.readouterr().out


def test_cli_errors_are_one_line(toy, model_folder, capsys, tmp_path):
    base = ["sweep", "--model", str(model_folder), "--data-dir", str(toy.parent / "data"), "--output", str(tmp_path / "o")]
    assert "unknown task 'nope'" in one_line_error(capsys, *base, "--tasks", "nope")
    assert "outside [0, 1)" in one_line_error(capsys, *base, "--tasks", str(toy), "--rates", "0.5,1.5")
    assert "layer 7 is out of range" in one_line_error(capsys, *base, "--tasks", str(toy), "--layers", "7")
    assert "unknown module" in one_line_error(capsys, *base, "--tasks", str(toy), "--modules", "fc_in")
    assert "--seeds 'x' is not an integer" in one_line_error(capsys, *base, "--tasks", str(toy), "--seeds", "0,x")
    assert "give --output DIR" in one_line_error(capsys, "sweep", "--tasks", "sst2")
    assert "give --tasks" in one_line_error(capsys, "sweep", "--output", str(tmp_path / "o"))


@pytest.mark.parametrize("name", ["fig1.yaml", "fig2.yaml", "quick-sweep.yaml"])
def test_example_sweep_configs_are_valid(name):
    argv = ["sweep", "--config", str(EXAMPLES / name)]
    args = parse_args(argv)
    shots = None if args.shots is None else parse_ints(args.shots, "--shots")
    chosen = SweepGrid(
        tasks=tuple(parse_list(args.tasks)),
        layers=tuple(parse_list(args.layers)),
        modules=tuple(parse_list(args.modules)),
        rates=args.rates,
        shots=(None,) if shots is None else shots,
        seeds=seeds_from(args),
        split=args.split,
        limit=args.limit,
    )
    assert len(layer_sets(chosen.layers, 30)) >= 2 and module_sets(chosen.modules) and args.output
    assert args.model == "smollm2-135m" and len(chosen.rates) >= 4


def test_cli_sweep_sampling_balanced_scores_an_even_subset_of_the_validation_split(toy, model_folder, capsys):
    source = toy.parent / "data" / "toy" / "test.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    source.write_text("".join(json.dumps({**row, "label": int(i % 5 == 0)}) + "\n" for i, row in enumerate(rows)))
    out = toy.parent / "out"
    argv = ["-q", "sweep", "--model", str(model_folder), "--tasks", str(toy), "--data-dir", str(toy.parent / "data"),
            "--layers", "0", "--modules", "mlp", "--rates", "0,0.9", "--split", "validation", "--limit", "8",
            "--output", str(out), "--no-report"]  # fmt: skip
    assert main([*argv, "--sampling", "balanced"]) == 0 and main(argv) == 0
    store = Store(out)
    by_data = {}
    for cell in store.cells():
        by_data.setdefault(cell.key.data, []).append(sorted(row["gold"] for row in store.samples(cell)))
    assert len(by_data) == 2  # the balanced and the random subset never share a cell
    golds = sorted(by_data.values(), key=lambda found: sum(found[0]))
    assert golds[1] == [[0, 0, 0, 0, 1, 1, 1, 1]] * 2  # 4 of each class in both cells of the balanced sweep
    assert all(gold.count(1) < 4 for gold in golds[0])
    capsys.readouterr()
