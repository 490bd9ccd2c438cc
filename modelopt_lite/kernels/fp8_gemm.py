"""FP8 W8A8 linear layer: E4M3 activations x E4M3 weights, float32 accumulation.

Public API:

* `quantize_fp8_act(x, amax=None) -> (codes, scale)` (from `fp8_quant`).
* `fp8_linear(x, w_codes, w_scale, x_amax=None, bias=None, out_dtype=None, fast_accum=False)`:
  `(sum_k qx * qw) * sx[m] * sw[n] + bias`, i.e. `F.linear(fake_quant(x),
  fake_quant(w), bias)` up to accumulation order. Registered (a plain
  `torch.library` definition, with a fake implementation) as the op
  `modelopt_lite::fp8_linear`, so `torch.compile` and `torch.export` see one node.
* `fp8_gemm(a, a_scale, w_codes, w_scale, ...)`: the GEMM alone on FP8 codes.

Accumulation: the FP8 tensor cores keep only ~13 mantissa bits in their running
sum, so by default every K tile's partial sum is promoted to float32 (every 128
products on wgmma tiles, as cuBLAS does without fast accumulation: ~1.3e-4
relative error on float32 outputs; mma.sync tiles, M <= 16, stay near 1e-6).
`fast_accum=True` keeps the whole sum in the tensor cores (like
`torch._scaled_mm(use_fast_accum=True)`: ~2e-3 to 5e-3, and 1.3-1.45x faster
for large M).

Dispatch: Triton kernels on CUDA devices of compute capability 8.9 or newer
(TMA loads and wgmma tiles on 9.0); the PyTorch dequantize-then-matmul
reference elsewhere (CPU, older GPUs, no Triton, `MODELOPT_LITE_KERNELS=0`).
Activation quantization: static per-tensor (`x_amax` given) with at most
`FUSE_QUANT_MAX_M` rows is done inside the GEMM's A prologue when that times
faster than quantize-then-GEMM (decided once per shape); otherwise one
quantization kernel (per-token row abs-max fused) runs before the GEMM. The
scales and the bias are applied in the GEMM epilogue. Any M, N and K work: a K
that is not a multiple of 16 takes the pointer-load path with a masked K tail
(no padding, no fallback); TMA is used only where every stride and base is
16-byte aligned.

Each (M bucket, N, K) is tuned once per process over a short config list for
its regime (`fp8_tuning`). Eager calls cost ~35 us (GEMM) to ~75 us (dynamic
fp8_linear) of host time in Triton's launcher; decode-sized calls belong in a
CUDA graph.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import device_capability, triton_available, use_triton
from .fp8_quant import _launch_quant, quantize_fp8_act, quantize_fp8_act_torch
from .common import COUNTER_SLOTS, num_sms, split_k_counters
from .fp8_tuning import GemmConfig, candidate_configs, lookup, m_bucket, tune

__all__ = ["quantize_fp8_act", "fp8_linear", "fp8_linear_reference", "fp8_gemm", "fp8_gemm_supported",
           "FUSE_QUANT_MAX_M", "GemmConfig", "launch_gemm"]

FUSE_QUANT_MAX_M = 16
"""Static per-tensor activations with at most this many rows are quantized in the GEMM prologue."""

PROMOTE_WGMMA = 2
"""ACC_MODE of wgmma tiles (block_m >= 64) without fast accumulation: 2 (compiler promotion) or 1."""

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

if triton_available():
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .fp8_gemm_kernels import _gemm_persistent_kernel, _gemm_tile_kernel


# ----------------------------------------------------------------------------------------------- checks


def _check_args(x, w_codes, w_scale, x_amax, bias, out_dtype):
    if not isinstance(x, torch.Tensor) or x.dtype not in _OUT_DTYPES:
        raise TypeError(f"x must be a float32, float16 or bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension ([..., K])")
    if w_codes.dtype != torch.float8_e4m3fn or w_codes.dim() != 2:
        raise TypeError(f"w_codes must be a 2-d float8_e4m3fn [N, K] tensor, got {w_codes.dtype} "
                        f"of shape {tuple(w_codes.shape)}")
    N, K = w_codes.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features but w_codes is [N={N}, K={K}]")
    if w_scale.numel() not in (1, N):
        raise ValueError(f"w_scale must have 1 (per tensor) or N={N} (per channel) values, got {w_scale.numel()}")
    if x_amax is not None and x_amax.numel() != 1:
        raise ValueError(f"x_amax must be a 0-d tensor (static per-tensor) or None (dynamic per token), "
                         f"got {x_amax.numel()} values")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"bias must be [N={N}], got shape {tuple(bias.shape)}")
    if out_dtype is not None and out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    for name, t in (("w_codes", w_codes), ("w_scale", w_scale), ("x_amax", x_amax), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put all operands on one device")


def fp8_gemm_supported(*tensors: torch.Tensor) -> bool:
    """True when the Triton FP8 kernels run for these tensors (CUDA, compute capability >= 8.9)."""
    return use_triton(*tensors) and device_capability(tensors[0].device) >= (8, 9)


# --------------------------------------------------------------------------------------------- reference


def fp8_linear_reference(x, w_codes, w_scale, x_amax=None, bias=None, out_dtype=None):
    """Dequantize-then-matmul in float32 (any device): the fallback and the tests' reference."""
    _check_args(x, w_codes, w_scale, x_amax, bias, out_dtype)
    out_dtype = out_dtype or x.dtype
    N, K = w_codes.shape
    x2 = x.reshape(-1, K)
    codes, sx = quantize_fp8_act_torch(x2, x_amax)
    xd = codes.float() * sx
    sw = w_scale.float().reshape(-1, 1) if w_scale.numel() == N and N > 1 else w_scale.float().reshape(())
    wd = w_codes.float() * sw
    out = xd @ wd.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).reshape(*x.shape[:-1], N)


