"""The model flags the benchmarks share: which model, in which dtype, on which device, optionally with random weights.

--random-weights builds the architecture in --model's config.json with random weights directly on
--device and takes the tokenizer from the same folder (or Hub id): speed measurements of, say, a
LLaMA-2-7B-shaped model where its weights cannot be had.  Accuracy is then meaningless, but two
paths over the same weights must still agree, so agreement stays a check.
"""

from __future__ import annotations

import argparse
import hashlib

import torch

import svdicl
from svdicl.models import DTYPES, LoadedModel


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="alias, .gguf, folder or Hub id (--random-weights: its config)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--random-weights", action="store_true", help="build --model's config.json with random weights on --device (timing only)"
    )


def load(args: argparse.Namespace) -> LoadedModel:
    """The model the flags name, in eval mode on args.device."""
    if not args.random_weights:
        return svdicl.load_model(args.model, dtype=args.dtype, device=args.device)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    with torch.device(args.device):  # initialised where it runs: a 7B model never passes through host memory
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype]).eval()
    digest = hashlib.blake2b(config.to_json_string().encode(), digest_size=16).hexdigest()
    return LoadedModel(model, tokenizer, source=f"{args.model} (random weights)", fingerprint=digest, dtype=args.dtype)


def describe(loaded: LoadedModel, device: str) -> str:
    """One line: model, parameters, dtype and where it runs."""
    params = sum(p.numel() for p in loaded.model.parameters())
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return f"{loaded.source}: {params / 1e9:.2f}B parameters, {loaded.dtype}, {device} ({where})"
