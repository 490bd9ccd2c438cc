"""TensorRT-LLM checkpoint export: names, dtypes and shapes, config, tensor-parallel splits, values."""

import json

import pytest
import torch

import modelopt_lite.quantization as mtq
from modelopt_lite.export import ExportError
from modelopt_lite.export import trtllm
from modelopt_lite.export.layers import dequantize_weight
from modelopt_lite.export.trtllm import QUANT_CONFIG_KEYS, export_tensorrt_llm_checkpoint
from modelopt_lite.export.trtllm_split import check_heads
from modelopt_lite.models.tiny import build_tiny_model
from modelopt_lite.quantization.tensor_quantizer import TensorQuantizer

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

FP8 = {"num_bits": "e4m3", "axis": None}
KV = {"*[kv]_proj.output_quantizer": FP8}
INT4 = {"num_bits": 4, "block_sizes": {-1: 128}}
F8, F32 = torch.float8_e4m3fn, torch.float32


def cfg(weight, inp, **extra):
    quant = {"default": {"enable": False}, "*weight_quantizer": weight, "*input_quantizer": inp,
             "*lm_head*": {"enable": False}, **extra}
    return {"quant_cfg": quant, "algorithm": "max"}


NVFP4 = {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}}
CONFIGS = {
    "FP8": cfg(FP8, FP8), "NVFP4": cfg(NVFP4, NVFP4), "W4A16_AWQ": cfg(INT4, {"enable": False}),
    "W4A8_AWQ": cfg(INT4, FP8), "W8A8_SQ_PER_CHANNEL": cfg({"num_bits": 8, "axis": 0}, {"num_bits": 8, "axis": None}),
}
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def llama(hidden=64, heads=4, kv_heads=2, inter=128, vocab=128, seed=0):
    torch.manual_seed(seed)
    c = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                                 num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                 max_position_embeddings=64)
    return transformers.LlamaForCausalLM(c).eval()


