"""FP8 (E4M3) activation quantization: static per tensor or dynamic per token.

`quantize_fp8_act(x, amax)` returns float8_e4m3fn codes and the float32
dequantization scale. The codes are bit-identical to
`formats.quantize(x, QuantFormat.create(num_bits=(4, 3)), amax)` (static) and to
`QuantFormat.create(num_bits=(4, 3), block_sizes={-1: None})` (dynamic per token):

    s = 448 / amax            (one correctly rounded float32 division; 0 when amax <= 2**-24)
    q = E4M3(clamp(x * s, -448, 448))   (round to nearest, ties to even)
    scale = amax / 448        (0 when amax <= 2**-24)

On CUDA one Triton kernel does the work (per token: row abs-max and
quantization fused in one program per row, the row read once when it fits in
registers; static: a flat elementwise kernel); elsewhere a PyTorch path with
the same arithmetic runs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import device_capability, triton_available, use_triton

__all__ = ["quantize_fp8_act", "quantize_fp8_act_torch", "FP8_MAX", "TINY_AMAX"]

FP8_MAX = 448.0
TINY_AMAX = 2.0**-24
_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _max_nan(a, b):
        # abs-max that keeps NaN (as torch.amax does), so a NaN row quantizes to NaN like the reference
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _fp8_multiplier(amax):
        """448 / amax rounded once (0 for amax <= 2**-24), as formats' `_multiplier`."""
        return tl.where(amax <= 5.960464477539063e-08, 0.0, tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax))

    @triton.jit
    def _fp8_dequant_scale(amax):
        """amax / 448 rounded once (0 for amax <= 2**-24), as formats' `dequant_scale`."""
        return tl.where(amax <= 5.960464477539063e-08, 0.0, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)))

    @triton.jit
    def _to_e4m3(y):
        """float32 (already scaled) -> E4M3: saturate at +-448 (NaN stays NaN), round to nearest even."""
        y = tl.where(y > 448.0, 448.0, y)
        y = tl.where(y < -448.0, -448.0, y)
        return y.to(tl.float8e4nv, fp_downcast_rounding="rtne")

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm,
                           BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr):
        """Per token: one program per row; the row's abs-max gives its scale (one read when the row fits)."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        x_row = x_ptr + row * stride_xm
        q_row = q_ptr + row * stride_qm
        if SINGLE_PASS:
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.reduce(tl.abs(x), 0, _max_nan)
            tl.store(scale_ptr + row, _fp8_dequant_scale(amax))
            tl.store(q_row + offs, _to_e4m3(x * _fp8_multiplier(amax)), mask=offs < K)
        else:
            run = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                x = tl.load(x_row + k + offs, mask=k + offs < K, other=0.0).to(tl.float32)
                run = _max_nan(run, tl.abs(x))
            amax = tl.reduce(run, 0, _max_nan)
            tl.store(scale_ptr + row, _fp8_dequant_scale(amax))
            s = _fp8_multiplier(amax)
            for k in range(0, K, BLOCK_K):
                x = tl.load(x_row + k + offs, mask=k + offs < K, other=0.0).to(tl.float32)
                tl.store(q_row + k + offs, _to_e4m3(x * s), mask=k + offs < K)

    @triton.jit
    def _quant_flat_kernel(x_ptr, q_ptr, amax_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        """Static per tensor over a contiguous tensor: BLOCK elements per program; program 0 writes the scale."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        amax = tl.load(amax_ptr).to(tl.float32)
        if pid == 0:
            tl.store(scale_ptr, _fp8_dequant_scale(amax))
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(q_ptr + offs, _to_e4m3(x * _fp8_multiplier(amax)), mask=offs < n)


def _check_act(x: torch.Tensor, amax: Optional[torch.Tensor]):
    if x.dim() != 2:
        raise ValueError(f"quantize_fp8_act expects a 2-d [M, K] tensor, got shape {tuple(x.shape)}; reshape to 2-d first")
    if x.dtype not in _FLOAT_INPUTS:
        raise TypeError(f"quantize_fp8_act takes float32, float16 or bfloat16 input, got {x.dtype}")
    if amax is not None:
        if not isinstance(amax, torch.Tensor) or amax.numel() != 1:
            raise ValueError("amax must be a 0-d (one-element) tensor for static per-tensor quantization, "
                             "or None for dynamic per-token scales")
        if amax.device != x.device:
            raise ValueError(f"amax is on {amax.device} but x is on {x.device}; move it to x's device")


def _multiplier_torch(amax: torch.Tensor) -> torch.Tensor:
    qmax = torch.full_like(amax, FP8_MAX)
    return torch.where(amax <= TINY_AMAX, torch.zeros_like(amax), qmax / amax)


def _scale_torch(amax: torch.Tensor) -> torch.Tensor:
    qmax = torch.full_like(amax, FP8_MAX)
    return torch.where(amax <= TINY_AMAX, torch.zeros_like(amax), amax / qmax)


def quantize_fp8_act_torch(x: torch.Tensor, amax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """PyTorch path of `quantize_fp8_act` (any device): same codes and scales."""
    _check_act(x, amax)
    xf = x.float()
    if amax is None:
        amax = xf.abs().amax(dim=1, keepdim=True)
    else:
        amax = amax.detach().float().reshape(())
    y = torch.clamp(xf * _multiplier_torch(amax), -FP8_MAX, FP8_MAX)
    return y.to(torch.float8_e4m3fn), _scale_torch(amax)


def _launch_quant(x: torch.Tensor, amax: Optional[torch.Tensor], q: torch.Tensor, scale: torch.Tensor):
    """Run the Triton kernel: x [M, K] (last dim contiguous) -> q [M, K] contiguous, and `scale`
    ([M] per token when amax is None, else one value)."""
    M, K = x.shape
    if M == 0 or K == 0:
        return
    if amax is None:
        block_k = triton.next_power_of_2(K)
        single = block_k <= 32768
        if not single:
            block_k = 8192
        warps = max(4, min(16, block_k // 2048))
        _quant_rows_kernel[(M,)](x, q, scale, K, x.stride(0), q.stride(0), BLOCK_K=block_k, SINGLE_PASS=single,
                                 num_warps=warps)
        return
    if x.stride(0) != K:
        x = x.contiguous()
    n = M * K
    block = 8192 if n >= 8192 * 132 else 1024
    _quant_flat_kernel[(triton.cdiv(n, block),)](x, q, amax, scale, n, BLOCK=block, num_warps=8 if block > 1024 else 4)


def quantize_fp8_act(x: torch.Tensor, amax: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations `x` [M, K] to FP8 E4M3 codes.

    amax: a 0-d tensor for static per-tensor quantization (scale is a 0-d
    float32 tensor amax / 448), or None for dynamic per-token quantization
    (scale is float32 [M, 1], one per row). Returns (codes float8_e4m3fn
    [M, K], scale). Codes dequantize as codes.float() * scale.
    """
    _check_act(x, amax)
    if not (use_triton(x) and device_capability(x.device) >= (8, 9)):
        return quantize_fp8_act_torch(x, amax)
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    if amax is None:
        scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
        _launch_quant(x, None, q, scale)
        return q, scale
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    _launch_quant(x, amax.detach().reshape(()), q, scale)
    return q, scale
