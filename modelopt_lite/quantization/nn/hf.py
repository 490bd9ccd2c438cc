"""Quantized transformers layers: `Conv1D` (GPT-2) and attention modules.

Conv1D stores its weight as [in, out]; the weight quantizer sees it as
[out, in] so per-channel and block settings mean the same as for Linear.
Attention classes get the q/k/v and softmax quantizers of
`attention.QuantAttention`. Both are registered at conversion time once
transformers has been imported (it is optional, and slow to import for
models that do not use it); attention classes are found in the modeling
files loaded so far.
"""

import sys

import torch

from .attention import register_hf_attention_classes
from .base import QUANT_MODULES, QuantWeightModule, register_quant_module


class QuantConv1D(QuantWeightModule):
    weight_axis_last = True

    def forward(self, x):
        x = self.input_quantizer(x)
        size_out = x.size()[:-1] + (self.nf,)
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.quantized_weight())
        return self.output_quantizer(out.view(size_out))


def register_transformers_layers() -> None:
    """Register transformers' layers if transformers is loaded and they are not yet registered.

    That is Conv1D, and the attention classes of every modeling file loaded
    so far (see `attention.register_hf_attention_classes`).
    """
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return
    if Conv1D not in QUANT_MODULES:
        register_quant_module(Conv1D, QuantConv1D)
    register_hf_attention_classes()
