"""The batched scorer against a reference that scores one prompt at a time, the plain way."""

from __future__ import annotations

import random

import pytest
from conftest import reference_logprobs, tiny_model, tiny_tokenizer

from svdicl.errors import SvdiclError
from svdicl.prompts import build_prompt, demonstrations_text, sample_demonstrations
from svdicl.requests import Scores, build_requests, context_length, forwarded_tokens
from svdicl.scoring import choose, score_requests
from svdicl.tasks import get_task, parse_task
from svdicl.tasks.data import Example, load_splits

SPLITS = "splits: {demonstrations: {source: train}, validation: {source: validation}, test: {source: test}}\n"
MULTI_TOKEN = 'kind: classification\ntemplate: "q: {text} a:"\nlabels: ["Yes", "No", "Maybe"]\nshots: 1\n' + SPLITS
SINGLE_TOKEN = 'kind: classification\ntemplate: "{text}="\nanswer_delimiter: ""\nlabels: ["+", "-"]\nshots: 1\n' + SPLITS
CHOICE = 'kind: multiple_choice\ntemplate: "{premise} {question}"\nchoices: [c1, c2]\nlabels: [c1, c2]\nshots: 1\n' + SPLITS


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 6))) for _ in range(n))


def tiny_examples(task, n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    if task.kind == "multiple_choice":
        return [
            Example(
                id=f"t:{i}",
                fields={"premise": words(rng, rng.randint(2, 9)), "question": rng.choice(["cause", "effect"])},
                label=i % 2,
                choices=(words(rng, rng.randint(1, 5)), words(rng, rng.randint(1, 5))),
            )
            for i in range(n)
        ]
    return [Example(id=f"t:{i}", fields={"text": words(rng, rng.randint(1, 12))}, label=i % task.num_classes) for i in range(n)]


def check_against_reference(model, tokenizer, task, demonstrations, examples, batch_size):
    """Both padding sides of the batched scorer equal the reference on every example."""
    block = demonstrations_text(task, demonstrations)
    prompts = [build_prompt(task, block, e) for e in examples]
    requests = build_requests(tokenizer, block, [p.query for p in prompts], [p.candidates for p in prompts])
    for prompt, request in zip(prompts, requests, strict=True):
        assert request.prefix is requests[0].prefix  # one shared demonstrations block
        for candidate, continuation in zip(prompt.candidates, request.continuations, strict=True):
            assert request.prefix + request.context + continuation == tuple(tokenizer(prompt.text + candidate)["input_ids"])
    expected = [reference_logprobs(model, tokenizer, p.text, p.candidates) for p in prompts]
    for side in ("left", "right"):
        batched = score_requests(model, requests, batch_size=batch_size, pad_id=tokenizer.pad_token_id, padding_side=side)
        for prompt, scores, want in zip(prompts, batched, expected, strict=True):
            # 1e-4 per token: the LM head on a few rows rounds differently (~2e-5) from full logits.
            for got, reference, n in zip(scores.logprobs, want, scores.n_tokens, strict=True):
                assert got == pytest.approx(reference, abs=1e-4 * n)
            assert choose(scores)[0] == max(range(len(want)), key=want.__getitem__)
            lengths = tuple(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in prompt.candidates)
            assert scores.n_tokens == lengths
    return requests


@pytest.mark.parametrize("spec", [MULTI_TOKEN, SINGLE_TOKEN, CHOICE], ids=["multi-token", "single-token", "choice"])
def test_tiny_llama_matches_reference(spec):
    task = parse_task(spec)
    examples = tiny_examples(task, 7)
    check_against_reference(tiny_model("llama"), tiny_tokenizer(), task, examples[:2], examples[2:], batch_size=3)


def test_every_tiny_family_matches_reference(any_tiny):
    task = parse_task(MULTI_TOKEN)
    examples = tiny_examples(task, 5, seed=1)
    check_against_reference(any_tiny, tiny_tokenizer(), task, examples[:1], examples[1:], batch_size=2)


def test_zero_shot_has_only_the_special_tokens_as_prefix():
    task = parse_task(MULTI_TOKEN)
    tokenizer = tiny_tokenizer()
    requests = check_against_reference(tiny_model("llama"), tokenizer, task, [], tiny_examples(task, 3), batch_size=2)
    assert requests[0].prefix == (tokenizer.bos_token_id,)


@pytest.mark.slow
@pytest.mark.parametrize("name,n", [("sst2", 6), ("copa", 4)])
def test_real_model_matches_reference(real_model, data_dir, name, n):
    task = get_task(name)
    splits = load_splits(task, data_dir)
    demonstrations = sample_demonstrations(task, splits.demonstrations, 1, seed=0)
    check_against_reference(real_model.model, real_model.tokenizer, task, demonstrations, splits.test[:n], batch_size=4)


def test_forwarded_tokens_counts_one_sequence_per_single_token_request():
    task = parse_task(SINGLE_TOKEN)
    tokenizer = tiny_tokenizer()
    examples = tiny_examples(task, 4)
    block = demonstrations_text(task, examples[:1])
    requests = build_requests(tokenizer, block, [build_prompt(task, block, e).query for e in examples], [["+", "-"]] * 4)
    assert forwarded_tokens(requests) == sum(len(r.prefix) + len(r.context) for r in requests)
    multi = parse_task(MULTI_TOKEN)
    prompts = [build_prompt(multi, "", e) for e in tiny_examples(multi, 3)]
    requests = build_requests(tokenizer, "", [p.query for p in prompts], [p.candidates for p in prompts])
    expected = sum(len(r.prefix) + len(r.context) + len(c) - 1 for r in requests for c in r.continuations)
    assert forwarded_tokens(requests) == expected


def test_identical_label_tokens_are_refused():
    # Both label words are outside the tokenizer's alphabet, so both become <unk>.
    with pytest.raises(SvdiclError, match="identical tokens"):
        build_requests(tiny_tokenizer(), "", ["q: x a:"], [[" é", " ü"]])


@pytest.mark.slow
def test_label_fused_with_the_query_is_refused(real_model):
    # "sentiment" + "al" is the single SmolLM2 token " sentimental": the label has no boundary.
    with pytest.raises(SvdiclError, match="query and a candidate answer share a token"):
        build_requests(real_model.tokenizer, "", ["text: good sentiment"], [["al", " positive"]])


def test_demonstrations_fused_with_the_query_are_refused():
    tokenizer = tiny_tokenizer(merges=("\nq",))
    with pytest.raises(SvdiclError, match="demonstrations and the query share a token"):
        build_requests(tokenizer, "q: a a: Yes\n", ["q: b a:"], [[" Yes", " No"]])


def test_prompt_longer_than_the_context_is_refused():
    model, tokenizer = tiny_model("gpt2"), tiny_tokenizer()  # 256 positions
    limit = context_length(model, tokenizer)
    assert limit == 256
    with pytest.raises(SvdiclError, match=r"reads at most 256.*fewer --shots"):
        build_requests(tokenizer, "x" * 300, ["q: a a:"], [[" Yes", " No"]], max_length=limit)
    build_requests(tokenizer, "x" * 200, ["q: a a:"], [[" Yes", " No"]], max_length=limit)


def test_choose_breaks_ties_to_the_lowest_index_and_reports_them():
    assert choose(Scores((-1.0, -0.5, -0.5), (1, 1, 1))) == (1, True)
    assert choose(Scores((-1.0, -0.5, -0.7), (1, 1, 1))) == (1, False)
    # Length normalisation ranks by mean log-probability per token.
    assert choose(Scores((-3.0, -2.0), (6, 2))) == (1, False)
    assert choose(Scores((-3.0, -2.0), (6, 2)), length_normalize=True) == (0, False)


def test_bad_batch_options_are_refused():
    with pytest.raises(SvdiclError, match="padding side"):
        score_requests(tiny_model("llama"), [], padding_side="middle")
    with pytest.raises(SvdiclError, match="batch size"):
        score_requests(tiny_model("llama"), [], batch_size=0)


def cut_per_token(tokens, offsets, cuts, name):
    """The per-token loop `requests._cut` replaced: the reference for its vectorised version."""
    parts = [[], [], []]
    for token, (start, end) in zip(tokens, offsets, strict=True):
        part = sum(end > cut for cut in cuts)
        inside = [i for i, cut in enumerate(cuts) if start < cut < end]
        if inside or any(parts[part + 1 :]):
            where = ("the demonstrations and the query", "the query and a candidate answer")[(inside or [part - 1])[0] > 0]
            raise SvdiclError(f"example {name}: {where} share a token")
        parts[part].append(token)
    return parts


def test_vectorised_cut_agrees_with_the_per_token_loop():
    from svdicl.requests import _cut

    rng = random.Random(0)
    for trial in range(3000):
        n = rng.randint(0, 8)
        ends = sorted(rng.randint(0, 12) for _ in range(n))
        offsets = [(max(0, end - rng.randint(0, 3)), end) for end in ends]
        if rng.random() < 0.1 and n > 1:  # an out-of-order token now and then
            i = rng.randrange(n - 1)
            offsets[i], offsets[i + 1] = offsets[i + 1], offsets[i]
        cuts = tuple(sorted(rng.randint(0, 12) for _ in range(2)))
        tokens = list(range(100, 100 + n))
        try:
            expected = cut_per_token(tokens, offsets, cuts, "x")
        except SvdiclError as error:
            with pytest.raises(SvdiclError) as raised:
                _cut(tokens, offsets, cuts, "x")
            assert str(raised.value).startswith(str(error)), (trial, offsets, cuts)
            continue
        assert _cut(tokens, offsets, cuts, "x") == expected, (trial, offsets, cuts)


def test_tokenizing_reports_progress_per_example():
    class Counter:
        done = 0

        def update(self, n):
            self.done += n

    counter = Counter()
    build_requests(tiny_tokenizer(), "q: a a: Yes\n", ["q: b a:"] * 7, [[" Yes", " No"]] * 7, chunk=3, progress=counter)
    assert counter.done == 7
