"""Hugging Face unified checkpoint: every format, checked against CHECKPOINTS.md part A, and loaded back."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import modelopt_lite.quantization as mtq  # noqa: E402
from modelopt_lite.export import ExportError, export_hf_checkpoint, load_hf_checkpoint  # noqa: E402
from modelopt_lite.export.hf_load import CheckpointReader  # noqa: E402
from modelopt_lite.export.layers import dequantize_weight, float_weight  # noqa: E402
from modelopt_lite.export.safetensors_io import ShardedSafetensorsWriter  # noqa: E402
from modelopt_lite.models.tiny import build_tiny_model  # noqa: E402

F8, F32, U8, I8 = torch.float8_e4m3fn, torch.float32, torch.uint8, torch.int8
QKV = ("q_proj", "k_proj", "v_proj")
KV_FP8 = {"*[kv]_proj.output_quantizer": {"num_bits": "e4m3", "axis": None}}
KV_NVFP4 = {"*[kv]_proj.output_quantizer": {"num_bits": "e2m1",
                                            "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}}}


def _llama(hidden=64, seed=0):
    if hidden == 64:
        return build_tiny_model("llama", seed=seed)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=64)).eval()


def _config(preset, extra=None):
    cfg = mtq.get_config(preset).model_dump(exclude_unset=True)
    cfg["quant_cfg"] = {**cfg["quant_cfg"], **(extra or {})}
    return cfg


def _smooth(model, groups=("self_attn", "mlp")):
    """Give every linear a pre_quant_scale (shared inside q/k/v and gate/up) and the smoothed weight W / s."""
    gen = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        sets = [[layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], [layer.self_attn.o_proj],
                [layer.mlp.gate_proj, layer.mlp.up_proj], [layer.mlp.down_proj]]
        for members in sets:
            s = 0.5 + torch.rand(members[0].in_features, generator=gen)
            for m in members:
                m.input_quantizer.pre_quant_scale = s
                with torch.no_grad():
                    m.weight.div_(s)


# qformat, quant_algo, hidden size, smooth, extra config
CASES = {
    "fp8": ("fp8", "FP8", 64, False),
    "fp8_pc_pt": ("fp8_pc_pt", "FP8_PER_CHANNEL_PER_TOKEN", 64, False),
    "nvfp4": ("nvfp4", "NVFP4", 64, False),
    "w4a16_nvfp4": ("w4a16_nvfp4", "W4A16_NVFP4", 64, False),
    "w4a8_nvfp4_fp8": ("w4a8_nvfp4_fp8", "W4A8_NVFP4_FP8", 64, False),
    "int4_awq": ("int4_wo", "W4A16_AWQ", 256, True),
    "w4a8_awq": ("w4a8_awq", "W4A8_AWQ", 256, True),
    "int8_sq": ("int8", "W8A8_SQ_PER_CHANNEL", 64, True),
    "int8_wo": ("int8_wo", "W8A16", 64, False),
}


def _quantized(case, kv=None, seed=0):
    preset, algo, hidden, smooth = CASES[case]
    model = _llama(hidden, seed)
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(seed + 1))

    def loop(m):
        if smooth and m.model.layers[0].self_attn.q_proj.input_quantizer.pre_quant_scale is None:
            _smooth(m)
        m(ids, use_cache=False)

    if smooth:
        mtq.replace_quant_modules(model)
        _smooth(model)
    mtq.quantize(model, _config(preset, kv), loop)
    return model, algo


def _expected(algo, out, inn, dtype, g=None):
    """CHECKPOINTS.md 2.4: (dtype, shape) per tensor suffix."""
    table = {
        "FP8": {"weight": (F8, [out, inn]), "weight_scale": (F32, []), "input_scale": (F32, [])},
        "FP8_PER_CHANNEL_PER_TOKEN": {"weight": (F8, [out, inn]), "weight_scale": (F32, [out])},
        "NVFP4": {"weight": (U8, [out, inn // 2]), "weight_scale": (F8, [out, inn // 16]),
                  "weight_scale_2": (F32, []), "input_scale": (F32, [])},
        "W4A16_NVFP4": {"weight": (U8, [out, inn // 2]), "weight_scale": (F8, [out, inn // 16]),
                        "weight_scale_2": (F32, [])},
        "W4A8_NVFP4_FP8": {"weight": (U8, [out, inn // 2]), "weight_scale": (F8, [out, inn // 32]),
                           "weight_scale_2": (F32, []), "input_scale": (F32, [])},
        "W4A16_AWQ": {"weight": (U8, [out // 2, inn]), "weight_scale": (F32, [out, inn // 128]),
                      "pre_quant_scale": (dtype, [inn])},
        "W4A8_AWQ": {"weight": (U8, [out // 2, inn]), "weight_scale": (F32, [out, inn // 128]),
                     "weight_scale_2": (F32, []), "input_scale": (F32, []), "pre_quant_scale": (dtype, [inn])},
        "W8A8_SQ_PER_CHANNEL": {"weight": (I8, [out, inn]), "weight_scale": (F32, [out]), "input_scale": (F32, []),
                                "pre_quant_scale": (dtype, [inn])},
        "W8A16": {"weight": (I8, [out, inn]), "weight_scale": (F32, [out])},
    }
    return table[algo]


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, mtq.QuantWeightModule)}


@pytest.mark.parametrize("case", list(CASES))
def test_export_every_format_matches_spec_and_round_trips(case, tmp_path):
    model, algo = _quantized(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = export_hf_checkpoint(model, tmp_path / "ckpt")

    # the caller's model is untouched and still runs
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    hfq = json.loads((out / "hf_quant_config.json").read_text())
    q = hfq["quantization"]
    assert q["quant_algo"] == algo and q["kv_cache_quant_algo"] is None
    assert {"lm_head", "model.embed_tokens"} <= set(q["exclude_modules"])
    if algo in ("NVFP4", "W4A16_NVFP4"):
        assert q["group_size"] == 16
    if algo == "W4A8_NVFP4_FP8":
        assert q["group_size"] == 32
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        assert (q["group_size"], q["has_zero_point"], q["pre_quant_scale"]) == (128, False, True)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == algo and qc["ignore"] == q["exclude_modules"]
    assert "kv_cache_scheme" not in qc and config["architectures"] == ["LlamaForCausalLM"]

    reader = CheckpointReader(out)
    keys = set(reader.keys())
    assert not any("quantizer" in k or k.endswith("_amax") for k in keys)
    dtype = model.model.embed_tokens.weight.dtype
    for name, m in _linears(model).items():
        if name == "lm_head":
            assert reader.get("lm_head.weight").dtype == dtype and "lm_head.weight_scale" not in keys
            continue
        expected = _expected(algo, m.out_features, m.in_features, dtype)
        got = {s: reader.get(f"{name}.{s}") for s in ("weight", "weight_scale", "weight_scale_2", "input_scale",
                                                     "pre_quant_scale") if f"{name}.{s}" in keys}
        assert {s: (t.dtype, list(t.shape)) for s, t in got.items()} == expected, name
        # dequantizing the stored codes gives the fake-quant weight bit for bit
        deq = dequantize_weight(got, algo, m.weight_quantizer.fmt, dtype)
        assert torch.equal(deq, m.quantized_weight()), name
        for s in ("weight_scale", "weight_scale_2", "input_scale"):
            if s in got:
                v = got[s].float()
                assert torch.isfinite(v).all() and (v > 0).all(), (name, s)
        if "input_scale" in got and algo != "NVFP4":
            amax = m.input_quantizer.amax
            assert torch.equal(got["input_scale"], amax / torch.tensor(m.input_quantizer.fmt.element.max_value))
        if algo == "FP8":
            assert torch.equal(got["weight_scale"], m.weight_quantizer.amax / torch.tensor(448.0))
        if algo == "W4A8_NVFP4_FP8":  # consumer source: weight_scale_2 = amax / 448
            assert torch.equal(got["weight_scale_2"], m.weight_quantizer.amax / torch.tensor(448.0))
        if algo == "W4A8_AWQ":
            assert (deq.float().abs().amax() / got["weight_scale_2"]).item() <= 448.0
        # relative error of the dequantized (un-smoothed) weight against the float weight (CHECKPOINTS.md 4)
        s = m.input_quantizer.pre_quant_scale
        w_src = float_weight(m).float()
        rel = ((deq.float() - w_src).norm() / w_src.norm()).item()
        assert rel < {"FP8": 0.06, "FP8_PER_CHANNEL_PER_TOKEN": 0.06, "W8A8_SQ_PER_CHANNEL": 0.05,
                      "W8A16": 0.05}.get(algo, 0.15 if "NVFP4" in algo else 0.25), (name, rel, s is not None)

    # fused groups carry the scales consumers require to be identical
    for layer in range(2):
        for members, keys_equal in ((QKV, ("weight_scale_2", "input_scale", "pre_quant_scale")),
                                    (("gate_proj", "up_proj"), ("weight_scale_2", "input_scale", "pre_quant_scale"))):
            parent = "self_attn" if members == QKV else "mlp"
            for suffix in keys_equal:
                names = [f"model.layers.{layer}.{parent}.{p}.{suffix}" for p in members]
                if names[0] in keys:
                    vals = [reader.get(n) for n in names]
                    assert all(torch.equal(v, vals[0]) for v in vals), names

    # loading back gives the exported model's outputs exactly
    loaded = load_hf_checkpoint(out)
    x = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
        got = loaded(x, use_cache=False).logits
    assert torch.equal(ref, got)
    # exporting again from the same model works (nothing was converted in place)
    export_hf_checkpoint(model, tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


@pytest.mark.parametrize("kv,algo,bound", [(KV_FP8, "FP8", 448.0), (KV_NVFP4, "NVFP4", 6 * 448.0)], ids=["fp8", "nvfp4"])
def test_kv_cache_scales(kv, algo, bound, tmp_path):
    model, _ = _quantized("fp8", kv=kv)
    out = export_hf_checkpoint(model, tmp_path / "kv")
    q = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert q["kv_cache_quant_algo"] == algo
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"]["num_bits"] == (8 if algo == "FP8" else 4)
    reader = CheckpointReader(out)
    for i, layer in enumerate(model.model.layers):
        for role in "kv":
            t = reader.get(f"model.layers.{i}.self_attn.{role}_proj.{role}_scale")
            amax = getattr(layer.self_attn, f"{role}_proj").output_quantizer.amax
            assert t.dtype == F32 and t.shape == () and torch.equal(t, amax / torch.tensor(bound))
    loaded = load_hf_checkpoint(out)
    x = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(x, use_cache=False).logits, loaded(x, use_cache=False).logits)


def test_sharded_checkpoint_has_an_index_and_loads(tmp_path):
    model, _ = _quantized("nvfp4")
    out = export_hf_checkpoint(model, tmp_path / "sharded", max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    single = export_hf_checkpoint(model, tmp_path / "single")
    assert set(index["weight_map"]) == set(CheckpointReader(single).keys())
    from safetensors import safe_open

    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
    x = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        assert torch.equal(load_hf_checkpoint(out)(x).logits, model(x).logits)


def test_failure_midway_leaves_nothing_and_targets_are_protected(tmp_path, monkeypatch):
    model, _ = _quantized("fp8")
    calls = {"n": 0}
    original = ShardedSafetensorsWriter.add

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure after the first tensor")
        return original(self, name, tensor)

    monkeypatch.setattr(ShardedSafetensorsWriter, "add", failing)
    with pytest.raises(RuntimeError, match="injected"):
        export_hf_checkpoint(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(ShardedSafetensorsWriter, "add", original)

    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_hf_checkpoint(model, target)
    assert (target / "keep.txt").read_text() == "x"
    export_hf_checkpoint(model, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    (tmp_path / "empty").mkdir()
    export_hf_checkpoint(model, tmp_path / "empty")  # an empty directory is fine


def test_tokenizer_and_generation_files_are_copied(tmp_path):
    model, _ = _quantized("fp8")
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "tokenizer_config.json").write_text("{}")
    out = export_hf_checkpoint(model, tmp_path / "out", source_dir=src)
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()


def test_unsupported_format_and_unquantized_model_are_refused(tmp_path):
    model = build_tiny_model("llama")
    with pytest.raises(ExportError, match="no quantized layer"):
        export_hf_checkpoint(model, tmp_path / "a")
    mtq.quantize(model, "mxfp8", lambda m: m(torch.randint(0, 128, (2, 4))))
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj.*Supported"):
        export_hf_checkpoint(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_checkpoint_without_state_loads_from_scales(tmp_path):
    model, _ = _quantized("nvfp4")
    out = export_hf_checkpoint(model, tmp_path / "ckpt")
    shutil.rmtree(out / "modelopt_lite")
    with pytest.warns(UserWarning, match="derived"):
        loaded = load_hf_checkpoint(out)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ref, got = model(x).logits, loaded(x).logits
    assert (got - ref).abs().max().item() < 1e-3 * ref.abs().max().item() + 1e-4
    for name, m in _linears(model).items():
        if name != "lm_head":
            lm = loaded.get_submodule(name)
            assert torch.equal(lm.weight, m.quantized_weight())
            assert torch.allclose(lm.input_quantizer.amax, m.input_quantizer.amax, rtol=1e-6, atol=0)
