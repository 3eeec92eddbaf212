"""The fast paths against the model's own plain forward over prefix + suffix, family by family."""

import copy
import warnings

import pytest
import torch
import transformers as tf
from conftest import TINY_CONFIGS, WINDOWED, build

import svdicl
from svdicl import forward as fw
from svdicl import memory
from svdicl.errors import SvdiclError

# Sliding windows shorter than the test sequences (12-token prefix + up to 7 tokens), so they matter.
CASES = sorted(fw.SUPPORTED) + sorted(WINDOWED)


def random_inputs(seed: int = 1, prefix_length: int = 12, lengths=(3, 7, 1, 5)):
    """A prefix and suffixes of different lengths, each scoring a random token at every position."""
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(2, 128, (prefix_length,), generator=generator).tolist()
    suffixes = []
    for n in lengths:
        ids = torch.randint(2, 128, (n,), generator=generator).tolist()
        tokens = torch.randint(0, 128, (n,), generator=generator).tolist()
        suffixes.append(fw.Suffix(tuple(ids), tuple(enumerate(tokens))))
    return prefix, suffixes


def plain_logprobs(model, prefix, suffixes) -> torch.Tensor:
    """The reference: the model's own forward over prefix + suffix (right-padded batch), full log-softmax."""
    width = len(prefix) + max(len(s.ids) for s in suffixes)
    ids = torch.zeros(len(suffixes), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, suffix in enumerate(suffixes):
        ids[row, : len(prefix) + len(suffix.ids)] = torch.tensor([*prefix, *suffix.ids])
        mask[row, : len(prefix) + len(suffix.ids)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        logprobs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    return torch.tensor(
        [logprobs[row, len(prefix) + p, t].item() for row, s in enumerate(suffixes) for p, t in s.targets],
        dtype=logprobs.dtype,
    )


def assert_matches(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5) -> None:
    assert got.shape == want.shape
    error = (got - want).abs().max().item()
    print(f"max |fast - plain| = {error:.3g} (bound {atol:.0e})")
    assert error <= atol


@pytest.mark.parametrize("case", CASES)
def test_shared_prefix_path_matches_plain_forward(case):
    model = build(case)
    prefix, suffixes = random_inputs()
    want = plain_logprobs(model, prefix, suffixes)
    assert_matches(fw.suffix_logprobs(model, fw.SuffixBatch.of(suffixes), fw.prefix_kv(model, prefix)), want)
    if case in WINDOWED:  # the window really cuts attention in these sequences
        model.config.sliding_window = 1000
        assert (plain_logprobs(model, prefix, suffixes) - want).abs().max().item() > 1e-3


def test_empty_prefix_and_single_token_suffixes():
    model = build("llama")
    prefix, suffixes = random_inputs(seed=2, prefix_length=0, lengths=(1, 4, 1))
    batch = fw.SuffixBatch.of(suffixes)
    want = plain_logprobs(model, prefix, suffixes)
    assert_matches(fw.suffix_logprobs(model, batch, fw.prefix_kv(model, prefix)), want)
    cache = fw.LayerCache(model, prefix, 1)
    assert_matches(cache.score(cache.encode(batch), cache.prefix()), want)
    prefix, _ = random_inputs(seed=3)
    _, one = random_inputs(seed=3, lengths=(1, 1))
    assert_matches(
        fw.suffix_logprobs(model, fw.SuffixBatch.of(one), fw.prefix_kv(model, prefix)), plain_logprobs(model, prefix, one)
    )


@pytest.mark.parametrize("case", CASES)
def test_layer_cache_matches_plain_forward_of_pruned_model(case):
    model = build(case)
    prefix, suffixes = random_inputs()
    batch = fw.SuffixBatch.of(suffixes)
    unpruned = plain_logprobs(model, prefix, suffixes)
    for start in (0, 1, 2):  # first, middle, last layer
        cache = fw.LayerCache(model, prefix, start)
        cached = cache.encode(batch)  # before any edit: layers < start are never run again
        assert_matches(cache.score(cached, cache.prefix()), unpruned)
        for modules in ("attn", "mlp"):
            for rate in (0.5, 0.9):
                with svdicl.pruned(model, layers=start, modules=modules, rate=rate):
                    want = plain_logprobs(model, prefix, suffixes)
                    assert (want - unpruned).abs().max().item() > 1e-3  # the edit changes the answer
                    assert_matches(cache.score(cached, cache.prefix()), want)


def test_stale_inputs_are_refused():
    model = build("llama")
    prefix, suffixes = random_inputs()
    batch = fw.SuffixBatch.of(suffixes)
    cache = fw.LayerCache(model, prefix, 2)
    cached = cache.encode(batch)
    upper = cache.prefix()
    with svdicl.pruned(model, layers=2, modules="mlp", rate=0.5), pytest.raises(SvdiclError, match="other weights"):
        cache.score(cached, upper)  # prefix keys/values from before the edit
    with svdicl.pruned(model, layers=1, modules="mlp", rate=0.5), pytest.raises(SvdiclError, match="below layer 2"):
        cache.score(cached, cache.prefix())  # an edit below the cached layer
    with pytest.raises(SvdiclError, match="cover layers"):
        fw.run_suffixes(model, cached.hidden, batch.mask, upper, 1)
    full = fw.prefix_kv(model, prefix)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1)  # an in-place edit of the embeddings, which layer 0 reads
    with pytest.raises(SvdiclError, match="other weights"):
        fw.suffix_logprobs(model, batch, full)


@pytest.mark.parametrize("family", sorted(set(TINY_CONFIGS) - fw.SUPPORTED))
def test_unsupported_family_is_reported(family):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(TINY_CONFIGS[family]()).eval()
    assert family in (fw.unsupported_reason(model) or "")  # None: the fast paths would serve it
    with pytest.raises(SvdiclError, match="no fast path"):
        fw.LayerCache(model, [1, 2, 3], 0)


def test_suffix_batch_pads_right_and_splits_targets():
    batch = fw.SuffixBatch.of([fw.Suffix((5, 6, 7), ((2, 9), (2, 10))), fw.Suffix((8,), ((0, 11),))], pad_id=3)
    assert batch.ids.tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch.mask.tolist() == [[True, True, True], [True, False, False]]
    assert [t.tolist() for t in batch.split(torch.tensor([1.0, 2.0, 3.0]))] == [[1.0, 2.0], [3.0]]
    with pytest.raises(SvdiclError, match="outside a suffix"):
        fw.Suffix((1, 2), ((2, 5),))


@pytest.mark.parametrize("case", ["llama", "gptj", "gemma3_text-window"])
def test_cache_cost_counts_what_the_cache_holds(case):
    model = build(case)
    prefix, suffixes = random_inputs()
    batch = fw.SuffixBatch.of(suffixes)
    for start in (0, 2):
        cache = fw.LayerCache(model, prefix, start)
        cached = cache.encode(batch)
        cost = memory.cache_cost(model, len(prefix))
        held = cache.lower.nbytes + cache.prefix_hidden.numel() * cache.prefix_hidden.element_size() + cache.prefix().nbytes
        assert cost.fixed == held
        assert cost.per_token * batch.ids.numel() == cached.hidden.numel() * cached.hidden.element_size()


def real_inputs(tokenizer):
    """Six demonstrations, then queries scored on both label words; one also scores a 3-token continuation."""
    pairs = [("a great movie", "positive"), ("boring and long", "negative"), ("I loved every minute", "positive")]
    pairs += [("the worst film this year", "negative"), ("charming, funny and smart", "positive"), ("a dull mess", "negative")]
    prefix = tokenizer("".join(f"text: {t} sentiment: {label}\n" for t, label in pairs))["input_ids"]
    labels = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" positive", " negative")]
    suffixes = []
    for query in ["a triumph of style", "painfully bad acting throughout", "not my cup of tea at all"]:
        ids = tokenizer(f"text: {query} sentiment:", add_special_tokens=False)["input_ids"]
        suffixes.append(fw.Suffix(tuple(ids), tuple((len(ids) - 1, label) for label in labels)))
    query = tokenizer("text: fine sentiment:", add_special_tokens=False)["input_ids"]
    continuation = tokenizer(" mostly positive", add_special_tokens=False)["input_ids"] + labels[:1]
    ids = (*query, *continuation[:-1])
    suffixes.append(fw.Suffix(ids, tuple((len(query) - 1 + j, t) for j, t in enumerate(continuation))))
    return prefix, suffixes


