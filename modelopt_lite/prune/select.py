"""How many units each group keeps: exact parameter counts and a greedy search under a parameter budget.

`ParamCounter` counts the model's parameters for any kept-unit counts (every
tensor a group sizes shrinks with it; shared tensors count once). `choose`
removes, one chunk at a time, the chunk with the lowest importance per
parameter it frees, until the model fits the budget; then it adds back the
most important removed chunks that still fit, so no single chunk can be
restored without exceeding the budget.

A unit's importance is divided by its group's mean (groups of different
scale compare) and multiplied by what one unit of its group costs in the
unpruned model. Without that factor the widest-reaching dimension (the
residual stream, which sizes every layer) always frees the most per unit
and would be pruned first and furthest; with it, groups shrink at similar
rates unless their importance says otherwise, and the rates adapt as the
groups they share tensors with shrink.
"""

from __future__ import annotations

import heapq
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .layers import split_name, targets
from .plan import Plan, Segment

__all__ = ["ParamCounter", "choose", "allowed_sizes"]


class ParamCounter:
    """Parameter count of `model` as a function of the kept units per group of `plan`."""

    def __init__(self, model: nn.Module, plan: Plan):
        entries: Dict[int, Tuple[List[int], Dict[int, List[Segment]]]] = {}
        for name, segs in plan.layouts().items():
            path, key = split_name(name)
            module = model.get_submodule(path) if path else model
            for tname, dim in targets(module, key) or []:
                t = getattr(module, tname, None)
                if isinstance(t, nn.Parameter):
                    entries.setdefault(id(t), (list(t.shape), {}))[1][dim % t.dim()] = segs
        params = {id(p): p for p in model.parameters()}
        self.fixed = sum(p.numel() for i, p in params.items() if i not in entries)
        self.entries = [e for i, e in entries.items() if i in params]
        self.by_group: Dict[int, List[int]] = {}
        for ei, (_, dims) in enumerate(self.entries):
            for segs in dims.values():
                for g, _, _ in segs:
                    if g is not None and ei not in self.by_group.setdefault(g, []):
                        self.by_group[g].append(ei)

    def _entry(self, ei: int, kept: List[int]) -> int:
        shape, dims = self.entries[ei]
        n = 1
        for d, size in enumerate(shape):
            if d in dims:
                size = sum(s if g is None else kept[g] * b for g, s, b in dims[d])
            n *= size
        return n

    def count(self, kept: List[int]) -> int:
        return self.fixed + sum(self._entry(ei, kept) for ei in range(len(self.entries)))

    def delta(self, g: int, kept: List[int], new: int) -> int:
        """Parameters freed when group `g` goes from ``kept[g]`` to `new` units (negative when growing)."""
        other = list(kept)
        other[g] = new
        return sum(self._entry(ei, kept) - self._entry(ei, other) for ei in self.by_group.get(g, []))


def allowed_sizes(units: int, chunk: int) -> List[int]:
    """Kept-unit counts a group may take, largest first: `units` and the multiples of `chunk` below it."""
    return sorted({units, *range(chunk, units + 1, chunk)}, reverse=True)


def choose(plan: Plan, scores: List[torch.Tensor], counter: ParamCounter, target: int
           ) -> Tuple[List[List[int]], int, Optional[int]]:
    """(kept units per group, resulting count, smallest reachable count if `target` is out of reach)."""
    # Removal order: least important first; ties remove the higher index first.
    order = [sorted(range(g.units), key=lambda u, s=s: (float(s[u]), -u)) for g, s in zip(plan.groups, scores)]
    norm = []
    for s in scores:
        mean = float(s.mean()) if s.numel() else 0.0
        norm.append([float(v) / mean for v in s] if mean > 0 else [1.0] * s.numel())
    sizes = [allowed_sizes(g.units, g.chunk) for g in plan.groups]
    kept = [g.units for g in plan.groups]
    # Each group's importance is scaled by what one of its units costs in the full model, so a unit's
    # score is its importance relative to its group per *share* of what it frees now.
    weight = [1.0] * len(kept)
    for g in range(len(kept)):
        if len(sizes[g]) > 1:
            weight[g] = counter.delta(g, kept, sizes[g][1]) / (kept[g] - sizes[g][1])

    def chunk_score(g: int, a: int, b: int) -> float:
        """Normalised importance of the units at removal positions [a, b) of group g."""
        return weight[g] * sum(norm[g][u] for u in order[g][a:b])

    def smaller(g: int) -> Optional[int]:
        return next((s for s in sizes[g] if s < kept[g]), None)

    def per_param(g: int, new: int) -> float:
        freed = counter.delta(g, kept, new)
        imp = chunk_score(g, plan.groups[g].units - kept[g], plan.groups[g].units - new)
        return imp / freed if freed > 0 else float("inf")

    count = counter.count(kept)
    heap = [(per_param(g, smaller(g)), g) for g in range(len(kept)) if smaller(g) is not None]
    heapq.heapify(heap)
    while count > target and heap:
        score, g = heapq.heappop(heap)
        new = smaller(g)
        current = per_param(g, new)
        if current > score * (1 + 1e-12) + 1e-300:  # stale: other groups shrank since it was scored
            heapq.heappush(heap, (current, g))
            continue
        count -= counter.delta(g, kept, new)
        kept[g] = new
        if smaller(g) is not None:
            heapq.heappush(heap, (per_param(g, smaller(g)), g))
    if count > target:
        return [], count, count
    while True:  # add back the most important chunk per parameter that still fits
        best = None
        for g in range(len(kept)):
            larger = [s for s in sizes[g] if s > kept[g]]
            if not larger:
                continue
            new = larger[-1]
            cost = -counter.delta(g, kept, new)
            if count + cost > target:
                continue
            units = plan.groups[g].units
            score = chunk_score(g, units - new, units - kept[g]) / max(cost, 1)
            if best is None or score > best[0]:
                best = (score, g, new, cost)
        if best is None:
            break
        _, g, new, cost = best
        kept[g] = new
        count += cost
    chosen = [sorted(order[g][plan.groups[g].units - kept[g]:]) for g in range(len(kept))]
    return chosen, count, None
