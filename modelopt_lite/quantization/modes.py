"""The quantization modes: ``quantize`` and ``calibrate`` in a model's recorded history.

`quantize` records ``quantize`` with its config; calling `calibrate` (this module's, exported as
``mtq.calibrate``) on a quantized model records ``calibrate`` with its algorithm. Replaying
``quantize`` on a fresh model converts its layers and sets the quantizers from the recorded
config; the calibrated values (amaxes, pre_quant_scales) and any weights an algorithm changed come
from the saved model state that `modelopt_lite.opt.restore` loads after the replay.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Union

from torch import nn

from ..opt.modes import ModeError, record_mode, register_mode
from .algorithms import calibrate as _calibrate
from .config import validate_config
from .conversion import named_quantizers, replace_quant_modules, set_quantizer_by_cfg

__all__ = ["calibrate"]


def _replay_quantize(model: nn.Module, config: Dict[str, Any], state: Dict[str, Any]) -> None:
    replace_quant_modules(model)
    set_quantizer_by_cfg(model, validate_config(config.get("quant_config", {})))


def _replay_calibrate(model: nn.Module, config: Dict[str, Any], state: Dict[str, Any]) -> None:
    """Nothing to rebuild (the values come from the saved state); the model must be quantized by then."""
    if next(iter(named_quantizers(model)), None) is None:
        raise ModeError("'calibrate' is replayed on a model without quantizers: the saved history is out of order")


register_mode("quantize", _replay_quantize, overwrite=True)
register_mode("calibrate", _replay_calibrate, overwrite=True)


def calibrate(model: nn.Module, algorithm: Union[str, Dict[str, Any], None] = "max",
              forward_loop: Optional[Callable[[nn.Module], Any]] = None) -> nn.Module:
    """Calibrate the quantizers of an already quantized model again, in place, and record it.

    `algorithm`: a registered name, ``{"method": name, **options}`` or None (see `algorithms.calibrate`)."""
    _calibrate(model, algorithm, forward_loop)
    record_mode(model, "calibrate", {"algorithm": algorithm})
    return model