def predictions(logprobs: torch.Tensor) -> list[int]:
    """The preferred label word of each of the three label-scored rows."""
    return logprobs[:6].view(3, 2).argmax(dim=1).tolist()


def check_real(model, prefix, suffixes, atol: float, same_predictions: bool, svd: str = "float32") -> None:
    batch = fw.SuffixBatch.of(suffixes)
    want = plain_logprobs(model, prefix, suffixes)
    got = fw.suffix_logprobs(model, batch, fw.prefix_kv(model, prefix))
    assert_matches(got, want, atol)
    for start in (0, 15, 29):
        cache = fw.LayerCache(model, prefix, start)
        cached = cache.encode(batch)
        for modules in ("attn", "mlp"):
            with svdicl.pruned(model, layers=start, modules=modules, rate=0.9, svd=svd):
                want = plain_logprobs(model, prefix, suffixes)
                got = cache.score(cached, cache.prefix())
            assert_matches(got, want, atol)
            assert not same_predictions or predictions(got) == predictions(want)


def test_real_model_fast_paths_match_plain_forward_float32(real_model):
    """float32 as users run it: within 1e-4 (the plain forward itself moves ~1e-5 with the batch's shape)."""
    prefix, suffixes = real_inputs(real_model.tokenizer)
    check_real(real_model.model, prefix, suffixes, atol=1e-4, same_predictions=True)


