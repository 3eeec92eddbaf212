"""What a search writes and how it is read back: DIR/search/<task>-<module>.json (schema `svdicl.search/1`,
docs/experiments.md) beside replayable eval and prune configs, and the model card's account of an export.

The writer owns the schema: `svdicl report` reads search results through `read_search` here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from svdicl.errors import SvdiclError

SEARCH_DIR = "search"
SEARCH_FORMAT = "svdicl.search/1"


def result_stem(result: dict) -> str:
    """`sst2-mlp`, `rte-q+k`: the file name of a search result, without suffix."""
    return f"{result['task']}-{result['module'].replace(',', '+')}"


def card_notes(result: dict) -> str:
    """The model card's account of a search's export: how Algorithm 1 chose the edit and what it measured."""
    test, metric = result["test"], result["metric"]
    layer = (
        f"layer {result['layer']}, the largest condition number among the top {result['top_k']} ({result['top_layers']})"
        if result["top_layers"]
        else f"layer {result['layer']} (given)"
    )
    curve = ", ".join(f"{r:g}: {v:.4f}" for r, v in zip(result["rates"], result["validation"]["values"], strict=True))
    return (
        f"Algorithm 1 (svdicl search) on task `{result['task']}`, module `{result['module']}`, "
        f"{result['shots_total']} demonstrations, seeds {[s['seed'] for s in result['seeds']]}, model "
        f"`{result['model']['name']}`:\n\n"
        f"- {layer};\n"
        f"- validation {metric} per clipping rate (n = {result['validation']['n']}): {curve};\n"
        f"- rate* = {result['rate_star']:g} (the validation argmax, ties to the smaller rate);\n"
        f"- test {metric} (n = {test['n']}): unpruned {_card_estimate(test['baseline'])}, this model "
        f"{_card_estimate(test['pruned'])}, paired p = {test['p_value']:.3g} ({test['paired'].get('method', 'paired test')}).\n"
    )


def _card_estimate(entry: dict) -> str:
    return f"{entry['value']:.4f} [{entry['ci_low']:.4f}, {entry['ci_high']:.4f}]"


def write_search(result: dict, directory: str | Path, *, data_dir: str | Path | None = None) -> list[Path]:
    """DIR/search/<task>-<module>.json plus replayable configs: `.yaml` for `svdicl eval --config` (the
    test evaluation of the chosen model) and, when rate* > 0, `.prune.yaml` for `svdicl prune --config`.

    Returns the paths written, the JSON first and the eval config second."""
    folder = Path(directory) / SEARCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = result_stem(result)
    spec = f"{result['layer']}:{result['module']}:{result['rate_star']:g}"
    prune = [spec] if result["rate_star"] > 0 else []
    common = {"model": result["model"]["name"], "dtype": result["model"]["dtype"], "prune": prune,
              "svd_dtype": result["scoring"]["options"]["svd"]}  # fmt: skip
    evaluation = {
        "task": result["task_source"],
        "shots_per_class": result["shots"],
        "seed": [s["seed"] for s in result["seeds"]],
        "split": "test",
        "limit": result["limit"]["test"],
        "length_normalize": result["scoring"]["options"]["length_normalize"],
        **({"data_dir": str(Path(data_dir).resolve())} if data_dir is not None else {}),
        **common,
    }
    where = f"{result['task']}, {result['module']} of layer {result['layer']}, rate* {result['rate_star']:g}"
    unpruned = " (rate* = 0: the unpruned model)" if not prune else ""
    files = {
        f"{stem}.yaml": (
            f"# Algorithm 1's choice for {where}{unpruned}.\n"
            f"# Replays the test evaluation of the chosen model: svdicl eval --config {SEARCH_DIR}/{stem}.yaml --output DIR\n",
            evaluation,
        )
    }
    if prune:  # rate* = 0 leaves nothing to prune
        files[f"{stem}.prune.yaml"] = (
            f"# Algorithm 1's choice for {where}.\n"
            f"# Saves the chosen model: svdicl prune --config {SEARCH_DIR}/{stem}.prune.yaml --output DIR\n",
            common,
        )
    (folder / f"{stem}.prune.yaml").unlink(missing_ok=True)
    written = [_write(folder / name, text + yaml.safe_dump(values, sort_keys=False)) for name, (text, values) in files.items()]
    result = {
        **result,
        "config": f"{SEARCH_DIR}/{stem}.yaml",
        "prune_config": f"{SEARCH_DIR}/{stem}.prune.yaml" if prune else None,
    }
    written.insert(0, _write(folder / f"{stem}.json", json.dumps(result, indent=2, allow_nan=False) + "\n"))
    return written


def _write(path: Path, text: str) -> Path:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path


def read_search(path: str | Path) -> dict[str, Any]:
    """One search result (schema `svdicl.search/1`, docs/experiments.md), checked for the fields the report needs."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SvdiclError(f"cannot read search result {file} ({exc}); rerun svdicl search") from None
    fmt = data.get("format", "") if isinstance(data, dict) else ""
    if not fmt.startswith("svdicl.search/"):
        raise SvdiclError(f"{file} is not an svdicl search result (format {fmt!r}); expected {SEARCH_FORMAT}")
    if int(fmt.rpartition("/")[2] or 0) > int(SEARCH_FORMAT.rpartition("/")[2]):
        raise SvdiclError(f"{file} has format {fmt}, newer than this svdicl reads; upgrade svdicl")
    required = ("task", "module", "layer", "rates", "rate_star", "validation.values", "test.baseline.value", "test.pruned.value")
    for dotted in required:
        node: Any = data
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise SvdiclError(f"search result {file} has no {dotted!r}; it does not follow {SEARCH_FORMAT}")
            node = node[part]
    values, rates = data["validation"]["values"], data["rates"]
    if len(values) != len(rates) or data["rate_star"] not in rates:
        raise SvdiclError(f"search result {file}: needs one validation value per rate and rate_star among the rates")
    return data
