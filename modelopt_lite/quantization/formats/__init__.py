"""Every number format of the project: the single source of truth (see NUMERICS.md)."""

from .blocks import Blocking
from .elements import E2M1, E2M3, E3M2, E4M3, E5M2, E8M0, FloatFormat, IntFormat, parse_format
from .schemes import TINY_AMAX, QuantFormat, QuantizedTensor, block_amax, compute_amax, dequant_scale, dequantize, fake_quant, quantize

__all__ = [
    "Blocking", "E2M1", "E2M3", "E3M2", "E4M3", "E5M2", "E8M0", "FloatFormat", "IntFormat", "parse_format",
    "TINY_AMAX", "QuantFormat", "QuantizedTensor", "block_amax", "compute_amax", "dequant_scale", "dequantize", "fake_quant", "quantize",
]
