"""Normalization or SwiGLU fused with activation fake quantization: ops, reference, Triton kernels.

Three `torch.library` ops (namespace ``modelopt_lite``, with fake impls for torch.export):

* ``rms_norm_quant(x, weight, eps, amax, spec)``: ``fake_quant(rms_norm(x, weight, eps))`` where
  rms_norm is the Llama formula (float32 math, ``x * rsqrt(mean(x**2) + eps)``, cast to x's dtype,
  then ``weight * h``; the result has the promoted dtype of weight and x);
* ``layer_norm_quant(x, weight, bias, eps, amax, spec)``: ``fake_quant(F.layer_norm(x, (N,), ...))``;
* ``silu_mul_quant(gate, up, amax, spec)``: ``fake_quant(F.silu(gate) * up)``.

An empty `spec` (``""``, amax None) means no quantization: the fused normalization or SwiGLU alone.

On CPU (and for formats or shapes the kernel does not cover) an op runs the PyTorch composition,
which is bit-identical to the unfused graph. On CUDA the Triton kernel (`triton_norm_quant`) does
one pass per row: the normalization (or SiLU-multiply) in float32, rounded to the output dtype,
then the quantization with the rounding helpers of `fq_numerics`. Covered formats: single-level
per tensor with a static amax (FP8 E4M3 ...), single-level per row with a dynamic amax (per-token
FP8: ``block_sizes={-1: None}``) and two-level blocks along the row with a scalar global amax (NVFP4).
The quantization is bit-identical to `formats.fake_quant` of the kernel's normalized values; the
normalization itself may differ from PyTorch in the last bit (another reduction order).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import interpret_mode, triton_available, use_triton
from . import fake_quant as _fqk
from ..quantization.formats.elements import E4M3, FloatFormat, IntFormat
from ..quantization.formats.schemes import QuantFormat
from ..quantization.ops import format_from_spec

__all__ = ["rms_norm_quant", "layer_norm_quant", "silu_mul_quant", "rms_norm_ref", "rms_norm_quant_ref", "layer_norm_quant_ref", "silu_mul_quant_ref",
           "triton_norm_quant", "kernel_plan", "MAX_ROW", "NORM_RMS", "NORM_LAYER", "NORM_SILU_MUL"]

NORM_RMS, NORM_LAYER, NORM_SILU_MUL = 0, 1, 2
Q_TENSOR, Q_ROW, Q_BLOCKS, Q_NONE = 0, 1, 2, 3
MAX_ROW = 16384
"""Longest row the kernel keeps in registers; longer rows take the PyTorch path."""
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------ PyTorch reference
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The HF LlamaRMSNorm formula, operation for operation."""
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return weight * h.to(x.dtype)


def _fq(v: torch.Tensor, amax: Optional[torch.Tensor], spec: str) -> torch.Tensor:
    if not spec:  # the empty spec: the fused op without quantization
        return v
    return _fqk.fake_quant(v, format_from_spec(spec), amax, cache_key=spec)


def rms_norm_quant_ref(x, weight, eps, amax, spec):
    return _fq(rms_norm_ref(x, weight, eps), amax, spec)


def layer_norm_quant_ref(x, weight, bias, eps, amax, spec):
    return _fq(F.layer_norm(x, (x.shape[-1],), weight, bias, eps), amax, spec)


def silu_mul_quant_ref(gate, up, amax, spec):
    return _fq(F.silu(gate) * up, amax, spec)


