"""Quantized nn.Linear."""

import torch.nn.functional as F
from torch import nn

from .base import QUANT_MODULES, QuantWeightModule


@QUANT_MODULES.register(nn.Linear)
class QuantLinear(QuantWeightModule):
    def forward(self, x):
        out = F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)
        return self.output_quantizer(out)
