"""Max calibration: the running abs-max per tensor, channel or block."""

from __future__ import annotations

from typing import Optional

import torch

from ...utils.dist import all_reduce_optional
from ..formats import compute_amax
from .base import CALIBRATORS, Calibrator


@CALIBRATORS.register("max")
class MaxCalibrator(Calibrator):
    def __init__(self, quantizer):
        super().__init__(quantizer)
        self._amax: Optional[torch.Tensor] = None

    def collect(self, x: torch.Tensor) -> None:
        amax = compute_amax(x, self.quantizer.fmt)
        self.check_finite(amax)
        if self._amax is None:
            self._amax = amax
        else:
            if amax.shape != self._amax.shape:
                raise ValueError(
                    f"quantizer {self.quantizer.name!r}: per-channel/block statistics of shape "
                    f"{tuple(amax.shape)} do not match earlier batches {tuple(self._amax.shape)}; "
                    "use a per-tensor or per-token format for inputs whose shape changes"
                )
            self._amax = torch.maximum(self._amax, amax)
        self.num_batches += 1

    def sync(self) -> None:
        self._amax = all_reduce_optional(self._amax, "max")

    def compute_amax(self) -> Optional[torch.Tensor]:
        return self._amax

    def reset(self) -> None:
        super().reset()
        self._amax = None
