"""Packed layout of 4-bit weights (NVFP4 and INT4) for the W4A16 GEMMs of `w4_gemm`.

The weight [N, K] is padded to [Npad, Kpad] (zeros) and cut along K into
granules of G codes per row, G = 4 * Q. A granule of one row is Q/2 32-bit
words; word q holds the 8 codes

    k = G * g + Q * i + 2 * q + e        for i in 0..3 (the "output"), e in 0..1 (the half)

so that one word decodes into four bf16x2 / fp16x2 registers, one per
output i, each holding the two K-neighbours e = 0, 1 that a tensor-core
operand register holds. Output i of the words of a granule row is a K-slice
of Q consecutive codes, so each output feeds its own dot over Q (or, across
granules, 16 * TG) rows of the activation.

Bit positions inside a word are chosen so that decoding is one or two
integer instructions per output (see `w4_kernels`):

* NVFP4 (E2M1 code bits m, e0, e1, s): output 0 sits at bits 6,7,8,15 (+16
  for e = 1), which is the bf16 bit pattern of value * 2**-126; outputs 1
  and 2 are the same pattern rotated by 3 and 6 bits; output 3 fills the
  remaining bits {0,1,3,4} (+16) and is spread into place with one multiply.
* INT4: the code plus 8 (0..15) of output i, half e sits at bits 4*i + 16*e,
  so `(w >> 4i) & 0x000F000F | 0x4300_4300` is bf16 128 + u.

NVFP4 block scales (E4M3, positive and finite) are stored as one byte each
in natural block order, re-encoded exactly as E5M3 codes b = (E + 21) << 3 |
mmm for sb = 2**E * 1.mmm (E4M3 subnormals become normal numbers), so that
`b << 4 | 0x7000` is bf16 sb * 2**118 and `b << 7` is fp16 sb * 2**6.
INT4 scales are the float32 dequantization multipliers, [Npad, ceil(Kpad / block)].
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

__all__ = ["ROW_PAD", "NV_Q", "int4_quarter", "granule", "k_pad_multiple", "NV_POS", "I4_POS", "pack_words",
           "unpack_words", "encode_nv_scales", "decode_nv_scales", "E5M3_BIAS"]

ROW_PAD = 128
"""N is padded to a multiple of this (the largest row tile of the kernels)."""

NV_Q = 16
"""NVFP4 slice length per output (one 16-element scale block): granule G = 64 codes."""

E5M3_BIAS = 21
"""Exponent bias of the stored NVFP4 block-scale codes: sb = 2**(code >> 3 - 21) * (1 + (code & 7) / 8)."""

# Bit position of code bit b (m, e0, e1, s for E2M1; u bits 0..3 for INT4) of output i, half e.
NV_POS: Tuple[Tuple[Tuple[int, ...], ...], ...] = (
    ((6, 7, 8, 15), (22, 23, 24, 31)),
    ((9, 10, 11, 18), (25, 26, 27, 2)),
    ((12, 13, 14, 21), (28, 29, 30, 5)),
    ((3, 4, 0, 1), (19, 20, 16, 17)),
)
I4_POS: Tuple[Tuple[Tuple[int, ...], ...], ...] = tuple(
    tuple(tuple(4 * i + 16 * e + b for b in range(4)) for e in range(2)) for i in range(4))


def int4_quarter(block: int) -> int:
    """INT4 slice length Q: the largest of 64/32/16 dividing the block (block % 16 == 0), else 16."""
    return math.gcd(block, 64) if block % 16 == 0 else 16


def granule(kind: str, block: int) -> int:
    """Codes per granule row: 4 * Q."""
    return 4 * (NV_Q if kind == "nvfp4" else int4_quarter(block))


def k_pad_multiple(kind: str, block: int) -> int:
    """Kpad is a multiple of this: the widest K step of the kernels (4 NVFP4 granules, 2 INT4 granules)."""
    return 4 * granule(kind, block) if kind == "nvfp4" else 2 * granule(kind, block)


def _positions(kind: str) -> torch.Tensor:
    pos = NV_POS if kind == "nvfp4" else I4_POS
    return torch.tensor(pos, dtype=torch.int64)  # [4 (i), 2 (e), 4 (bit)]


def pack_words(codes: torch.Tensor, kind: str, q: int, npad: int, kpad: int) -> torch.Tensor:
    """4-bit codes [N, K] (0..15, uint8) -> packed bytes [npad, kpad // 2] (uint8, little-endian words)."""
    n, k = codes.shape
    c = torch.zeros((npad, kpad), dtype=torch.int64, device=codes.device)
    c[:n, :k] = codes.to(torch.int64)
    c = c.reshape(npad, kpad // (4 * q), 4, q // 2, 2)  # [n, g, i, q, e]
    pos = _positions(kind).to(codes.device)
    words = torch.zeros((npad, kpad // (4 * q), q // 2), dtype=torch.int64, device=codes.device)
    for i in range(4):
        for e in range(2):
            ci = c[:, :, i, :, e]
            for b in range(4):
                words |= ((ci >> b) & 1) << int(pos[i, e, b])
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(npad, -1).contiguous().view(torch.uint8).reshape(npad, kpad // 2)


def unpack_words(data: torch.Tensor, kind: str, q: int, n: int, k: int) -> torch.Tensor:
    """Packed bytes [npad, kpad // 2] -> 4-bit codes [n, k] (int64, 0..15)."""
    npad, half = data.shape
    kpad = 2 * half
    words = data.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    words = words.reshape(npad, kpad // (4 * q), q // 2)
    pos = _positions(kind).to(data.device)
    out = torch.zeros((npad, kpad // (4 * q), 4, q // 2, 2), dtype=torch.int64, device=data.device)
    for i in range(4):
        for e in range(2):
            acc = torch.zeros_like(words)
            for b in range(4):
                acc |= ((words >> int(pos[i, e, b])) & 1) << b
            out[:, :, i, :, e] = acc
    return out.reshape(npad, kpad)[:n, :k]


def encode_nv_scales(block_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales (positive, finite) -> E5M3 codes (uint8), exactly."""
    sb = block_scale.float()
    if not bool(torch.isfinite(sb).all()) or bool((sb <= 0).any()):
        raise ValueError("NVFP4 block scales must be positive finite E4M3 values (as formats.quantize produces: "
                         "a zero block gets scale 1); got zero, negative or NaN scales")
    mant, exp = torch.frexp(sb)  # sb = mant * 2**exp, mant in [0.5, 1)
    e = exp.to(torch.int64) - 1
    m = ((mant.double() * 2 - 1) * 8).to(torch.int64)
    return (((e + E5M3_BIAS) << 3) | m).to(torch.uint8)


def decode_nv_scales(codes: torch.Tensor) -> torch.Tensor:
    """E5M3 codes (uint8) -> float32 block scales (exactly the E4M3 values that were encoded)."""
    c = codes.to(torch.int32)
    mant = 1.0 + (c & 7).to(torch.float32) / 8.0
    return torch.ldexp(mant, ((c >> 3) - E5M3_BIAS).to(torch.float32))
