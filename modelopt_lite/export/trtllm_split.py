"""Tensor-parallel slices of TensorRT-LLM checkpoint tensors (CHECKPOINTS.md 3.5).

Every tensor of the checkpoint is written with a `Split` rule that says how
rank ``r`` of ``tp`` gets its part:

* ``REPLICATED``: the whole tensor (norms, per-tensor scales, ...);
* ``COLUMN``: contiguous chunk of dim 0 (output rows);
* ``ROW``: contiguous chunk of the last dim (input columns; 1-d tensors such
  as a row-parallel ``prequant_scaling_factor`` are chunked along their one dim);
* ``VOCAB``: zero-pad dim 0 to a multiple of ``tp``, then chunk it;
* ``qkv_split(nh, nkv)``: the rows are q|k|v of ``nh + 2 * nkv`` heads; each
  component is chunked on its own, and when ``nkv < tp`` rank ``r`` gets KV
  head ``r * nkv // tp`` (heads are duplicated). The rows per head are
  derived from the tensor, so packed weights (two rows per byte) work too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .layers import ExportError

__all__ = ["Split", "REPLICATED", "COLUMN", "ROW", "VOCAB", "qkv_split", "split_tensor", "padded_size",
           "check_heads"]


@dataclass(frozen=True)
class Split:
    kind: str  # "rep", "col", "row", "vocab", "qkv"
    heads: Optional[Tuple[int, int]] = None  # qkv: (num_heads, num_kv_heads)


REPLICATED = Split("rep")
COLUMN = Split("col")
ROW = Split("row")
VOCAB = Split("vocab")


def qkv_split(num_heads: int, num_kv_heads: int) -> Split:
    return Split("qkv", (num_heads, num_kv_heads))


def padded_size(n: int, tp: int) -> int:
    """`n` rounded up to a multiple of `tp`."""
    return -(-n // tp) * tp


def check_heads(num_heads: int, num_kv_heads: int, tp: int) -> None:
    """Raise ExportError unless q heads split evenly and KV heads split or duplicate evenly over `tp` ranks."""
    if num_heads % tp:
        raise ExportError(f"{num_heads} attention heads cannot be split over {tp} tensor-parallel ranks; "
                          f"use a tensor-parallel size that divides {num_heads}")
    if num_kv_heads >= tp and num_kv_heads % tp:
        raise ExportError(f"{num_kv_heads} KV heads cannot be split over {tp} tensor-parallel ranks")
    if num_kv_heads < tp and tp % num_kv_heads:
        raise ExportError(f"{num_kv_heads} KV heads cannot be duplicated evenly over {tp} tensor-parallel ranks "
                          f"({tp} must be a multiple of {num_kv_heads})")


def _chunk(t: torch.Tensor, dim: int, tp: int, rank: int, what: str) -> torch.Tensor:
    size = t.shape[dim]
    if size % tp:
        raise ExportError(f"{what}: dimension {dim} of size {size} cannot be split over {tp} ranks")
    part = size // tp
    return t.narrow(dim, rank * part, part)


def _kv_part(t: torch.Tensor, num_kv_heads: int, tp: int, rank: int, what: str) -> torch.Tensor:
    if num_kv_heads >= tp:
        return _chunk(t, 0, tp, rank, what)
    per_head = t.shape[0] // num_kv_heads
    head = rank * num_kv_heads // tp
    return t.narrow(0, head * per_head, per_head)


def split_tensor(t: torch.Tensor, rule: Split, tp: int, rank: int, what: str = "tensor") -> torch.Tensor:
    """Rank `rank`'s part of `t` (a view where possible) under `rule`."""
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is outside 0..{tp - 1}")
    if rule.kind == "rep":
        return t
    if rule.kind == "col":
        return _chunk(t, 0, tp, rank, what)
    if rule.kind == "row":
        return _chunk(t, t.dim() - 1, tp, rank, what)
    if rule.kind == "vocab":
        rows = padded_size(t.shape[0], tp)
        if rows != t.shape[0]:
            t = torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])
        return _chunk(t, 0, tp, rank, what)
    if rule.kind == "qkv":
        nh, nkv = rule.heads
        per_head, rem = divmod(t.shape[0], nh + 2 * nkv)
        if rem:
            raise ExportError(f"{what}: {t.shape[0]} rows are not q|k|v of {nh} + 2 x {nkv} heads")
        q, k, v = t.split([nh * per_head, nkv * per_head, nkv * per_head])
        return torch.cat([_chunk(q, 0, tp, rank, what), _kv_part(k, nkv, tp, rank, what),
                          _kv_part(v, nkv, tp, rank, what)])
    raise ValueError(f"unknown split rule {rule.kind!r}")
