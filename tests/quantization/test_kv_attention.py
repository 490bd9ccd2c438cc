"""Quantized Hugging Face attention: KV-cache (k/v), query and softmax quantizers, presets, export, state."""

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import modelopt_lite.quantization as mtq  # noqa: E402
from modelopt_lite.models.tiny import build_tiny_model  # noqa: E402
from modelopt_lite.quantization import ConfigError, QuantAttention  # noqa: E402
from modelopt_lite.quantization.formats import E4M3, fake_quant  # noqa: E402
from modelopt_lite.quantization.nn.attention import (  # noqa: E402
    is_hf_attention_class,
    softmax_quantized_attention,
)
from modelopt_lite.trace.tracer import is_leaf  # noqa: E402

FP8_KV = {"num_bits": "e4m3", "axis": None}
NVFP4_KV = {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}}
KV_ONLY = {"quant_cfg": {"default": {"enable": False}}, "algorithm": None}
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16  # the tiny decoders


def ids(batch=2, seq=8, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def kv_only(fmt="fp8"):
    return mtq.with_kv_cache(KV_ONLY, fmt)


def llama(impl="sdpa", seed=0):
    model = build_tiny_model("llama", seed=seed)
    model.config._attn_implementation = impl
    return model


def attentions(model):
    return [layer.self_attn for layer in model.model.layers]


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None]


def llama_attention_by_hand(attn, hidden, cos, sin, kv_fmt=None):
    """Llama attention (causal, GQA) from the layer weights, with k and v fake-quantized when kv_fmt is given."""
    b, s, _ = hidden.shape

    def heads(proj):
        return F.linear(hidden, proj.weight).view(b, s, -1, HEAD_DIM).transpose(1, 2)

    q, k, v = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    if kv_fmt is not None:
        k = fake_quant(k, attn.k_bmm_quantizer.fmt, attn.k_bmm_quantizer.amax)
        v = fake_quant(v, attn.v_bmm_quantizer.fmt, attn.v_bmm_quantizer.amax)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
    scores = q @ k.transpose(-1, -2) * HEAD_DIM ** -0.5
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)
    return F.linear(out, attn.o_proj.weight), (q, k, v)


def record_attention_calls(model):
    """Hooks keeping (hidden_states, cos, sin, output) of every self_attn call."""
    seen = {}
    handles = []
    for i, attn in enumerate(attentions(model)):
        def pre(module, args, kwargs, i=i):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            seen.setdefault(i, []).append([hidden, *kwargs["position_embeddings"]])

        def post(module, args, kwargs, out, i=i):
            seen[i][-1].append(out[0])

        handles += [attn.register_forward_pre_hook(pre, with_kwargs=True),
                    attn.register_forward_hook(post, with_kwargs=True)]
    return seen, handles


# --------------------------------------------------------------------------- which classes are converted


def test_attention_classes_of_the_tiny_models_are_found_and_converted():
    import transformers.models.llama.modeling_llama as ml

    # the attention classes use the attention interface; the other layers do not
    assert is_hf_attention_class(ml.LlamaAttention)
    assert not is_hf_attention_class(ml.LlamaMLP) and not is_hf_attention_class(torch.nn.Linear)
    expected = {"llama": "LlamaAttention", "mistral": "MistralAttention", "qwen2": "Qwen2Attention",
                "gpt2": "GPT2Attention", "bert": "BertSelfAttention", "t5-encoder": "T5Attention"}
    for name, cls_name in expected.items():
        model = build_tiny_model(name)
        mtq.replace_quant_modules(model)
        converted = [m for m in model.modules() if isinstance(m, QuantAttention)]
        # every layer's attention is converted, keeping its class as a base
        assert converted and {m._original_class.__name__ for m in converted} == {cls_name}, name
        for m in converted:
            for attr in ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer"):
                # four quantizers, all off until a config turns them on
                assert not getattr(m, attr).is_enabled
            # a quantized attention is traced through (its projections matter), unlike other quantized layers
            assert not is_leaf(m)


def test_disabled_attention_quantizers_change_nothing():
    model = llama()
    x = ids()
    ref = model(input_ids=x).logits
    mtq.replace_quant_modules(model)
    mtq.disable_quantizer(model, "*")
    assert torch.equal(model(input_ids=x).logits, ref)


