"""The TritonLookUp kernel, in a file of its own so Triton's ahead-of-time compiler can load it standalone."""

import triton
import triton.language as tl


@triton.jit
def lookup_kernel(ids_ptr, table_ptr, out_ptr, N, V, D, BLOCK_D: tl.constexpr):
    """One program per (id, column tile): out[row, cols] = table[ids[row], cols], zeros for ids outside [0, V).

    `N` (the number of ids) sizes the grid of ahead-of-time launchers: (N, ceil(D / BLOCK_D), 1).
    """
    row = tl.program_id(0)
    if row < N:
        col = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        idx = tl.load(ids_ptr + row).to(tl.int64) + tl.zeros([BLOCK_D], dtype=tl.int64)  # one id, as a vector
        valid = (idx >= 0) & (idx < V)
        safe = tl.where(valid, idx, 0)
        in_cols = col < D
        vals = tl.load(table_ptr + safe * D + col, mask=in_cols & valid, other=0.0)
        tl.store(out_ptr + row.to(tl.int64) * D + col, vals.to(out_ptr.dtype.element_ty), mask=in_cols)
