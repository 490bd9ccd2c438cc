"""Quantized versions of layers, looked up by the class of the original layer."""

from .base import QUANT_MODULES, QuantInputModule, QuantModule, QuantWeightModule, register_quant_module
from . import conv, linear  # noqa: F401  (register the built-in layers)
from .hf import register_transformers_layers

__all__ = ["QUANT_MODULES", "QuantModule", "QuantInputModule", "QuantWeightModule", "register_quant_module", "register_transformers_layers"]
