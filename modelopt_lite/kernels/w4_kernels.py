"""Triton kernels of the 4-bit weight GEMMs (see `w4_gemm` for the API and `w4_layout` for the packing).

`_w4_mm_kernel` computes out^T = W @ x^T: the decoded weight tile is the A
operand of the tensor-core dot (N on the MMA's M side, BN rows), the
activation tile is B (M padded to BM >= 16). Decoding happens in the dot's
register layout: each packed 32-bit word becomes four bf16x2 / fp16x2
registers (one per K-slice "output" i) with one to three integer
instructions (`tl.inline_asm_elementwise`, two elements per call); the
interpreter takes plain Triton integer arithmetic instead (ASM=False).

* NVFP4: each output i of TG granules is a [BN, 16*TG] operand whose 16-wide
  K groups are E4M3 blocks; it is multiplied elementwise (bf16x2 / fp16x2)
  by the block scale, exactly (E2M1 * E4M3 fits in 6 significant bits), so
  one dot covers 16*TG rows. The global scale (and 2**8) is applied to the
  float32 result.
* INT4: the codes decode to the exact integers (bf16 128 + u minus 136);
  the float32 block scale multiplies the float32 partial sum of each block
  (the dots of one block accumulate together; the block scales are loaded
  before and applied after all dots of a granule).

Split-K (SPLIT > 1): each split writes its float32 partial tile; the last to
arrive (per-tile counter) sums them in split order, runs the epilogue and
resets the counter. `_w4_dequant_kernel` writes the dequantized weight
(bit-identical to `dequantize_w4`) for the dequantize-then-cuBLAS path.
"""

from __future__ import annotations

from . import triton_available


def _i4_asm(i: int, base: str, one: str, off: str, ty: str) -> str:
    """INT4 output i -> (nibbles of output i + base) * one + off, two 16-bit lanes (unary, so that Triton
    decodes in the dot-operand registers)."""
    ext = f"shr.b32 t, $1, {4 * i}; and.b32 t, t, 0x000F000F;" if i else "and.b32 t, $1, 0x000F000F;"
    return (f"{{.reg .b32 t, one, off; {ext} add.u32 t, t, {base}; mov.b32 one, {one}; mov.b32 off, {off}; "
            f"fma.rn.{ty} $0, t, one, off;}}")


