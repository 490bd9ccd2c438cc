"""ONNX export: graph content per format, and ONNX Runtime against the PyTorch fake-quant model.

Every ONNX Runtime check runs on fresh inputs (another seed, another batch
and sequence size than export and calibration) with ONNX Runtime's default
session options (ORT_ENABLE_ALL). Tolerances, as max |ORT - torch| over the
output's largest |value| (check_onnx's max_rel_diff):

* EXACT = 1e-5: formats computed by fake quant's own formula (per-token
  FP8, NVFP4 portable) and weight-only formats; only the order of the
  float32 sums in MatMul differs (measured <= 6e-7).
* QDQ = 1e-2: static INT8/FP8 activations. QuantizeLinear computes
  round(x / scale), fake quant round(x * (qmax / amax)); at a rounding tie
  the two can differ by one code (measured 0 on these inputs).
* ORT_INT8_COMPUTE = 3e-2: INT4 weight-only at ONNX Runtime's defaults,
  which may run DequantizeLinear -> MatMul as MatMulNBits with int8
  activations (accuracy level 4; measured exact for INT4 on this CPU, 1e-2
  for INT8 weight-only). With accuracy level 1 the result is EXACT.
"""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import modelopt_lite.quantization as mtq  # noqa: E402
from modelopt_lite.export.layers import ExportError  # noqa: E402
from modelopt_lite.export.onnx import check_onnx, export_onnx  # noqa: E402
from modelopt_lite.quantization import TensorQuantizer  # noqa: E402

TP = onnx.TensorProto
EXACT, QDQ, ORT_INT8_COMPUTE = 1e-5, 1e-2, 3e-2
E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
ORT_CPU_OPS = {  # standard operators the portable flavour may use (all run on ORT's CPU provider)
    "Abs", "Add", "BitShift", "BitwiseAnd", "Cast", "Clip", "Concat", "DequantizeLinear", "Div", "Equal", "Gather",
    "Gelu", "Less", "LessOrEqual", "MatMul", "Max", "Min", "Mul", "Pad", "QuantizeLinear", "ReduceMax", "Relu",
    "Reshape", "Round", "Slice", "Transpose", "Unsqueeze", "Where",
}


# ---------------------------------------------------------------- helpers
def _mlp(in_features=32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(in_features, 64), nn.ReLU(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16)).eval()


def _quantize(model, config, shape, seed=0):
    """Calibrate on four random batches of `shape`; returns the model and the first batch."""
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(*shape, generator=g) for _ in range(4)]
    mtq.quantize(model, config, lambda m: [m(b) for b in batches])
    return model, batches[0]


def _fresh(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _config(preset, extra):
    cfg = mtq.get_config(preset).model_dump(exclude_unset=True)
    cfg["quant_cfg"] = {**cfg["quant_cfg"], **extra}
    return cfg


def _nodes(proto, op_type):
    return [n for n in proto.graph.node if n.op_type == op_type]


def _attr(node, name, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _inits(proto):
    return {t.name: t for t in proto.graph.initializer}


def _producer(proto, name):
    return next(n for n in proto.graph.node if name in n.output)


def _max_ir_version_ort_accepts():
    g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
                               [onnx.helper.make_tensor_value_info("x", TP.FLOAT, [1])],
                               [onnx.helper.make_tensor_value_info("y", TP.FLOAT, [1])])
    for ir in range(onnx.IR_VERSION, 6, -1):
        m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)])
        m.ir_version = ir
        try:
            ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            return ir
        except Exception:
            continue
    return 0


def _snapshot(model):
    quantizers = {n: (copy.deepcopy(q._attrs), q.fmt, q._spec, q._calibrating, q._quantizing,
                      None if q._amax is None else q._amax.clone(),
                      None if q.pre_quant_scale is None else q.pre_quant_scale.clone())
                  for n, q in model.named_modules() if isinstance(q, TensorQuantizer)}
    return ({k: v.clone() for k, v in model.state_dict().items()}, quantizers,
            [(n, type(m), m.training) for n, m in model.named_modules()])


def _same_tensor(a, b):
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


