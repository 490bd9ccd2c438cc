"""Two 4-bit codes per byte, in the layouts checkpoints use.

* NVFP4 (E2M1 codes): packed along the input (last) dimension, element
  ``2j`` in the low nibble and ``2j + 1`` in the high nibble:
  ``[out, in] -> uint8 [out, in / 2]``.
* INT4 AWQ (two's-complement codes): packed along the output (first)
  dimension, row ``2r`` in the low nibble and ``2r + 1`` in the high one:
  ``[out, in] -> uint8 [out / 2, in]``.
"""

from __future__ import annotations

import torch

__all__ = ["pack_nibbles_last", "unpack_nibbles_last", "pack_int4_rows", "unpack_int4_rows"]


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.int16) & 0xF


def pack_nibbles_last(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (any integer dtype, values 0..15) ``[..., n]`` -> uint8 ``[..., n / 2]``."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd last dimension ({codes.shape[-1]}) two codes per byte")
    c = _nibbles(codes)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_nibbles_last(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., n / 2]`` -> codes 0..15 as uint8 ``[..., n]`` (low nibble first)."""
    p = packed.to(torch.int16)
    out = torch.stack([p & 0xF, p >> 4], dim=-1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.uint8)


def pack_int4_rows(codes: torch.Tensor) -> torch.Tensor:
    """Signed INT4 codes ``[out, in]`` (-8..7) -> uint8 ``[out / 2, in]``, even rows in the low nibble."""
    if codes.dim() != 2 or codes.shape[0] % 2:
        raise ValueError(f"INT4 row packing needs a 2-d tensor with an even first dimension, got {tuple(codes.shape)}")
    c = _nibbles(codes)
    return (c[0::2] | (c[1::2] << 4)).to(torch.uint8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (or int8 holding the same bytes) ``[out / 2, in]`` -> signed codes int8 ``[out, in]``."""
    p = packed.view(torch.uint8).to(torch.int16) if packed.dtype == torch.int8 else packed.to(torch.int16)
    lo, hi = p & 0xF, p >> 4
    rows = torch.stack([lo, hi], dim=1).reshape(packed.shape[0] * 2, packed.shape[1])
    return torch.where(rows >= 8, rows - 16, rows).to(torch.int8)
