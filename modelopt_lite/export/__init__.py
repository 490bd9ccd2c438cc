"""Deployable checkpoints from quantized models.

    from modelopt_lite.export import export_hf_checkpoint, load_hf_checkpoint
    export_hf_checkpoint(model, export_dir="out/llama-nvfp4")
    model = load_hf_checkpoint("out/llama-nvfp4")
"""

from .hf import export_hf_checkpoint, hf_quant_config
from .hf_load import CheckpointReader, load_hf_checkpoint
from .layers import ExportError
from .plan import ExportPlan, plan_export

__all__ = ["export_hf_checkpoint", "hf_quant_config", "CheckpointReader", "load_hf_checkpoint", "ExportError",
           "ExportPlan", "plan_export"]