# ---------------------------------------------------------------- INT8 / FP8 as QuantizeLinear/DequantizeLinear
def test_int8_qdq_with_pre_quant_scale_and_output_quantizer(tmp_path):
    cfg = _config("int8", {"*4.output_quantizer": {"num_bits": 8, "axis": None}})
    model, x = _quantize(_mlp(), cfg, (2, 8, 32))
    pqs = torch.rand(32, generator=torch.Generator().manual_seed(3)) + 0.5
    model[0].input_quantizer.pre_quant_scale = pqs
    target = tmp_path / "int8.onnx"
    target.write_bytes(b"old")
    export_onnx(model, x, target, overwrite=True)
    proto = onnx.load(target)
    inits = _inits(proto)

    # 3 inputs + 1 output quantizer, each Q -> DQ; weights are INT8 codes under a per-channel DQ (axis 0)
    assert len(_nodes(proto, "QuantizeLinear")) == 4 and len(_nodes(proto, "DequantizeLinear")) == 7
    for i in (0, 2, 4):
        w, scale = inits[f"{i}.weight_quantizer.weight"], inits[f"{i}.weight_quantizer.weight_scale"]
        assert w.data_type == TP.INT8 and list(w.dims) == list(model[i].weight.shape)
        amax = model[i].weight_quantizer.amax.reshape(-1)
        assert np.array_equal(onnx.numpy_helper.to_array(scale), (amax / torch.full_like(amax, 127.0)).numpy())
        dq = next(n for n in _nodes(proto, "DequantizeLinear") if n.input[0] == w.name)
        assert _attr(dq, "axis") == 0
    assert not any(t.data_type == TP.FLOAT and len(t.dims) == 2 for t in proto.graph.initializer)
    for q in _nodes(proto, "QuantizeLinear"):  # symmetric: no zero point, INT8 named by output_dtype
        assert len(q.input) == 2 and _attr(q, "output_dtype") == TP.INT8
    # pre_quant_scale: a Mul by the per-channel vector feeds the first QuantizeLinear
    q0 = next(q for q in _nodes(proto, "QuantizeLinear") if q.input[1] == "0.input_quantizer.input_scale")
    mul = _producer(proto, q0.input[0])
    assert mul.op_type == "Mul" and "input" in mul.input
    pqs_init = next(inits[i] for i in mul.input if i in inits)
    assert np.array_equal(onnx.numpy_helper.to_array(pqs_init), pqs.numpy())

    result = check_onnx(model, target, _fresh(3, 5, 32))
    assert result["outputs"] == 1 and result["max_rel_diff"] <= QDQ, result


