"""`quantize_onnx`: calibrate an ONNX model in ONNX Runtime, insert Q/DQ nodes, write it and report its fidelity."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import onnx

from .calibrate import METHODS, collect_statistics
from .io import finish_model, load_batches, load_model, make_session, save_model, set_opset
from .qdq import MODES, OPSET, insert_qdq, plan_quantization
from .report import QuantReport, compare_models

__all__ = ["quantize_onnx", "quantize_model"]

PathLike = Union[str, os.PathLike]


def _check_choices(mode: str, method: str, percentile: float) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown quantize_mode {mode!r}; choose one of {', '.join(MODES)}")
    if method not in METHODS:
        raise ValueError(f"unknown calibration_method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")


def quantize_model(model: onnx.ModelProto, batches, quantize_mode: str = "int8", calibration_method: str = "max",
                   percentile: float = 99.99, op_types_to_exclude: Sequence[str] = (),
                   nodes_to_exclude: Sequence[str] = ()):
    """The quantized copy of `model` (a ModelProto), the plan, the added node counts and the amaxes."""
    _check_choices(quantize_mode, calibration_method, percentile)
    model = load_model(model)
    plan = plan_quantization(model, quantize_mode, op_types_to_exclude, nodes_to_exclude)
    amax: Dict[str, float] = {}
    if plan.activations:
        amax = collect_statistics(model, list(plan.activations), batches, method=calibration_method,
                                  fmt="fp8" if quantize_mode == "fp8" else "int8", percentile=percentile)
    set_opset(model, OPSET[quantize_mode])
    added = insert_qdq(model, plan, amax)
    model.producer_name = "modelopt_lite"
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        "modelopt_lite.onnx_ptq": f"{quantize_mode}/{calibration_method}"})
    finish_model(model)
    return model, plan, added, amax


def quantize_onnx(model: Union[PathLike, onnx.ModelProto], calibration_data=None, quantize_mode: str = "int8",
                  calibration_method: str = "max", output_path: Optional[PathLike] = None, eval_data=None, *,
                  batch_size: int = 8, percentile: float = 99.99, op_types_to_exclude: Sequence[str] = (),
                  nodes_to_exclude: Sequence[str] = (), use_external_data: bool = False,
                  overwrite: bool = True, session_config: Optional[Dict[str, str]] = None) -> QuantReport:
    """Post-training quantization of an ONNX model with ONNX Runtime; returns a `QuantReport`.

    `model`: a path or a ModelProto. `calibration_data`: an ``.npz`` path, a
    dict of arrays (one per model input, samples on the first axis, cut into
    batches of `batch_size`) or an iterable of batches (dicts of arrays);
    ``int4`` (weight-only) needs none. `quantize_mode`: "int8", "fp8" or
    "int4". `calibration_method`: "max", "percentile" (`percentile` of |x|)
    or "entropy". Operators in `op_types_to_exclude` (MatMul, Gemm, Conv)
    and nodes named in `nodes_to_exclude` stay in float. The model is
    written to `output_path` (default: ``<model>.<mode>.onnx`` beside a
    model path) atomically; `use_external_data` stores the weights in
    ``<output>.data`` (needed above 2 GB). The report compares both models
    in ONNX Runtime (CPU, default optimizations, plus `session_config`
    entries) on `eval_data` (same forms; the calibration data when None).
    """
    _check_choices(quantize_mode, calibration_method, percentile)
    source = load_model(model)
    in_path = str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>"
    if output_path is None:
        if isinstance(model, onnx.ModelProto):
            raise ValueError("output_path is needed when the model is given as a ModelProto")
        p = Path(model)
        output_path = p.with_name(f"{p.stem}.{quantize_mode}.onnx")
    calib = None
    if calibration_data is not None:
        calib = load_batches(calibration_data, source, batch_size, "calibration data")
    elif quantize_mode != "int4":
        raise ValueError(f"{quantize_mode} quantizes activations and needs calibration_data (an .npz path, a dict "
                         "of arrays or a list of batches)")
    evals, eval_source = calib, "the calibration data"
    if eval_data is not None:
        evals, eval_source = load_batches(eval_data, source, batch_size, "evaluation data"), "held-out data"
    quant, plan, added, amax = quantize_model(source, calib, quantize_mode, calibration_method, percentile,
                                              op_types_to_exclude, nodes_to_exclude)
    out = save_model(quant, output_path, use_external_data=use_external_data, overwrite=overwrite)
    outputs = []
    if evals:
        float_session = make_session(source, options=session_config)
        quant_session = make_session(out, options=session_config)
        outputs = compare_models(float_session, quant_session, evals)
    return QuantReport(
        input_path=in_path, output_path=str(out), mode=quantize_mode,
        method=calibration_method if plan.activations else None,
        quantized_nodes=plan.counts(source), qdq_nodes=added, outputs=outputs,
        eval_batches=len(evals or []), eval_source=eval_source if evals else "no data",
        input_bytes=_size(model), output_bytes=_size(out), skipped=plan.skipped, amax=amax)


def _size(path) -> int:
    if isinstance(path, onnx.ModelProto):
        return path.ByteSize()
    p = Path(path)
    data = p.with_name(p.name + ".data")
    return p.stat().st_size + (data.stat().st_size if data.exists() else 0)
