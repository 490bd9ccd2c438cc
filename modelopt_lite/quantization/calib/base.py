"""Calibrator base class, registry, and the batch counter used in error messages."""

from __future__ import annotations

import abc
import contextlib
from typing import Optional

import torch

from ...utils import Registry

CALIBRATORS: Registry[type] = Registry("calibrator")

_batch: list = [None]


class CalibrationError(RuntimeError):
    """Calibration data a quantizer cannot use (NaN or Inf)."""


def current_batch() -> Optional[int]:
    """Index of the forward-loop batch being run, when inside `batch_counter`."""
    return _batch[0]


@contextlib.contextmanager
def batch_counter(model: torch.nn.Module):
    """Count calls of `model.forward` so errors can name the batch."""
    _batch[0] = -1

    def pre_hook(module, args):
        _batch[0] += 1

    handle = model.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()
        _batch[0] = None


class Calibrator(abc.ABC):
    """Collects statistics with `collect(x)`; `compute_amax()` gives the result.

    `quantizer` is the owning TensorQuantizer (for its format and name).

    Protocol with the calibration algorithms:

    * `next_pass()` is called after each run of the forward loop; a
      calibrator that needs the data again (an MSE search that first needs
      the range) prepares its next pass and returns True, and the loop runs
      again for it. The default is one pass.
    * `sync()` is called once, on every rank, before `compute_amax()`: under
      torch.distributed it reduces the statistics across ranks (see
      `modelopt_lite.utils.dist`), so every rank computes the same amax.
      Calibrators call collectives in a fixed order and unconditionally,
      also when they saw no data.
    """

    def __init__(self, quantizer):
        self._quantizer_ref = quantizer
        self.num_batches = 0

    @property
    def quantizer(self):
        return self._quantizer_ref

    @abc.abstractmethod
    def collect(self, x: torch.Tensor) -> None:
        """Add the statistics of one tensor."""

    @abc.abstractmethod
    def compute_amax(self) -> Optional[torch.Tensor]:
        """The amax from everything collected, or None when nothing was."""

    def reset(self) -> None:
        self.num_batches = 0

    def next_pass(self) -> bool:
        """Prepare another pass over the data; False (the default) when done."""
        return False

    def sync(self) -> None:
        """Reduce the statistics across data-parallel ranks (no-op in one process)."""

    def check_finite(self, stat: torch.Tensor) -> None:
        if not bool(torch.isfinite(stat).all()):
            batch = current_batch()
            where = f" in batch {batch}" if batch is not None and batch >= 0 else ""
            raise CalibrationError(
                f"NaN or Inf in the calibration data of quantizer {self.quantizer.name!r}{where}; "
                "check the inputs (and the layers before it) for overflow"
            )
