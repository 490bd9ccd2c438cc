"""A small Triton kernel for the AoT tests: out = x + y."""

import triton
import triton.language as tl


@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m), mask=m)


@triton.jit
def smem_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """Uses shared memory for a transpose (the AoT shared-memory check needs a kernel that asks for some)."""
    r = tl.arange(0, BLOCK)
    tile = tl.load(x_ptr + r[:, None] * BLOCK + r[None, :])
    tl.store(out_ptr + r[:, None] * BLOCK + r[None, :], tl.trans(tile))
