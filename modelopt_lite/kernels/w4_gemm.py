"""4-bit weight GEMMs (W4A16): NVFP4 and INT4 (AWQ) weights times bf16/fp16 activations.

Public API:

* `PackedW4`: the packed weight (`kind` "nvfp4" | "int4", `n`, `k`, `block`,
  `data`, `scales`, `global_scale`); `buffers()` / `from_buffers(...)` let a
  module keep the tensors as registered buffers.
* `pack_nvfp4(codes, block_scale, global_scale)`, `pack_int4(codes, scale, block)`.
* `dequantize_w4(p, dtype)`: PyTorch, bit-identical to `formats.dequantize`
  of the original QuantizedTensor (code * scale in float32, then cast).
* `w4_linear(x, p, bias=None)`: x [..., K] bf16/fp16 -> [..., N] in x.dtype,
  the custom op `torch.ops.modelopt_lite.w4_linear` (with a fake
  implementation for torch.compile / torch.export).

Dispatch: CUDA tensors with Triton and compute capability >= 8.0 take the
Triton kernels (`w4_kernels`), everything else (and INT4 blocks that are not
a multiple of 16) `F.linear(x, dequantize_w4(p, x.dtype), bias)`. On the
Triton path each (M bucket, N, K, kind, dtype) is tuned once per process
(`w4_tuning`) over tensor-core kernels that decode in registers and, for
large M, the dequantize-to-scratch-then-cuBLAS path.

Numerics: the kernels multiply the exact weight values (the E2M1 * E4M3
product is exact in bf16/fp16; INT4 integers are exact and their float32
scale multiplies each block's float32 partial sum) with the activation in
its own dtype and accumulate in float32, so they equal F.linear with the
dequantized weight up to the rounding of that weight to x.dtype and the
accumulation order. bf16 activations use bf16 tensor-core math (no fp16
overflow risk), fp16 activations fp16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from . import device_capability, use_triton
from .w4_layout import (ROW_PAD, NV_Q, decode_nv_scales, encode_nv_scales, int4_quarter, k_pad_multiple, pack_words,
                        unpack_words)

__all__ = ["PackedW4", "pack_nvfp4", "pack_int4", "dequantize_w4", "w4_linear", "w4_linear_reference",
           "w4_kernel_supported"]

_KINDS = ("nvfp4", "int4")
_ACT_DTYPES = (torch.bfloat16, torch.float16)
_ROWS_PER_CHUNK = 2048  # bounds the temporaries of packing and dequantization


def _ceil_to(a: int, b: int) -> int:
    return -(-a // b) * b


@dataclass
class PackedW4:
    """A 4-bit weight [n, k] in the kernels' layout (see `w4_layout`).

    `data`: uint8 [Npad, Kpad // 2], two codes per byte. `scales`: NVFP4 uint8
    [Npad, Kpad // 16] (the E4M3 block scales, exactly, as E5M3 codes); INT4
    float32 [Npad, ceil(Kpad / block)] (the dequantization multipliers).
    `global_scale`: 0-d float32 (NVFP4) or None (INT4).
    """

    kind: str
    n: int
    k: int
    block: int
    data: torch.Tensor
    scales: torch.Tensor
    global_scale: Optional[torch.Tensor] = None

    def __post_init__(self):
        _validate(self.kind, self.n, self.k, self.block, self.data, self.scales, self.global_scale)

    @property
    def q(self) -> int:
        return NV_Q if self.kind == "nvfp4" else int4_quarter(self.block)

    @property
    def npad(self) -> int:
        return self.data.shape[0]

    @property
    def kpad(self) -> int:
        return self.data.shape[1] * 2

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (padding included)."""
        return sum(t.numel() * t.element_size() for t in self.buffers().values() if t is not None)

    def to(self, device) -> "PackedW4":
        gs = None if self.global_scale is None else self.global_scale.to(device)
        return PackedW4(self.kind, self.n, self.k, self.block, self.data.to(device), self.scales.to(device), gs)

    def buffers(self) -> Dict[str, Optional[torch.Tensor]]:
        return {"w4_data": self.data, "w4_scales": self.scales, "w4_global_scale": self.global_scale}

    @classmethod
    def from_buffers(cls, kind: str, n: int, k: int, block: int, buffers: Dict[str, Optional[torch.Tensor]]):
        missing = [name for name in ("w4_data", "w4_scales") if buffers.get(name) is None]
        if missing:
            raise KeyError(f"PackedW4.from_buffers needs the buffers {missing} (as buffers() names them)")
        return cls(kind, n, k, block, buffers["w4_data"], buffers["w4_scales"], buffers.get("w4_global_scale"))


def _validate(kind, n, k, block, data, scales, global_scale):
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if n <= 0 or k <= 0:
        raise ValueError(f"n and k must be positive, got n={n}, k={k}")
    if kind == "nvfp4" and block != 16:
        raise ValueError(f"NVFP4 blocks are 16 elements, got block={block}")
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    npad, kpad = _ceil_to(n, ROW_PAD), _ceil_to(k, k_pad_multiple(kind, block))
    if data.dtype != torch.uint8 or tuple(data.shape) != (npad, kpad // 2):
        raise ValueError(f"{kind} data must be uint8 [{npad}, {kpad // 2}] for n={n}, k={k}, block={block}; "
                         f"got {data.dtype} {tuple(data.shape)} (build it with pack_{kind})")
    if kind == "nvfp4":
        want = (torch.uint8, (npad, kpad // 16))
        if global_scale is None or global_scale.numel() != 1 or global_scale.dtype != torch.float32:
            raise ValueError("NVFP4 needs a one-element float32 global_scale")
    else:
        want = (torch.float32, (npad, -(-kpad // block)))
        if global_scale is not None:
            raise ValueError("INT4 has no global_scale (pass None)")
    if scales.dtype != want[0] or tuple(scales.shape) != want[1]:
        raise ValueError(f"{kind} scales must be {want[0]} {list(want[1])}, got {scales.dtype} {tuple(scales.shape)}")
    for name, t in (("scales", scales), ("global_scale", global_scale)):
        if t is not None and t.device != data.device:
            raise ValueError(f"{name} is on {t.device} but data is on {data.device}")


# ---------------------------------------------------------------------------------------------- packing


def _pack_rows(codes: torch.Tensor, kind: str, q: int, npad: int, kpad: int) -> torch.Tensor:
    n = codes.shape[0]
    out = torch.empty((npad, kpad // 2), dtype=torch.uint8, device=codes.device)
    for r0 in range(0, npad, _ROWS_PER_CHUNK):
        r1 = min(r0 + _ROWS_PER_CHUNK, npad)
        chunk = codes[r0:min(r1, n)]
        out[r0:r1] = pack_words(chunk, kind, q, r1 - r0, kpad)
    return out


def pack_nvfp4(codes: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> PackedW4:
    """NVFP4 codes [N, K] (uint8 E2M1 codes, `formats.quantize(w, nvfp4).codes`), block scales
    float8_e4m3fn [N, ceil(K/16)] and the 0-d float32 global scale -> PackedW4."""
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a 2-d uint8 tensor of E2M1 codes, got {codes.dtype} {tuple(codes.shape)}")
    n, k = codes.shape
    nb = -(-k // 16)
    if block_scale.dtype != torch.float8_e4m3fn or tuple(block_scale.shape) != (n, nb):
        raise TypeError(f"block_scale must be float8_e4m3fn [{n}, {nb}], got {block_scale.dtype} "
                        f"{tuple(block_scale.shape)}")
    if global_scale.numel() != 1:
        raise ValueError(f"global_scale must have one value, got {global_scale.numel()}")
    if bool((codes > 15).any()):
        raise ValueError("E2M1 codes are 4-bit (0..15)")
    npad, kpad = _ceil_to(n, ROW_PAD), _ceil_to(k, k_pad_multiple("nvfp4", 16))
    data = _pack_rows(codes, "nvfp4", NV_Q, npad, kpad)
    scales = torch.full((npad, kpad // 16), (21 << 3), dtype=torch.uint8, device=codes.device)  # pad: 1.0
    scales[:n, :nb] = encode_nv_scales(block_scale)
    gs = global_scale.detach().reshape(()).to(device=codes.device, dtype=torch.float32).clone()
    return PackedW4("nvfp4", n, k, 16, data, scales, gs)


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, block: int) -> PackedW4:
    """INT4 codes [N, K] (int8 in [-8, 7]) and float32 scales [N, ceil(K/block)] (amax / 7) -> PackedW4."""
    if codes.dim() != 2 or codes.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"codes must be a 2-d integer tensor in [-8, 7], got {codes.dtype} {tuple(codes.shape)}")
    block = int(block)
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    n, k = codes.shape
    nb = -(-k // block)
    if tuple(scale.shape) != (n, nb):
        raise ValueError(f"scale must be [{n}, {nb}] (one per {block}-element block), got {tuple(scale.shape)}")
    if bool((codes < -8).any()) or bool((codes > 7).any()):
        raise ValueError("INT4 codes must be in [-8, 7]")
    q = int4_quarter(block)
    npad, kpad = _ceil_to(n, ROW_PAD), _ceil_to(k, k_pad_multiple("int4", block))
    data = _pack_rows((codes.to(torch.int16) + 8).to(torch.uint8), "int4", q, npad, kpad)
    scales = torch.zeros((npad, -(-kpad // block)), dtype=torch.float32, device=codes.device)
    scales[:n, :nb] = scale.to(device=codes.device, dtype=torch.float32)
    return PackedW4("int4", n, k, block, data, scales, None)


# ----------------------------------------------------------------------------------------- dequantization


def dequantize_w4(p: PackedW4, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight [n, k] in `dtype`: code value * scale in float32, then cast (as `formats.dequantize`)."""
    from ..quantization.formats import E2M1

    out = torch.empty((p.n, p.k), dtype=dtype, device=p.device)
    for r0 in range(0, p.n, _ROWS_PER_CHUNK):
        r1 = min(r0 + _ROWS_PER_CHUNK, p.n)
        codes = unpack_words(p.data[r0:r1], p.kind, p.q, r1 - r0, p.k)
        if p.kind == "nvfp4":
            q = E2M1.decode(codes.to(torch.uint8))
            sb = decode_nv_scales(p.scales[r0:r1]).repeat_interleave(16, dim=1)[:, :p.k]
            val = q * (sb * p.global_scale.reshape(()))
        else:
            q = (codes - 8).to(torch.float32)
            val = q * p.scales[r0:r1].repeat_interleave(p.block, dim=1)[:, :p.k]
        out[r0:r1] = val.to(dtype)
    return out


def w4_linear_reference(x: torch.Tensor, p: PackedW4, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fallback: F.linear with the dequantized weight in x.dtype (any device)."""
    return F.linear(x, dequantize_w4(p, x.dtype), None if bias is None else bias.to(x.dtype))


# --------------------------------------------------------------------------------------------- dispatch


def w4_kernel_supported(x: torch.Tensor, p: PackedW4) -> bool:
    """True when the Triton kernels run for x and p (CUDA, capability >= 8.0, block multiple of 16)."""
    if not (use_triton(x, p.data) and device_capability(x.device) >= (8, 0)):
        return False
    return p.kind == "nvfp4" or p.block % 16 == 0


def _check_args(x, p: PackedW4, bias):
    if not isinstance(x, torch.Tensor) or x.dtype not in _ACT_DTYPES:
        raise TypeError(f"x must be a bfloat16 or float16 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[-1] != p.k:
        raise ValueError(f"x must be [..., K={p.k}], got shape {tuple(x.shape)}")
    if x.device != p.device:
        raise ValueError(f"x is on {x.device} but the packed weight on {p.device}; move one of them (p.to(device))")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != p.n or bias.device != x.device):
        raise ValueError(f"bias must be [N={p.n}] on {x.device}, got {tuple(bias.shape)} on {bias.device}")


def _impl(x, data, scales, global_scale, bias, kind, n, k, block):
    p = PackedW4(kind, n, k, block, data, scales, global_scale)
    if not w4_kernel_supported(x, p):
        return w4_linear_reference(x, p, bias)
    from .w4_tuning import run_w4

    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) % 8 != 0):
        x2 = x2.contiguous()
    return run_w4(x2, p, bias).reshape(*x.shape[:-1], n)


@torch.library.custom_op("modelopt_lite::w4_linear", mutates_args=())
def _w4_linear_op(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, global_scale: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], kind: str, n: int, k: int, block: int) -> torch.Tensor:
    return _impl(x, data, scales, global_scale, bias, kind, n, k, block)


@_w4_linear_op.register_fake
def _w4_linear_fake(x, data, scales, global_scale, bias, kind, n, k, block):
    if x.shape[-1] != k:
        raise ValueError(f"x must be [..., K={k}], got shape {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], n))


def w4_linear(x: torch.Tensor, p: PackedW4, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ W^T + bias for a packed 4-bit W [N, K]; x [..., K] bf16/fp16 -> [..., N] in x.dtype.

    Runs as the custom op `torch.ops.modelopt_lite.w4_linear`. The AWQ
    pre_quant_scale, if any, must already be applied to x.
    """
    _check_args(x, p, bias)
    return torch.ops.modelopt_lite.w4_linear(x, p.data, p.scales, p.global_scale, bias, p.kind, p.n, p.k, p.block)