@pytest.mark.parametrize("family", ["llama", "gptj", "gemma3_text"])
def test_fast_paths_use_no_deprecated_transformers_keyword(family):
    """transformers renamed `past_key_values` to `cache` (the old name goes in 5.40): neither path may warn."""
    model = build(family)
    prefix, suffixes = random_inputs()
    batch = fw.SuffixBatch.of(suffixes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        fw.suffix_logprobs(model, batch, fw.prefix_kv(model, prefix))
        cache = fw.LayerCache(model, prefix, 1)
        cache.score(cache.encode(batch), cache.prefix())


def rotary_in_float64(model) -> None:
    """Make the rotary cos/sin float64 too: transformers computes them in float32 whatever the model's dtype
    (`position_ids.float() * inv_freq`), and float32 cos/sin of one position can differ by an ulp (2^-24, ~6e-8)
    between tensor shapes -- which the two paths have -- moving log-probs by ~1e-8 (seen: 2.2e-8)."""
    rotary = model.model.rotary_emb

    def forward(x, position_ids):
        freqs = position_ids[..., None].double() * rotary.inv_freq.double()
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * rotary.attention_scaling).to(x.dtype), (angles.sin() * rotary.attention_scaling).to(x.dtype)

    rotary.forward = forward


def test_real_model_fast_paths_are_exact_in_float64(real_model):
    """Entirely in float64 the two paths differ at most by summation order: float64's unit roundoff (1.1e-16)
    times the forward's error growth (30 layers, sums over <= 1,536 terms, log-probs ~15) stays below 1e-12,
    so 1e-10 has >= 100x room yet fails on any real difference (float32 noise is ~1e-5). Measured: <= 5e-14.
    The SVD is float64 too: with the default float32 SVD run on 2 threads, the truncated layer-0 attention
    (float32 factors cast to float64) put the two paths 3.7e-7 apart (1 thread: 5e-14; float64 SVD: 4e-14 on
    either), on an AVX2 CPU on 2026-12-05."""
    prefix, suffixes = real_inputs(real_model.tokenizer)
    model = copy.deepcopy(real_model.model).double()
    rotary_in_float64(model)
    check_real(model, prefix, suffixes, atol=1e-10, same_predictions=False, svd="float64")