def test_existing_target_refused_without_overwrite(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        export_onnx(_mlp(), torch.randn(2, 8, 32), target)
    assert target.read_bytes() == b"keep"


@pytest.fixture(scope="module")
def fp8_relu(tmp_path_factory):
    """Linear -> ReLU -> FP8-quantized Linear (both Linears FP8, per tensor)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    model, x = _quantize(model, "fp8", (2, 8, 16))
    return model, export_onnx(model, x, tmp_path_factory.mktemp("fp8") / "fp8.onnx")


def test_fp8_qdq_per_tensor(fp8_relu):
    model, path = fp8_relu
    proto = onnx.load(path)
    inits = _inits(proto)
    qs = _nodes(proto, "QuantizeLinear")
    assert len(qs) == 2 and len(_nodes(proto, "DequantizeLinear")) == 4
    for q in qs:  # no zero point, the type is named by output_dtype
        assert len(q.input) == 2 and _attr(q, "output_dtype") == TP.FLOAT8E4M3FN
        amax = model[0 if q.input[0] == "input" else 2].input_quantizer.amax
        scale = onnx.numpy_helper.to_array(inits[q.input[1]])
        assert scale == (amax / torch.full_like(amax, 448.0)).numpy()
    for q in qs:  # portable: the saturation bound between an FP8 activation's DQ and the MatMul (see onnx_nvfp4)
        dq = next(n for n in proto.graph.node if q.output[0] in n.input)
        clip = next(n for n in proto.graph.node if dq.output[0] in n.input)
        assert dq.op_type == "DequantizeLinear" and clip.op_type == "Clip"
    for i in (0, 2):  # FP8 codes x the per-tensor scale are the fake-quant weight, bit for bit
        w, scale = inits[f"{i}.weight_quantizer.weight"], inits[f"{i}.weight_quantizer.weight_scale"]
        assert w.data_type == TP.FLOAT8E4M3FN and list(w.dims) == list(model[i].weight.shape)
        codes = torch.frombuffer(bytearray(w.raw_data), dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        scale = torch.from_numpy(onnx.numpy_helper.to_array(scale).copy())
        assert scale.dim() == 0
        assert torch.equal(codes.reshape(model[i].weight.shape) * scale, model[i].quantized_weight())
    result = check_onnx(model, path, _fresh(3, 5, 16))
    assert result["max_rel_diff"] <= QDQ, result


def test_relu_before_fp8_quantizer_is_kept_by_onnxruntime(fp8_relu):
    """ONNX Runtime (1.31, default level) deletes a Relu feeding a FLOAT8 QuantizeLinear that has a zero point."""
    model, path = fp8_relu
    proto = onnx.load(path)
    relu = _nodes(proto, "Relu")[0]
    q = next(n for n in proto.graph.node if relu.output[0] in n.input)
    assert q.op_type == "QuantizeLinear" and len(q.input) == 2

    fresh = _fresh(4, 6, 16)
    with torch.no_grad():
        ref = model(fresh)
        without_relu = model[2](model[0](fresh))
    assert (ref - without_relu).abs().max() > 0.1 * ref.abs().max()  # the Relu matters for these inputs
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        out = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(
            None, {"input": fresh.numpy()})[0]
        assert np.abs(out - ref.numpy()).max() <= QDQ * ref.abs().max().item()


def test_fp8_per_channel_per_token(tmp_path):
    model, x = _quantize(_mlp(), "fp8_pc_pt", (2, 8, 32))
    path = export_onnx(model, x, tmp_path / "pcpt.onnx")
    proto = onnx.load(path)
    assert not _nodes(proto, "QuantizeLinear")  # no static activation scale: computed per row
    assert len(_nodes(proto, "ReduceMax")) == 3
    for i in (0, 2, 4):
        w = _inits(proto)[f"{i}.weight_quantizer.weight"]
        dq = next(n for n in _nodes(proto, "DequantizeLinear") if n.input[0] == w.name)
        assert w.data_type == TP.FLOAT8E4M3FN and _attr(dq, "axis") == 0
    result = check_onnx(model, path, _fresh(3, 5, 32))
    assert result["max_rel_diff"] <= EXACT, result


# ---------------------------------------------------------------- INT4 blocks
def test_int4_block_weights(tmp_path):
    model, x = _quantize(_mlp(in_features=256), "int4_wo", (2, 8, 256))
    path = export_onnx(model, x, tmp_path / "int4.onnx")
    proto = onnx.load(path)
    inits = _inits(proto)
    assert not _nodes(proto, "QuantizeLinear")  # activations stay in float
    for i, blocks in ((0, 2), (2, 1), (4, 1)):  # 256 inputs: two blocks of 128; 64 and 48: one (padded) block
        w, scale = inits[f"{i}.weight_quantizer.weight"], inits[f"{i}.weight_quantizer.weight_scale"]
        dq = next(n for n in _nodes(proto, "DequantizeLinear") if n.input[0] == w.name)
        out_f = model[i].weight.shape[0]
        assert w.data_type == TP.INT4 and list(scale.dims) == [out_f, blocks]
        assert (_attr(dq, "axis"), _attr(dq, "block_size")) == (1, 128)
        raw = np.frombuffer(w.raw_data, np.uint8)
        nibbles = np.stack([raw & 15, raw >> 4], -1).reshape(-1)[: model[i].weight.numel()].astype(np.int8)
        codes = torch.from_numpy(np.where(nibbles > 7, nibbles - 16, nibbles)).float().reshape(out_f, -1)
        per_elem = torch.from_numpy(onnx.numpy_helper.to_array(scale).copy()).repeat_interleave(128, 1)
        per_elem = per_elem[:, : codes.shape[1]]
        assert torch.equal(codes * per_elem, model[i].quantized_weight())
    fresh = _fresh(3, 5, 256)
    assert check_onnx(model, path, fresh)["max_rel_diff"] <= ORT_INT8_COMPUTE
    exact = check_onnx(model, path, fresh, session_config={"session.qdq_matmulnbits_accuracy_level": "1"})
    assert exact["max_rel_diff"] <= EXACT, exact


# ---------------------------------------------------------------- NVFP4
@pytest.mark.parametrize("preset", ["nvfp4", "w4a16_nvfp4", "w4a8_nvfp4_fp8"])
def test_nvfp4_portable_runs_in_onnxruntime(tmp_path, preset):
    model, x = _quantize(_mlp(), preset, (2, 8, 32))
    path = export_onnx(model, x, tmp_path / f"{preset}.onnx")
    proto = onnx.load(path)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 21)] and proto.ir_version == 10
    assert {n.op_type for n in proto.graph.node} <= ORT_CPU_OPS and all(n.domain == "" for n in proto.graph.node)
    inits = _inits(proto)
    assert not any(t.data_type == TP.FLOAT4E2M1 for t in proto.graph.initializer)
    for i in (0, 2, 4):  # E2M1 codes two per byte, FP8 block scales
        out_f, in_f = model[i].weight.shape
        block = model[i].weight_quantizer.fmt.blocks[-1]
        packed, scale = inits[f"{i}.weight_quantizer.weight_packed"], inits[f"{i}.weight_quantizer.weight_scale"]
        assert packed.data_type == TP.UINT8 and list(packed.dims) == [out_f, in_f // 2]
        assert scale.data_type == TP.FLOAT8E4M3FN and list(scale.dims) == [out_f, -(-in_f // block)]
    n_q = len(_nodes(proto, "QuantizeLinear"))
    assert n_q == {"nvfp4": 0, "w4a16_nvfp4": 0, "w4a8_nvfp4_fp8": 3}[preset]
    assert (len(_nodes(proto, "Round")) > 0) == (preset == "nvfp4")  # dynamic E2M1 activations
    result = check_onnx(model, path, _fresh(3, 5, 32))
    assert result["max_rel_diff"] <= (QDQ if n_q else EXACT), result


def _decode_fp4_weight(inits, prefix, shape, block):
    """The weight from the FLOAT4E2M1 codes, FP8 block scales and global scale, decoded here."""
    codes_t, sb_t = inits[f"{prefix}.weight"], inits[f"{prefix}.weight_scale"]
    raw = np.frombuffer(codes_t.raw_data, np.uint8)
    codes = np.stack([raw & 15, raw >> 4], -1).reshape(-1)[: shape[0] * shape[1]].reshape(shape)
    mags = np.array(E2M1_VALUES, np.float32)[codes & 7]
    q = torch.from_numpy(np.where(codes & 8, -mags, mags))
    sb = torch.frombuffer(bytearray(sb_t.raw_data), dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    s2 = torch.from_numpy(onnx.numpy_helper.to_array(inits[f"{prefix}.weight_scale_2"]).copy())
    eff = (sb.reshape(shape[0], -1) * s2).repeat_interleave(block, 1)[:, : shape[1]]
    return q * eff


def test_nvfp4_tensorrt_flavour_structure(tmp_path):
    fp8_last = {"*4.input_quantizer": {"num_bits": "e4m3", "axis": None}}  # and one static FP8 activation
    model, x = _quantize(_mlp(), _config("nvfp4", fp8_last), (2, 8, 32))
    path = export_onnx(model, x, tmp_path / "trt.onnx", nvfp4_flavour="tensorrt")
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert proto.ir_version == 11 and proto.ir_version <= _max_ir_version_ort_accepts()
    assert sorted((o.domain, o.version) for o in proto.opset_import) == [("", 23), ("trt", 1)]
    inits = _inits(proto)
    dq_of = {n.input[0]: n for n in _nodes(proto, "DequantizeLinear")}

    for i in (0, 2, 4):  # weights: FLOAT4E2M1 codes, FLOAT8E4M3FN block scales dequantized by the global scale
        prefix, shape = f"{i}.weight_quantizer", tuple(model[i].weight.shape)
        codes, sb = inits[f"{prefix}.weight"], inits[f"{prefix}.weight_scale"]
        assert codes.data_type == TP.FLOAT4E2M1 and tuple(codes.dims) == shape
        assert sb.data_type == TP.FLOAT8E4M3FN and list(sb.dims) == [shape[0], shape[1] // 16]
        scale_dq, w_dq = dq_of[sb.name], dq_of[codes.name]
        assert list(scale_dq.input) == [sb.name, f"{prefix}.weight_scale_2"]
        assert w_dq.input[1] == scale_dq.output[0] and (_attr(w_dq, "axis"), _attr(w_dq, "block_size")) == (-1, 16)
        assert torch.equal(_decode_fp4_weight(inits, prefix, shape, 16), model[i].quantized_weight())

    dyn = _nodes(proto, "TRT_FP4DynamicQuantize")  # activations, as TensorRT's dynamic FP4 quantizer
    assert len(dyn) == 2 and all(n.domain == "trt" for n in dyn)
    for n, i in zip(dyn, (0, 2)):
        assert (_attr(n, "axis"), _attr(n, "block_size"), _attr(n, "scale_type")) == (-1, 16, TP.FLOAT8E4M3FN)
        s2 = onnx.numpy_helper.to_array(inits[n.input[1]])
        amax = model[i].input_quantizer.amax
        assert s2 == (amax / torch.full_like(amax, 6.0 * 448.0)).numpy()
        scale_dq, x_dq = dq_of[n.output[1]], dq_of[n.output[0]]
        assert list(scale_dq.input) == [n.output[1], n.input[1]] and x_dq.input[1] == scale_dq.output[0]
        assert (_attr(x_dq, "axis"), _attr(x_dq, "block_size")) == (-1, 16)

    (q,) = _nodes(proto, "QuantizeLinear")  # FP8 in TensorRT's form: zero points, DequantizeLinear into the MatMul
    zp = inits[q.input[2]]
    assert zp.data_type == TP.FLOAT8E4M3FN and zp.raw_data == b"\x00"
    dq = next(n for n in proto.graph.node if q.output[0] in n.input)
    assert dq.op_type == "DequantizeLinear" and list(dq.input)[2] == q.input[2]
    assert next(n for n in proto.graph.node if dq.output[0] in n.input).op_type == "MatMul"


# ---------------------------------------------------------------- Hugging Face models
def _hf_inputs(batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 2:] = 0  # right padding on one row
    return {"input_ids": torch.randint(0, 128, (batch, seq), generator=g), "attention_mask": mask}


def _hf_export(tmp_path_factory, name, preset):
    from modelopt_lite.models.tiny import build_tiny_model

    model = build_tiny_model(name)
    layers = model.model.layers if name == "llama" else model.encoder.layer
    del layers[1:]  # one layer: tracing with dynamic shapes dominates the test time
    model.config.num_hidden_layers = 1
    batches = [_hf_inputs(2, 8, seed) for seed in range(2)]
    mtq.quantize(model, preset, lambda m: [m(**b) for b in batches])
    before = _snapshot(model)
    path = export_onnx(model, batches[0], tmp_path_factory.mktemp(name) / f"{name}.onnx")
    return model, path, before


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("transformers")
    return _hf_export(tmp_path_factory, "llama", "nvfp4")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    pytest.importorskip("transformers")
    return _hf_export(tmp_path_factory, "bert", "fp8")


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_llama_nvfp4_at_two_sizes(llama):
    model, path, _ = llama
    proto = onnx.load(path)
    assert [(i.name, _dims(i)) for i in proto.graph.input] == [("input_ids", ["batch", "seq"]),
                                                               ("attention_mask", ["batch", "seq"])]
    assert [(o.name, _dims(o)) for o in proto.graph.output] == [("logits", ["batch", "seq", 128])]
    assert proto.ir_version <= _max_ir_version_ort_accepts()
    for batch, seq in ((3, 11), (1, 5)):
        result = check_onnx(model, path, _hf_inputs(batch, seq, seed=7))
        assert result["names"] == ["logits"] and result["max_rel_diff"] <= EXACT, result


def test_export_leaves_the_model_unchanged(llama):
    model, _, (state, quantizers, modules) = llama
    now_state, now_quantizers, now_modules = _snapshot(model)
    assert now_state.keys() == state.keys() and all(torch.equal(now_state[k], state[k]) for k in state)
    assert now_modules == modules and now_quantizers.keys() == quantizers.keys()
    for name, (attrs, fmt, spec, calibrating, quantizing, amax, pqs) in quantizers.items():
        a, f, s, c, q, am, p = now_quantizers[name]
        assert (a, f, s, c, q) == (attrs, fmt, spec, calibrating, quantizing), name
        assert f.scale is fmt.scale and _same_tensor(am, amax) and _same_tensor(p, pqs), name


def test_bert_fp8_outputs_flattened(bert):
    model, path, _ = bert
    proto = onnx.load(path)
    assert [(o.name, _dims(o)) for o in proto.graph.output] == [("last_hidden_state", ["batch", "seq", 64]),
                                                                ("pooler_output", ["batch", 64])]
    for batch, seq in ((3, 11), (1, 6)):
        result = check_onnx(model, path, _hf_inputs(batch, seq, seed=8))
        assert result["outputs"] == 2 and result["max_rel_diff"] <= QDQ, result


# ---------------------------------------------------------------- failures and refusals
def test_failed_write_leaves_the_old_file_and_no_temporary(fp8_relu, tmp_path, monkeypatch):
    import modelopt_lite.export.onnx as onnx_export

    model, path = fp8_relu
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    write = Path.write_bytes

    def half_then_fail(self, data):
        write(self, data[: len(data) // 2])
        raise OSError("disk full")

    # the graph torch.onnx.export gave for this model, so the test spends no time tracing
    monkeypatch.setattr(onnx_export, "_torch_export", lambda *args, **kwargs: onnx.load(path))
    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(model, torch.randn(2, 8, 16), target, overwrite=True)
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_refusals_before_any_work(tmp_path):
    model, x = _quantize(_mlp(), "mxfp8", (2, 8, 32))
    with pytest.raises(ExportError, match="E8M0"):
        export_onnx(model, x, tmp_path / "mx.onnx")
    with pytest.raises(ValueError, match="nvfp4_flavour"):
        export_onnx(_mlp(), x, tmp_path / "a.onnx", nvfp4_flavour="fast")
    nvfp4, _ = _quantize(_mlp(), "nvfp4", (2, 8, 32))
    with pytest.raises(ValueError, match="opset 21 is out of range"):
        export_onnx(nvfp4, x, tmp_path / "b.onnx", nvfp4_flavour="tensorrt", opset=21)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("preset", ["nvfp4_mse", "int8_sq"])
def test_calibration_algorithm_presets_export_exactly(preset, tmp_path_factory):
    """Searched per-block NVFP4 amaxes under a global shared by q/k/v (and SmoothQuant's scales) export exactly."""
    model, path, _ = _hf_export(tmp_path_factory, "llama", preset)
    if preset == "nvfp4_mse":
        q = model.model.layers[0].self_attn.k_proj.weight_quantizer
        assert q.amax.numel() > 1 and q.global_amax is not None  # the shared-global form is what is exported
    result = check_onnx(model, path, _hf_inputs(3, 11, seed=7))
    assert result["max_rel_diff"] <= EXACT, result


def test_softmax_and_kv_quantizers_export(tmp_path_factory):
    """Static per-tensor quantizers need no static last dimension (the softmax output's is the sequence)."""
    cfg = mtq.compose_configs("fp8", {"quant_cfg": {"*softmax_quantizer": {"num_bits": "e4m3", "axis": None}}})
    model, path, _ = _hf_export(tmp_path_factory, "llama", mtq.with_kv_cache(cfg, "fp8"))
    attn = model.model.layers[0].self_attn
    assert attn.softmax_quantizer.amax is not None and attn.k_bmm_quantizer.amax is not None
    for batch, seq in ((3, 11), (1, 5)):
        result = check_onnx(model, path, _hf_inputs(batch, seq, seed=7))
        assert result["max_rel_diff"] <= QDQ, result
