"""`mse`: max calibration with every static quantizer searching its amax for the lowest squared error.

``algorithm: mse`` (or ``{method: mse, weights: true, activations: false}``)
gives the quantizers it covers an MSE-search calibrator (see
`calib.mse.MseCalibrator`) for the duration of the calibration, whatever
their ``calibrator`` attribute says; the others calibrate as configured.
Without a forward loop the weights are still searched (on the weight
itself); activations then fall back as `calibrate` describes.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..calib.mse import MseCalibrator, is_weight_quantizer
from ..tensor_quantizer import TensorQuantizer
from .max import max_calibrate
from .registry import ForwardLoop, calibrate_weight, register_algorithm


@register_algorithm("mse")
@torch.no_grad()
def mse_calibrate(
    model: nn.Module,
    forward_loop: Optional[ForwardLoop] = None,
    weights: bool = True,
    activations: bool = True,
    multipliers: Optional[Sequence[float]] = None,
) -> None:
    """Calibrate like `max`, with the MSE search for weight and/or activation quantizers.

    `multipliers`: the candidate amaxes as fractions of the max (default
    `calib.mse.DEFAULT_MULTIPLIERS`, 0.25 to 1.0 in steps of 0.025).
    """
    if not isinstance(weights, bool) or not isinstance(activations, bool):
        raise TypeError("algorithm mse: `weights` and `activations` must be true or false")
    swapped = []
    for q in model.modules():
        if not isinstance(q, TensorQuantizer) or not q.needs_calibration:
            continue
        if weights if is_weight_quantizer(q.name) else activations:
            swapped.append((q, q.calibrator))
            q.calibrator = MseCalibrator(q, multipliers)
    try:
        max_calibrate(model, forward_loop)
        if weights:
            for module in model.modules():
                q = getattr(module, "weight_quantizer", None)
                if (isinstance(q, TensorQuantizer) and q.needs_calibration and q.amax is None
                        and isinstance(q.calibrator, MseCalibrator) and hasattr(module, "quantized_weight")):
                    calibrate_weight(module)
    finally:
        for q, calibrator in swapped:
            q.calibrator = calibrator