# --------------------------------------------------------------------------- k/v quantizers see the KV cache


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_kv_quantizers_see_post_rope_keys_and_values(impl):
    model = llama(impl)
    x = ids()
    mtq.replace_quant_modules(model)
    seen, handles = record_attention_calls(model)
    inputs = {}
    for i, attn in enumerate(attentions(model)):
        for role in "kv":
            handles.append(getattr(attn, f"{role}_bmm_quantizer").register_forward_hook(
                lambda m, a, o, key=(i, role): inputs.setdefault(key, a[0])))
    mtq.quantize(model, kv_only(), forward_loop=lambda m: m(input_ids=x))
    for h in handles:
        h.remove()
    for i, attn in enumerate(attentions(model)):
        hidden, cos, sin, _ = seen[i][0]
        _, (q, k, v) = llama_attention_by_hand(attn, hidden, cos, sin)
        k, v = k[:, ::HEADS // KV_HEADS], v[:, ::HEADS // KV_HEADS]  # undo the GQA repeat
        # the quantizers get the cache layout [batch, kv_heads, seq, head_dim], keys after RoPE
        assert inputs[i, "k"].shape == inputs[i, "v"].shape == (2, KV_HEADS, 8, HEAD_DIM)
        torch.testing.assert_close(inputs[i, "k"], k, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(inputs[i, "v"], v, rtol=1e-6, atol=1e-7)
        pre_rope = F.linear(hidden, attn.k_proj.weight).view(2, 8, KV_HEADS, HEAD_DIM).transpose(1, 2)
        assert (inputs[i, "k"] - pre_rope).abs().max() > 0.05
        # amax is the max |key| after RoPE, and the max |value|
        torch.testing.assert_close(attn.k_bmm_quantizer.amax, k.abs().amax(), rtol=1e-6, atol=0)
        torch.testing.assert_close(attn.v_bmm_quantizer.amax, v.abs().amax(), rtol=1e-6, atol=0)
        # static E4M3 per tensor; the query and softmax quantizers stay off
        assert attn.k_bmm_quantizer.fmt.name == "fp8_e4m3" and not attn.k_bmm_quantizer.is_dynamic
        assert not attn.q_bmm_quantizer.is_enabled and not attn.softmax_quantizer.is_enabled


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_quantized_attention_equals_fake_quantizing_k_and_v_by_hand(impl, fmt):
    model = llama(impl)
    x = ids()
    mtq.quantize(model, kv_only(fmt), forward_loop=lambda m: m(input_ids=x))
    seen, handles = record_attention_calls(model)
    model(input_ids=ids(seed=1))
    for h in handles:
        h.remove()
    for i, attn in enumerate(attentions(model)):
        hidden, cos, sin, out = seen[i][0]
        ref, _ = llama_attention_by_hand(attn, hidden, cos, sin, kv_fmt=fmt)
        float_ref, _ = llama_attention_by_hand(attn, hidden, cos, sin)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        # and the quantization is visible: the float attention differs
        assert (out - float_ref).abs().max() > 1e-4
    if fmt == "nvfp4":
        q = attentions(model)[0].k_bmm_quantizer
        # NVFP4: one static global amax per tensor, blocks of 16 along head_dim
        assert q.fmt.scale is E4M3 and q.fmt.blocks == {-1: 16} and q.amax.numel() == 1


def test_eager_and_sdpa_agree_with_kv_quantization():
    model = llama("sdpa")
    x = ids()
    mtq.quantize(model, kv_only(), forward_loop=lambda m: m(input_ids=x))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding: a real mask for sdpa
    outs = {}
    for impl in ("eager", "sdpa"):
        model.config._attn_implementation = impl
        outs[impl] = model(input_ids=ids(seed=2), attention_mask=mask).logits
    valid = mask.bool()  # padded positions' outputs are meaningless (and differ between kernels)
    torch.testing.assert_close(outs["eager"][valid], outs["sdpa"][valid], rtol=1e-5, atol=1e-5)


def test_decoding_with_a_cache_equals_the_full_forward():
    # static per-tensor scales quantize each cached element alike, whenever it is read
    model = llama("sdpa")
    x = ids(batch=1, seq=8)
    mtq.quantize(model, kv_only(), forward_loop=lambda m: m(input_ids=x))
    full = model(input_ids=x).logits[:, -1]
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=x[:, :6], past_key_values=cache, use_cache=True)
    out = model(input_ids=x[:, 6:7], past_key_values=cache, use_cache=True)
    out = model(input_ids=x[:, 7:8], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


def test_globals_are_restored_and_unquantized_models_are_unaffected():
    import transformers.models.llama.modeling_llama as ml

    interface, eager = ml.ALL_ATTENTION_FUNCTIONS, ml.eager_attention_forward
    float_model = llama()
    x = ids()
    float_ref = float_model(input_ids=x).logits
    model = llama()
    mtq.quantize(model, kv_only(), forward_loop=lambda m: m(input_ids=x))
    inside = []

    def run_float(module, args):
        # runs while the quantized forward has the names replaced
        assert ml.ALL_ATTENTION_FUNCTIONS is not interface
        inside.append(float_model(input_ids=x).logits)

    handle = attentions(model)[0].k_bmm_quantizer.register_forward_pre_hook(run_float)
    model(input_ids=x)
    handle.remove()
    assert torch.equal(inside[0], float_ref)
    assert ml.ALL_ATTENTION_FUNCTIONS is interface and ml.eager_attention_forward is eager

    def fail(module, args):
        raise RuntimeError("boom")

    handle = attentions(model)[0].v_bmm_quantizer.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=x)
    handle.remove()
    # restored after an error too
    assert ml.ALL_ATTENTION_FUNCTIONS is interface and ml.eager_attention_forward is eager


def test_bert_keys_without_rope_and_gpt2():
    model = build_tiny_model("bert")
    x = ids()
    hidden = {}
    attn = model.encoder.layer[0].attention.self

    def keep(module, args, kwargs):
        hidden.setdefault("h", kwargs.get("hidden_states", args[0] if args else None))

    attn.register_forward_pre_hook(keep, with_kwargs=True)
    mtq.quantize(model, kv_only(), forward_loop=lambda m: m(input_ids=x))
    key = F.linear(hidden["h"], attn.key.weight, attn.key.bias)
    torch.testing.assert_close(attn.k_bmm_quantizer.amax, key.abs().amax(), rtol=1e-6, atol=0)

    gpt2 = build_tiny_model("gpt2")
    mtq.quantize(gpt2, kv_only(), forward_loop=lambda m: m(input_ids=x))
    assert all(b.attn.k_bmm_quantizer.amax is not None for b in gpt2.transformer.h)
    gpt2.config._attn_implementation = "eager"
    for block in gpt2.transformer.h:
        block.attn.reorder_and_upcast_attn = True  # a path that bypasses the attention interface
    with pytest.raises(RuntimeError, match="reorder_and_upcast_attn"):
        gpt2(input_ids=x)


# --------------------------------------------------------------------------- softmax quantizer


def softmax_config():
    return mtq.compose_configs(KV_ONLY, {"quant_cfg": {"*softmax_quantizer": {"num_bits": "e4m3", "axis": None}}})


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_softmax_quantizer_quantizes_the_probabilities(impl):
    x = ids()
    ref = llama("eager")(input_ids=x, output_attentions=True).attentions
    model = llama(impl)
    mtq.replace_quant_modules(model)
    mtq.set_quantizer_by_cfg(model, softmax_config())
    seen = []
    for attn in attentions(model):
        attn.softmax_quantizer.amax = torch.tensor(1.0)
        attn.softmax_quantizer.register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
    out = model(input_ids=x, output_attentions=True)
    # the first layer's quantizer gets the float probabilities (eager math on any implementation) ...
    torch.testing.assert_close(seen[0][0], ref[0], rtol=1e-5, atol=1e-7)
    for i, (probs_in, probs_out) in enumerate(seen):
        # ... and each returns them on the E4M3 grid scaled by amax / 448
        assert torch.equal(probs_out, fake_quant(probs_in, attentions(model)[i].softmax_quantizer.fmt, torch.tensor(1.0)))
        assert torch.equal(out.attentions[i], probs_out)
    # causal rows still sum to about 1; the quantization changed them
    assert not torch.equal(seen[0][1], seen[0][0])
    torch.testing.assert_close(seen[0][1].sum(-1), torch.ones(2, HEADS, 8), rtol=0, atol=0.05)


def test_softmax_quantizer_with_padding_eager_and_sdpa_agree():
    model = llama("sdpa")
    x = ids()
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :2] = 0
    mtq.quantize(model, softmax_config(), forward_loop=lambda m: m(input_ids=x, attention_mask=mask))
    assert 0.9 < attentions(model)[0].softmax_quantizer.amax.item() <= 1.0
    outs = {}
    for impl in ("eager", "sdpa"):
        model.config._attn_implementation = impl
        outs[impl] = model(input_ids=x, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(outs["eager"][valid], outs["sdpa"][valid], rtol=1e-5, atol=1e-5)


class _Stub(torch.nn.Module):
    def __init__(self, impl):
        super().__init__()
        self.config = type("C", (), {"_attn_implementation": impl})()
        self.is_causal = True
        self.softmax_quantizer = mtq.TensorQuantizer({"enable": False})


def test_flash_style_masks_align_causality_at_the_bottom_right():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 2, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    padding = torch.tensor([[0, 1, 1, 1]])  # first key is padding
    out, probs = softmax_quantized_attention(_Stub("flash_attention_2"), q, k, v, padding, sliding_window=3)
    # query 0 sits at position 2: keys 1..2 (0 is padding, 3 is in the future); query 1 at 3: keys 1..3
    allowed = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(probs[0, 0] > 0, allowed) and torch.equal(probs[0, 1] > 0, allowed)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 8 ** -0.5
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(out, (expected @ v.repeat_interleave(2, 1)).transpose(1, 2))
    # sliding window 2: query 1 (position 3) keeps keys 2..3 only
    _, probs = softmax_quantized_attention(_Stub("flash_attention_2"), q, k, v, padding, sliding_window=2)
    assert torch.equal(probs[0, 0, 1] > 0, torch.tensor([False, False, True, True]))
    with pytest.raises(ValueError, match="packed"):
        softmax_quantized_attention(_Stub("flash_attention_2"), q, k, v, None, cu_seq_lens_q=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        softmax_quantized_attention(_Stub("flex_attention"), q, k, v, object())


# --------------------------------------------------------------------------- presets and composition


def test_kv_presets_compose_with_weight_presets():
    for base, weight_fmt in (("int4_wo", "int4"), ("fp8", "fp8_e4m3")):
        model = llama()
        x = ids()
        mtq.quantize(model, mtq.with_kv_cache(base, "fp8"), forward_loop=lambda m: m(input_ids=x),
                     share_input_amax=False)
        attn = attentions(model)[0]
        # both the weight preset and the KV cache are on
        assert attn.q_proj.weight_quantizer.is_enabled and attn.q_proj.weight_quantizer.fmt.name == weight_fmt
        assert attn.k_bmm_quantizer.is_enabled and attn.k_bmm_quantizer.fmt.name == "fp8_e4m3"
        assert attn.k_bmm_quantizer.amax is not None and attn.v_bmm_quantizer.amax is not None
        assert not attn.q_bmm_quantizer.is_enabled and not attn.softmax_quantizer.is_enabled
        # the base's exclusions still apply
        assert not model.lm_head.weight_quantizer.is_enabled
        assert attn.q_proj.input_quantizer.is_enabled is (base == "fp8")


def test_compose_rules_and_errors():
    cfg = mtq.compose_configs("fp8", "FP8_KV_CFG")
    assert cfg == mtq.with_kv_cache("fp8", "fp8") == mtq.compose_configs("fp8", "fp8_kv")
    # the KV entry comes last; the base keeps its algorithm and default
    assert list(cfg.quant_cfg)[-1] == "*[kv]_bmm_quantizer" and "default" in cfg.quant_cfg
    assert mtq.with_kv_cache("fp8", "none") == mtq.get_config("fp8") == mtq.with_kv_cache("fp8", None)
    # a base without an algorithm (dynamic MX formats) takes the add-on's, so the KV scales get calibrated
    assert mtq.get_config("mxfp4").algorithm is None and mtq.with_kv_cache("mxfp4", "nvfp4").algorithm == "max"
    # the preset dicts are not modified
    assert mtq.FP8_KV_CFG == {"quant_cfg": {"*[kv]_bmm_quantizer": {"num_bits": "e4m3", "axis": None}},
                              "algorithm": "max"}
    assert "default" not in mtq.NVFP4_KV_CFG["quant_cfg"]
    # the add-ons are presets, marked as such
    assert mtq.QFORMATS["fp8_kv"] == "FP8_KV_CFG" and mtq.PRESET_INFO["NVFP4_KV_CFG"]["kv_cache"] == "nvfp4"
    assert mtq.KV_CACHE_QFORMATS == {"fp8": "FP8_KV_CFG", "nvfp4": "NVFP4_KV_CFG"}
    assert mtq.is_kv_cache_preset("fp8_kv") and mtq.is_kv_cache_preset("NVFP4_KV_CFG")
    assert not mtq.is_kv_cache_preset("fp8") and not mtq.is_kv_cache_preset(mtq.FP8_KV_CFG)
    # on their own they touch only the k/v quantizers
    assert list(mtq.get_config("fp8_kv").quant_cfg) == ["*[kv]_bmm_quantizer"]
    with pytest.raises(ConfigError, match="'default' entry"):
        mtq.compose_configs("fp8", "int8")
    with pytest.raises(ConfigError, match="unknown KV-cache format 'int3'.*fp8, nvfp4"):
        mtq.with_kv_cache("fp8", "int3")


@pytest.mark.parametrize("algorithm", ["max", "mse"])
def test_kv_quantizers_calibrate_with_any_algorithm(algorithm):
    model = llama()
    x = ids()
    cfg = mtq.compose_configs({"quant_cfg": {"default": {"enable": False}}, "algorithm": algorithm}, "FP8_KV_CFG")
    mtq.quantize(model, cfg, forward_loop=lambda m: m(input_ids=x))
    ref = llama()
    mtq.quantize(ref, kv_only(), forward_loop=lambda m: m(input_ids=x))
    for attn, max_attn in zip(attentions(model), attentions(ref)):
        for name in ("k_bmm_quantizer", "v_bmm_quantizer"):
            q, q_max = getattr(attn, name), getattr(max_attn, name)
            # static, calibrated; the MSE search picks at most the max
            assert q.amax is not None and not q.is_dynamic
            assert 0.2 * q_max.amax <= q.amax <= q_max.amax
            if algorithm == "max":
                assert torch.equal(q.amax, q_max.amax)


# --------------------------------------------------------------------------- graph, state, export


def test_shared_input_groups_still_found_through_quantized_attention():
    model = llama()
    x = ids()
    mtq.quantize(model, mtq.with_kv_cache("fp8", "fp8"), forward_loop=lambda m: m(input_ids=x))
    groups = model._modelopt_lite_shared_inputs
    for i in range(2):
        prefix = f"model.layers.{i}"
        assert [f"{prefix}.self_attn.{p}_proj" for p in "qkv"] in groups
        assert [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"] in groups


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_save_restore_round_trip(tmp_path, fmt):
    model = llama()
    x = ids()
    cfg = mtq.compose_configs(mtq.with_kv_cache("int8", fmt),
                              {"quant_cfg": {"*softmax_quantizer": {"num_bits": 8, "unsigned": True}}})
    mtq.quantize(model, cfg, forward_loop=lambda m: m(input_ids=x), share_input_amax=False)
    out = model(input_ids=ids(seed=3)).logits
    mtq.save(model, tmp_path / "state")
    meta = json.loads((tmp_path / "state" / "quant_state.json").read_text())
    assert "model.layers.0.self_attn" in meta["modules"]
    fresh = mtq.restore(llama(), tmp_path / "state")
    for a, b in zip(attentions(model), attentions(fresh)):
        assert isinstance(b, QuantAttention)
        for name in ("k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer"):
            assert torch.equal(getattr(a, name).amax, getattr(b, name).amax)
    assert torch.equal(fresh(input_ids=ids(seed=3)).logits, out)


@pytest.mark.parametrize("fmt,algo,bound", [("fp8", "FP8", 448.0), ("nvfp4", "NVFP4", 6.0 * 448.0)])
def test_hf_export_writes_k_and_v_scales(tmp_path, fmt, algo, bound):
    from safetensors.torch import load_file

    from modelopt_lite.export import export_hf_checkpoint

    model = llama()
    x = ids()
    mtq.quantize(model, mtq.with_kv_cache("fp8", fmt), forward_loop=lambda m: m(input_ids=x))
    out = export_hf_checkpoint(model, tmp_path / "ckpt")
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    for i, attn in enumerate(attentions(model)):
        for role in "kv":
            q = getattr(attn, f"{role}_bmm_quantizer")
            scale = tensors[f"model.layers.{i}.self_attn.{role}_proj.{role}_scale"]
            # amax / 448 for FP8, amax / (6 * 448) for NVFP4, float32 scalars
            assert scale.dtype == torch.float32 and scale.numel() == 1
            torch.testing.assert_close(scale.reshape(()), q.amax.reshape(()) / bound, rtol=1e-6, atol=0)
    assert not any("bmm_quantizer" in k for k in tensors)
    hf_cfg = json.loads((out / "hf_quant_config.json").read_text())
    assert hf_cfg["quantization"]["kv_cache_quant_algo"] == algo and hf_cfg["quantization"]["quant_algo"] == "FP8"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"]["num_bits"] == (8 if fmt == "fp8" else 4)
