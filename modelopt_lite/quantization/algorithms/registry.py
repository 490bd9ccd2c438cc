"""The algorithm registry and `calibrate`, which runs one algorithm on a model."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn

from ...utils import Registry
from ..tensor_quantizer import TensorQuantizer

ALGORITHMS: Registry[Callable] = Registry("calibration algorithm")
ForwardLoop = Callable[[nn.Module], Any]


def register_algorithm(name: str):
    """Decorator: register `fn(model, forward_loop, **options)` under `name`."""
    return ALGORITHMS.register(name)


def calibrate(
    model: nn.Module,
    algorithm: Union[str, Dict[str, Any], None] = "max",
    forward_loop: Optional[ForwardLoop] = None,
) -> nn.Module:
    """Calibrate the quantizers of an already converted model, in place.

    `algorithm` is a registered name, a dict ``{"method": name, **options}``
    or None (no calibration). Quantizers that need an amax but end without
    one fall back as NUMERICS.md section 5 says (see `finalize_uncalibrated`).
    """
    if isinstance(algorithm, dict):
        options = dict(algorithm)
        name = options.pop("method", None)
    else:
        name, options = algorithm, {}
    if name is not None:
        ALGORITHMS.get(name)(model, forward_loop, **options)
    finalize_uncalibrated(model, had_data=forward_loop is not None and name is not None)
    return model


def finalize_uncalibrated(model: nn.Module, had_data: bool) -> None:
    """Give every enabled static quantizer without an amax a usable one.

    Weights take the weight's own amax. Inputs and outputs switch to dynamic
    quantization (amax from each tensor at run time), with a warning: when a
    forward loop ran, that input was never reached by the data; without a
    loop, activations cannot be calibrated.
    """
    unseen = []
    for module in model.modules():
        for attr, q in list(module.named_children()):
            if not isinstance(q, TensorQuantizer) or not q.needs_calibration or q.amax is not None:
                continue
            if attr == "weight_quantizer" and hasattr(module, "quantized_weight"):
                calibrate_weight(module)
            else:
                q.set_dynamic()
                unseen.append(q.name)
    if unseen:
        why = "saw no calibration data" if had_data else "cannot be calibrated without a forward_loop"
        shown = ", ".join(unseen[:5]) + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
        warnings.warn(f"{len(unseen)} activation quantizer(s) {why} and now quantize dynamically: {shown}")


@torch.no_grad()
def calibrate_weight(module: nn.Module) -> None:
    """Max-calibrate a module's weight quantizer from the weight itself."""
    q = module.weight_quantizer
    q.disable_quant()
    q.enable_calib()
    try:
        module.quantized_weight()
    finally:
        q.disable_calib()
        q.enable_quant()
    q.load_calib_amax()
