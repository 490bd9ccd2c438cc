"""`max`: the running abs-max of every tensor a quantizer sees."""

from __future__ import annotations

import torch
from torch import nn

from ..calib import batch_counter
from ..tensor_quantizer import TensorQuantizer
from .registry import ForwardLoop, register_algorithm


@register_algorithm("max")
@torch.no_grad()
def max_calibrate(model: nn.Module, forward_loop: ForwardLoop | None = None) -> None:
    """Run the forward loop once with every static quantizer collecting statistics."""
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.needs_calibration]
    for q in quantizers:
        q.calibrator.reset()
        q.disable_quant()
        q.enable_calib()
    try:
        if forward_loop is not None:
            with batch_counter(model):
                forward_loop(model)
    finally:
        for q in quantizers:
            q.disable_calib()
            q.enable_quant()
    for q in quantizers:
        q.load_calib_amax()
