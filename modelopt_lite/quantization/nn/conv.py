"""Quantized Conv1d/2d/3d and ConvTranspose1d/2d/3d."""

import torch.nn.functional as F
from torch import nn

from .base import QuantWeightModule, register_quant_module


class QuantConvNd(QuantWeightModule):
    def forward(self, x):
        out = self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)
        return self.output_quantizer(out)


class QuantConvTransposeNd(QuantWeightModule):
    _functional = None

    def forward(self, x, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError("only 'zeros' padding is supported for ConvTranspose")
        n = len(self.kernel_size)
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, n, self.dilation
        )
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
        out = fn(
            self.input_quantizer(x), self.quantized_weight(), self.bias,
            self.stride, self.padding, output_padding, self.groups, self.dilation,
        )
        return self.output_quantizer(out)


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_quant_module(_cls, QuantConvNd)
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_quant_module(_cls, QuantConvTransposeNd)
