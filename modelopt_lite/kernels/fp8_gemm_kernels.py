"""Triton kernels of the FP8 W8A8 GEMM (see `fp8_gemm` for the launcher and the public API).

C[m, n] = (sum_k A[m, k] * W[n, k]) * sa * sw + bias[n], float32 accumulation.

* `_gemm_tile_kernel`: one program per output tile, optionally split along K
  (SPLIT_K programs per tile; the last one to finish sums the float32 partials
  in a fixed order and runs the epilogue, so results are deterministic). Loads
  A and W through TMA descriptors (Hopper) or plain pointers (Ada, ragged K,
  unaligned tensors). QUANT_A quantizes a high-precision A tile in the prologue
  with the static per-tensor multiplier 448 / amax (same arithmetic as
  `quantize_fp8_act`).
* `_gemm_persistent_kernel`: one program per multiprocessor walking the output
  tiles in grouped order, TMA loads, for large M.

WS turns on the compiler's warp specialization of the main loop (producer
warps issue the TMA loads, consumer warpgroups the MMAs).

Epilogue (both): multiply by the activation scale (scalar, per row, or
amax / 448 from a static amax) and the weight scale (scalar or per column),
add the bias, cast to the output dtype, store through TMA or masked pointers.
"""

from __future__ import annotations

from . import triton_available

