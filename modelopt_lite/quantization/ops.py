"""Fake quantization as a `torch.library` custom op with a straight-through gradient.

As an opaque op with a fake (meta) implementation, it is seen the same way by
eager autograd, `torch.compile` and `torch.export`, on every torch version the
package supports; the format travels as a small JSON string attribute. On CUDA
the ops run the fused Triton kernels (`modelopt_lite.kernels.fake_quant`,
bit-identical to `formats.fake_quant`), elsewhere the PyTorch reference.
"""

from __future__ import annotations

import functools
import json
from typing import Optional

import torch

from ..kernels import fake_quant as _kernels
from .formats import E4M3, E8M0, FloatFormat, QuantFormat

__all__ = ["fake_quant_ste", "format_to_spec", "format_from_spec"]


def format_to_spec(fmt: QuantFormat) -> str:
    """A QuantFormat as a JSON string (the op's attribute)."""
    e = fmt.element
    num_bits = [e.ebits, e.mbits] if isinstance(e, FloatFormat) else e.bits
    scale = {None: None, E4M3: "e4m3", E8M0: "e8m0"}[fmt.scale]
    return json.dumps(
        {
            "num_bits": num_bits,
            "unsigned": getattr(e, "unsigned", False),
            "narrow_range": getattr(e, "narrow_range", False),
            "axis": list(fmt.axis) if fmt.axis is not None else None,
            "block_sizes": [list(b) for b in fmt.block_sizes] if fmt.block_sizes else None,
            "scale_bits": scale,
            "global_fp8": fmt.global_fp8,
        },
        sort_keys=True,
    )


@functools.lru_cache(maxsize=None)
def format_from_spec(spec: str) -> QuantFormat:
    d = json.loads(spec)
    num_bits = tuple(d["num_bits"]) if isinstance(d["num_bits"], list) else d["num_bits"]
    blocks = {int(k): v for k, v in d["block_sizes"]} if d["block_sizes"] else None
    return QuantFormat.create(
        num_bits=num_bits, axis=d["axis"], block_sizes=blocks, scale_bits=d["scale_bits"],
        unsigned=d["unsigned"], narrow_range=d["narrow_range"], global_fp8=d.get("global_fp8", False),
    )


@torch.library.custom_op("modelopt_lite::fake_quant", mutates_args=())
def _fake_quant_op(x: torch.Tensor, amax: Optional[torch.Tensor], spec: str) -> torch.Tensor:
    return _kernels.fake_quant(x, format_from_spec(spec), amax, cache_key=spec)


@_fake_quant_op.register_fake
def _(x, amax, spec):
    return torch.empty_like(x)


@torch.library.custom_op("modelopt_lite::fake_quant_blocks", mutates_args=())
def _fake_quant_blocks_op(x: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor, spec: str) -> torch.Tensor:
    return _kernels.fake_quant(x, format_from_spec(spec), block_amax, global_amax, cache_key=spec)


@_fake_quant_blocks_op.register_fake
def _(x, block_amax, global_amax, spec):
    return torch.empty_like(x)


def _backward(ctx, grad):
    return grad, None, None


def _backward_blocks(ctx, grad):
    return grad, None, None, None


_fake_quant_op.register_autograd(_backward)
_fake_quant_blocks_op.register_autograd(_backward_blocks)


def fake_quant_ste(x: torch.Tensor, fmt: QuantFormat, amax: Optional[torch.Tensor] = None, spec: Optional[str] = None,
                   global_amax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`formats.fake_quant` whose gradient passes straight through to `x`.

    With `global_amax` (two-level formats with static per-block amaxes whose
    global scale is shared by a fused layer) a second op carries both.
    """
    spec = spec if spec is not None else format_to_spec(fmt)
    if global_amax is not None:
        return _fake_quant_blocks_op(x, amax, global_amax, spec)
    return _fake_quant_op(x, amax, spec)
