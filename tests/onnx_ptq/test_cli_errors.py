"""The onnx-ptq command end to end, the ORT FP8-after-Relu defect, and the errors for bad input."""

import argparse
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import cnn_data
from onnx import TensorProto, helper, numpy_helper

from modelopt_lite.cli import onnx_ptq
from modelopt_lite.onnx import make_session, quantize_onnx


def _run_cli(argv):
    parser = argparse.ArgumentParser(prog="modelopt-lite")
    sub = parser.add_subparsers(dest="command")
    onnx_ptq.add_parser(sub)
    args = parser.parse_args(["onnx-ptq", *argv])
    return onnx_ptq.run(args)


def test_cli_end_to_end(cnn_onnx, tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", **cnn_data(24, 0))
    np.savez(tmp_path / "heldout.npz", **cnn_data(12, 1))
    out = tmp_path / "cnn.int8.onnx"
    rc = _run_cli([str(cnn_onnx), "--calib", str(tmp_path / "calib.npz"), "--mode", "int8", "--method", "entropy",
                   "--output", str(out), "--eval", str(tmp_path / "heldout.npz"), "--batch-size", "5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "ONNX PTQ int8, calibration entropy" in text and "Conv 3, Gemm 1" in text
    assert "held-out data (3 batches)" in text  # 12 samples in batches of 5
    cosine = float(next(line.split()[1] for line in text.splitlines() if line.strip().startswith("logits")))
    assert cosine > 0.999
    got = make_session(str(out)).run(None, cnn_data(2, 3))[0]
    assert got.shape == (2, 10)
    # the default output name, next to the model, for a weight-only mode that needs no calibration data
    assert _run_cli([str(cnn_onnx), "--mode", "int4"]) == 0
    assert cnn_onnx.with_name("cnn.int4.onnx").is_file()
    assert "fidelity: not measured (no evaluation data)" in capsys.readouterr().out


def _relu_conv_model():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3, "w")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3, "w2")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv1")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 6, 6])], [w, w2])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _levels_agree(model, x):
    default = make_session(model, optimize=True).run(None, {"x": x})[0]
    plain = make_session(model, optimize=False).run(None, {"x": x})[0]
    return float(np.abs(default - plain).max())


def test_fp8_after_relu_at_the_default_optimization_level(tmp_path):
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(np.float32)
    # A FLOAT8 QuantizeLinear right after the Relu: onnxruntime's default level deletes the Relu.
    naive = _relu_conv_model()
    g = naive.graph
    g.initializer.extend([numpy_helper.from_array(np.array(0.01, np.float32), "s"),
                          helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0])])
    g.node.insert(2, helper.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"]))
    g.node.insert(3, helper.make_node("DequantizeLinear", ["rq", "s", "z"], ["rd"]))
    g.node[4].input[0] = "rd"
    assert _levels_agree(naive, x) > 0.1  # the check below catches the defect
    # quantize_onnx places the pair above the Relu: both levels give the same output
    report = quantize_onnx(_relu_conv_model(), {"x": x}, "fp8", "max", tmp_path / "q.onnx")
    quant = onnx.load(str(tmp_path / "q.onnx"))
    assert _levels_agree(quant, x) < 1e-6
    assert report.min_cosine > 0.995  # measured 0.998 (FP8 E4M3 on both convolutions)


def test_no_torch_import():
    code = "import sys, modelopt_lite.onnx; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.fixture()
def calib(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, **cnn_data(4, 0))
    return path


def test_errors(cnn_onnx, tmp_path, calib):
    out = tmp_path / "o.onnx"
    with pytest.raises(FileNotFoundError, match="ONNX model .*missing.onnx' does not exist"):
        quantize_onnx(tmp_path / "missing.onnx", calib, "int8", output_path=out)
    with pytest.raises(FileNotFoundError, match="calibration data: file .*nope.npz' does not exist"):
        quantize_onnx(cnn_onnx, tmp_path / "nope.npz", "int8", output_path=out)
    with pytest.raises(ValueError, match="unknown quantize_mode 'int3'; choose one of int8, fp8, int4"):
        quantize_onnx(cnn_onnx, calib, "int3", output_path=out)
    with pytest.raises(ValueError, match="unknown calibration_method 'minmax'; choose one of max, percentile, entropy"):
        quantize_onnx(cnn_onnx, calib, "int8", "minmax", output_path=out)
    with pytest.raises(ValueError, match="fp8 quantizes activations and needs calibration_data"):
        quantize_onnx(cnn_onnx, None, "fp8", output_path=out)
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=cnn_data(4, 0)["x"])
    with pytest.raises(ValueError, match=r"missing: x; not model inputs: image. The model takes x: float32 \[batch, 3"):
        quantize_onnx(cnn_onnx, bad, "int8", output_path=out)
    with pytest.raises(ValueError, match=r"array 'x' has rank 3 .* the model input has rank 4"):
        quantize_onnx(cnn_onnx, {"x": np.zeros((4, 3, 16), np.float32)}, "int8", output_path=out)
    with pytest.raises(ValueError, match=r"array 'x' has dtype float64, the model input needs float32"):
        quantize_onnx(cnn_onnx, {"x": np.zeros((4, 3, 16, 16))}, "int8", output_path=out)
    with pytest.raises(ValueError, match="size 8 on axis 2, the model input needs 16"):
        quantize_onnx(cnn_onnx, {"x": np.zeros((4, 3, 8, 16), np.float32)}, "int8", output_path=out)
    with pytest.raises(ValueError, match="same number of samples"):
        quantize_onnx(_relu_conv_model(), {"x": np.zeros((4, 4, 6, 6), np.float32), "y": np.zeros(3)}, "int8",
                      output_path=out)
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    with pytest.raises(ValueError, match="is not a readable .npz file"):
        quantize_onnx(cnn_onnx, not_npz, "int8", output_path=out)
    with pytest.raises(ValueError, match="op_types_to_exclude: Relu are not quantized anyway"):
        quantize_onnx(cnn_onnx, calib, "int8", output_path=out, op_types_to_exclude=["Relu"])
    with pytest.raises(ValueError, match="nodes_to_exclude: no node named 'conv9'"):
        quantize_onnx(cnn_onnx, calib, "int8", output_path=out, nodes_to_exclude=["conv9"])
    assert not out.exists()
    rc = None
    with pytest.raises(ValueError, match="unknown quantize_mode 'int2'"):
        rc = _run_cli([str(cnn_onnx), "--calib", str(calib), "--mode", "int2"])
    assert rc is None


def test_main_command_runs_without_torch(cnn_onnx, tmp_path):
    """`modelopt-lite onnx-ptq` through the main entry point, in a process that never imports torch."""
    code = ("import sys; from modelopt_lite.cli import main; "
            f"rc = main(['onnx-ptq', {str(cnn_onnx)!r}, '--mode', 'int4', '--output', {str(tmp_path / 'o.onnx')!r}]); "
            "print('torch loaded' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "no torch" and (tmp_path / "o.onnx").is_file()
