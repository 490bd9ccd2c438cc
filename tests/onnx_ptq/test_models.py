"""PTQ of exported float models (tiny BERT, small CNN) in int8, fp8 and int4, run in ONNX Runtime."""

from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import bert_data, cnn_data
from onnx import TensorProto, numpy_helper

from modelopt_lite.onnx import int4_block, make_session, quantize_onnx

# Lowest cosine to the float model on held-out data, measured (tiny BERT: int8 0.99999, fp8 0.99999,
# int4 0.99998; CNN: int8 0.99998, fp8 0.9996, int4 0.9987); the thresholds leave a margin.
BERT_MIN_COSINE = {"int8": 0.9995, "fp8": 0.9995, "int4": 0.999}
CNN_MIN_COSINE = {"int8": 0.999, "fp8": 0.998, "int4": 0.995}


def _ops(model):
    return Counter(n.op_type for n in model.graph.node)


def _float_counts(path):
    """(quantizable nodes, weights, distinct activation inputs) of the float graph, counted independently."""
    g = onnx.load(str(path)).graph
    inits = {t.name for t in g.initializer}
    nodes = [n for n in g.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    weights = [n.input[1] for n in nodes if n.input[1] in inits]
    acts = {x for n in nodes for x in n.input[:2] if x not in inits}
    return len(nodes), len(weights), len(acts)


def _default_vs_plain(path, batch):
    model = onnx.load(str(path))
    default = make_session(model, optimize=True).run(None, batch)[0]
    plain = make_session(model, optimize=False).run(None, batch)[0]
    return float(np.abs(default - plain).max() / np.abs(plain).max())


@pytest.mark.parametrize("mode", ["int8", "fp8", "int4"])
def test_bert(bert_onnx, tmp_path, mode):
    out = tmp_path / f"bert.{mode}.onnx"
    report = quantize_onnx(bert_onnx, bert_data(16, 0), mode, "max", out, eval_data=bert_data(8, 1))
    nodes, weights, acts = _float_counts(bert_onnx)
    assert (nodes, weights, acts) == (16, 12, 16)
    assert report.quantized_nodes == {"MatMul": weights if mode == "int4" else nodes}
    assert report.outputs[0].name == "last_hidden_state"
    assert report.min_cosine > BERT_MIN_COSINE[mode], str(report)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    ops = _ops(model)
    opset = next(o.version for o in model.opset_import if o.domain == "")
    assert model.ir_version <= 13
    if mode == "int4":
        assert (ops["QuantizeLinear"], ops["DequantizeLinear"], opset) == (0, weights, 21)
        blocks = sorted(next(a.i for a in n.attribute if a.name == "block_size")
                        for n in model.graph.node if n.op_type == "DequantizeLinear")
        assert blocks == [64] * 10 + [128] * 2  # K = 64 everywhere but the FFN down projection (K = 128)
        assert all(t.data_type == TensorProto.INT4 for t in model.graph.initializer if t.name.endswith("_int4"))
    else:
        assert ops["QuantizeLinear"] == acts and ops["DequantizeLinear"] == acts + weights
        assert opset == 20  # the exported opset (20) is enough for both
        code = TensorProto.INT8 if mode == "int8" else TensorProto.FLOAT8E4M3FN
        codes = [t for t in model.graph.initializer if t.name.endswith(f"_{mode}")]
        assert len(codes) == weights and all(t.data_type == code for t in codes)
        # per output channel: MatMul B is [K, N], one scale per column
        by_name = {t.name: t for t in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "DequantizeLinear" and n.input[0].endswith(f"_{mode}"):
                assert next(a.i for a in n.attribute if a.name == "axis") == 1
                assert list(by_name[n.input[1]].dims) == [by_name[n.input[0]].dims[1]]
        if mode == "fp8":
            assert report.qdq_nodes["Cast"] == acts  # activations dequantize with a float16 scale, then cast
            assert _default_vs_plain(out, bert_data(4, 2)) < 1e-5


def test_bert_fp8_weights_are_on_the_grid(bert_onnx, tmp_path):
    out = tmp_path / "bert.fp8.onnx"
    quantize_onnx(bert_onnx, bert_data(8, 0), "fp8", "max", out)
    float_w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(bert_onnx)).graph.initializer}
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    checked = 0
    for name, w in float_w.items():
        if f"{name}_fp8" in inits:
            codes = numpy_helper.to_array(inits[f"{name}_fp8"]).astype(np.float32)
            scale = numpy_helper.to_array(inits[f"{name}_scale"])
            np.testing.assert_allclose(scale, np.abs(w).max(0) / 448, rtol=1e-6)
            assert np.abs(codes).max() == 448
            np.testing.assert_allclose(codes * scale, w, atol=float(np.abs(w).max()) / 16)
            checked += 1
    assert checked == 12


@pytest.mark.parametrize("mode", ["int8", "fp8", "int4"])
def test_cnn(cnn_onnx, tmp_path, mode):
    out = tmp_path / f"cnn.{mode}.onnx"
    report = quantize_onnx(cnn_onnx, cnn_data(32, 0), mode, "max", out, eval_data=cnn_data(16, 1))
    assert report.quantized_nodes == {"Conv": 3, "Gemm": 1}
    assert report.min_cosine > CNN_MIN_COSINE[mode], str(report)
    model = onnx.load(str(out))
    ops = _ops(model)
    if mode == "int4":
        assert (ops["QuantizeLinear"], ops["DequantizeLinear"]) == (0, 4)
    else:  # activations: the input, the stem Relu, the inner Relu, the flattened pool
        assert (ops["QuantizeLinear"], ops["DequantizeLinear"]) == (4, 8)
    assert _default_vs_plain(out, cnn_data(4, 2)) < 1e-5
    if mode == "fp8":
        producer = {o: n.op_type for n in model.graph.node for o in n.output}
        assert not any(producer.get(n.input[0]) == "Relu" for n in model.graph.node if n.op_type == "QuantizeLinear")
        # the two Relus that feed a Conv read dequantized values: the pair moved above them
        # (the last Relu feeds the pooling, and the pair of the pooled tensor sits after the pooling)
        assert [producer[n.input[0]] for n in model.graph.node if n.op_type == "Relu"] == ["Cast", "Cast", "Add"]


def test_exclusions(cnn_onnx, tmp_path):
    report = quantize_onnx(cnn_onnx, cnn_data(8, 0), "int8", "max", tmp_path / "a.onnx", op_types_to_exclude=["Gemm"])
    assert report.quantized_nodes == {"Conv": 3}
    model = onnx.load(str(tmp_path / "a.onnx"))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert not gemm.input[0].endswith("_dequantized") and not gemm.input[1].endswith("_dequantized")
    first = next(n.name for n in onnx.load(str(cnn_onnx)).graph.node if n.op_type == "Conv")
    report = quantize_onnx(cnn_onnx, cnn_data(8, 0), "int8", "max", tmp_path / "b.onnx", nodes_to_exclude=[first])
    assert report.quantized_nodes == {"Conv": 2, "Gemm": 1}
    assert report.qdq_nodes == {"QuantizeLinear": 3, "DequantizeLinear": 6}


def test_external_data(cnn_onnx, tmp_path):
    out = tmp_path / "ext.onnx"
    report = quantize_onnx(cnn_onnx, cnn_data(8, 0), "int8", "max", out, use_external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 4096
    assert report.min_cosine > CNN_MIN_COSINE["int8"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    onnx.checker.check_model(str(out))


def test_int4_block_lengths():
    assert [int4_block(k) for k in (64, 96, 128, 256, 384, 200, 262)] == [64, 96, 128, 128, 128, 100, 262]
