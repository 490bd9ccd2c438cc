"""Layers that read the same activation, and layers that write into a residual stream.

Fused kernels and checkpoints (one QKV GEMM, one gate-up GEMM) quantize an
activation once for all the layers that read it, so those layers' input
quantizers must agree; `shared_input_groups` finds them in the graphs.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import fx, nn

from .collection import GraphCollection
from .graph_utils import SAME_VALUE_OPS, op_name, same_value_op

__all__ = ["shared_input_groups", "residual_writers", "same_value"]

# Ops and modules whose output is their input's value (in eval mode), so readers through them read the same activation.
_SAME_VALUE_OPS = SAME_VALUE_OPS | {"dropout"}
_SAME_VALUE_MODULES = (nn.Identity, nn.Dropout)
_ADD_OPS = {"add", "add_", "iadd", "__add__", "__iadd__"}


def _module(entry_module: nn.Module, node: fx.Node) -> Optional[nn.Module]:
    if node.op != "call_module":
        return None
    try:
        return entry_module.get_submodule(node.target)
    except AttributeError:
        return None


def same_value(entry_module: nn.Module, node: fx.Node) -> bool:
    """True when `node` passes its first input's value on unchanged (dropout, no-op casts and the like)."""
    if node.op == "call_module":
        return isinstance(_module(entry_module, node), _SAME_VALUE_MODULES)
    return same_value_op(node, _SAME_VALUE_OPS)


def _readers(entry_module: nn.Module, node: fx.Node, want: Callable[[nn.Module], bool]) -> List[fx.Node]:
    """call_module nodes of wanted layers that take `node`'s value as their first input."""
    out: List[fx.Node] = []
    for user in node.users:
        first = user.args[0] if user.args else None
        m = _module(entry_module, user)
        if m is not None and first is node and want(m):
            out.append(user)
        elif first is node and same_value(entry_module, user):
            out.extend(_readers(entry_module, user, want))
    return out


def _is_weighted_layer(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() >= 2 and not isinstance(m, nn.Embedding)


def shared_input_groups(graphs: GraphCollection, want: Optional[Callable[[nn.Module], bool]] = None) -> List[List[str]]:
    """Groups (full module names, graph order) of two or more layers that read the same activation."""
    want = want or _is_weighted_layer
    groups: List[List[str]] = []
    for entry in graphs.entries():
        prefix = entry.name
        for node in entry.graph.nodes:
            readers = _readers(entry.module, node, want)
            names = list(dict.fromkeys(f"{prefix}.{r.target}" if prefix else r.target for r in readers))
            if len(names) >= 2:
                groups.append(names)
    # Reading through a dropout gives the same group twice; keep each once, and no subsets.
    unique: List[List[str]] = []
    for g in sorted(groups, key=len, reverse=True):
        if not any(set(g) <= set(u) for u in unique):
            unique.append(g)
    order = {tuple(g): i for i, g in enumerate(groups)}
    return sorted(unique, key=lambda g: order[tuple(g)])


def residual_writers(graphs: GraphCollection, want: Optional[Callable[[nn.Module], bool]] = None) -> List[str]:
    """Layers whose output is added (directly or through dropout) to another tensor of the same shape."""
    want = want or _is_weighted_layer
    found: Dict[str, None] = {}
    for entry in graphs.entries():
        for node in entry.graph.nodes:
            m = _module(entry.module, node)
            if m is None or not want(m):
                continue
            downstream = _descendants(node)
            frontier = [node]
            while frontier:
                cur = frontier.pop()
                for user in cur.users:
                    if same_value(entry.module, user) and user.args and user.args[0] is cur:
                        frontier.append(user)
                    elif user.op in ("call_function", "call_method") and op_name(user) in _ADD_OPS:
                        other = [a for a in user.args[:2] if isinstance(a, fx.Node) and a is not cur]
                        if other and other[0] not in downstream and _same_shape(cur, other[0]):
                            found[f"{entry.name}.{node.target}" if entry.name else node.target] = None
    return list(found)


def _descendants(node: fx.Node) -> set:
    seen, todo = set(), [node]
    while todo:
        for u in todo.pop().users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
        return tuple(map(str, va.shape)) == tuple(map(str, vb.shape))
    return True  # no metadata: an add of a layer output with another tensor
