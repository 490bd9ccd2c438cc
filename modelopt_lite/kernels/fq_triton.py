"""Triton kernels of fused fake quantization (the dispatcher is `fake_quant.py`).

Every kernel reads its input once (the dynamic per-tensor / per-channel
amax kernels read it once more, first), derives the scales from a stored
amax, a reduction buffer or the block in registers, rounds with the device
functions of `fq_numerics` and writes the result in the input's dtype.

Element constexprs shared by the kernels: IS_INT, SYM (grid symmetric about
0), LO/HI (saturation bounds), FSCALE (2**frac_bits), MINNORM (float min
normal), INV_C and MAGIC (float rounding constants), UNSCALE (see
`fq_numerics`).
"""

import triton
import triton.language as tl

from .fq_numerics import (
    _absmax_all,
    _absmax_rows,
    _fq_tiny,
    _fq_values,
    _global_scale,
    _ld,
    _maxnan,
    _mx_scales,
    _single_scales,
    _st,
    _to_out,
    _two_level_scales,
)


@triton.jit
def _row_scales(am, s2, rden, KIND: tl.constexpr, QMAXV: tl.constexpr, RQ: tl.constexpr, UNSCALE: tl.constexpr,
                EMAX: tl.constexpr, FAST_DIV: tl.constexpr, POS: tl.constexpr, MAGIC_PATH: tl.constexpr,
                INTERP: tl.constexpr):
    """(mul, eff, deq) of a scale kind from amax values (any shape)."""
    if KIND == 0:
        mul, deq = _single_scales(am, QMAXV, RQ, UNSCALE)
        eff = deq
    elif KIND == 1:
        mul, eff, deq = _two_level_scales(am, s2, rden, QMAXV, UNSCALE, FAST_DIV, POS, MAGIC_PATH, INTERP)
    else:
        mul, deq = _mx_scales(am, EMAX, UNSCALE)
        eff = deq
    return mul, eff, deq


@triton.jit
def _fq_out(x, mul, eff, deq, tiny, y_ptr, KIND: tl.constexpr, FAST_DIV: tl.constexpr, POS: tl.constexpr,
            SYM: tl.constexpr, IS_INT: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, FSCALE: tl.constexpr,
            MINNORM: tl.constexpr, INV_C: tl.constexpr, MAGIC: tl.constexpr, INTERP: tl.constexpr):
    """Fake-quantized values in the output dtype (two-level: a uniform branch on the tiny flag)."""
    if KIND == 1:
        if tiny:
            out = _fq_tiny(x, eff)
        else:
            out = _fq_values(x, mul, eff, deq, KIND, FAST_DIV, POS, SYM, IS_INT, LO, HI, FSCALE, MINNORM, INV_C,
                             MAGIC, INTERP)
    else:
        out = _fq_values(x, mul, eff, deq, KIND, FAST_DIV, POS, SYM, IS_INT, LO, HI, FSCALE, MINNORM, INV_C, MAGIC,
                         INTERP)
    return _to_out(out, y_ptr, INTERP)


