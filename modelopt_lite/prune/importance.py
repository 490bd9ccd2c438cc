"""Importance of every unit of every prune group: from activations or from weights.

``activation``: forward hooks over the calibration data record the mean
absolute activation of every channel where it is consumed (the input of the
Linear/Conv layers that read the group), or, for groups no layer reads, where
it is produced (the output of its layers). A unit's score is the L2 norm of
its channels (a head: its ``head_dim`` channels), averaged over the layers.

``weight`` / ``weight_l1``: the L2 (L1) norm of every weight that produces or
consumes a unit, over all those weights (rows of the producing layers,
columns of the consuming layers, norm and embedding entries).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..quantization.api import create_forward_loop
from .layers import _CONVS, _NORMS, split_name, targets
from .plan import Plan, Segment

__all__ = ["IMPORTANCE", "unit_importance"]

IMPORTANCE = ("activation", "weight", "weight_l1")
_IN_KEYS = ("in_features", "in_channels")
_OUT_KEYS = ("out_features", "out_channels", "embedding_dim", "num_features", "channels")


def unit_importance(model: nn.Module, plan: Plan, importance: str, data_loader: Optional[Iterable] = None,
                    max_batches: Optional[int] = None) -> List[torch.Tensor]:
    """One score per unit of each group of `plan` (float64 tensors, higher is more important)."""
    if importance not in IMPORTANCE:
        raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}, got {importance!r}")
    if importance == "activation":
        if data_loader is None:
            raise ValueError("importance='activation' needs a data_loader (batches the model can be called with); "
                             "or use importance='weight'")
        return _activation(model, plan, data_loader, max_batches)
    return _weight(model, plan, p=2 if importance == "weight" else 1)


def _module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _scatter(vec: torch.Tensor, segs: List[Segment], plan: Plan, acc: List[torch.Tensor],
             reduce: Callable[[torch.Tensor], torch.Tensor], counts: Optional[List[int]] = None) -> None:
    """Add the per-unit reduction of each segment of the per-channel `vec` to its group's accumulator."""
    off = 0
    for g, size, block in segs:
        if g is not None:
            units = plan.groups[g].units
            acc[g] += reduce(vec[off:off + size].reshape(units, block).double())
            if counts is not None:
                counts[g] += 1
        off += size


def _weight(model: nn.Module, plan: Plan, p: int) -> List[torch.Tensor]:
    acc = [torch.zeros(g.units, dtype=torch.float64) for g in plan.groups]
    for name, segs in plan.layouts().items():
        path, key = split_name(name)
        module = _module(model, path)
        for tname, dim in targets(module, key) or []:
            t = getattr(module, tname, None)
            if tname != "weight" or not isinstance(t, nn.Parameter):
                continue
            w = t.detach().double()
            d = dim % w.dim()
            other = [i for i in range(w.dim()) if i != d]
            vec = (w.abs() if p == 1 else w.pow(2)).sum(dim=other) if other else (w.abs() if p == 1 else w.pow(2))
            _scatter(vec, segs, plan, acc, lambda v: v.sum(dim=1))
    return [a.sqrt() if p == 2 else a for a in acc]


def _channel_dim(module: nn.Module, side: str) -> int:
    if isinstance(module, _CONVS + _NORMS):
        return 1
    return -1


def _activation(model: nn.Module, plan: Plan, data_loader: Iterable, max_batches: Optional[int]) -> List[torch.Tensor]:
    layouts = plan.layouts()
    has_reader = [False] * len(plan.groups)
    for name, segs in layouts.items():
        if split_name(name)[1] in _IN_KEYS:
            for g, _, _ in segs:
                if g is not None:
                    has_reader[g] = True
    sources: Dict[Tuple[str, str], List[List[Segment]]] = {}
    for name, segs in layouts.items():
        path, key = split_name(name)
        groups = [g for g, _, _ in segs if g is not None]
        if key in _IN_KEYS:
            sources.setdefault((path, "in"), []).append(segs)
        elif key in _OUT_KEYS and any(not has_reader[g] for g in groups):
            sources.setdefault((path, "out"), []).append([(g if g is not None and not has_reader[g] else None, s, b)
                                                          for g, s, b in segs])
    stats: Dict[Tuple[str, str], List] = {}
    handles = []

    def make_hook(path: str, side: str, cdim: int):
        def hook(_module, inputs, output):
            if side == "in" and not inputs:
                return
            x = inputs[0] if side == "in" else (output[0] if isinstance(output, (tuple, list)) else output)
            if not isinstance(x, torch.Tensor) or x.dim() == 0:
                return
            d = cdim % x.dim()
            v = x.detach().abs().double().mean(dim=[i for i in range(x.dim()) if i != d]) if x.dim() > 1 \
                else x.detach().abs().double()
            cur = stats.setdefault((path, side), [torch.zeros_like(v), 0])
            cur[0] += v
            cur[1] += 1
        return hook

    for (path, side) in sources:
        module = _module(model, path)
        handles.append(module.register_forward_hook(make_hook(path, side, _channel_dim(module, side))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            create_forward_loop(data_loader, num_batches=max_batches, progress=False)(model)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    acc = [torch.zeros(g.units, dtype=torch.float64) for g in plan.groups]
    counts = [0] * len(plan.groups)
    for key, seg_lists in sources.items():
        if key not in stats:
            continue
        total, n = stats[key]
        for segs in seg_lists:
            _scatter(total / n, segs, plan, acc, lambda v: v.norm(dim=1), counts)
    missing = [plan.groups[i].leader for i, c in enumerate(counts) if c == 0]
    if missing:
        raise RuntimeError(f"no activations were recorded for {', '.join(missing)}: the data_loader gave no batch "
                           "or these layers never ran; check the data, or use importance='weight'")
    return [a / c for a, c in zip(acc, counts)]
