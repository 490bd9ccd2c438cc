"""torch.distributed helpers for data-parallel calibration.

Every function is a no-op in a single process (no process group, or a group
of one), so calibration code calls them unconditionally. Under a process
group they are collectives: every rank must call them in the same order.
Tensors on a device the backend cannot reduce (CUDA under gloo, CPU under
NCCL) are moved for the reduction and come back where they were.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "all_reduce", "all_reduce_optional", "broadcast_object"]

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}
_MAX_DIMS = 8
_DTYPES = (torch.float32, torch.float64, torch.int64, torch.float16, torch.bfloat16, torch.int32)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _op(op: str):
    if op not in _OPS:
        raise ValueError(f"reduce op must be one of {sorted(_OPS)}, got {op!r}")
    return getattr(dist.ReduceOp, _OPS[op])


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The element-wise reduction of `t` over all ranks (a new tensor; `t` is not changed)."""
    reduce_op = _op(op)
    if not is_distributed():
        return t
    backend = dist.get_backend()
    work = t.detach().clone()
    if backend == "gloo" and work.device.type != "cpu":
        work = work.cpu()
    elif backend == "nccl" and work.device.type != "cuda":
        work = work.cuda()
    dist.all_reduce(work, op=reduce_op)
    return work.to(t.device)


def all_reduce_optional(t: Optional[torch.Tensor], op: str = "sum") -> Optional[torch.Tensor]:
    """Like `all_reduce`, for a statistic that some ranks may not have (None: saw no data).

    Ranks agree on the shape first; a rank without the statistic contributes
    zeros (the neutral element of sum, and of max for non-negative values
    such as amaxes, counts and Hessians). Returns None only when no rank has it.
    """
    _op(op)
    if not is_distributed():
        return t
    if t is not None and t.dim() > _MAX_DIMS:
        raise ValueError(f"all_reduce_optional supports up to {_MAX_DIMS} dimensions, got shape {tuple(t.shape)}")
    if op == "min":
        raise ValueError("all_reduce_optional cannot reduce with min: a missing statistic has no neutral value")
    header = torch.zeros(3 + _MAX_DIMS, dtype=torch.int64)
    if t is not None:
        if t.dtype not in _DTYPES:
            raise ValueError(f"all_reduce_optional cannot reduce {t.dtype} tensors")
        header[0] = 1
        header[1] = t.dim()
        header[2] = _DTYPES.index(t.dtype)
        header[3 : 3 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    agreed = all_reduce(header, "max")
    mine = header.clone()
    if t is not None and not torch.equal(agreed, mine):
        raise RuntimeError(f"ranks collected statistics of different shapes (this rank {tuple(t.shape)}); "
                           "calibrate with the same model and input layout on every rank")
    if int(agreed[0]) == 0:
        return None
    if t is None:
        shape = [int(s) for s in agreed[3 : 3 + int(agreed[1])]]
        t = torch.zeros(shape, dtype=_DTYPES[int(agreed[2])])
    return all_reduce(t, op)


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
