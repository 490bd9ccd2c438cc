"""Deployable checkpoints from quantized models.

    from modelopt_lite.export import export_hf_checkpoint, export_tensorrt_llm_checkpoint, export_onnx
    export_hf_checkpoint(model, export_dir="out/llama-nvfp4")
    export_tensorrt_llm_checkpoint(model, decoder_type="llama", export_dir="out/trt", inference_tensor_parallel=2)
    export_onnx(model, example_inputs, "out/model.onnx")
    model = load_hf_checkpoint("out/llama-nvfp4")

ONNX needs the `onnx` extra; it is imported when first used.
"""

from .hf import export_hf_checkpoint, hf_quant_config
from .hf_load import CheckpointReader, load_hf_checkpoint
from .layers import ExportError
from .plan import ExportPlan, plan_export
from .trtllm import export_tensorrt_llm_checkpoint


def export_onnx(*args, **kwargs):
    """See `modelopt_lite.export.onnx.export_onnx` (imported on first use: it needs the onnx extra)."""
    from .onnx import export_onnx as _export_onnx

    return _export_onnx(*args, **kwargs)


def check_onnx(*args, **kwargs):
    """See `modelopt_lite.export.onnx.check_onnx`."""
    from .onnx import check_onnx as _check_onnx

    return _check_onnx(*args, **kwargs)


__all__ = ["export_hf_checkpoint", "hf_quant_config", "CheckpointReader", "load_hf_checkpoint", "ExportError",
           "ExportPlan", "plan_export", "export_tensorrt_llm_checkpoint", "export_onnx", "check_onnx"]