if triton_available():
    import triton
    import triton.language as tl

    from .fp8_quant import _fp8_dequant_scale, _fp8_multiplier, _to_e4m3

    @triton.jit
    def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
        """Grouped ordering: GROUP_M row-tiles share each column sweep, so W tiles are reused from L2."""
        per_group = GROUP_M * num_n
        group = tile // per_group
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % size_m
        pid_n = (tile % per_group) // size_m
        return pid_m, pid_n

    @triton.jit
    def _mma(a, b, acc, ACC_MODE: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc += a @ b. The FP8 tensor cores keep only ~13 mantissa bits of their running sum; so
        ACC_MODE 1 sums each K tile in a fresh accumulator and adds it to `acc` in float32, ACC_MODE 2 lets
        the compiler promote every min(BLOCK_K, 128) products (wgmma tiles), ACC_MODE 0 accumulates in
        the tensor cores throughout (fastest, least accurate for long K)."""
        if ACC_MODE == 0:
            acc = tl.dot(a, b, acc)
        elif ACC_MODE == 2:
            if BLOCK_K >= 128:
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=128)
            else:
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc += tl.dot(a, b)
        return acc

    @triton.jit
    def _epilogue(acc, off_m, off_n, M, N, c_ptr, c_desc, stride_cm, sa_ptr, sw_ptr, bias_ptr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, A_SCALE: tl.constexpr, SW_VEC: tl.constexpr,
                  HAS_BIAS: tl.constexpr, TMA_C: tl.constexpr):
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        if A_SCALE == 1:  # per row (dynamic per token)
            sa = tl.load(sa_ptr + offs_m, mask=offs_m < M, other=0.0)
            acc = acc * sa[:, None]
        elif A_SCALE == 2:  # static amax: scale = amax / 448
            acc = acc * _fp8_dequant_scale(tl.load(sa_ptr).to(tl.float32))
        else:  # one dequant scale
            acc = acc * tl.load(sa_ptr)
        if SW_VEC:
            sw = tl.load(sw_ptr + offs_n, mask=offs_n < N, other=0.0)
            acc = acc * sw[None, :]
        else:
            acc = acc * tl.load(sw_ptr)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        if TMA_C:
            c_desc.store([off_m, off_n], acc.to(c_ptr.dtype.element_ty))
        else:
            ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
            tl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit(do_not_specialize=["M"])
    def _gemm_tile_kernel(a_ptr, a_desc, b_ptr, b_desc, c_ptr, c_desc, sa_ptr, sw_ptr, bias_ptr, ws_ptr, cnt_ptr,
                          M, N, K, stride_am, stride_bn, stride_cm,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                          TMA_A: tl.constexpr, TMA_B: tl.constexpr, TMA_C: tl.constexpr, QUANT_A: tl.constexpr,
                          A_SCALE: tl.constexpr, SW_VEC: tl.constexpr, HAS_BIAS: tl.constexpr,
                          ACC_MODE: tl.constexpr, WS: tl.constexpr):
        tile = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        k_tiles = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(k_tiles, SPLIT_K)
        kt_lo = pid_k * per_split
        kt_hi = tl.minimum(kt_lo + per_split, k_tiles)

        offs_k = tl.arange(0, BLOCK_K)
        rows = off_m + tl.arange(0, BLOCK_M)
        rows = tl.where(rows < M, rows, 0)  # clamped rows: loads stay in bounds, the store masks them
        cols = off_n + tl.arange(0, BLOCK_N)
        cols = tl.where(cols < N, cols, 0)
        a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + cols[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
        if QUANT_A:
            s_a = _fp8_multiplier(tl.load(sa_ptr).to(tl.float32))

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in tl.range(kt_lo, kt_hi, warp_specialize=WS):
            k = kt * BLOCK_K
            if TMA_A:
                a = a_desc.load([off_m, k])
            elif EVEN_K:
                a = tl.load(a_ptrs + k)
            else:
                a = tl.load(a_ptrs + k, mask=(k + offs_k)[None, :] < K, other=0.0)
            if QUANT_A:
                a = _to_e4m3(a.to(tl.float32) * s_a)
            if TMA_B:
                b = b_desc.load([off_n, k]).T
            elif EVEN_K:
                b = tl.load(b_ptrs + k)
            else:
                b = tl.load(b_ptrs + k, mask=(k + offs_k)[:, None] < K, other=0.0)
            acc = _mma(a, b, acc, ACC_MODE, BLOCK_K)

        if SPLIT_K == 1:
            _epilogue(acc, off_m, off_n, M, N, c_ptr, c_desc, stride_cm, sa_ptr, sw_ptr, bias_ptr,
                      BLOCK_M, BLOCK_N, A_SCALE, SW_VEC, HAS_BIAS, TMA_C)
        else:
            offs_m = off_m + tl.arange(0, BLOCK_M)
            offs_n = off_n + tl.arange(0, BLOCK_N)
            inb = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            plane = M.to(tl.int64) * N
            part = ws_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
            tl.store(part + pid_k * plane, acc, mask=inb)
            tl.debug_barrier()  # every thread's partial is written before the arrival is published
            tile_id = pid_m * num_n + pid_n
            arrived = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in range(SPLIT_K):  # fixed order: the same sum whichever split finishes last
                    total += tl.load(part + s * plane, mask=inb, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + tile_id, 0, sem="relaxed", scope="gpu")  # ready for the next launch
                _epilogue(total, off_m, off_n, M, N, c_ptr, c_desc, stride_cm, sa_ptr, sw_ptr, bias_ptr,
                          BLOCK_M, BLOCK_N, A_SCALE, SW_VEC, HAS_BIAS, TMA_C)

    @triton.jit(do_not_specialize=["M"])
    def _gemm_persistent_kernel(a_desc, b_desc, c_ptr, c_desc, sa_ptr, sw_ptr, bias_ptr, M, N, K, stride_cm, NUM_PROGS,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                GROUP_M: tl.constexpr, A_SCALE: tl.constexpr,
                                SW_VEC: tl.constexpr, HAS_BIAS: tl.constexpr, TMA_C: tl.constexpr,
                                ACC_MODE: tl.constexpr, WS: tl.constexpr):
        start = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        num_tiles = num_m * num_n
        tile_c = start - NUM_PROGS  # a separate counter for the epilogue keeps the flattened pipeline simple
        for tile in tl.range(start, num_tiles, NUM_PROGS, flatten=True, warp_specialize=WS):
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for kt in range(k_tiles):
                a = a_desc.load([off_m, kt * BLOCK_K])
                b = b_desc.load([off_n, kt * BLOCK_K])
                acc = _mma(a, b.T, acc, ACC_MODE, BLOCK_K)
            tile_c += NUM_PROGS
            pm, pn = _tile_coords(tile_c, num_m, num_n, GROUP_M)
            _epilogue(acc, pm * BLOCK_M, pn * BLOCK_N, M, N, c_ptr, c_desc, stride_cm, sa_ptr, sw_ptr, bias_ptr,
                      BLOCK_M, BLOCK_N, A_SCALE, SW_VEC, HAS_BIAS, TMA_C)