# ------------------------------------------------------------------ Triton kernel
if triton_available():
    import triton
    import triton.language as tl

    from .fq_numerics import _absmax_all, _absmax_rows, _global_scale, _to_out
    from .fq_triton import _fq_out, _row_scales

    @triton.jit
    def _round_as(v, ptr, INTERP: tl.constexpr):
        """float32 `v` rounded (to nearest even) to the element type of `ptr`, back in float32."""
        return _to_out(v, ptr, INTERP).to(tl.float32)

    @triton.jit
    def _norm_quant_kernel(x_ptr, w_ptr, b_ptr, a_ptr, y_ptr, N, eps,
                           NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, INTERP: tl.constexpr,
                           QMODE: tl.constexpr, KIND: tl.constexpr, BB: tl.constexpr, NBLK: tl.constexpr,
                           BSZ: tl.constexpr, QMAXV: tl.constexpr, RQ: tl.constexpr, BOUND: tl.constexpr,
                           EMAX: tl.constexpr, FAST_DIV: tl.constexpr, POS: tl.constexpr,
                           MAGIC_PATH: tl.constexpr, IS_INT: tl.constexpr, SYM: tl.constexpr, LO: tl.constexpr,
                           HI: tl.constexpr, FSCALE: tl.constexpr, MINNORM: tl.constexpr, INV_C: tl.constexpr,
                           UNSCALE: tl.constexpr, MAGIC: tl.constexpr):
        """One row per program, held as an [NBLK, BB] tile (quantization blocks of BSZ elements).

        NORM 0: RMSNorm (Llama order: float32 x * rstd, rounded to x's dtype, times the weight);
        1: LayerNorm; 2: silu(gate) * up. The result is rounded to y's dtype, then QMODE 0: per-tensor
        scale from a_ptr; 1: per-row dynamic scale; 2: two-level blocks (global amax at a_ptr);
        3: no quantization."""
        row = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BB)[None, :]
        col = tl.arange(0, NBLK)[:, None] * BSZ + j
        mask = (j < BSZ) & (col < N)
        base = row * N
        xv = tl.load(x_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
        if NORM == 0:
            var = tl.sum(tl.sum(xv * xv, 1), 0) / N
            rstd = 1.0 / tl.sqrt_rn(var + eps)
            h = _round_as(xv * rstd, x_ptr, INTERP)
            v = tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32) * h
        elif NORM == 1:
            mean = tl.sum(tl.sum(xv, 1), 0) / N
            d = tl.where(mask, xv - mean, 0.0)
            var = tl.sum(tl.sum(d * d, 1), 0) / N
            v = d * (1.0 / tl.sqrt_rn(var + eps))
            if HAS_W:
                v = v * tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                v = v + tl.load(b_ptr + col, mask=mask, other=0.0).to(tl.float32)
        else:
            s = _round_as(xv / (1.0 + tl.exp(-xv)), x_ptr, INTERP)
            v = s * tl.load(w_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, _round_as(v, y_ptr, INTERP), 0.0)
        if QMODE == 3:
            out = _to_out(v, y_ptr, INTERP)
        else:
            s2 = tl.full([1, 1], 1.0, tl.float32)
            rden = s2
            tiny = row < 0
            if QMODE == 0:
                am = tl.load(a_ptr + tl.zeros([1, 1], tl.int32))
            elif QMODE == 1:
                am = _absmax_all(v)
            else:
                am = _absmax_rows(v)
                s2, rden, tiny = _global_scale(a_ptr, QMAXV, BOUND)
            mul, eff, deq = _row_scales(am, s2, rden, KIND, QMAXV, RQ, UNSCALE, EMAX, FAST_DIV, POS, MAGIC_PATH,
                                        INTERP)
            out = _fq_out(v, mul, eff, deq, tiny, y_ptr, KIND, FAST_DIV, POS, SYM, IS_INT, LO, HI, FSCALE,
                          MINNORM, INV_C, MAGIC, INTERP)
        tl.store(y_ptr + base + col, out, mask=mask)


