"""Quantized-module mixins and the registry that maps layer classes to them.

Conversion is in place: the layer's class is swapped for a subclass that
mixes the quantized behaviour into the original class, so names,
parameters, buffers, hooks, device and dtype all stay as they were.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional, Type

import torch
from torch import nn

from ...trace.tracer import register_leaf
from ...utils import Registry
from ..tensor_quantizer import TensorQuantizer

QUANT_MODULES: Registry[type] = Registry("quantized module")
_DYNAMIC_CLASSES: Dict[tuple, type] = {}

_DEFAULT_INPUT = {"num_bits": 8, "axis": None}
_DEFAULT_WEIGHT = {"num_bits": 8, "axis": 0}


class QuantModule(nn.Module):
    """Base mixin: a module whose quantizers are set up after conversion."""

    def _setup(self) -> None:
        """Create the quantizers; called right after the class swap."""

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Turn `module` (an instance of a registered class) into its quantized form, in place."""
        original = type(module)
        mixin = mixin_for(module)
        quant_cls = _DYNAMIC_CLASSES.get((original, mixin))
        if quant_cls is None:
            quant_cls = type(f"Quant{original.__name__}", (mixin, original), {"_original_class": original})
            _DYNAMIC_CLASSES[(original, mixin)] = quant_cls
        module.__class__ = quant_cls
        module._setup()
        return module

    def _new_quantizer(self, attrs) -> TensorQuantizer:
        q = TensorQuantizer(attrs)
        ref = next(iter(self.parameters(recurse=False)), None)
        return q.to(ref.device) if ref is not None else q


register_leaf(QuantModule)  # graphs show a quantized layer as one node, like the layer it replaced


class QuantInputModule(QuantModule):
    """Input and output quantizers around the original forward (output off by default)."""

    def _setup(self) -> None:
        self.input_quantizer = self._new_quantizer(_DEFAULT_INPUT)
        self.output_quantizer = self._new_quantizer(_DEFAULT_INPUT)
        self.output_quantizer.disable()

    def forward(self, x, *args, **kwargs):
        out = super().forward(self.input_quantizer(x), *args, **kwargs)
        return self.output_quantizer(out) if isinstance(out, torch.Tensor) else out


class QuantWeightModule(QuantInputModule):
    """Adds a weight quantizer (per output channel by default).

    The generic forward runs the original forward with the fake-quantized
    weight swapped in; built-in layers override `forward` with a direct call
    (faster, and friendlier to torch.compile). `quantized_weight()` is the
    weight as the layer computes with it.
    """

    weight_axis_last = False  # True when the stored weight is [in, out] (transformers' Conv1D)

    def _setup(self) -> None:
        super()._setup()
        self.weight_quantizer = self._new_quantizer(_DEFAULT_WEIGHT)

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight
        if self.weight_axis_last:
            return self.weight_quantizer(w.t()).t()
        return self.weight_quantizer(w)

    @contextlib.contextmanager
    def _swapped_weight(self):
        original = self._parameters["weight"]
        self._parameters["weight"] = self.quantized_weight()
        try:
            yield
        finally:
            self._parameters["weight"] = original

    def forward(self, x, *args, **kwargs):
        x = self.input_quantizer(x)
        with self._swapped_weight():
            out = super(QuantInputModule, self).forward(x, *args, **kwargs)
        return self.output_quantizer(out) if isinstance(out, torch.Tensor) else out

    def fold_weight(self) -> None:
        """Replace the weight by its fake-quantized value and turn the weight quantizer off."""
        if self.weight_quantizer.is_enabled:
            with torch.no_grad():
                self.weight.data.copy_(self.quantized_weight())
            self.weight_quantizer.disable()


def register_quant_module(original: Type[nn.Module], quant_mixin: Optional[Type[QuantModule]] = None) -> None:
    """Register how to quantize the layer class `original`.

    Without `quant_mixin`, a layer with a `weight` parameter gets the generic
    weight + input + output quantizers, any other layer input + output
    quantizers. `@QUANT_MODULES.register(cls)` on a mixin class does the same
    as a decorator.
    """
    if not isinstance(original, type) or not issubclass(original, nn.Module):
        raise TypeError(f"register_quant_module expects an nn.Module subclass, got {original!r}")
    QUANT_MODULES.register(original, quant_mixin or _AUTO, overwrite=True)
    for key in [k for k in _DYNAMIC_CLASSES if k[0] is original]:
        del _DYNAMIC_CLASSES[key]


class _AUTO:
    """Marker: pick the generic mixin from the layer itself."""


def mixin_for(module: nn.Module) -> Type[QuantModule]:
    mixin = QUANT_MODULES.get(type(module))
    if mixin is _AUTO:
        return QuantWeightModule if isinstance(getattr(module, "weight", None), nn.Parameter) else QuantInputModule
    return mixin
