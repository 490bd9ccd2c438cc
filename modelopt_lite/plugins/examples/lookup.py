"""TritonLookUp: embedding look-up (gather rows of a table) as a plugin with a Triton kernel.

    from modelopt_lite.plugins.examples import TritonLookUp
    out = TritonLookUp(fp32_output=False)(ids, table)   # ids [N...] int32/int64, table [V, D] -> [N..., D]

The output has the table's dtype, or float32 with ``fp32_output=True``. CUDA tensors take the Triton kernel
(``lookup_triton``); elsewhere the PyTorch path (``lookup_torch``) runs, and both give exactly
``torch.nn.functional.embedding(ids, table)`` (a gather, then an exact widening cast). Ids outside
``[0, V)`` raise IndexError on the PyTorch path; the kernel, which cannot raise, writes a zero row for them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...kernels import triton_available, use_triton
from ..base import PluginBase, PluginError, SymTensor, plugin

__all__ = ["TritonLookUp", "lookup_torch", "lookup_triton"]

_ID_DTYPES = (torch.int32, torch.int64)
_TABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if triton_available():
    import triton

    from .lookup_kernel import lookup_kernel


def _check(ids: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> None:
    if ids.dtype not in _ID_DTYPES:
        raise PluginError(f"TritonLookUp ids must be int32 or int64, got {ids.dtype}")
    if table.dim() != 2 or table.dtype not in _TABLE_DTYPES:
        raise PluginError(f"TritonLookUp table must be 2-D float16/bfloat16/float32 [V, D], got "
                          f"{table.dtype} {tuple(table.shape)}")
    want = tuple(ids.shape) + (table.shape[1],)
    if tuple(out.shape) != want:
        raise PluginError(f"TritonLookUp output must have shape {want}, got {tuple(out.shape)}")


def lookup_torch(ids: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[...] = table[ids] (cast to out's dtype) with PyTorch; ids out of range raise IndexError."""
    _check(ids, table, out)
    flat = ids.reshape(-1)
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= table.shape[0]:
            bad = lo if lo < 0 else hi
            raise IndexError(f"TritonLookUp: id {bad} is out of range for a table of {table.shape[0]} rows "
                             f"(ids must lie in [0, {table.shape[0]}))")
    out.view(-1, table.shape[1]).copy_(torch.index_select(table, 0, flat.to(torch.int64)))
    return out


def lookup_triton(ids: torch.Tensor, table: torch.Tensor, out: torch.Tensor, block_d: int = 0) -> torch.Tensor:
    """out[...] = table[ids] with the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    Ids outside [0, V) give zero rows. ``block_d`` (a power of two) overrides the column tile.
    """
    if not triton_available():
        raise RuntimeError("lookup_triton needs Triton; use lookup_torch")
    _check(ids, table, out)
    ids_c, table_c = ids.reshape(-1).contiguous(), table.contiguous()
    if not out.is_contiguous():
        raise PluginError("TritonLookUp output must be contiguous")
    n, d = ids_c.numel(), table_c.shape[1]
    if n == 0 or d == 0:
        return out
    block = block_d or min(1024, triton.next_power_of_2(d))
    lookup_kernel[(n, triton.cdiv(d, block))](ids_c, table_c, out, n, table_c.shape[0], d, BLOCK_D=block)
    return out


@plugin("TritonLookUp")
class TritonLookUp(PluginBase):
    """Gathers rows of ``table`` [V, D] at ``ids`` [N...] into [N..., D] (float32 with ``fp32_output``)."""

    # `modelopt-lite aot --plugin TritonLookUp`: the kernel and its default specialisations, one dispatcher
    # per table dtype (int32 ids, 128-column tiles; pointer types are invisible to a C dispatcher).
    aot_kernel = ("modelopt_lite/plugins/examples/lookup_kernel.py", "lookup_kernel")
    aot_variants = {
        "fp16": (("*i32:16, *fp16:16, *fp16:16, i32, i32, i32, 128", "N, (D + 127) / 128, 1", 4, 1),),
        "fp32": (("*i32:16, *fp32:16, *fp32:16, i32, i32, i32, 128", "N, (D + 127) / 128, 1", 4, 1),),
    }

    def __init__(self, fp32_output: bool = False):
        super().__init__()
        self.fp32_output = fp32_output

    def shape_dtype_inference(self, inputs: Sequence[SymTensor]) -> SymTensor:
        if len(inputs) != 2:
            raise PluginError(f"TritonLookUp takes (ids, table), got {len(inputs)} inputs")
        ids, table = inputs
        if ids.dtype not in _ID_DTYPES:
            raise PluginError(f"TritonLookUp ids must be int32 or int64, got {ids.dtype}")
        if table.ndim != 2 or table.dtype not in _TABLE_DTYPES:
            raise PluginError(f"TritonLookUp table must be 2-D float16/bfloat16/float32 [V, D], got "
                              f"{table.dtype} with {table.ndim} dims")
        dtype = torch.float32 if self.fp32_output else table.dtype
        return SymTensor(dtype, list(ids.shape) + [table.shape[1]])

    def forward(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        ids, table = inputs
        if use_triton(ids, table, outputs[0]):
            lookup_triton(ids, table, outputs[0])
        else:
            lookup_torch(ids, table, outputs[0])
