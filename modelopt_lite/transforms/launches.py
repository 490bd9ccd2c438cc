"""Count the kernels a call runs: how `optimize` is judged besides its outputs.

    from modelopt_lite.transforms import count_launches
    count_launches(model, ids)            # LaunchCount(kernels=412, how='cuda-profiler') on a GPU

On CUDA inputs the count is the number of GPU kernels (and memsets/copies) the torch
profiler records. Elsewhere it counts operator calls that compute: every ATen or custom op
dispatched at the top level (a custom op such as ``modelopt_lite::rms_norm_quant`` is one,
whatever it runs inside), except views and other calls that only reinterpret or allocate
memory. On a GPU each such call is one kernel launch or more, so the CPU count is the
lower bound a graph's launches can reach.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LaunchCount", "count_launches"]

_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh",
              "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "_assert_tensor_metadata",
              "_assert_scalar", "sym_constrain_range_for_size", "detach", "alias", "clone_preserve_view"}


@dataclass(frozen=True)
class LaunchCount:
    """``kernels``: the count; ``how``: ``"cuda-profiler"`` or ``"dispatch"``; ``by_op``: count per name."""

    kernels: int
    how: str
    by_op: Counter = field(default_factory=Counter, compare=False, repr=False)


def _is_view(func) -> bool:
    schema = func._schema
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not _is_view(func) and name not in _NO_KERNEL:
            self.ops[f"{func.namespace}::{name}"] += 1
        return func(*args, **(kwargs or {}))


def count_launches(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> LaunchCount:
    """Run ``fn(*args, **kwargs)`` once under no_grad and count its kernels (see the module docstring)."""
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tree_leaves((args, kwargs)))
    with torch.no_grad():
        if on_cuda:
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn(*args, **kwargs)
                torch.cuda.synchronize()
            names = Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
            return LaunchCount(sum(names.values()), "cuda-profiler", names)
        counter = _OpCounter()
        with counter:
            fn(*args, **kwargs)
        return LaunchCount(sum(counter.ops.values()), "dispatch", counter.ops)
