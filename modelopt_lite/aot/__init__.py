"""Ahead-of-time Triton kernels for deployment runtimes: C launcher sources and headers.

    from modelopt_lite.aot import AotVariant, compile_aot
    result = compile_aot("kernels.py", "add_kernel", [AotVariant("*fp32:16, *fp32:16, *fp32:16, i32, 1024",
                                                                "(n + 1023) / 1024, 1, 1", num_warps=4)],
                         out_dir="aot/add", name="add_f32")

Each variant (one signature with its constexpr values, grid, warps and
stages) is compiled with Triton's own `triton.tools.compile` into a C file
that embeds the cubin, then `triton.tools.link` writes the dispatcher. What
we emit fixes what those tools leave open:

* a dispatcher whose inputs match no specialisation returns
  CUDA_ERROR_INVALID_VALUE instead of falling off the end of the function;
* unloading a kernel's module twice is safe (the handle is checked and
  cleared), and an empty grid returns CUDA_SUCCESS;
* the dynamic shared memory each variant needs is checked against the
  target's limit at generation time, with an error that says which variant
  and what to change.

No GPU is needed to generate: the target is given (`cuda:90:32` for Hopper).
"""

from .compile import AotResult, AotVariant, compile_aot, shared_memory_limit

__all__ = ["AotResult", "AotVariant", "compile_aot", "shared_memory_limit"]