def layers(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def unify_groups(model):
    """What quantize(share_input_amax=True) does for q/k/v and gate/up, without tracing (fast)."""
    if model.config.model_type == "gpt2":
        return  # c_attn is one layer
    for layer in layers(model):
        for group in GROUPS:
            mods = [layer.get_submodule(n) for n in group]
            for attr in ("input_quantizer", "weight_quantizer"):
                qs = [getattr(m, attr) for m in mods]
                if qs and all(q.is_enabled and q.amax is not None and q.amax.numel() == 1 for q in qs):
                    top = torch.stack([q.amax.reshape(()) for q in qs]).amax()
                    for q in qs:
                        q.amax = top.reshape(q.amax.shape)


def set_pre_quant_scales(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for layer in layers(model):
        for group in GROUPS + (("self_attn.o_proj",), ("mlp.down_proj",)):
            mods = [layer.get_submodule(n) for n in group]
            s = torch.rand(mods[0].in_features, generator=g) + 0.5
            for m in mods:
                m.input_quantizer.pre_quant_scale = s


def quantized(model, algo, kv=False, share=False, pqs=False):
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    config = CONFIGS[algo]
    if kv:
        config = {**config, "quant_cfg": {**config["quant_cfg"], **KV}}
    mtq.quantize(model, config, lambda m: m(ids), share_input_amax=share)
    if not share:
        unify_groups(model)
    if pqs:
        set_pre_quant_scales(model)
    return model


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(key):
        if key not in cache:
            cache[key] = BUILD[key]()
        return cache[key]

    return get


def _w4a8_kv():
    m = quantized(llama(256, 4, 2, 512, 256), "W4A8_AWQ", kv=True, pqs=True)
    m.model.layers[0].self_attn.k_proj.output_quantizer.amax = torch.tensor(896.0)  # k factor 2.0
    return m


BUILD = {
    "llama-fp8-kv": lambda: quantized(build_tiny_model("llama"), "FP8", kv=True, share=True),
    "llama-nvfp4-kv": lambda: quantized(build_tiny_model("llama"), "NVFP4", kv=True),
    "llama-sq": lambda: quantized(build_tiny_model("llama"), "W8A8_SQ_PER_CHANNEL", pqs=True),
    "llama256-awq": lambda: quantized(llama(256, 4, 2, 512, 256), "W4A16_AWQ", pqs=True),
    "llama256-w4a8-kv": _w4a8_kv,
    "llama8h-nvfp4": lambda: quantized(llama(128, 8, 2, 256, 100), "NVFP4", kv=True),
    "mistral": lambda: build_tiny_model("mistral"),
    "mistral-fp8": lambda: quantized(build_tiny_model("mistral"), "FP8"),
    "qwen2-fp8": lambda: quantized(build_tiny_model("qwen2"), "FP8", kv=True),
    "gpt2": lambda: build_tiny_model("gpt2"),
    "gpt2-nvfp4": lambda: quantized(build_tiny_model("gpt2"), "NVFP4"),
    "gpt2-sq": lambda: quantized(build_tiny_model("gpt2"), "W8A8_SQ_PER_CHANNEL"),
}


def export(model, path, tp=1, **kw):
    out = export_tensorrt_llm_checkpoint(model, export_dir=path, inference_tensor_parallel=tp, **kw)
    config = json.loads((out / "config.json").read_text())
    ranks = [safetensors_torch.load_file(str(out / f"rank{r}.safetensors")) for r in range(tp)]
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] + [f"rank{r}.safetensors" for r in range(tp)]
    assert config["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1}
    assert set(config["quantization"]) <= QUANT_CONFIG_KEYS
    return config, ranks


# ---- what the spec says every tensor looks like (TP = 1) ---------------------------------------------------------

def linear_spec(algo, out, inp, dtype, group=128):
    if algo is None:
        return {"weight": (dtype, (out, inp))}
    return {
        "FP8": {"weight": (F8, (out, inp)), "weights_scaling_factor": (F32, (1,)),
                "activation_scaling_factor": (F32, (1,))},
        "NVFP4": {"weight": (torch.uint8, (out, inp // 2)), "weights_scaling_factor": (F8, (out, inp // 16)),
                  "weights_scaling_factor_2": (F32, ()), "activation_scaling_factor": (F32, ())},
        "W4A16_AWQ": {"weight": (torch.int8, (out // 2, inp)), "weights_scaling_factor": (F32, (out, inp // group)),
                      "prequant_scaling_factor": (dtype, (inp,))},
        "W4A8_AWQ": {"weight": (torch.int8, (out // 2, inp)), "weights_scaling_factor": (F32, (out, inp // group)),
                     "weights_scaling_factor_2": (F32, (1,)), "activation_scaling_factor": (F32, (1,)),
                     "prequant_scaling_factor": (dtype, (inp,))},
        "W8A8_SQ_PER_CHANNEL": {"weight": (torch.int8, (out, inp)), "weights_scaling_factor": (F32, (out,)),
                                "activation_scaling_factor": (F32, (1,)), "prequant_scaling_factor": (dtype, (inp,))},
    }[algo]


def expected_tensors(model, algo, kv=False, excluded=(), dtype=F32):
    c = model.config
    gpt2 = c.model_type == "gpt2"
    if gpt2:
        h, nh, nkv, inter, n, v = c.n_embd, c.n_head, c.n_head, c.n_inner or 4 * c.n_embd, c.n_layer, c.vocab_size
    else:
        h, nh, nkv, inter, n, v = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
                                   c.num_hidden_layers, c.vocab_size)
    hd = h // nh
    qkv = (nh + 2 * nkv) * hd
    spec = {"transformer.vocab_embedding.weight": (dtype, (v, h)), "transformer.ln_f.weight": (dtype, (h,)),
            "lm_head.weight": (dtype, (v, h))}
    if gpt2:
        spec["transformer.position_embedding.weight"] = (dtype, (c.n_positions, h))
        spec["transformer.ln_f.bias"] = (dtype, (h,))
    shapes = {"attention.qkv": (qkv, h), "attention.dense": (h, nh * hd), "mlp.fc": (inter, h), "mlp.proj": (h, inter)}
    if not gpt2:
        shapes["mlp.gate"] = (inter, h)
    for i in range(n):
        p = f"transformer.layers.{i}."
        for norm in ("input_layernorm", "post_layernorm"):
            spec[f"{p}{norm}.weight"] = (dtype, (h,))
            if gpt2:
                spec[f"{p}{norm}.bias"] = (dtype, (h,))
        for lin, (o, k) in shapes.items():
            for suffix, s in linear_spec(None if f"{p}{lin}" in excluded else algo, o, k, dtype).items():
                spec[f"{p}{lin}.{suffix}"] = s
            if gpt2 or (lin == "attention.qkv" and c.model_type == "qwen2"):
                spec[f"{p}{lin}.bias"] = (dtype, (o,))
        if kv:
            for f in ("kv", "k", "v"):
                spec[f"{p}attention.{f}_cache_scaling_factor"] = (F32, (1,))
    return spec


def assert_matches_spec(rank, spec):
    got = {k: (t.dtype, tuple(t.shape)) for k, t in rank.items()}
    assert set(got) == set(spec), (sorted(set(got) - set(spec)), sorted(set(spec) - set(got)))
    for k in spec:
        assert got[k] == spec[k], k


# ---- re-assembling rank files (independent of the writer's split code) ------------------------------------------

def as_bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a, b, name=""):
    assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(as_bytes(a), as_bytes(b)), name


def replicated(name, ref):
    layer, suffix = name.rsplit(".", 1)
    if "layernorm" in layer or "ln_f" in layer or "cache_scaling" in suffix or ref.numel() == 1:
        return True
    if suffix in ("weights_scaling_factor_2", "activation_scaling_factor"):
        return True
    if layer.endswith(("attention.dense", "mlp.proj")):
        return suffix == "bias" or (suffix == "weights_scaling_factor" and ref.dim() == 1)
    return suffix == "prequant_scaling_factor"


def undo_qkv(parts, nh, nkv):
    tp = len(parts)
    q_heads, kv_heads = nh // tp, max(nkv // tp, 1)
    qs, ks, vs = [], [], []
    for r, t in enumerate(parts):
        per_head = t.shape[0] // (q_heads + 2 * kv_heads)
        q, k, v = t.split([q_heads * per_head, kv_heads * per_head, kv_heads * per_head])
        qs.append(q)
        if nkv >= tp or r % (tp // nkv) == 0:
            ks.append(k)
            vs.append(v)
        else:  # a duplicated KV head equals the one of the first rank that holds it
            first = parts[r - r % (tp // nkv)]
            assert_same(torch.cat([k, v]), first[q_heads * per_head:], "duplicated kv head")
    return torch.cat(qs + ks + vs)


def reassemble(ranks, full, nh, nkv):
    out = {}
    for name, ref in full.items():
        parts = [r[name] for r in ranks]
        layer = name.rsplit(".", 1)[0]
        if "embedding" in name or name == "lm_head.weight":
            t = torch.cat(parts)
            assert all(p.shape[0] == -(-ref.shape[0] // len(ranks)) for p in parts)
            assert not as_bytes(t[ref.shape[0]:]).any(), "vocab padding must be zeros"
            t = t[: ref.shape[0]]
        elif replicated(name, ref):
            for p in parts[1:]:
                assert_same(p, parts[0], name)
            t = parts[0]
        elif layer.endswith("attention.qkv"):
            t = undo_qkv(parts, nh, nkv)
        elif layer.endswith(("attention.dense", "mlp.proj")):
            t = torch.cat(parts, dim=-1)
        else:
            t = torch.cat(parts, dim=0)
        out[name] = t
    return out


def check_tp(model, tmp_path, tps, nh, nkv, **kw):
    _, (full,) = export(model, tmp_path / "tp1", 1, **kw)
    for tp in tps:
        config, ranks = export(model, tmp_path / f"tp{tp}", tp, **kw)
        for r in ranks:
            assert set(r) == set(full)
        qkv = ranks[0]["transformer.layers.0.attention.qkv.weight"]
        assert qkv.shape[0] * tp * (nh + 2 * nkv) == full["transformer.layers.0.attention.qkv.weight"].shape[0] * (
            nh + 2 * max(nkv, tp))
        again = reassemble(ranks, full, nh, nkv)
        for name in full:
            assert_same(again[name], full[name], f"tp{tp} {name}")
    return full


# ---- tests ------------------------------------------------------------------------------------------------------

def snapshot(model):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    amax = {n: (None if m.amax is None else m.amax.clone(), None if m.pre_quant_scale is None
                else m.pre_quant_scale.clone()) for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    return state, amax


def assert_unchanged(model, before):
    state, amax = snapshot(model)
    assert state.keys() == before[0].keys()
    for k in state:
        assert_same(state[k], before[0][k], k)
    assert amax.keys() == before[1].keys()
    for k, (a, p) in amax.items():
        for x, y in ((a, before[1][k][0]), (p, before[1][k][1])):
            assert (x is None and y is None) or torch.equal(x, y), k


CASES = [  # (model, algo, kv, tensor-parallel sizes, heads, kv heads)
    ("llama-fp8-kv", "FP8", True, (2, 4), 4, 2),
    ("llama-nvfp4-kv", "NVFP4", True, (2, 4), 4, 2),
    ("llama-sq", "W8A8_SQ_PER_CHANNEL", False, (2, 4), 4, 2),
    ("llama256-awq", "W4A16_AWQ", False, (2,), 4, 2),
    ("llama256-w4a8-kv", "W4A8_AWQ", True, (2,), 4, 2),
    ("llama8h-nvfp4", "NVFP4", True, (8,), 8, 2),
    ("mistral-fp8", "FP8", False, (2,), 4, 2),
    ("qwen2-fp8", "FP8", True, (2, 4), 4, 2),
    ("gpt2-nvfp4", "NVFP4", False, (2, 4), 4, 4),
    ("gpt2-sq", "W8A8_SQ_PER_CHANNEL", False, (2,), 4, 4),
]


@pytest.mark.parametrize("key,algo,kv,tps,nh,nkv", CASES, ids=[c[0] for c in CASES])
def test_quantized_export_names_shapes_tp_and_values(models, tmp_path, key, algo, kv, tps, nh, nkv):
    model = models(key)
    before = snapshot(model)
    config, (full,) = export(model, tmp_path / "one")
    assert_matches_spec(full, expected_tensors(model, algo, kv))
    q = config["quantization"]
    assert q["quant_algo"] == algo and q["kv_cache_quant_algo"] == ("FP8" if kv else None)
    assert q["exclude_modules"] == ["lm_head"]
    if algo == "NVFP4":
        assert q["group_size"] == 16
    if algo.endswith("AWQ"):
        assert (q["group_size"], q["has_zero_point"], q["pre_quant_scale"]) == (128, False, True)
    check_tp(model, tmp_path, tps, nh, nkv)
    assert_dequantized_equals_fake_quant(model, full, algo)
    if kv:
        assert_kv_factors(model, full)
    assert_unchanged(model, before)


def members(model, i):
    """TRT-LLM linear -> HF modules of layer i (rows in order)."""
    layer = layers(model)[i]
    if model.config.model_type == "gpt2":
        return {"attention.qkv": [layer.attn.c_attn], "attention.dense": [layer.attn.c_proj],
                "mlp.fc": [layer.mlp.c_fc], "mlp.proj": [layer.mlp.c_proj]}
    a, m = layer.self_attn, layer.mlp
    return {"attention.qkv": [a.q_proj, a.k_proj, a.v_proj], "attention.dense": [a.o_proj],
            "mlp.fc": [m.gate_proj], "mlp.gate": [m.up_proj], "mlp.proj": [m.down_proj]}


def fake_quant_weight(m):
    w = m.quantized_weight().detach()
    return w.t() if m.weight_axis_last else w


def assert_dequantized_equals_fake_quant(model, full, algo):
    """Scales are shared in every fused group here, so the checkpoint reproduces the fake-quant weights bit for bit."""
    for i in range(len(layers(model))):
        for lin, mods in members(model, i).items():
            p = f"transformer.layers.{i}.{lin}."
            t = {"weight": full[p + "weight"], "weight_scale": full[p + "weights_scaling_factor"]}
            if p + "weights_scaling_factor_2" in full:
                t["weight_scale_2"] = full[p + "weights_scaling_factor_2"]
            deq = dequantize_weight(t, algo, mods[0].weight_quantizer.fmt, torch.float32)
            assert torch.equal(deq, torch.cat([fake_quant_weight(m) for m in mods])), p
            pqs = mods[0].input_quantizer.pre_quant_scale
            if pqs is not None:
                assert torch.equal(full[p + "prequant_scaling_factor"], pqs)
            if p + "activation_scaling_factor" in full:
                amax = max(float(m.input_quantizer.amax) for m in mods)
                bound = 6 * 448 if algo == "NVFP4" else (127 if algo.startswith("W8A8") else 448)
                assert full[p + "activation_scaling_factor"].item() == pytest.approx(amax / bound, rel=1e-6)


def assert_kv_factors(model, full):
    for i, layer in enumerate(layers(model)):
        k = max(float(layer.self_attn.k_proj.output_quantizer.amax) / 448, 1.0)
        v = max(float(layer.self_attn.v_proj.output_quantizer.amax) / 448, 1.0)
        p = f"transformer.layers.{i}.attention."
        assert full[p + "k_cache_scaling_factor"].item() == pytest.approx(k)
        assert full[p + "v_cache_scaling_factor"].item() == pytest.approx(v)
        assert full[p + "kv_cache_scaling_factor"].item() == pytest.approx(max(k, v))
        assert full[p + "kv_cache_scaling_factor"].item() >= 1.0


def test_w4a8_kv_factor_above_one_and_shared_scales(models, tmp_path):
    _, (full,) = export(models("llama256-w4a8-kv"), tmp_path / "x")
    assert full["transformer.layers.0.attention.k_cache_scaling_factor"].item() == 2.0
    assert full["transformer.layers.0.attention.kv_cache_scaling_factor"].item() == 2.0
    assert full["transformer.layers.1.attention.kv_cache_scaling_factor"].item() == 1.0
    ws = full["transformer.layers.0.attention.qkv.weights_scaling_factor"]
    codes = trtllm_codes(full["transformer.layers.0.attention.qkv.weight"])
    deq_max = (codes.float() * ws.repeat_interleave(128, dim=1)).abs().max()
    assert deq_max / full["transformer.layers.0.attention.qkv.weights_scaling_factor_2"] <= 448 * (1 + 1e-6)


def trtllm_codes(packed):
    from modelopt_lite.export.packing import unpack_int4_rows
    return unpack_int4_rows(packed)


@pytest.mark.parametrize("key", ["mistral", "gpt2"])
def test_unquantized_export_maps_hf_weights(models, tmp_path, key):
    model = models(key)
    config, (full,) = export(model, tmp_path / "x")
    assert config["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}
    assert_matches_spec(full, expected_tensors(model, None))
    sd = model.state_dict()
    if key == "gpt2":
        assert config["architecture"] == "GPT2LMHeadModel" and config["gpt_variant"] == "gpt2"
        assert config["position_embedding_type"] == "learned_absolute" and config["hidden_act"] == "gelu_new"
        assert (config["num_key_value_heads"], config["intermediate_size"], config["max_position_embeddings"]) == (
            4, 256, 64)
        pairs = {"attention.qkv.weight": ("attn.c_attn.weight", True), "attention.qkv.bias": ("attn.c_attn.bias", 0),
                 "attention.dense.weight": ("attn.c_proj.weight", True), "mlp.fc.weight": ("mlp.c_fc.weight", True),
                 "mlp.proj.bias": ("mlp.c_proj.bias", 0), "post_layernorm.bias": ("ln_2.bias", 0)}
        prefix = "transformer.h.1."
        assert torch.equal(full["lm_head.weight"], sd["transformer.wte.weight"])
        assert torch.equal(full["transformer.position_embedding.weight"], sd["transformer.wpe.weight"])
    else:
        assert config["architecture"] == "MistralForCausalLM"
        assert (config["rotary_base"], config["position_embedding_type"], config["head_size"]) == (
            10000.0, "rope_gpt_neox", 16)
        pairs = {"mlp.fc.weight": ("mlp.gate_proj.weight", False), "mlp.gate.weight": ("mlp.up_proj.weight", False),
                 "mlp.proj.weight": ("mlp.down_proj.weight", False), "attention.dense.weight": (
                     "self_attn.o_proj.weight", False), "post_layernorm.weight": ("post_attention_layernorm.weight", 0)}
        prefix = "model.layers.1."
        qkv = torch.cat([sd[f"{prefix}self_attn.{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(full["transformer.layers.1.attention.qkv.weight"], qkv)
    for trt, (hf, transpose) in pairs.items():
        w = sd[prefix + hf]
        assert torch.equal(full[f"transformer.layers.1.{trt}"], w.t() if transpose else w), trt
    check_tp(model, tmp_path, (2, 4), 4, 4 if key == "gpt2" else 2)


def test_qwen2_config_and_biases(models, tmp_path):
    model = models("qwen2-fp8")
    config, (full,) = export(model, tmp_path / "x")
    assert (config["architecture"], config["qwen_type"], config["attn_bias"], config["seq_length"]) == (
        "Qwen2ForCausalLM", "qwen2", True, 64)
    a = model.model.layers[0].self_attn
    assert torch.equal(full["transformer.layers.0.attention.qkv.bias"], torch.cat([a.q_proj.bias, a.k_proj.bias,
                                                                                 a.v_proj.bias]).detach())
    _, ranks = export(model, tmp_path / "tp4", 4)
    # rank 3 holds q head 3 and KV head 3 * 2 // 4 = 1
    hd = 16
    bias = full["transformer.layers.0.attention.qkv.bias"]
    want = torch.cat([bias[3 * hd:4 * hd], bias[64 + hd:64 + 2 * hd], bias[96 + hd:96 + 2 * hd]])
    assert torch.equal(ranks[3]["transformer.layers.0.attention.qkv.bias"], want)


def test_llama_config_fields(models, tmp_path):
    config, _ = export(models("llama-fp8-kv"), tmp_path / "x", dtype=torch.bfloat16)
    want = {"architecture": "LlamaForCausalLM", "dtype": "bfloat16", "logits_dtype": "float16", "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
            "vocab_size": 128, "max_position_embeddings": 64, "hidden_act": "silu", "head_size": 16,
            "norm_epsilon": 1e-6, "position_embedding_type": "rope_gpt_neox", "rotary_base": 10000.0,
            "use_parallel_embedding": True, "embedding_sharding_dim": 0, "share_embedding_table": False}
    assert {k: config[k] for k in want} == want


def test_bfloat16_export_casts_unquantized_tensors_only(models, tmp_path):
    model = models("llama256-awq")
    _, (full,) = export(model, tmp_path / "x", dtype="bfloat16")
    assert_matches_spec(full, expected_tensors(model, "W4A16_AWQ", dtype=torch.bfloat16))


def test_fp8_group_with_different_weight_amaxes_gets_one_max_scale(models, tmp_path):
    import copy

    model = copy.deepcopy(models("mistral-fp8"))
    a = model.model.layers[0].self_attn
    a.k_proj.weight_quantizer.amax = a.k_proj.weight_quantizer.amax * 0.5
    top = float(a.q_proj.weight_quantizer.amax)
    _, (full,) = export(model, tmp_path / "x")
    s = full["transformer.layers.0.attention.qkv.weights_scaling_factor"]
    assert s.item() == pytest.approx(top / 448)
    # every member, k included, is quantized with the shared max scale
    from modelopt_lite.quantization.formats import quantize
    k = quantize(a.k_proj.weight.detach(), a.k_proj.weight_quantizer.fmt, torch.tensor(top)).codes
    assert_same(full["transformer.layers.0.attention.qkv.weight"][64:96], k)


def test_excluded_decoder_linear_is_written_in_high_precision(tmp_path):
    model = build_tiny_model("llama")
    config = cfg(FP8, FP8, **{"*down_proj*": {"enable": False}})
    mtq.quantize(model, config, lambda m: m(torch.randint(0, 128, (2, 8))), share_input_amax=False)
    unify_groups(model)
    conf, (full,) = export(model, tmp_path / "x")
    excluded = ["transformer.layers.0.mlp.proj", "transformer.layers.1.mlp.proj"]
    assert conf["quantization"]["exclude_modules"] == ["lm_head"] + excluded
    assert_matches_spec(full, expected_tensors(model, "FP8", excluded=excluded))
    assert torch.equal(full["transformer.layers.1.mlp.proj.weight"], model.model.layers[1].mlp.down_proj.weight)
    check_tp(model, tmp_path, (2,), 4, 2)


def test_refusals(models, tmp_path):
    with pytest.raises(ExportError, match="group size 128"):
        export_tensorrt_llm_checkpoint(models("llama256-awq"), export_dir=tmp_path / "a", inference_tensor_parallel=4)
    with pytest.raises(ExportError, match="4 attention heads"):
        export_tensorrt_llm_checkpoint(models("mistral"), export_dir=tmp_path / "b", inference_tensor_parallel=8)
    with pytest.raises(ExportError, match="3 KV heads cannot be split"):
        check_heads(12, 3, 2)
    with pytest.raises(ExportError, match="duplicated evenly"):
        check_heads(12, 2, 3)
    with pytest.raises(ExportError, match="decoder type"):
        export_tensorrt_llm_checkpoint(models("mistral"), "bert", export_dir=tmp_path / "c")
    with pytest.raises(ExportError, match="not a llama config"):
        export_tensorrt_llm_checkpoint(models("gpt2"), "llama", export_dir=tmp_path / "c")
    wo = build_tiny_model("llama")
    mtq.quantize(wo, "int8_wo", share_input_amax=False)
    with pytest.raises(ExportError, match="W8A16"):
        export_tensorrt_llm_checkpoint(wo, export_dir=tmp_path / "d")
    head = build_tiny_model("llama")
    head_cfg = {"quant_cfg": {"default": {"enable": False}, "*weight_quantizer": FP8, "*input_quantizer": FP8},
                "algorithm": "max"}
    mtq.quantize(head, head_cfg, lambda m: m(torch.randint(0, 128, (2, 8))), share_input_amax=False)
    with pytest.raises(ExportError, match="lm_head"):
        export_tensorrt_llm_checkpoint(head, export_dir=tmp_path / "e")
    assert not any(tmp_path.iterdir())


def test_refuses_non_empty_target_and_overwrites_on_request(models, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_tensorrt_llm_checkpoint(models("mistral"), export_dir=target)
    assert (target / "keep.txt").exists()
    export_tensorrt_llm_checkpoint(models("mistral"), export_dir=target, overwrite=True, inference_tensor_parallel=2)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "rank0.safetensors", "rank1.safetensors"]


def test_failure_after_the_first_tensor_leaves_no_directory(models, tmp_path, monkeypatch):
    calls = []

    class Failing(trtllm.ShardedSafetensorsWriter):
        def add(self, name, tensor):
            calls.append(name)
            if len(calls) > 1:
                raise OSError("disk full")
            super().add(name, tensor)

    monkeypatch.setattr(trtllm, "ShardedSafetensorsWriter", Failing)
    with pytest.raises(OSError, match="disk full"):
        export_tensorrt_llm_checkpoint(models("llama-fp8-kv"), export_dir=tmp_path / "out")
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []
