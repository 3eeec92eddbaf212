"""Layer and module specs resolve to the right matrices on every family of the table."""

import pytest
import torch
from conftest import TINY_CONFIGS, tiny_model

import svdicl
from svdicl.errors import SvdiclError
from svdicl.targets import parse_layers, resolve

# What each family's `attn` and `mlp` groups must name inside layer 1, written out by hand
# from the transformers modelling code (not derived from svdicl's table).
EXPECTED = {
    "llama": ("model.layers.1.", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    "gptj": ("transformer.h.1.", ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"], ["mlp.fc_in", "mlp.fc_out"]),
    "gpt2": ("transformer.h.1.", ["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"]),
    "gpt_neox": ("gpt_neox.layers.1.", ["attention.query_key_value", "attention.dense"],
                 ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "opt": ("model.decoder.layers.1.", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"],
            ["fc1", "fc2"]),
    "phi": ("model.layers.1.", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"],
            ["mlp.fc1", "mlp.fc2"]),
    "phi3": ("model.layers.1.", ["self_attn.qkv_proj", "self_attn.o_proj"], ["mlp.gate_up_proj", "mlp.down_proj"]),
}  # fmt: skip
for _name in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"):
    EXPECTED[_name] = EXPECTED["llama"]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_groups_resolve_to_the_family_matrices(family):
    model = tiny_model(family)
    prefix, attn, mlp = EXPECTED[family]
    assert [t.name for t in resolve(model, 1, "attn")] == [prefix + n for n in attn]
    assert [t.name for t in resolve(model, 1, "mlp")] == [prefix + n for n in mlp]
    assert [t.name for t in resolve(model, "1", "all")] == [prefix + n for n in attn + mlp]
    every = resolve(model, "all", "mlp")
    assert sorted({t.layer for t in every}) == [0, 1, 2]
    for target in every:
        assert isinstance(model.get_submodule(target.module_name).weight, torch.nn.Parameter)


def test_layer_specs():
    assert parse_layers("26", 28) == [26]
    assert parse_layers(-1, 28) == [27]
    assert parse_layers("0-1", 28) == [0, 1]
    assert parse_layers("first2,last2", 28) == [0, 1, 26, 27]
    assert parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers([0, -1], 4) == [0, 3]
    for bad in ["28", "-29", "3-1", "last0", "x", "first29", ""]:
        with pytest.raises(SvdiclError):
            parse_layers(bad, 28)


def test_gpt2_conv1d_slices_are_column_blocks_of_the_stored_weight():
    model = tiny_model("gpt2")
    hidden = model.config.n_embd
    q, k, v = resolve(model, 0, "q,k,v")
    assert all(t.transposed for t in (q, k, v))
    assert [t.blocks for t in (q, k, v)] == [((0, hidden),), ((hidden, 2 * hidden),), ((2 * hidden, 3 * hidden),)]
    stored = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # (in, 3*out)
    with svdicl.pruned(model, layers=0, modules="k", rate=0.9) as edit:
        now = model.transformer.h[0].attn.c_attn.weight
        key = now[:, hidden : 2 * hidden].T  # logical (out, in) of k
        assert torch.linalg.matrix_rank(key).item() == edit.matrices[0].kept_rank == 6
        assert torch.equal(now[:, :hidden], stored[:, :hidden])
        assert torch.equal(now[:, 2 * hidden :], stored[:, 2 * hidden :])
        best = torch.linalg.svd(stored[:, hidden : 2 * hidden].T.double())
        reference = (best.U[:, :6] * best.S[:6]) @ best.Vh[:6]
        assert torch.allclose(key.double(), reference, atol=1e-5)


def test_gpt_neox_query_rows_are_interleaved_per_head():
    model = tiny_model("gpt_neox")
    heads, hidden = model.config.num_attention_heads, model.config.hidden_size
    head_dim = hidden // heads
    weight = model.gpt_neox.layers[2].attention.query_key_value.weight
    original = weight.detach().clone()
    with svdicl.pruned(model, layers=-1, modules="q", rate=0.5):
        per_head = weight.view(heads, 3, head_dim, hidden)  # the modelling code's [head][q|k|v][dim] layout
        query = per_head[:, 0].reshape(heads * head_dim, hidden)
        assert torch.linalg.matrix_rank(query).item() == 32
        untouched = original.view(heads, 3, head_dim, hidden)[:, 1:]
        assert torch.equal(per_head[:, 1:], untouched)
    assert torch.equal(weight, original)


def test_phi3_fused_gate_up_slices_follow_the_chunk_order():
    model = tiny_model("phi3")
    inter = model.config.intermediate_size
    (up,) = resolve(model, 0, "up")
    assert up.blocks == ((inter, 2 * inter),)
    (q, k, v) = resolve(model, 0, "q,k,v")
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    q_rows = model.config.num_attention_heads * head_dim
    kv_rows = model.config.num_key_value_heads * head_dim
    assert [q.blocks, k.blocks, v.blocks] == [
        ((0, q_rows),),
        ((q_rows, q_rows + kv_rows),),
        ((q_rows + kv_rows, q_rows + 2 * kv_rows),),
    ]


def test_whole_fused_and_part_cannot_both_be_chosen():
    model = tiny_model("gpt2")
    with pytest.raises(SvdiclError, match="selected twice"):
        resolve(model, 0, "qkv,q")
    specs = [svdicl.PruneSpec("0", "attn", 0.5), svdicl.PruneSpec("0", "q", 0.9)]
    with pytest.raises(SvdiclError, match="selected twice"), svdicl.pruned(model, specs=specs):
        pass


def test_regex_selects_modules_and_respects_layers():
    model = tiny_model("llama")
    found = resolve(model, "last2", r"re:mlp\.(up|down)_proj")
    assert [t.name for t in found] == [f"model.layers.{i}.mlp.{n}_proj" for i in (1, 2) for n in ("up", "down")]
    with pytest.raises(SvdiclError, match="matches no weight"):
        resolve(model, "all", "re:nothing_here")
    with pytest.raises(SvdiclError, match="does not compile"):
        resolve(model, "all", "re:(")


def test_unknown_family_needs_a_regex():
    model = tiny_model("llama")
    model.config.model_type = "brand_new_arch"
    with pytest.raises(SvdiclError, match=r"not in svdicl's table.*regex"):
        resolve(model, 0, "mlp")
    assert [t.layer for t in resolve(model, 0, r"re:down_proj")] == [0]


def test_unknown_module_names_the_choices():
    with pytest.raises(SvdiclError, match=r"unknown module 'fc_in' for family llama; choose from .*gate"):
        resolve(tiny_model("llama"), 0, "fc_in")


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text", "opt"])
def test_tied_embeddings_are_never_changed_by_accident(family):
    model = tiny_model(family)
    embeddings = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embeddings
    before = embeddings.detach().clone()
    with svdicl.pruned(model, layers="all", modules="all", rate=0.9):
        assert torch.equal(embeddings, before)
    svdicl.prune(model, layers="all", modules="all", rate=0.9)
    assert torch.equal(model.get_input_embeddings().weight, before)
    with pytest.raises(SvdiclError, match="tied to"):
        resolve(model, "all", r"re:lm_head")
    assert [t.name for t in resolve(model, "all", r"re:lm_head", allow_tied=True)] == ["lm_head"]
