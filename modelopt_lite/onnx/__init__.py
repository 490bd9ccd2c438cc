"""Post-training quantization of existing ONNX models with ONNX Runtime (numpy and onnx only, no PyTorch).

    from modelopt_lite.onnx import quantize_onnx
    report = quantize_onnx("model.onnx", calibration_data="calib.npz", quantize_mode="int8",
                           calibration_method="max", output_path="model.int8.onnx", eval_data="heldout.npz")
    print(report)

Modes: ``int8`` (activations per tensor, weights per output channel),
``fp8`` (FLOAT8E4M3FN, same granularity, opset 19) and ``int4`` (weight-only
blocks of 128 along the input dimension, opset 21). See `qdq` for the
placement rules and `calibrate` for the calibration methods.
"""

from __future__ import annotations

from .api import quantize_model, quantize_onnx
from .calibrate import METHODS, HistogramStatistic, MaxStatistic, collect_statistics, entropy_amax
from .io import load_batches, make_session
from .qdq import MODES, QUANTIZABLE_OPS, int4_block, plan_quantization
from .report import OutputFidelity, QuantReport

__all__ = ["quantize_onnx", "quantize_model", "QuantReport", "OutputFidelity", "collect_statistics",
           "entropy_amax", "MaxStatistic", "HistogramStatistic", "load_batches", "make_session",
           "plan_quantization", "int4_block", "METHODS", "MODES", "QUANTIZABLE_OPS"]
