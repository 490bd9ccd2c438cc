"""Triton device functions of fused fake quantization: rounding, scales, exact division.

Numerics follow `modelopt_lite.quantization.formats` bit for bit:

* divisions the reference writes with `/` are correctly rounded: `div_rn`,
  or a correctly rounded reciprocal followed by one Markstein correction
  (exact in the range where the result matters); divisions by powers of
  two are multiplications by the exact reciprocal;
* float rounding takes the binade from the float32 exponent bits, clamps
  it to the format's smallest normal binade and rounds half to even
  (`libdevice.rint`; under the interpreter, which has no libdevice, the
  1.5 * 2**23 addition trick with the sign of zero restored);
* clamps and amax reductions propagate NaN (as torch.clamp / torch.amax).

Rounded element values come back multiplied by 1 / UNSCALE (2**mbits for
floats, 2**frac_bits for fixed point): callers fold UNSCALE into the
dequantization scale, which changes no product (powers of two).
"""

import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # older layouts
    from triton.language.extra.cuda import libdevice

TINY: tl.constexpr = tl.constexpr(2.0**-24)
E4M3_INV_C: tl.constexpr = tl.constexpr(((254 + 3) << 23) - 2**32)


@triton.jit
def _rint(v, INTERP: tl.constexpr):
    """Round to the nearest integer, ties to even, sign of zero kept (|v| <= 2**22 under INTERP)."""
    if INTERP:
        r = (v + 12582912.0) - 12582912.0
        sign = v.to(tl.int32, bitcast=True) & -2147483648
        r = (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    else:
        r = libdevice.rint(v)
    return r


@triton.jit
def _clamp(y, LO: tl.constexpr, HI: tl.constexpr):
    return tl.minimum(tl.maximum(y, LO, propagate_nan=tl.PropagateNan.ALL), HI, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _maxnan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _absmax_rows(x):
    """Per-row abs-max of a 2-D tile as [rows, 1] (NaN if the row has one)."""
    return tl.reduce(tl.abs(x), 1, _maxnan)[:, None]


@triton.jit
def _absmax_all(x):
    """Abs-max of a whole 2-D tile as [1, 1]."""
    return tl.reduce(tl.reduce(tl.abs(x), 1, _maxnan), 0, _maxnan) + tl.zeros([1, 1], tl.float32)


@triton.jit
def _round_elem(y, IS_INT: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, FSCALE: tl.constexpr,
                MINNORM: tl.constexpr, INV_C: tl.constexpr, INTERP: tl.constexpr):
    """IntFormat / FloatFormat round of float32 `y`, returned times 1 / UNSCALE (exact).

    Floats: saturate, p = 2**max(floor(log2|y|), min_exp) from the exponent bits (inf for NaN),
    rint(y * 2**mbits / p) * p. Integers: rint(clamp(y * 2**frac)); clamping to integer bounds
    first rounds the same as the reference's round-then-clamp.
    """
    if IS_INT:
        if FSCALE != 1.0:
            y = y * FSCALE
        r = _rint(_clamp(y, LO, HI), INTERP)
    else:
        y = _clamp(y, LO, HI)
        p = tl.maximum((y.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True), MINNORM)
        inv = (-(p.to(tl.int32, bitcast=True) - INV_C)).to(tl.float32, bitcast=True)  # 2**mbits / p (int32 wraps)
        r = _rint(y * inv, INTERP) * p
    return r


@triton.jit
def _round_e4m3(v, INTERP: tl.constexpr):
    """E4M3.round(v) (the true grid value)."""
    return _round_elem(v, False, -448.0, 448.0, 1.0, 0.015625, E4M3_INV_C, INTERP) * 0.125


@triton.jit
def _round_pos(q, MINNORM: tl.constexpr, MAGIC: tl.constexpr):
    """FloatFormat.round of q in [0, max] (or NaN), as the true grid value: with the quantum
    p * 2**-mbits of q's binade (p = 2**max(floor(log2 q), min_exp)), c = 1.5 * 2**23 * quantum has
    that quantum as its ulp, so (q + c) - c rounds q half to even onto the grid, exactly
    (MAGIC = 1.5 * 2**(23 - mbits)). Zero stays +0."""
    p = tl.maximum((q.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True), MINNORM)
    c = p * MAGIC
    return (q + c) - c


@triton.jit
def _pow2(k):
    """2**k as float32 for int32 k in [-127, 127] (2**-127 is subnormal)."""
    return tl.where(k > -127, (k + 127) << 23, 4194304).to(tl.float32, bitcast=True)


@triton.jit
def _div_guarded(x, d, rcp):
    """x / d correctly rounded from rcp = RN(1 / d): one Markstein correction. Quotients too small or
    too large for it (|q| <= 2**-100, >= 2**100, inf, NaN: they round to zero or saturate anyway,
    with the sign of x) keep x * rcp."""
    q0 = x * rcp
    q1 = tl.fma(tl.fma(-q0, d, x), rcp, q0)
    a = tl.abs(q0)
    return tl.where((a > 7.888609052210118e-31) & (a < 1.2676506002282294e30), q1, q0)


@triton.jit
def _single_scales(a, QMAXV: tl.constexpr, RQ: tl.constexpr, UNSCALE: tl.constexpr):
    """Multiplier qmax / amax and dequant scale (amax / qmax) * UNSCALE, both 0 for a tiny amax.

    amax / qmax is exact from RQ = RN(1 / qmax) and one correction (the quotient is a normal
    number for any amax above TINY; an infinite amax gives NaN instead of inf, which the
    product with round(x * 0) turns into the same NaN)."""
    tiny = a <= TINY
    mul = tl.where(tiny, 0.0, tl.math.div_rn(tl.full(a.shape, QMAXV, tl.float32), a))
    q0 = a * RQ
    deq = tl.fma(tl.fma(-q0, QMAXV, a), RQ, q0)
    return mul, tl.where(tiny, 0.0, deq) * UNSCALE


@triton.jit
def _mx_scales(am, EMAX: tl.constexpr, UNSCALE: tl.constexpr):
    """E8M0 scale X = 2**clamp(floor(log2 amax) - emax, -127, 127) (1 for amax 0, NaN for inf/NaN):
    returns (1 / X, X * UNSCALE)."""
    ab = am.to(tl.int32, bitcast=True)
    eb = ab >> 23
    k = tl.minimum(tl.maximum(eb - (127 + EMAX), -127), 127)
    k = tl.where(ab == 0, 0, k)
    nan = (ab | 0x7FC00000).to(tl.float32, bitcast=True)
    bad = eb == 255
    return tl.where(bad, nan, _pow2(-k)), tl.where(bad, nan, _pow2(k)) * UNSCALE


@triton.jit
def _global_scale(g_ptr, QMAXV: tl.constexpr, BOUND: tl.constexpr):
    """Two-level: s2 = gamax / bound (1 for a tiny gamax) and RN(1 / (qmax * s2)), as [1, 1], and
    the scalar tiny flag."""
    gam = tl.load(g_ptr)
    tiny = gam <= TINY
    g2 = gam + tl.zeros([1, 1], tl.float32)
    s2 = tl.where(g2 <= TINY, 1.0, tl.math.div_rn(g2, tl.full([1, 1], BOUND, tl.float32)))
    rden = tl.math.div_rn(tl.full([1, 1], 1.0, tl.float32), QMAXV * s2)
    return s2, rden, tiny


@triton.jit
def _two_level_scales(bamax, s2, rden, QMAXV: tl.constexpr, UNSCALE: tl.constexpr, FAST_DIV: tl.constexpr,
                      POS: tl.constexpr, MAGIC_PATH: tl.constexpr, INTERP: tl.constexpr):
    """E4M3 block scale sb = round(min(bamax / (qmax * s2), 448)) (0 -> 1) and eff = sb * s2.

    Returns (mul, eff, deq): mul = RN(1 / eff) under FAST_DIV; deq = eff on the MAGIC_PATH of
    `_fq_values` (NaN where eff is inf under POS: the reference's 0 * inf), else eff * UNSCALE.
    POS (block amaxes from the data: >= 0 or NaN): the block quotient needs no sign guards and is
    rounded with `_round_pos`."""
    den = QMAXV * s2
    if POS:
        q0 = bamax * rden
        q1 = tl.fma(tl.fma(-q0, den, bamax), rden, q0)
        v = tl.minimum(tl.where(q1 != q1, q0, q1), 448.0, propagate_nan=tl.PropagateNan.ALL)
        sb = _round_pos(v, 0.015625, 1572864.0)
    else:
        if FAST_DIV:
            v = _div_guarded(bamax, den, rden)
        else:
            v = tl.math.div_rn(bamax, den)
        sb = _round_e4m3(v, INTERP)
    sb = tl.where(sb == 0.0, 1.0, sb)
    eff = sb * s2
    if FAST_DIV:
        mul = tl.math.div_rn(tl.full(eff.shape, 1.0, tl.float32), eff)
    else:
        mul = eff
    if MAGIC_PATH:
        if POS:
            deq = tl.where(eff > 3.4028234663852886e38, eff - eff, eff)
        else:
            deq = eff
    else:
        deq = eff * UNSCALE
    return mul, eff, deq


@triton.jit
def _fq_values(x, mul, eff, deq, KIND: tl.constexpr, FAST_DIV: tl.constexpr, POS: tl.constexpr, SYM: tl.constexpr,
               IS_INT: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, FSCALE: tl.constexpr,
               MINNORM: tl.constexpr, INV_C: tl.constexpr, MAGIC: tl.constexpr, INTERP: tl.constexpr):
    """Fake-quantized float32 values (two-level: for a global amax above TINY, see `_fq_tiny`).

    KIND 0 (single level) and 2 (MX): round(x * mul) * deq. KIND 1 (two-level): round(x / eff) * deq.
    With FAST_DIV and a symmetric grid the quotient is taken of |x| (no cancellation to a zero of
    the wrong sign) and the sign of x is put back at the end (the reference's result always has
    the sign of x); float elements are then rounded with `_round_pos`. An infinite x makes the
    correction NaN: POS (block amaxes from the data, so a NaN x has made the whole block's scale
    NaN) saturates it with a NaN-dropping minimum; otherwise the uncorrected quotient is kept.
    """
    if KIND == 1:
        if FAST_DIV:
            if SYM:
                ax = tl.abs(x)
                q0 = ax * mul
                q1 = tl.fma(tl.fma(-q0, eff, ax), mul, q0)
                if POS:
                    q = tl.minimum(q1, HI)
                else:
                    q = tl.minimum(tl.where(q1 != q1, q0, q1), HI, propagate_nan=tl.PropagateNan.ALL)
                if IS_INT:
                    r = _round_elem(q, IS_INT, LO, HI, FSCALE, MINNORM, INV_C, INTERP) * deq
                else:
                    r = _round_pos(q, MINNORM, MAGIC) * deq
                out = (r.to(tl.int32, bitcast=True) | (x.to(tl.int32, bitcast=True) & -2147483648)).to(
                    tl.float32, bitcast=True)
            else:
                q = _round_elem(_div_guarded(x, eff, mul), IS_INT, LO, HI, FSCALE, MINNORM, INV_C, INTERP)
                out = q * deq
        else:
            out = _round_elem(tl.math.div_rn(x, eff), IS_INT, LO, HI, FSCALE, MINNORM, INV_C, INTERP) * deq
    else:
        out = _round_elem(x * mul, IS_INT, LO, HI, FSCALE, MINNORM, INV_C, INTERP) * deq
    return out


@triton.jit
def _fq_tiny(x, eff):
    """Two-level formats with a tiny global amax: the reference's (x * 0) * eff."""
    return (x * 0.0) * eff


@triton.jit
def _to_out(v, y_ptr, INTERP: tl.constexpr):
    """Cast float32 results to the output dtype, rounding to nearest even (as the GPU does; the
    interpreter's float32 -> bfloat16 cast truncates, so the bits are rounded first there)."""
    if INTERP:
        if y_ptr.dtype.element_ty == tl.bfloat16:
            b = v.to(tl.int32, bitcast=True)
            r = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
            v = tl.where(v != v, b | 0x00400000, r).to(tl.float32, bitcast=True)
    return v.to(y_ptr.dtype.element_ty)


@triton.jit
def _ld(ptrs, rmask, cmask, EVEN_L: tl.constexpr, EVEN_R: tl.constexpr):
    if EVEN_L:
        if EVEN_R:
            v = tl.load(ptrs)
        else:
            v = tl.load(ptrs, mask=rmask, other=0.0)
    else:
        v = tl.load(ptrs, mask=rmask & cmask, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _st(ptrs, v, rmask, cmask, EVEN_L: tl.constexpr, EVEN_R: tl.constexpr):
    if EVEN_L:
        if EVEN_R:
            tl.store(ptrs, v)
        else:
            tl.store(ptrs, v, mask=rmask)
    else:
        tl.store(ptrs, v, mask=rmask & cmask)
