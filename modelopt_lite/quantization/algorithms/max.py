"""`max`: every static quantizer's calibrator sees the data (by default the running abs-max).

Calibrators that need more than one pass (the MSE search on activations)
ask for it through `Calibrator.next_pass()`; the forward loop then runs
again with only those quantizers collecting.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..calib import batch_counter
from ..tensor_quantizer import TensorQuantizer
from .registry import ForwardLoop, register_algorithm

MAX_PASSES = 8


@register_algorithm("max")
@torch.no_grad()
def max_calibrate(model: nn.Module, forward_loop: ForwardLoop | None = None) -> None:
    """Run the forward loop with every static quantizer collecting statistics, then load their amaxes."""
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.needs_calibration]
    for q in quantizers:
        q.calibrator.reset()
    run_calibration_passes(model, forward_loop, quantizers)
    for q in quantizers:
        q.load_calib_amax()


def run_calibration_passes(model: nn.Module, forward_loop: ForwardLoop | None, quantizers: List[TensorQuantizer]) -> None:
    """Run the loop with `quantizers` collecting, as many passes as their calibrators ask.

    Quantization stays off for all of them until the last pass ends (their
    amaxes are loaded by the caller), so every pass sees the same tensors.
    """
    for q in quantizers:
        q.disable_quant()
    try:
        active = list(quantizers)
        for _ in range(MAX_PASSES):
            _one_pass(model, forward_loop, active)
            if forward_loop is None:
                return
            # Every rank asks every calibrator, in the same order (next_pass may reduce across ranks).
            active = [q for q in active if q.calibrator.next_pass()]
            if not active:
                return
        raise RuntimeError(f"calibrators still asked for more data after {MAX_PASSES} passes: "
                           f"{', '.join(q.name for q in active[:5])}")
    finally:
        for q in quantizers:
            q.enable_quant()


def _one_pass(model: nn.Module, forward_loop: ForwardLoop | None, quantizers: List[TensorQuantizer]) -> None:
    for q in quantizers:
        q.enable_calib()
    try:
        if forward_loop is not None:
            with batch_counter(model):
                forward_loop(model)
    finally:
        for q in quantizers:
            q.disable_calib()
