"""Quantized versions of layers, looked up by the class of the original layer."""

from .base import QUANT_MODULES, QuantInputModule, QuantModule, QuantWeightModule, register_quant_module
from . import conv, linear  # noqa: F401  (register the built-in layers)
from .attention import ATTENTION_QUANTIZERS, QuantAttention, is_hf_attention_class, softmax_quantized_attention
from .hf import register_transformers_layers

__all__ = [
    "QUANT_MODULES", "QuantModule", "QuantInputModule", "QuantWeightModule", "QuantAttention", "ATTENTION_QUANTIZERS",
    "register_quant_module", "register_transformers_layers", "is_hf_attention_class", "softmax_quantized_attention",
]
