"""GPU kernels (Triton) and when to use them.

The kernels are used automatically for CUDA tensors when Triton imports;
everything else (CPU tensors, no Triton, `MODELOPT_LITE_KERNELS=0`) takes
the PyTorch reference path, which gives the same results. Under
`TRITON_INTERPRET=1` the kernels also run on CPU tensors when called
directly, which is how the CPU tests exercise them.
"""

from __future__ import annotations

import functools
import os
from typing import Tuple

import torch

__all__ = ["triton_available", "kernels_enabled", "interpret_mode", "use_triton", "device_capability"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton can be imported."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # an incomplete or broken install counts as absent
        return False
    return True


def kernels_enabled() -> bool:
    """False when the environment sets MODELOPT_LITE_KERNELS=0 (always use the PyTorch path)."""
    return os.environ.get("MODELOPT_LITE_KERNELS", "1") != "0"


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether automatic dispatch takes the Triton path for these tensors (all on CUDA)."""
    if not tensors or not kernels_enabled() or not triton_available():
        return False
    return all(t.is_cuda for t in tensors)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device) -> Tuple[int, int]:
    """(major, minor) compute capability of a CUDA device; (0, 0) for other devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return (0, 0)
    return _capability(device.index if device.index is not None else torch.cuda.current_device())