# ------------------------------------------------------------------------------------------------ launch



def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and (t.dim() < 2 or (t.stride(0) * t.element_size()) % 16 == 0)


def _tma_capable(device: torch.device) -> bool:
    return device.type != "cuda" or device_capability(device) >= (9, 0)


def _acc_mode(cfg: GemmConfig, fast_accum: bool) -> int:
    """Kernel ACC_MODE: 0 tensor-core accumulation; else float32 promotion every K tile (see `_mma`)."""
    if fast_accum:
        return 0
    return PROMOTE_WGMMA if cfg.block_m >= 64 else 1


def launch_gemm(cfg: GemmConfig, a, sa, w, sw, bias, out, a_mode: str, tma: bool = True, fast_accum: bool = False,
                acc_mode: Optional[int] = None):
    """Launch one GEMM config. a: fp8 codes [M, K] (a_mode 'tensor' or 'row') or high-precision x ('quant').

    sa: 'tensor' a one-value dequant scale, 'row' [M] scales, 'quant' the static amax. TMA descriptors
    are used where `tma`, `cfg.tma` and the operands' alignment allow. `fast_accum`: accumulate in the tensor cores (about 13
    mantissa bits, like torch._scaled_mm(use_fast_accum=True)); by default partial sums are promoted to
    float32 every K tile. `acc_mode` overrides the kernel's ACC_MODE. Writes `out` [M, N].
    """
    acc = _acc_mode(cfg, fast_accum) if acc_mode is None else acc_mode
    M, K = a.shape
    N = w.shape[0]
    quant_a = a_mode == "quant"
    a_scale_mode = {"tensor": 0, "row": 1, "quant": 2}[a_mode]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    tma = tma and (cfg.tma or cfg.persistent)
    tma_a = tma and not quant_a and _aligned(a) and K % 16 == 0
    tma_b = tma and _aligned(w) and K % 16 == 0
    # TMA stores for 16-bit outputs only: a float32 tile would take too much shared memory
    tma_c = tma and out.element_size() == 2 and _aligned(out) and out.is_contiguous() and N % 8 == 0
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk]) if tma_a else None
    b_desc = TensorDescriptor.from_tensor(w, [bn, bk]) if tma_b else None
    c_desc = TensorDescriptor.from_tensor(out, [bm, bn]) if tma_c else None
    sw_vec = sw.numel() > 1
    bias_arg = bias if bias is not None else sw
    if cfg.persistent:
        if not (tma_a and tma_b) or quant_a:
            raise ValueError("the persistent FP8 GEMM needs TMA-aligned fp8 operands")
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        progs = min(num_sms(a.device), tiles)
        _gemm_persistent_kernel[(progs,)](
            a_desc, b_desc, out, c_desc, sa, sw, bias_arg, M, N, K, out.stride(0), progs,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.group_m, A_SCALE=a_scale_mode,
            SW_VEC=sw_vec, HAS_BIAS=bias is not None, TMA_C=tma_c, ACC_MODE=acc, WS=cfg.ws,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return out
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = cfg.split_k
    if split > 1 and tiles > COUNTER_SLOTS:
        split = 1
    ws = torch.empty((split, M, N), dtype=torch.float32, device=a.device) if split > 1 else out
    cnt = split_k_counters(a.device, "fp8") if split > 1 else out
    _gemm_tile_kernel[(tiles, split)](
        a, a_desc, w, b_desc, out, c_desc, sa, sw, bias_arg, ws, cnt, M, N, K, a.stride(0), w.stride(0),
        out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.group_m, SPLIT_K=split,
        EVEN_K=K % bk == 0, TMA_A=tma_a, TMA_B=tma_b, TMA_C=tma_c, QUANT_A=quant_a, A_SCALE=a_scale_mode,
        SW_VEC=sw_vec, HAS_BIAS=bias is not None, ACC_MODE=acc, WS=cfg.ws, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out


def fp8_gemm(a, sa, w, sw, bias=None, out_dtype=torch.bfloat16, a_mode: str = "tensor",
             config: Optional[GemmConfig] = None, tma: Optional[bool] = None, fast_accum: bool = False) -> torch.Tensor:
    """The Triton GEMM on prepared operands (see `launch_gemm` for `a_mode`); tunes per (M bucket, N, K).

    `sa` and `sw` are float32 (sa holds the amax for a_mode 'quant'); `config` skips tuning.
    """
    M, K = a.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_() if bias is None else out.copy_(bias.to(out_dtype).expand(M, N))
    if tma is None:
        tma = _tma_capable(a.device)
    if config is None:
        key = (a.device.index, m_bucket(M), N, K, a.dtype if a_mode == "quant" else None, tma, fast_accum)
        config = lookup(key)
        if config is None:
            cands = candidate_configs(M, N, K, quant_a=a_mode == "quant", tma=tma and _aligned(a) and _aligned(w),
                                      fast_accum=fast_accum)
            config = tune(key, cands, lambda c: launch_gemm(c, a, sa, w, sw, bias, out, a_mode, tma, fast_accum))
    return launch_gemm(config, a, sa, w, sw, bias, out, a_mode, tma, fast_accum)


# -------------------------------------------------------------------------------------------- the op


_FUSE_CHOICE = {}


def _quant_then_gemm(x2, x_amax, w_codes, sw, bias, out_dtype, fast_accum):
    M, K = x2.shape
    codes = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x2.device)
    if x_amax is None:
        sa = torch.empty((M,), dtype=torch.float32, device=x2.device)
        _launch_quant(x2, None, codes, sa)
        return fp8_gemm(codes, sa, w_codes, sw, bias, out_dtype, a_mode="row", fast_accum=fast_accum)
    sa = torch.empty((), dtype=torch.float32, device=x2.device)
    _launch_quant(x2, x_amax, codes, sa)
    return fp8_gemm(codes, sa, w_codes, sw, bias, out_dtype, a_mode="tensor", fast_accum=fast_accum)


def _fused_pays(x2, x_amax, w_codes, sw, bias, out_dtype, fast_accum) -> bool:
    """Static activations with few rows: time the A-prologue GEMM against quantize-then-GEMM once per shape."""
    M, K = x2.shape
    key = (x2.device.index, m_bucket(M), w_codes.shape[0], K, x2.dtype, fast_accum)
    choice = _FUSE_CHOICE.get(key)
    if choice is None:
        fused = lambda: fp8_gemm(x2, x_amax, w_codes, sw, bias, out_dtype, a_mode="quant", fast_accum=fast_accum)
        split = lambda: _quant_then_gemm(x2, x_amax, w_codes, sw, bias, out_dtype, fast_accum)
        if os.environ.get("MODELOPT_LITE_FP8_TUNE", "1") == "0":
            choice = True
        else:
            fused()  # tune both paths before timing them
            split()
            t_fused = triton.testing.do_bench(fused, warmup=2, rep=10, return_mode="median")
            t_split = triton.testing.do_bench(split, warmup=2, rep=10, return_mode="median")
            choice = t_fused <= t_split
        _FUSE_CHOICE[key] = choice
    return choice


def _fp8_linear_impl(x, w_codes, w_scale, x_amax=None, bias=None, out_dtype=None, fast_accum=False):
    out_dtype = out_dtype or x.dtype
    N, K = w_codes.shape
    if not fp8_gemm_supported(x, w_codes):
        return fp8_linear_reference(x, w_codes, w_scale, x_amax, bias, out_dtype)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if w_codes.stride(-1) != 1:
        w_codes = w_codes.contiguous()
    M = x2.shape[0]
    sw = w_scale.reshape(-1) if w_scale.dtype == torch.float32 else w_scale.float().reshape(-1)
    if x_amax is not None:
        x_amax = x_amax.reshape(())
    if x_amax is not None and M <= FUSE_QUANT_MAX_M and _fused_pays(x2, x_amax, w_codes, sw, bias, out_dtype,
                                                                      fast_accum):
        out = fp8_gemm(x2, x_amax, w_codes, sw, bias, out_dtype, a_mode="quant", fast_accum=fast_accum)
    else:
        out = _quant_then_gemm(x2, x_amax, w_codes, sw, bias, out_dtype, fast_accum)
    return out.reshape(*x.shape[:-1], N)


def _fp8_linear_fake(x, w_codes, w_scale, x_amax=None, bias=None, out_dtype=None, fast_accum=False):
    _check_args(x, w_codes, w_scale, x_amax, bias, out_dtype)
    return x.new_empty((*x.shape[:-1], w_codes.shape[0]), dtype=out_dtype or x.dtype)


# A plain Library registration: the op dispatches straight to the implementation (a `custom_op` wrapper
# would add ~15 us of Python per call, which matters at decode sizes).
_LIB = torch.library.Library("modelopt_lite", "FRAGMENT")
_LIB.define("fp8_linear(Tensor x, Tensor w_codes, Tensor w_scale, Tensor? x_amax=None, Tensor? bias=None, "
            "ScalarType? out_dtype=None, bool fast_accum=False) -> Tensor")
_LIB.impl("fp8_linear", _fp8_linear_impl, "CompositeExplicitAutograd")
torch.library.register_fake("modelopt_lite::fp8_linear", _fp8_linear_fake, lib=_LIB)


def fp8_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, x_amax: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
               fast_accum: bool = False) -> torch.Tensor:
    """FP8 W8A8 linear: x [..., K] (bf16/fp16/fp32) times E4M3 weights [N, K] -> [..., N].

    w_scale: float32 dequant multipliers (amax / 448), 0-d per tensor or [N] per channel. x_amax: 0-d
    static per-tensor activation amax, or None for dynamic per-token scales. out_dtype defaults to
    x.dtype. fast_accum: keep the whole K sum in the FP8 tensor cores' accumulator (faster for large M;
    relative error ~2e-3 to 5e-3 instead of ~1e-4). Runs as the op `torch.ops.modelopt_lite.fp8_linear`.
    """
    _check_args(x, w_codes, w_scale, x_amax, bias, out_dtype)
    return torch.ops.modelopt_lite.fp8_linear(x, w_codes, w_scale, x_amax, bias, out_dtype, fast_accum)
