"""Fused fake quantization: Triton kernels where they apply, the PyTorch reference otherwise.

`fake_quant(x, fmt, amax, global_amax)` is a drop-in for
`modelopt_lite.quantization.formats.fake_quant` with bit-identical results;
the custom ops of `quantization.ops` call it, so every quantized model on
CUDA uses the kernels. `triton_fake_quant` is the kernel path alone (None
when a layout is not covered).

Covered, for float32/float16/bfloat16 inputs of any rank:

* single-level formats (INT, FP8, FP6, FP4 elements): per tensor, per
  channel (one axis or adjacent axes), blocks along the last dim (static
  per-block amax or computed per block; a block of None is the whole row),
  2-D blocks on the last two dims; static amax or dynamic;
* two-level formats (E4M3 block scales along the last dim, NVFP4): global
  amax given (block amaxes from the data), static per-block amaxes with or
  without `global_amax`, or no amax (one reduction for the global amax);
* MX formats (E8M0 block scales along the last dim).

Launch parameters are built once per (format, shape, dtype, amax layout) and
cached; the CUDA path does no host synchronisation (except the reference's
check that an unsigned format sees no negative input).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch

from . import interpret_mode, triton_available, use_triton
from ..quantization.formats.elements import E4M3, E8M0, IntFormat
from ..quantization.formats.schemes import QuantFormat
from ..quantization.formats.schemes import fake_quant as reference_fake_quant

__all__ = ["fake_quant", "triton_fake_quant", "clear_cache"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Launch shapes (elements per program), chosen from sweeps on an H200 (benchmarks/fake_quant.py --sweep).
TILE = 8192
"""Elements per program of the row/column kernels (single-level and MX formats)."""
FLAT_TILE = 8192
"""Elements per program for per-tensor scales."""
MAX_ROW = 16384
"""Longest row (block) reduced in registers; longer ones loop over chunks of LOOP_CHUNK."""
LOOP_CHUNK = 4096
TILE_2D = 16384
"""Largest 2-D block handled by one tile."""
COL_TILE = 256
"""Columns per program for per-column scales."""
COL_ITERS = 16
MIN_PROGRAMS = 1024
"""Per-column scales: programs loop over up to COL_ITERS row tiles while at least this many remain."""
FAST_DIV = True
"""Two-level formats: x / scale from a correctly rounded reciprocal refined once (exact), not div.rn."""
WARPS_BIG = 8
"""Warps per program for tiles of more than 2048 elements."""
TILE_2D_DYN = 16384
"""Dynamic 2-D blocks larger than this are reduced and quantized in two passes over sub-tiles of this size."""
TILE_TWO_LEVEL = 4096
"""Elements per program of two-level formats (NVFP4), which do more arithmetic per element."""

_PLANS: Dict[tuple, Optional[Callable]] = {}


def clear_cache() -> None:
    """Forget the cached launch plans (after changing the tuning constants above)."""
    _PLANS.clear()


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _rcp32(v: float) -> float:
    """RN(1 / v) in float32 (one IEEE float32 division)."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(v, dtype=torch.float32))


def _elem_consts(elem) -> dict:
    if isinstance(elem, IntFormat):
        return dict(IS_INT=True, SYM=elem.qmin_code == -elem.qmax_code, LO=float(elem.qmin_code),
                    HI=float(elem.qmax_code), FSCALE=float(2.0**elem.frac_bits), MINNORM=0.0, INV_C=0,
                    UNSCALE=float(2.0**-elem.frac_bits), MAGIC=0.0)
    inv_c = (254 + elem.mbits) << 23
    if inv_c >= 2**31:
        inv_c -= 2**32  # int32 bit pattern; the kernel's int32 subtraction wraps back
    return dict(IS_INT=False, SYM=True, LO=-float(elem.max_value), HI=float(elem.max_value), FSCALE=1.0,
                MINNORM=float(2.0**elem.min_exp), INV_C=inv_c, UNSCALE=float(2.0**-elem.mbits),
                MAGIC=1.5 * 2.0 ** (23 - elem.mbits))


def _f32(t: torch.Tensor) -> torch.Tensor:
    if t.dtype is not torch.float32 or not t.is_contiguous():
        t = t.float().contiguous()
    return t