# ------------------------------------------------------------------ kernel plans
def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def kernel_plan(fmt: QuantFormat, n: int, amax: Optional[torch.Tensor]) -> Optional[dict]:
    """Constexprs of the fused kernel for rows of `n` elements, or None when not covered."""
    if n <= 0 or n > MAX_ROW:
        return None
    elem = fmt.element
    if not isinstance(elem, (FloatFormat, IntFormat)) or getattr(elem, "unsigned", False):
        return None
    blocks = dict(fmt.block_sizes) if fmt.block_sizes else None
    if blocks is not None and set(blocks) not in ({-1},):
        return None
    consts = dict(_fqk._elem_consts(elem), QMAXV=float(elem.max_value), RQ=_fqk._rcp32(float(elem.max_value)),
                  BOUND=0.0, FAST_DIV=False, POS=False, MAGIC_PATH=False, KIND=0, EMAX=0)
    if fmt.scale is None:
        if fmt.axis is not None:
            return None
        if blocks is None and amax is not None and amax.numel() == 1:
            mode, bb = Q_TENSOR, n
        elif blocks is not None and amax is None and (blocks[-1] is None or blocks[-1] >= n):
            mode, bb = Q_ROW, n
        else:
            return None
        nblk, bsz = 1, n
    elif fmt.scale is E4M3:
        if blocks is None or blocks[-1] is None or amax is None or amax.numel() != 1:
            return None
        bsz = int(blocks[-1])
        mode, bb, nblk = Q_BLOCKS, _np2(bsz), -(-n // bsz)
        magic = consts["SYM"] and not consts["IS_INT"]
        consts.update(BOUND=float(E4M3.max_value if fmt.global_fp8 else elem.max_value * E4M3.max_value),
                      FAST_DIV=True, MAGIC_PATH=magic, POS=magic, KIND=1)
    else:
        return None
    bb = _np2(bb)
    nbp = _np2(nblk)
    if nbp * bb > 2 * MAX_ROW:
        return None
    return dict(consts, QMODE=mode, BB=bb, NBLK=nbp, BSZ=bsz)


def triton_norm_quant(norm: int, x: torch.Tensor, w: Optional[torch.Tensor], b: Optional[torch.Tensor], eps: float,
                      amax: Optional[torch.Tensor], fmt: Optional[QuantFormat], out_dtype: torch.dtype,
                      quantize: bool = True) -> Optional[torch.Tensor]:
    """The fused kernel on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); None when not covered.

    `norm`: NORM_RMS (w: weight), NORM_LAYER (w, b: weight, bias or None), NORM_SILU_MUL (x: gate,
    w: up). With ``quantize=False`` the normalized values (in `out_dtype`) come back unquantized."""
    if not triton_available() or x.dtype not in _DTYPES or out_dtype not in _DTYPES or x.numel() == 0:
        return None
    if x.device.type != "cuda" and not interpret_mode():
        return None
    tensors = [t for t in (w, b, amax) if t is not None]
    if any(t.device != x.device for t in tensors):
        return None
    n = x.shape[-1]
    if norm == NORM_SILU_MUL:
        if w is None or w.shape != x.shape or w.dtype not in _DTYPES:
            return None
    elif any(t is not None and (t.shape != (n,) or t.dtype not in _DTYPES) for t in (w, b)):
        return None
    if quantize:
        plan = kernel_plan(fmt, n, amax)
        if plan is None:
            return None
    else:
        if n > MAX_ROW:
            return None
        plan = dict(_fqk._elem_consts(E4M3), QMAXV=448.0, RQ=_fqk._rcp32(448.0), BOUND=0.0, FAST_DIV=False,
                    POS=False, MAGIC_PATH=False, KIND=0, EMAX=0, QMODE=Q_NONE, BB=_np2(n), NBLK=1, BSZ=n)
    xc = x.contiguous()
    wc = w.contiguous() if w is not None else xc
    rows = xc.numel() // n
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    a = amax.float().contiguous() if amax is not None else xc
    _norm_quant_kernel[(rows,)](
        xc, wc, b.contiguous() if b is not None else xc, a, y, n, float(eps), NORM=norm, HAS_W=w is not None,
        HAS_B=b is not None, INTERP=interpret_mode(), num_warps=4 if plan["NBLK"] * plan["BB"] <= 2048 else 8,
        enable_fp_fusion=False, **plan)
    return y


def _dispatch(norm, x, w, b, eps, amax, spec, out_dtype, ref):
    if use_triton(x):
        fmt = format_from_spec(spec) if spec else None
        y = triton_norm_quant(norm, x, w, b, eps, amax, fmt, out_dtype, quantize=fmt is not None)
        if y is not None:
            return y
    return ref()


# ------------------------------------------------------------------ ops
def _rms_dtype(x, weight):
    return torch.promote_types(weight.dtype, x.dtype)


@torch.library.custom_op("modelopt_lite::rms_norm_quant", mutates_args=())
def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, amax: Optional[torch.Tensor],
                   spec: str) -> torch.Tensor:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm_quant: weight must have shape ({x.shape[-1]},) (the last dim of x), "
                         f"got {tuple(weight.shape)}")
    return _dispatch(NORM_RMS, x, weight, None, eps, amax, spec, _rms_dtype(x, weight),
                     lambda: rms_norm_quant_ref(x, weight, eps, amax, spec))


@rms_norm_quant.register_fake
def _(x, weight, eps, amax, spec):
    return x.new_empty(x.shape, dtype=_rms_dtype(x, weight))


@torch.library.custom_op("modelopt_lite::layer_norm_quant", mutates_args=())
def layer_norm_quant(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                     amax: Optional[torch.Tensor], spec: str) -> torch.Tensor:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (x.shape[-1],):
            raise ValueError(f"layer_norm_quant: {name} must have shape ({x.shape[-1]},), got {tuple(t.shape)}")
    return _dispatch(NORM_LAYER, x, weight, bias, eps, amax, spec, x.dtype,
                     lambda: layer_norm_quant_ref(x, weight, bias, eps, amax, spec))


@layer_norm_quant.register_fake
def _(x, weight, bias, eps, amax, spec):
    return torch.empty_like(x)


@torch.library.custom_op("modelopt_lite::silu_mul_quant", mutates_args=())
def silu_mul_quant(gate: torch.Tensor, up: torch.Tensor, amax: Optional[torch.Tensor], spec: str) -> torch.Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul_quant: gate and up must have the same shape, got {tuple(gate.shape)} "
                         f"and {tuple(up.shape)}")
    return _dispatch(NORM_SILU_MUL, gate, up, None, 0.0, amax, spec, torch.promote_types(gate.dtype, up.dtype),
                     lambda: silu_mul_quant_ref(gate, up, amax, spec))


@silu_mul_quant.register_fake
def _(gate, up, amax, spec):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))
