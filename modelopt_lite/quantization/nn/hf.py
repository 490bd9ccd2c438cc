"""Quantized transformers `Conv1D` (GPT-2).

Conv1D stores its weight as [in, out]; the weight quantizer sees it as
[out, in] so per-channel and block settings mean the same as for Linear.
Registered on first conversion once transformers has been imported (it is
optional, and slow to import for models that do not use it).
"""

import sys

import torch

from .base import QUANT_MODULES, QuantWeightModule, register_quant_module


class QuantConv1D(QuantWeightModule):
    weight_axis_last = True

    def forward(self, x):
        x = self.input_quantizer(x)
        size_out = x.size()[:-1] + (self.nf,)
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.quantized_weight())
        return self.output_quantizer(out.view(size_out))


def register_transformers_layers() -> None:
    """Register transformers' layers if transformers is loaded and they are not yet registered."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return
    if Conv1D not in QUANT_MODULES:
        register_quant_module(Conv1D, QuantConv1D)