if triton_available():
    import triton
    import triton.language as tl

    # NVFP4 output i -> bf16 bit pattern of value * 2**-126 (two per word).
    _NV_BF16_0 = tl.constexpr("and.b32 $0, $1, 0x81C081C0;")
    _NV_BF16_1 = tl.constexpr("{.reg .b32 t; shf.r.wrap.b32 t, $1, $1, 3; and.b32 $0, t, 0x81C081C0;}")
    _NV_BF16_2 = tl.constexpr("{.reg .b32 t; shf.r.wrap.b32 t, $1, $1, 6; and.b32 $0, t, 0x81C081C0;}")
    _NV_BF16_3 = tl.constexpr(
        "{.reg .b32 t; and.b32 t, $1, 0x001B001B; mul.lo.u32 t, t, 0x4108; and.b32 $0, t, 0x81C081C0;}")
    # ... -> fp16 bit pattern of value * 2**-14: magnitude moved up 3 bits (t + 7 * mag).
    _NV_F16_0 = tl.constexpr(
        "{.reg .b32 t, u; and.b32 t, $1, 0x81C081C0; and.b32 u, t, 0x01C001C0; mad.lo.u32 $0, u, 7, t;}")
    _NV_F16_1 = tl.constexpr(
        "{.reg .b32 t, u; shf.r.wrap.b32 t, $1, $1, 3; and.b32 t, t, 0x81C081C0; and.b32 u, t, 0x01C001C0; "
        "mad.lo.u32 $0, u, 7, t;}")
    _NV_F16_2 = tl.constexpr(
        "{.reg .b32 t, u; shf.r.wrap.b32 t, $1, $1, 6; and.b32 t, t, 0x81C081C0; and.b32 u, t, 0x01C001C0; "
        "mad.lo.u32 $0, u, 7, t;}")
    _NV_F16_3 = tl.constexpr(
        "{.reg .b32 t, u; and.b32 t, $1, 0x001B001B; mul.lo.u32 t, t, 0x4108; and.b32 t, t, 0x81C081C0; "
        "and.b32 u, t, 0x01C001C0; mad.lo.u32 $0, u, 7, t;}")
    # Four E5M3 scale codes (one int32) -> bf16x2 pairs (sb0, sb1), (sb2, sb3) of sb * 2**118 ...
    _NV_MULT_BF16 = tl.constexpr(
        "{.reg .b32 x, z; mov.b32 z, 0; prmt.b32 x, $2, z, 0x4140; mad.lo.u32 $0, x, 16, 0x70007000; "
        "prmt.b32 x, $2, z, 0x4342; mad.lo.u32 $1, x, 16, 0x70007000;}")
    # ... or fp16x2 pairs of sb * 2**6.
    _NV_MULT_F16 = tl.constexpr(
        "{.reg .b32 x, z; mov.b32 z, 0; prmt.b32 x, $2, z, 0x4140; shl.b32 $0, x, 7; "
        "prmt.b32 x, $2, z, 0x4342; shl.b32 $1, x, 7;}")
    # INT4 output i -> exact integer u - 8 (bf16: 128 + u - 136; fp16: 1024 + u - 1032).
    _I4_BF16_0 = tl.constexpr(_i4_asm(0, "0x43004300", "0x3F803F80", "0xC308C308", "bf16x2"))
    _I4_BF16_1 = tl.constexpr(_i4_asm(1, "0x43004300", "0x3F803F80", "0xC308C308", "bf16x2"))
    _I4_BF16_2 = tl.constexpr(_i4_asm(2, "0x43004300", "0x3F803F80", "0xC308C308", "bf16x2"))
    _I4_BF16_3 = tl.constexpr(_i4_asm(3, "0x43004300", "0x3F803F80", "0xC308C308", "bf16x2"))
    _I4_F16_0 = tl.constexpr(_i4_asm(0, "0x64006400", "0x3C003C00", "0xE408E408", "f16x2"))
    _I4_F16_1 = tl.constexpr(_i4_asm(1, "0x64006400", "0x3C003C00", "0xE408E408", "f16x2"))
    _I4_F16_2 = tl.constexpr(_i4_asm(2, "0x64006400", "0x3C003C00", "0xE408E408", "f16x2"))
    _I4_F16_3 = tl.constexpr(_i4_asm(3, "0x64006400", "0x3C003C00", "0xE408E408", "f16x2"))

    @triton.jit
    def _asm_nv_bits(w, I: tl.constexpr, F16: tl.constexpr):
        """int16 pairs (packed words) -> int16 bit patterns of output I (bf16 value * 2**-126 / fp16 * 2**-14)."""
        if F16:
            if I == 0:
                r = tl.inline_asm_elementwise(_NV_F16_0, "=r,r", [w], dtype=tl.int16, is_pure=True, pack=2)
            elif I == 1:
                r = tl.inline_asm_elementwise(_NV_F16_1, "=r,r", [w], dtype=tl.int16, is_pure=True, pack=2)
            elif I == 2:
                r = tl.inline_asm_elementwise(_NV_F16_2, "=r,r", [w], dtype=tl.int16, is_pure=True, pack=2)
            else:
                r = tl.inline_asm_elementwise(_NV_F16_3, "=r,r", [w], dtype=tl.int16, is_pure=True, pack=2)
        else:
            if I == 0:
                r = tl.inline_asm_elementwise(_NV_BF16_0, "=r,r", [w], dtype=tl.int16, is_pure=True, pack=2)
            elif I == 1:
                r = tl.inline_asm_elementwise(_NV_BF16_1, "=r,r", [w], dtype=tl.int16, is_pure=True, pack=2)
            elif I == 2:
                r = tl.inline_asm_elementwise(_NV_BF16_2, "=r,r", [w], dtype=tl.int16, is_pure=True, pack=2)
            else:
                r = tl.inline_asm_elementwise(_NV_BF16_3, "=r,r", [w], dtype=tl.int16, is_pure=True, pack=2)
        return r

    @triton.jit
    def _asm_i4(w, I: tl.constexpr, F16: tl.constexpr):
        """int16 pairs (packed words) -> output I as exact integers (code), bf16 or fp16."""
        if F16:
            if I == 0:
                r = tl.inline_asm_elementwise(_I4_F16_0, "=r,r", [w], dtype=tl.float16, is_pure=True, pack=2)
            elif I == 1:
                r = tl.inline_asm_elementwise(_I4_F16_1, "=r,r", [w], dtype=tl.float16, is_pure=True, pack=2)
            elif I == 2:
                r = tl.inline_asm_elementwise(_I4_F16_2, "=r,r", [w], dtype=tl.float16, is_pure=True, pack=2)
            else:
                r = tl.inline_asm_elementwise(_I4_F16_3, "=r,r", [w], dtype=tl.float16, is_pure=True, pack=2)
        else:
            if I == 0:
                r = tl.inline_asm_elementwise(_I4_BF16_0, "=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=2)
            elif I == 1:
                r = tl.inline_asm_elementwise(_I4_BF16_1, "=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=2)
            elif I == 2:
                r = tl.inline_asm_elementwise(_I4_BF16_2, "=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=2)
            else:
                r = tl.inline_asm_elementwise(_I4_BF16_3, "=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=2)
        return r

    # ------------------------------------------------------------------ plain-Triton decoding (interpreter)

    @triton.jit
    def _bits4(w, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr):
        return ((w >> P0) & 1) | (((w >> P1) & 1) << 1) | (((w >> P2) & 1) << 2) | (((w >> P3) & 1) << 3)

    @triton.jit
    def _plain_code(w32, par, I: tl.constexpr, KIND: tl.constexpr):
        """The 4-bit code of output I, half `par` (0/1), from the int32 word (positions of `w4_layout`)."""
        if KIND == 1:
            c = (w32 >> (4 * I + 16 * par)) & 15
        elif I == 0:
            c = tl.where(par == 0, _bits4(w32, 6, 7, 8, 15), _bits4(w32, 22, 23, 24, 31))
        elif I == 1:
            c = tl.where(par == 0, _bits4(w32, 9, 10, 11, 18), _bits4(w32, 25, 26, 27, 2))
        elif I == 2:
            c = tl.where(par == 0, _bits4(w32, 12, 13, 14, 21), _bits4(w32, 28, 29, 30, 5))
        else:
            c = tl.where(par == 0, _bits4(w32, 3, 4, 0, 1), _bits4(w32, 19, 20, 16, 17))
        return c

    @triton.jit
    def _e2m1_value(c):
        """E2M1 code -> float32 value."""
        mag = c & 7
        ex = mag >> 1
        mb = (mag & 1).to(tl.float32)
        p2 = tl.where(ex == 1, 1.0, tl.where(ex == 2, 2.0, 4.0))
        v = tl.where(ex == 0, 0.5 * mb, (1.0 + 0.5 * mb) * p2)
        return tl.where((c & 8) != 0, -v, v)

    @triton.jit
    def _e5m3_f32(code, EXP: tl.constexpr):
        """E5M3 scale code (int32, 0..255) -> float32 sb * 2**EXP, exactly."""
        return ((code << 20) + ((106 + EXP) << 23)).to(tl.float32, bitcast=True)

    @triton.jit
    def _plain_word(w_ptr, rn, ldw, col16):
        """int32 words holding int16 columns `col16` (plain path): one load per element."""
        wp = w_ptr.to(tl.pointer_type(tl.int32))
        return tl.load(wp + rn[:, None].to(tl.int64) * (ldw // 2) + col16[None, :] // 2)

    # ------------------------------------------------------------------ operands

    @triton.jit
    def _nv_operand(wv, w32, par, mult, I: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):
        """Output I of NVFP4 words times its block-scale multiplier: value * sb * 2**-8 (exact)."""
        if ASM:
            if F16:
                a = _asm_nv_bits(wv, I, F16).to(tl.float16, bitcast=True) * mult
            else:
                a = _asm_nv_bits(wv, I, F16).to(tl.bfloat16, bitcast=True) * mult
        else:
            v = _e2m1_value(_plain_code(w32, par, I, 0)) * mult * 0.00390625
            a = v.to(tl.float16) if F16 else v.to(tl.bfloat16)
        return a

    @triton.jit
    def _i4_operand(wv, w32, par, I: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):
        if ASM:
            a = _asm_i4(wv, I, F16)
        else:
            v = (_plain_code(w32, par, I, 1) - 8).to(tl.float32)
            a = v.to(tl.float16) if F16 else v.to(tl.bfloat16)
        return a

    @triton.jit
    def _dot(a, b, acc, ASM: tl.constexpr):
        """acc + a @ b; the plain path multiplies in float32 (the interpreter's bf16 dot is not usable)."""
        if ASM:
            r = tl.dot(a, b, acc)
        else:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return r

    @triton.jit
    def _i4_group(wv, w32, par, x_base, xrow_ok, kbase, K, I0: tl.constexpr, NI: tl.constexpr, Q: tl.constexpr,
                  BN: tl.constexpr, BM: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr):
        """Sum over outputs I0 .. I0+NI-1 (one scale block) of dot(decoded INT4 slice, x slice), float32."""
        rq = tl.arange(0, Q)
        p = tl.zeros((BN, BM), dtype=tl.float32)
        for i in tl.static_range(I0, I0 + NI):
            a = _i4_operand(wv, w32, par, i, F16, ASM)
            p = _dot(a, _x_tile(x_base, xrow_ok, kbase + i * Q + rq, K, EVEN_K), p, ASM)
        return p

    @triton.jit
    def _x_tile(x_base, xrow_ok, kk, K, EVEN_K: tl.constexpr):
        if EVEN_K:
            r = tl.load(x_base + kk[:, None], mask=xrow_ok[None, :], other=0.0)
        else:
            r = tl.load(x_base + kk[:, None], mask=xrow_ok[None, :] & (kk[:, None] < K), other=0.0)
        return r

    # ------------------------------------------------------------------ the GEMM

    @triton.jit(do_not_specialize=["M", "SPLIT", "HAS_BIAS"])
    def _w4_mm_kernel(x_ptr, w_ptr, s_ptr, gs_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                      M, N, K, stride_xm, stride_om, ldw, lds, n_iters, SPLIT, HAS_BIAS,
                      KIND: tl.constexpr, F16: tl.constexpr,
                      BN: tl.constexpr, BM: tl.constexpr, TG: tl.constexpr, Q: tl.constexpr, BLOCK: tl.constexpr,
                      IPB: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        G: tl.constexpr = 4 * Q
        per = tl.cdiv(n_iters, SPLIT)
        it_lo = pid_k * per
        it_hi = tl.minimum(it_lo + per, n_iters)

        rn = pid_n * BN + tl.arange(0, BN)  # padded rows: always in bounds
        rm = pid_m * BM + tl.arange(0, BM)
        xrow_ok = rm < M
        x_base = x_ptr + tl.where(xrow_ok, rm, 0).to(tl.int64)[None, :] * stride_xm
        w_row = w_ptr + rn[:, None].to(tl.int64) * ldw
        acc = tl.zeros((BN, BM), dtype=tl.float32)

        if KIND == 0:
            KT: tl.constexpr = 16 * TG
            rj = tl.arange(0, KT)
            xk = 64 * (rj // 16) + rj % 16
            s_tile = s_ptr + rn[:, None].to(tl.int64) * lds + tl.arange(0, TG)[None, :]
            for it in range(it_lo, it_hi):
                g0 = it * TG
                if ASM:
                    sv = tl.load(s_tile + g0)
                    if F16:
                        mp01, mp23 = tl.inline_asm_elementwise(_NV_MULT_F16, "=r,=r,r", [sv],
                                                               dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
                    else:
                        mp01, mp23 = tl.inline_asm_elementwise(_NV_MULT_BF16, "=r,=r,r", [sv],
                                                               dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
                    wv = tl.load(w_row + g0 * 16 + rj[None, :])
                    w32 = wv
                    par = wv
                else:
                    sc8 = s_ptr.to(tl.pointer_type(tl.uint8))
                    srow = sc8 + rn[:, None].to(tl.int64) * (lds * 4) + (g0 + rj // 16)[None, :] * 4
                    wv = tl.load(w_row + g0 * 16 + rj[None, :])
                    w32 = _plain_word(w_ptr, rn, ldw, g0 * 16 + rj)
                    par = (rj % 2)[None, :]
                for i in tl.static_range(4):
                    if ASM:
                        pair = mp01 if i < 2 else mp23
                        half = (pair >> 16) if (i % 2) == 1 else pair
                        if F16:
                            m = half.to(tl.int16).to(tl.float16, bitcast=True)
                        else:
                            m = half.to(tl.int16).to(tl.bfloat16, bitcast=True)
                        mult = tl.reshape(tl.broadcast_to(m[:, :, None], (BN, TG, 16)), (BN, KT))
                    else:
                        mult = _e5m3_f32(tl.load(srow + i).to(tl.int32), 0)
                    a = _nv_operand(wv, w32, par, mult, i, F16, ASM)
                    xv = _x_tile(x_base, xrow_ok, g0 * 64 + 16 * i + xk, K, EVEN_K)
                    acc = _dot(a, xv, acc, ASM)
        else:
            rq = tl.arange(0, Q)
            s_row = s_ptr + rn.to(tl.int64) * lds
            NG: tl.constexpr = 4 // IPB
            for it in range(it_lo, it_hi):
                for gg in tl.static_range(TG):
                    g = it * TG + gg
                    wv = tl.load(w_row + g * Q + rq[None, :])
                    if ASM:
                        w32 = wv
                        par = wv
                    else:
                        w32 = _plain_word(w_ptr, rn, ldw, g * Q + rq)
                        par = (rq % 2)[None, :]
                    # the block scales of the granule (loaded up front), every dot of the granule (no wait
                    # between blocks), then the scaled partial sums
                    b0 = (g * G) // BLOCK
                    if NG == 1:
                        s0 = tl.load(s_row + b0)
                    elif NG == 2:
                        s0, s1 = tl.split(tl.load(s_row[:, None] + b0 + tl.arange(0, 2)[None, :]))
                    elif (G % BLOCK) == 0:  # four consecutive blocks: one [BN, 4] load
                        s02, s13 = tl.split(tl.reshape(tl.load(s_row[:, None] + b0 + tl.arange(0, 4)[None, :]),
                                                       (BN, 2, 2)))
                        s0, s2 = tl.split(s02)
                        s1, s3 = tl.split(s13)
                    else:  # blocks that straddle granules (e.g. 48, 96): one load per slice
                        s0 = tl.load(s_row + b0)
                        s1 = tl.load(s_row + (g * G + Q) // BLOCK)
                        s2 = tl.load(s_row + (g * G + 2 * Q) // BLOCK)
                        s3 = tl.load(s_row + (g * G + 3 * Q) // BLOCK)
                    p0 = _i4_group(wv, w32, par, x_base, xrow_ok, g * G, K, 0, IPB, Q, BN, BM, F16, ASM, EVEN_K)
                    if NG >= 2:
                        p1 = _i4_group(wv, w32, par, x_base, xrow_ok, g * G, K, IPB, IPB, Q, BN, BM, F16, ASM,
                                       EVEN_K)
                    if NG == 4:
                        p2 = _i4_group(wv, w32, par, x_base, xrow_ok, g * G, K, 2, 1, Q, BN, BM, F16, ASM, EVEN_K)
                        p3 = _i4_group(wv, w32, par, x_base, xrow_ok, g * G, K, 3, 1, Q, BN, BM, F16, ASM, EVEN_K)
                    acc += p0 * s0[:, None]
                    if NG >= 2:
                        acc += p1 * s1[:, None]
                    if NG == 4:
                        acc += p2 * s2[:, None]
                        acc += p3 * s3[:, None]

        if KIND == 0:
            acc = acc * (tl.load(gs_ptr) * 256.0)
        mask = (rn[:, None] < N) & xrow_ok[None, :]
        if SPLIT == 1:
            _w4_epilogue(acc, rn, rm, N, mask, b_ptr, out_ptr, stride_om, HAS_BIAS)
        else:
            plane = M.to(tl.int64) * N
            part_ptr = ws_ptr + rm[None, :].to(tl.int64) * N + rn[:, None]
            tl.store(part_ptr + pid_k * plane, acc, mask=mask)
            tl.debug_barrier()  # every thread's partial is written before the arrival is published
            tile_id = pid_m * tl.num_programs(0) + pid_n
            arrived = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT - 1:
                total = tl.zeros((BN, BM), dtype=tl.float32)
                for s in range(SPLIT):  # fixed order: the same sum whichever split finishes last
                    total += tl.load(part_ptr + s * plane, mask=mask, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + tile_id, 0, sem="relaxed", scope="gpu")
                _w4_epilogue(total, rn, rm, N, mask, b_ptr, out_ptr, stride_om, HAS_BIAS)

    @triton.jit
    def _w4_epilogue(acc, rn, rm, N, mask, b_ptr, out_ptr, stride_om, HAS_BIAS):
        if HAS_BIAS != 0:
            acc = acc + tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
        ptrs = out_ptr + rm[None, :].to(tl.int64) * stride_om + rn[:, None]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    # ------------------------------------------------------------------ dequantization

    @triton.jit
    def _w4_dequant_kernel(w_ptr, s_ptr, gs_ptr, out_ptr, N, K, ldw, lds, stride_o,
                           KIND: tl.constexpr, Q: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr,
                           TG: tl.constexpr, ASM: tl.constexpr):
        """out[n, k] = code * scale in float32, cast (exactly `dequantize_w4`), for TG granules of BN rows.

        The value is decoded as the fp16 pattern value * 2**-14 and the per-block factor carries 2**14, so
        the one float32 product rounds exactly as `dequantize_w4`'s value * (sb * s2)."""
        pid_n = tl.program_id(0)
        pid_g = tl.program_id(1)
        G: tl.constexpr = 4 * Q
        KT: tl.constexpr = Q * TG
        rn = pid_n * BN + tl.arange(0, BN)
        rj = tl.arange(0, KT)
        rg = tl.arange(0, TG)
        g0 = pid_g * TG
        col16 = g0 * Q + rj
        wv = tl.load(w_ptr + rn[:, None].to(tl.int64) * ldw + col16[None, :])
        if ASM:
            w32 = wv
            par = wv
        else:
            w32 = _plain_word(w_ptr, rn, ldw, col16)
            par = (rj % 2)[None, :]
        row_ok = (rn < N)[:, None]
        v0 = _dequant_slice(wv, w32, par, rn, rg, g0, s_ptr, gs_ptr, lds, 0, KIND, Q, BLOCK, BN, TG, ASM)
        v1 = _dequant_slice(wv, w32, par, rn, rg, g0, s_ptr, gs_ptr, lds, 1, KIND, Q, BLOCK, BN, TG, ASM)
        v2 = _dequant_slice(wv, w32, par, rn, rg, g0, s_ptr, gs_ptr, lds, 2, KIND, Q, BLOCK, BN, TG, ASM)
        v3 = _dequant_slice(wv, w32, par, rn, rg, g0, s_ptr, gs_ptr, lds, 3, KIND, Q, BLOCK, BN, TG, ASM)
        # back to natural K order (k = G*g + Q*i + r) so that every store writes whole 128-byte lines
        vv = tl.join(tl.join(v0, v2), tl.join(v1, v3))  # [BN, KT, 2, 2]: [..., a, b] = output 2a + b
        vv = tl.permute(tl.reshape(vv, (BN, TG, Q, 4)), (0, 1, 3, 2))
        val = tl.reshape(vv, (BN, 4 * KT))
        kk = g0 * G + tl.arange(0, 4 * KT)
        ptrs = out_ptr + rn[:, None].to(tl.int64) * stride_o + kk[None, :]
        tl.store(ptrs, val.to(out_ptr.dtype.element_ty), mask=row_ok & (kk < K)[None, :])

    @triton.jit
    def _dequant_slice(wv, w32, par, rn, rg, g0, s_ptr, gs_ptr, lds, I: tl.constexpr, KIND: tl.constexpr,
                       Q: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr, TG: tl.constexpr, ASM: tl.constexpr):
        """Output I of the dequantization tile, float32 [BN, Q * TG] (K-slices of Q per granule)."""
        G: tl.constexpr = 4 * Q
        KT: tl.constexpr = Q * TG
        if KIND == 0:
            code = tl.load(s_ptr.to(tl.pointer_type(tl.uint8)) + rn[:, None].to(tl.int64) * (lds * 4)
                           + ((g0 + rg) * 4 + I)[None, :]).to(tl.int32)
            f = (_e5m3_f32(code, 0) * tl.load(gs_ptr)) * 16384.0
            if ASM:
                v = _asm_nv_bits(wv, I, True).to(tl.float16, bitcast=True).to(tl.float32)
            else:
                v = _e2m1_value(_plain_code(w32, par, I, 0)) * 6.103515625e-05
        else:
            f = tl.load(s_ptr + rn[:, None].to(tl.int64) * lds + (((g0 + rg) * G + I * Q) // BLOCK)[None, :])
            if ASM:
                v = _asm_i4(wv, I, True).to(tl.float32)
            else:
                v = (_plain_code(w32, par, I, 1) - 8).to(tl.float32)
        return v * tl.reshape(tl.broadcast_to(f[:, :, None], (BN, TG, Q)), (BN, KT))
