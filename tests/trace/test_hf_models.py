"""Tiny Hugging Face models built from configs: traced end to end, symbols linked, shared inputs found."""

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from modelopt_lite.models.tiny import TINY_MODELS, build_tiny_model  # noqa: E402
from modelopt_lite.trace.graph_utils import linear_types  # noqa: E402
from modelopt_lite.trace import analyze_symbols, example_inputs_for, recursive_trace, residual_writers, shared_input_groups  # noqa: E402

DECODERS = ["llama", "mistral", "qwen2"]


@pytest.fixture(scope="module")
def traced():
    cache = {}

    def get(name):
        if name not in cache:
            model = build_tiny_model(name)
            graphs = recursive_trace(model)
            cache[name] = (model, graphs, analyze_symbols(model, graphs=graphs))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_every_linear_layer_is_in_one_graph(traced, name):
    model, graphs, _ = traced(name)
    assert len(graphs) == 1
    entry = graphs.entries()[0]
    assert entry.module is model and entry.method == "export" and entry.note.startswith("FX failed")
    covered, total = graphs.coverage(linear_types())
    assert covered == total and total > 0
    calls = [n.target for n in entry.graph.nodes if n.op == "call_module"]
    linear_names = [n for n, m in model.named_modules() if isinstance(m, linear_types())]
    assert set(linear_names) <= set(calls)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_normalised_graph_runs_like_the_model(traced, name):
    model, graphs, _ = traced(name)
    gm = graphs.graph_module(model)
    for batch, seq in [(2, 8), (3, 11)]:  # dynamic batch and sequence
        ids = torch.randint(0, 128, (batch, seq))
        with torch.no_grad():
            ref = model(input_ids=ids, **({"use_cache": False} if name in DECODERS + ["gpt2"] else {}))
            out = gm(input_ids=ids)
        first = out[0] if isinstance(out, (tuple, list)) else out
        torch.testing.assert_close(first, ref[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_shared_inputs_and_symbols(traced, name):
    model, graphs, sm = traced(name)
    groups = shared_input_groups(graphs)
    expected = []
    for i in range(2):
        expected.append([f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"])
        expected.append([f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"])
    assert groups == expected
    assert residual_writers(graphs) == [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")]
    p = "model.layers.0."
    assert sm.dependents(p + "mlp.gate_proj.out_features") == [p + "mlp.up_proj.out_features", p + "mlp.down_proj.in_features"]
    heads = {p + "self_attn." + n for n in ("q_proj.out_features", "num_heads", "num_kv_heads", "k_proj.out_features",
                                             "v_proj.out_features", "o_proj.in_features")}
    assert set(sm.dependents(p + "self_attn.num_heads")) | {p + "self_attn.num_heads"} == heads
    assert sm.symbol(p + "self_attn.head_dim").is_constant  # rotary embedding fixes it
    assert sm.symbol("model.embed_tokens.embedding_dim").is_searchable
    width = set(sm.dependents("model.embed_tokens.embedding_dim"))
    assert {"model.norm.num_features", "lm_head.in_features", p + "input_layernorm.num_features",
            p + "self_attn.o_proj.out_features", p + "mlp.down_proj.out_features"} <= width
    assert sm.symbol("lm_head.out_features").is_constant and sm.symbol("lm_head.out_features").reason == "model output"


def test_bert_and_t5_attention(traced):
    model, graphs, sm = traced("bert")
    assert shared_input_groups(graphs) == [[f"encoder.layer.{i}.attention.self.{p}" for p in ("query", "key", "value")] for i in range(2)]
    assert sm.symbol("embeddings.word_embeddings.embedding_dim").is_constant  # last_hidden_state is an output
    assert set(sm.dependents("encoder.layer.0.intermediate.dense.out_features")) == {"encoder.layer.0.output.dense.in_features"}
    model, graphs, sm = traced("t5-encoder")
    assert len(shared_input_groups(graphs)) == 2
    # T5's relative position bias is per head and shared by all blocks: heads of every block move together.
    deps = set(sm.dependents("encoder.block.0.layer.0.SelfAttention.num_heads"))
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.embedding_dim" in deps
    assert "encoder.block.1.layer.0.SelfAttention.num_heads" in deps


def test_gpt2_fused_attention_is_conservative(traced):
    model, graphs, sm = traced("gpt2")
    assert shared_input_groups(graphs) == []  # q/k/v are already one Conv1D
    assert sm.symbol("transformer.h.0.attn.c_attn.out_features").is_constant  # split into q, k, v
    assert sm.dependents("transformer.h.0.mlp.c_fc.out_features") == ["transformer.h.0.mlp.c_proj.in_features"]


def test_example_inputs_for_hf_model():
    model = build_tiny_model("llama")
    args, kwargs = example_inputs_for(model)
    assert args == () and kwargs["input_ids"].shape == (2, 8) and kwargs["use_cache"] is False
    assert example_inputs_for(nn.Linear(2, 2)) is None