@triton.jit
def _fq_rows_kernel(x_ptr, y_ptr, a_ptr, g_ptr, R, L, C, NB, ROWLEN, NCB,
                    BR: tl.constexpr, BL: tl.constexpr, SRC: tl.constexpr, ITERS: tl.constexpr,
                    ROW_MOD: tl.constexpr, RAGGED: tl.constexpr, EVEN_L: tl.constexpr, EVEN_R: tl.constexpr,
                    LOOP: tl.constexpr, BIG: tl.constexpr, KIND: tl.constexpr, QMAXV: tl.constexpr,
                    RQ: tl.constexpr, BOUND: tl.constexpr, EMAX: tl.constexpr, FAST_DIV: tl.constexpr,
                    POS: tl.constexpr, MAGIC_PATH: tl.constexpr, IS_INT: tl.constexpr, SYM: tl.constexpr,
                    LO: tl.constexpr, HI: tl.constexpr,
                    FSCALE: tl.constexpr, MINNORM: tl.constexpr, INV_C: tl.constexpr, UNSCALE: tl.constexpr,
                    MAGIC: tl.constexpr, INTERP: tl.constexpr):
    """Fake quantization of a [R, L] view with one scale per row, per column or per tensor.

    SRC 0: one amax at a_ptr; 1: per row (index row % C when ROW_MOD); 2: per column (each
    program loops over ITERS tiles of rows); 3: per row from the data (dynamic blocks, per token,
    MX, NVFP4): whole rows in one tile or, with LOOP, two passes over chunks. RAGGED rows are the
    blocks of L elements of rows of ROWLEN elements (NB blocks each, the last one short).
    KIND 0: single level; 1: two-level (E4M3 block scales, global amax at g_ptr); 2: MX (E8M0).
    POS: two-level with block amaxes from the data, a float element and FAST_DIV; MAGIC_PATH: two-level
    with FAST_DIV, a float element and a symmetric grid (see `_fq_values`, `_two_level_scales`).
    """
    pid = tl.program_id(0)
    pr = pid // NCB
    pc = pid - pr * NCB
    cols = tl.arange(0, BL)
    if BIG:
        c0 = pc.to(tl.int64) * BL
    else:
        c0 = pc * BL
    cc = c0 + cols[None, :]

    tiny = pid < 0
    s2 = tl.full([1, 1], 1.0, tl.float32)
    rden = s2
    if KIND == 1:
        s2, rden, tiny = _global_scale(g_ptr, QMAXV, BOUND)

    if SRC == 2:
        a = tl.load(a_ptr + cc, mask=cc < L, other=1.0)
        mul, eff, deq = _row_scales(a, s2, rden, 0, QMAXV, RQ, UNSCALE, EMAX, FAST_DIV, POS, False, INTERP)
        for it in range(ITERS):
            rows = (pr * ITERS + it) * BR + tl.arange(0, BR)
            rmask = (rows < R)[:, None]
            ptrs = rows.to(tl.int64)[:, None] * L + cc
            x = _ld(x_ptr + ptrs, rmask, cc < L, EVEN_L, EVEN_R)
            out = _fq_out(x, mul, eff, deq, tiny, y_ptr, 0, False, False, SYM, IS_INT, LO, HI, FSCALE, MINNORM,
                          INV_C, MAGIC, INTERP)
            _st(y_ptr + ptrs, out, rmask, cc < L, EVEN_L, EVEN_R)
    else:
        rows = pr * BR + tl.arange(0, BR)
        rmask = (rows < R)[:, None]
        if RAGGED:
            blk = rows % NB
            base = (rows // NB).to(tl.int64) * ROWLEN + blk.to(tl.int64) * L
            cmask = cc < tl.minimum(ROWLEN - blk * L, L)[:, None]
        else:
            base = rows.to(tl.int64) * L
            cmask = cc < L
        ptrs = base[:, None] + cc
        if SRC == 3:
            if LOOP:
                acc = tl.zeros([BR, BL], tl.float32)
                for start in range(0, L, BL):
                    xv = _ld(x_ptr + (ptrs + start), rmask, cmask & (cc + start < L), False, False)
                    acc = _maxnan(acc, tl.abs(xv))
                am = _absmax_rows(acc)
            else:
                x = _ld(x_ptr + ptrs, rmask, cmask, EVEN_L, EVEN_R)
                am = _absmax_rows(x)
        elif SRC == 0:
            am = tl.load(a_ptr + tl.zeros([1, 1], tl.int32))
        else:
            if ROW_MOD:
                ridx = rows % C
            else:
                ridx = rows
            am = tl.load(a_ptr + ridx, mask=rows < R, other=1.0)[:, None]
        mul, eff, deq = _row_scales(am, s2, rden, KIND, QMAXV, RQ, UNSCALE, EMAX, FAST_DIV, POS, MAGIC_PATH, INTERP)
        if LOOP:
            for start in range(0, L, BL):
                m2 = cmask & (cc + start < L)
                x = _ld(x_ptr + (ptrs + start), rmask, m2, False, False)
                out = _fq_out(x, mul, eff, deq, tiny, y_ptr, KIND, FAST_DIV, POS, SYM, IS_INT, LO, HI, FSCALE,
                              MINNORM, INV_C, MAGIC, INTERP)
                _st(y_ptr + (ptrs + start), out, rmask, m2, False, False)
        else:
            if SRC != 3:
                x = _ld(x_ptr + ptrs, rmask, cmask, EVEN_L, EVEN_R)
            out = _fq_out(x, mul, eff, deq, tiny, y_ptr, KIND, FAST_DIV, POS, SYM, IS_INT, LO, HI, FSCALE, MINNORM,
                          INV_C, MAGIC, INTERP)
            _st(y_ptr + ptrs, out, rmask, cmask, EVEN_L, EVEN_R)


@triton.jit
def _fq_blocks2d_kernel(x_ptr, y_ptr, a_ptr, M, N, NBM, NBN, BM, BN,
                        TM: tl.constexpr, TN: tl.constexpr, DYN: tl.constexpr, SINGLE: tl.constexpr,
                        EVEN: tl.constexpr, QMAXV: tl.constexpr, RQ: tl.constexpr, IS_INT: tl.constexpr,
                        SYM: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, FSCALE: tl.constexpr,
                        MINNORM: tl.constexpr, INV_C: tl.constexpr, UNSCALE: tl.constexpr, INTERP: tl.constexpr):
    """Single-level fake quantization with one scale per BM x BN block of the last two dims of a
    [batch, M, N] view; one program per block (index = pid), amax stored (a_ptr) or from the data (DYN).
    SINGLE: the block fits one TM x TN tile; else loops over tiles (twice when DYN)."""
    pid = tl.program_id(0)
    pj = pid % NBN
    t = pid // NBN
    pi = t % NBM
    b = t // NBM
    row0 = pi * BM
    col0 = pj * BN
    rlim = tl.minimum(M - row0, BM)
    clim = tl.minimum(N - col0, BN)
    base = (b.to(tl.int64) * M + row0) * N + col0
    rr = tl.arange(0, TM)[:, None]
    cc = tl.arange(0, TN)[None, :]
    if SINGLE:
        m = (rr < rlim) & (cc < clim)
        offs = base + rr.to(tl.int64) * N + cc
        x = _ld(x_ptr + offs, m, m, EVEN, True)
        if DYN:
            am = _absmax_all(x)
        else:
            am = tl.load(a_ptr + pid + tl.zeros([1, 1], tl.int32))
        mul, deq = _single_scales(am, QMAXV, RQ, UNSCALE)
        out = _fq_values(x, mul, deq, deq, 0, False, False, SYM, IS_INT, LO, HI, FSCALE, MINNORM, INV_C, 0.0, INTERP)
        _st(y_ptr + offs, _to_out(out, y_ptr, INTERP), m, m, EVEN, True)
    else:
        if DYN:
            acc = tl.zeros([TM, TN], tl.float32)
            for r0 in range(0, rlim, TM):
                for k0 in range(0, clim, TN):
                    m = (r0 + rr < rlim) & (k0 + cc < clim)
                    offs = base + (r0 + rr).to(tl.int64) * N + (k0 + cc)
                    acc = _maxnan(acc, tl.abs(_ld(x_ptr + offs, m, m, False, False)))
            am = _absmax_all(acc)
        else:
            am = tl.load(a_ptr + pid + tl.zeros([1, 1], tl.int32))
        mul, deq = _single_scales(am, QMAXV, RQ, UNSCALE)
        for r0 in range(0, rlim, TM):
            for k0 in range(0, clim, TN):
                m = (r0 + rr < rlim) & (k0 + cc < clim)
                offs = base + (r0 + rr).to(tl.int64) * N + (k0 + cc)
                x = _ld(x_ptr + offs, m, m, False, False)
                out = _fq_values(x, mul, deq, deq, 0, False, False, SYM, IS_INT, LO, HI, FSCALE, MINNORM, INV_C, 0.0,
                                 INTERP)
                _st(y_ptr + offs, _to_out(out, y_ptr, INTERP), m, m, False, False)


@triton.jit
def _amax_flat_kernel(x_ptr, out_ptr, N, NPROG, BLOCK: tl.constexpr, BIG: tl.constexpr):
    """out_ptr[0] (int32 bits of a float32 >= 0, NaN above inf) = max(itself, abs-max of N elements)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    if BIG:
        start0 = pid.to(tl.int64) * BLOCK
        step = NPROG.to(tl.int64) * BLOCK
    else:
        start0 = pid * BLOCK
        step = NPROG * BLOCK
    for start in range(start0, N, step):
        o = start + offs
        acc = _maxnan(acc, tl.abs(tl.load(x_ptr + o, mask=o < N, other=0.0).to(tl.float32)))
    tl.atomic_max(out_ptr, tl.reduce(acc, 0, _maxnan).to(tl.int32, bitcast=True))


@triton.jit
def _amax_rows_kernel(x_ptr, out_ptr, R, L, C, NCB, BR: tl.constexpr, BL: tl.constexpr, PER_COL: tl.constexpr,
                      ROW_MOD: tl.constexpr):
    """Per-channel abs-max of a [R, L] view into int32 bits: per row (index row % C when ROW_MOD) or per column."""
    pid = tl.program_id(0)
    pr = pid // NCB
    pc = pid - pr * NCB
    rows = pr * BR + tl.arange(0, BR)
    cols = pc * BL + tl.arange(0, BL)
    m = (rows < R)[:, None] & (cols < L)[None, :]
    xv = tl.load(x_ptr + (rows.to(tl.int64)[:, None] * L + cols[None, :]), mask=m, other=0.0).to(tl.float32)
    if PER_COL:
        tl.atomic_max(out_ptr + cols, tl.reduce(tl.abs(xv), 0, _maxnan).to(tl.int32, bitcast=True), mask=cols < L)
    else:
        if ROW_MOD:
            idx = rows % C
        else:
            idx = rows
        tl.atomic_max(out_ptr + idx, tl.reduce(tl.abs(xv), 1, _maxnan).to(tl.int32, bitcast=True), mask=rows < R)