class _Launch:
    """One kernel with a fixed grid and constexprs (built once per plan)."""

    __slots__ = ("kernel", "grid", "kwargs")

    def __init__(self, kernel, grid, kwargs: dict):
        self.kernel, self.grid, self.kwargs = kernel, grid, kwargs

    def __call__(self, *args):
        self.kernel[self.grid](*args, **self.kwargs)


def _warps(elements: int) -> int:
    return 4 if elements <= 2048 else WARPS_BIG


class _Ctx:
    """What a plan needs besides the shapes: the kernels module and shared constexprs."""

    def __init__(self, fmt: QuantFormat):
        from . import fq_triton

        self.k = fq_triton
        self.elem = fmt.element
        self.qmaxv = float(fmt.element.max_value)
        self.consts = dict(_elem_consts(fmt.element), QMAXV=self.qmaxv, RQ=_rcp32(self.qmaxv))
        self.interp = interpret_mode()


def _amax_flat_fn(k, n: int):
    """A function x -> float32 [1] tensor holding abs-max(x) (NaN if any), on the device without a sync."""
    block = 4096
    nprog = max(1, min(triton_cdiv(n, block), 1024))
    launch = _Launch(k._amax_flat_kernel, (nprog,), dict(BLOCK=block, BIG=n + block * nprog >= 2**31, num_warps=8))

    def amax_fn(x, *unused):
        buf = torch.zeros(1, dtype=torch.int32, device=x.device)
        launch(x, buf, n, nprog)
        return buf.view(torch.float32)

    return amax_fn


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rows_plan(c: _Ctx, R: int, L: int, *, src: int, kind: int, C: int = 1, row_mod: bool = False,
               ragged: bool = False, rowlen: int = 0, nb: int = 1, bound: float = 0.0, emax: int = 0,
               amax_fn=None, g_fn=None) -> Optional[Callable]:
    """A launcher of `_fq_rows_kernel` on a [R, L] view (see the kernel for src/kind)."""
    if R >= 2**31 - TILE or L >= 2**31 - TILE:
        return None
    loop, iters = False, 1
    tile = TILE_TWO_LEVEL if kind == 1 else TILE
    if src == 3:
        lp = _np2(L)
        if lp > MAX_ROW:
            loop, bl, br = True, LOOP_CHUNK, 1
        else:
            bl, br = lp, max(1, min(tile // lp, _np2(R)))
        ncb = 1
    elif R == 1:
        bl, br = min(FLAT_TILE, _np2(L)), 1
        ncb = triton_cdiv(L, bl)
    else:
        bl = min(_np2(L), tile if src == 1 else COL_TILE)
        br = max(1, min(tile // bl, _np2(R)))
        ncb = triton_cdiv(L, bl)
        if src == 2:  # per-column scales are computed once per program, which loops over row tiles
            iters = max(1, min(COL_ITERS, triton_cdiv(R, br) * ncb // MIN_PROGRAMS))
    row_tiles = triton_cdiv(R, br * iters)
    grid = (row_tiles * ncb,)
    consts = dict(c.consts, BR=br, BL=bl, SRC=src, ITERS=iters, ROW_MOD=row_mod, RAGGED=ragged,
                  EVEN_L=(not ragged and not loop and L % bl == 0), EVEN_R=R % (br * iters) == 0, LOOP=loop,
                  BIG=(ncb * bl >= 2**31 - bl), KIND=kind, BOUND=bound, EMAX=emax,
                  FAST_DIV=FAST_DIV and kind == 1, INTERP=c.interp, num_warps=_warps(br * bl),
                  enable_fp_fusion=False)
    consts["MAGIC_PATH"] = consts["FAST_DIV"] and consts["SYM"] and not consts["IS_INT"]
    consts["POS"] = consts["MAGIC_PATH"] and src == 3
    launch = _Launch(c.k._fq_rows_kernel, grid, consts)
    args = (R, L, C, nb, rowlen, ncb)

    def run(x, amax, g):
        y = torch.empty_like(x)
        a = amax_fn(x, amax) if amax_fn is not None else x
        gg = g_fn(x, amax, g) if g_fn is not None else x
        launch(x, y, a, gg, *args)
        return y

    return run


def _block_rows_plan(c: _Ctx, R: int, N: int, B: int, *, src: int, kind: int, **kw) -> Optional[Callable]:
    """Blocks of B along rows of N elements: one row of the rows kernel per block."""
    return _rows_plan(c, R * triton_cdiv(N, B), B, src=src, kind=kind, ragged=N % B != 0, rowlen=N,
                      nb=triton_cdiv(N, B), **kw)


def _blocks2d_plan(c: _Ctx, batch: int, M: int, N: int, B2: int, B1: int, dyn: bool) -> Optional[Callable]:
    nbm, nbn = triton_cdiv(M, B2), triton_cdiv(N, B1)
    tm, tn = _np2(B2), _np2(B1)
    single = tm * tn <= (TILE_2D_DYN if dyn else TILE_2D)
    if not single:
        tn = min(tn, 2048)
        tm = max(1, min(tm, (TILE_2D_DYN if dyn else 8192) // tn))
    nblocks = batch * nbm * nbn
    if nblocks >= 2**31:
        return None
    even = single and tm == B2 and tn == B1 and M % B2 == 0 and N % B1 == 0
    consts = dict(c.consts, TM=tm, TN=tn, DYN=dyn, SINGLE=single, EVEN=even, INTERP=c.interp,
                  num_warps=_warps(tm * tn), enable_fp_fusion=False)
    consts.pop("MAGIC")
    launch = _Launch(c.k._fq_blocks2d_kernel, (nblocks,), consts)
    args = (M, N, nbm, nbn, B2, B1)

    def run(x, amax, g):
        y = torch.empty_like(x)
        launch(x, y, x if dyn else _f32(amax), *args)
        return y

    return run


def _channel_amax_fn(c: _Ctx, R: int, L: int, C: int, per_col: bool, row_mod: bool):
    bl = min(_np2(L), 1024)
    br = max(1, min(4096 // bl, _np2(R)))
    ncb = triton_cdiv(L, bl)
    grid = (triton_cdiv(R, br) * ncb,)
    launch = _Launch(c.k._amax_rows_kernel, grid, dict(BR=br, BL=bl, PER_COL=per_col, ROW_MOD=row_mod, num_warps=4))

    def amax_fn(x, amax):
        buf = torch.zeros(C, dtype=torch.int32, device=x.device)
        launch(x, buf, R, L, C, ncb)
        return buf.view(torch.float32)

    return amax_fn


def _static_amax(x, amax):
    return _f32(amax)


def _flat_plan(c: _Ctx, numel: int, dyn: bool):
    return _rows_plan(c, 1, numel, src=0, kind=0, amax_fn=_amax_flat_fn(c.k, numel) if dyn else _static_amax)


def _norm_axes(axes, nd: int):
    out = set()
    for a in axes:
        if not -nd <= a < nd:
            return None
        out.add(a % nd)
    return sorted(out)


def _build(fmt: QuantFormat, shape, a_n: Optional[int], g_n: Optional[int]) -> Optional[Callable]:
    nd = len(shape)
    numel = math.prod(shape)
    if numel == 0 or a_n == 0:
        return None
    c = _Ctx(fmt)
    if fmt.scale is not E4M3 and g_n is not None:
        return None  # the reference says global_amax is for two-level formats only
    blocks = None
    if fmt.block_sizes:
        if nd == 0:
            return None
        blocks = {}
        for k_, v in fmt.block_sizes:
            ax = _norm_axes((k_,), nd)
            if ax is None or ax[0] in blocks:
                return None
            size = shape[ax[0]] if v is None else int(v)
            if size <= 0:
                return None
            blocks[ax[0]] = size
    last = nd - 1

    if fmt.scale is None:
        if blocks is None:
            if fmt.axis is None:
                return _flat_plan(c, numel, a_n is None) if a_n in (None, 1) else None
            axes = _norm_axes(fmt.axis, nd)
            if axes is None or axes != list(range(axes[0], axes[-1] + 1)):
                return None
            C = math.prod(shape[axes[0]:axes[-1] + 1])
            outer, inner = math.prod(shape[:axes[0]]), math.prod(shape[axes[-1] + 1:])
            if a_n == 1:
                return _flat_plan(c, numel, False)
            if a_n not in (None, C):
                return None
            per_col = inner == 1
            R, L = (outer, C) if per_col else (outer * C, inner)
            row_mod = not per_col and outer > 1
            amax_fn = _channel_amax_fn(c, R, L, C, per_col, row_mod) if a_n is None else _static_amax
            return _rows_plan(c, R, L, src=2 if per_col else 1, kind=0, C=C, row_mod=row_mod, amax_fn=amax_fn)
        if set(blocks) == {last}:
            N, B = shape[last], blocks[last]
            R = numel // N
            nb = triton_cdiv(N, B)
            if a_n not in (None, R * nb):  # (the reference broadcasts no single amax over several blocks)
                return None
            return _block_rows_plan(c, R, N, B, src=3 if a_n is None else 1, kind=0,
                                    amax_fn=None if a_n is None else _static_amax)
        if nd >= 2 and set(blocks) == {last, last - 1}:
            M, N = shape[last - 1], shape[last]
            B2, B1 = blocks[last - 1], blocks[last]
            nblocks = (numel // (M * N)) * triton_cdiv(M, B2) * triton_cdiv(N, B1)
            if a_n not in (None, nblocks):
                return None
            return _blocks2d_plan(c, numel // (M * N), M, N, B2, B1, a_n is None)
        return None

    if blocks is None or set(blocks) != {last}:
        return None
    N, B = shape[last], blocks[last]
    R = numel // N
    nb = triton_cdiv(N, B)
    if fmt.scale is E8M0:
        return _block_rows_plan(c, R, N, B, src=3, kind=2, emax=fmt.element.emax)

    # two-level (E4M3 block scales)
    bound = float(E4M3.max_value if fmt.global_fp8 else c.qmaxv * E4M3.max_value)
    if g_n not in (None, 1):
        return None
    k = c.k
    if a_n is not None and a_n > 1:  # static per-block amaxes
        if a_n != R * nb:
            return None
        g_fn = (lambda x, amax, g: _f32(g)) if g_n is not None else (lambda x, amax, g: amax.float().amax())
        return _block_rows_plan(c, R, N, B, src=1, kind=1, bound=bound, amax_fn=_static_amax, g_fn=g_fn)
    if g_n is not None:
        g_fn = lambda x, amax, g: _f32(g)  # noqa: E731
    elif a_n == 1:
        g_fn = lambda x, amax, g: _f32(amax)  # noqa: E731
    else:
        g_fn = _amax_flat_fn(k, R * N)
    return _block_rows_plan(c, R, N, B, src=3, kind=1, bound=bound, g_fn=g_fn)


def triton_fake_quant(x: torch.Tensor, fmt: QuantFormat, amax: Optional[torch.Tensor] = None,
                      global_amax: Optional[torch.Tensor] = None, *, cache_key=None) -> Optional[torch.Tensor]:
    """`formats.fake_quant` by the Triton kernels; None when the layout is not covered.

    Runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1). `cache_key`
    (e.g. the op's format spec string) replaces `fmt` in the plan cache key.
    """
    if x.dtype not in _DTYPES or not triton_available():
        return None
    dev = x.device
    if dev.type != "cuda" and not interpret_mode():
        return None
    if (amax is not None and amax.device != dev) or (global_amax is not None and global_amax.device != dev):
        return None
    key = (fmt if cache_key is None else cache_key, x.shape, x.dtype,
           None if amax is None else amax.numel(), None if global_amax is None else global_amax.numel())
    plan = _PLANS.get(key, _PLANS)
    if plan is _PLANS:
        plan = _PLANS[key] = _build(fmt, tuple(x.shape), key[3], key[4])
    if plan is None:
        return None
    if isinstance(fmt.element, IntFormat) and fmt.element.unsigned and bool((x < 0).any()):
        return None  # the reference raises its error
    if not x.is_contiguous():
        x = x.contiguous()
    if dev.type == "cuda" and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            return plan(x, amax, global_amax)
    return plan(x, amax, global_amax)


def fake_quant(x: torch.Tensor, fmt: QuantFormat, amax: Optional[torch.Tensor] = None,
               global_amax: Optional[torch.Tensor] = None, *, cache_key=None) -> torch.Tensor:
    """Quantize then dequantize `x` (see `formats.fake_quant`): Triton on CUDA when covered, else the reference."""
    if use_triton(x):
        y = triton_fake_quant(x, fmt, amax, global_amax, cache_key=cache_key)
        if y is not None:
            return y
    return reference_fake_quant(x, fmt, amax, global_amax)
