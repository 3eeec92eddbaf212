"""What an export says about itself: a model card (README.md) and an `svdicl` entry in config.json.

An export folder travels without svdicl (copied, uploaded to the Hub, opened by lm-eval), so
it explains itself where people and tools look: the card says what was pruned, to which ranks,
at what relative error, from which weights, with which svdicl, and how to load it; config.json
carries the same facts in short under the key `svdicl` (transformers keeps unknown config keys
on reload, so `AutoConfig.from_pretrained(folder).svdicl` reads them back).  The full record
stays in svdicl_edit.json.
"""

from __future__ import annotations

import re
from pathlib import Path

CARD_FILE = "README.md"
CONFIG_KEY = "svdicl"
PAPER = (
    "Yao, Hu, et al.: Enhancing In-Context Learning Performance with just SVD-Based Weight Pruning: "
    "A Theoretical Perspective. NeurIPS 2024, arXiv:2406.03768"
)
UNCHANGED = " No matrix was truncated (every rate is 0): the weights are the source's."
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def config_entry(info: dict, edit_file: str) -> dict:
    """The `svdicl` entry of config.json: format, version, source, edit and kept rank per matrix."""
    edit = info["edit"]
    return {
        "format": info["format"],
        "version": info["versions"].get("svdicl"),
        "source": info["source"],
        "source_fingerprint": info["source_fingerprint"],
        "edit": edit["key"],
        "kept_ranks": {m["name"]: m["kept_rank"] for m in edit["matrices"]},
        "details": edit_file,
    }


def model_card(info: dict, folder: str | Path, notes: str = ""):
    """A `huggingface_hub.ModelCard` for the export `info` (what svdicl_edit.json records) written to `folder`."""
    from huggingface_hub import ModelCard, ModelCardData

    source = info["source"]
    hub_source = bool(_HUB_ID.match(source)) and not Path(source).expanduser().exists()
    data = ModelCardData(
        library_name="transformers" if info["format"] == "dense" else "svdicl",
        pipeline_tag="text-generation",
        tags=["svdicl", "svd", "low-rank", "pruned"],
        base_model=source if hub_source else None,
    )
    sections = [
        _summary(info),
        _matrices(info),
        _provenance(info),
        _loading(info, str(folder)),
        *([f"## How this edit was chosen\n\n{notes.strip()}\n"] if notes.strip() else []),
        f"## Citation\n\n{PAPER}.\n",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections))


def _summary(info: dict) -> str:
    edit = info["edit"]
    n = sum(m["kept_rank"] < m["rank"] for m in edit["matrices"])
    if info["format"] == "dense":
        stored = (
            "Stored **dense**: every matrix at its full shape (the truncated ones too), so any tool that loads the "
            "source model loads this one."
        )
    else:
        size = info["size"]
        stored = (
            f"Stored **factorised**: each listed matrix W_k (m x n) as two thin factors B = U_k S_k (m x k) and "
            f"A = Vh_k (k x n), {size['params_dense']:,} -> {size['params_factorized']:,} parameters "
            f"({size['bytes_dense']:,} -> {size['bytes_factorized']:,} bytes). Load it with svdicl (below)."
        )
    return (
        f"# {info['source']}, {edit['key']} (svdicl)\n\n"
        f"This is `{info['source']}` with {n} weight matrices replaced by their best rank-k approximation (truncated "
        f"SVD, Eckart-Young): clipping rate xi keeps floor((1 - xi) * min(m, n)) singular values, as in Yao et al. "
        f"(NeurIPS 2024). Made with svdicl {info['versions'].get('svdicl')}; edit `{edit['key']}` "
        f"(specs: {', '.join(f'`{s}`' for s in edit['specs'])}).{UNCHANGED if n == 0 else ''}\n\n{stored}\n"
    )


def _matrices(info: dict) -> str:
    factorized = {m["name"] for m in info.get("factorized", {}).get("modules", [])}
    dense = {m["name"]: m["reason"] for m in info.get("factorized", {}).get("dense", [])}
    lines = [
        "## What was pruned\n",
        "Relative error = ||W - W_k||_F / ||W||_F of each matrix (from its singular values).\n",
        "| matrix | shape (out x in) | rank kept / full | relative error | stored as |",
        "|---|---|---|---|---|",
    ]
    for m in info["edit"]["matrices"]:
        if info["format"] == "dense":
            stored = "dense"
        else:
            stored = "factors" if m["name"] in factorized else f"dense ({dense.get(m['name'], 'not pruned')})"
        lines.append(
            f"| `{m['name']}` | {m['shape'][0]} x {m['shape'][1]} | {m['kept_rank']} / {m['rank']} | "
            f"{m['relative_error']:.4f} | {stored} |"
        )
    return "\n".join(lines) + "\n"


def _provenance(info: dict) -> str:
    versions = ", ".join(f"{name} {value}" for name, value in info["versions"].items() if value)
    return (
        "## Source\n\n"
        f"- source model: `{info['source']}` ({info['dtype']})\n"
        f"- source fingerprint: `{info['source_fingerprint']}` (BLAKE2 of the source's config and every weight as "
        f"loaded; `svdicl.load_model(source).fingerprint` gives the same for the same weights)\n"
        f"- versions: {versions}\n"
        "- the full record (every matrix, its rate, ranks, errors): `svdicl_edit.json`; in short: the `svdicl` key "
        "of `config.json`\n"
    )


def _loading(info: dict, folder: str) -> str:
    if info["format"] == "dense":
        return (
            "## How to load it\n\n"
            "A plain Hugging Face folder:\n\n"
            "```python\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{folder}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")\n'
            "```\n\n"
            f"With lm-evaluation-harness: `lm_eval --model hf --model_args pretrained={folder} --tasks ...`; "
            f'with svdicl: `svdicl.load_pruned("{folder}")` or `svdicl eval --model {folder} ...`.\n'
        )
    return (
        "## How to load it\n\n"
        "The weights file is `model.factorized.safetensors`, on purpose not `model.safetensors`: transformers alone "
        "stops with an error instead of loading random weights for the factorised matrices. svdicl rebuilds the "
        "model with `LowRankLinear` modules:\n\n"
        "```python\n"
        "import svdicl\n\n"
        f'loaded = svdicl.load_pruned("{folder}")  # .model (a transformers model), .tokenizer\n'
        "```\n\n"
        "With lm-evaluation-harness, hand it the model object:\n\n"
        "```python\n"
        "import lm_eval\n"
        "from lm_eval.models.huggingface import HFLM\n\n"
        "lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=8)\n"
        'results = lm_eval.simple_evaluate(model=lm, tasks=["..."])\n'
        "```\n\n"
        f"On the command line: `svdicl eval --model {folder} ...`.\n"
    )
