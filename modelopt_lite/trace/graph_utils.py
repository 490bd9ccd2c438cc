"""Small helpers shared by the tracer, the export normalisation and the graph walks."""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Optional, Tuple

import torch
from torch import fx, nn

__all__ = ["op_name", "get_attr_path", "matches_any", "linear_types", "same_value_op", "SAME_VALUE_OPS"]


def op_name(node: fx.Node) -> str:
    """The op's base name, the same for FX and ATen graphs: "view", "add", "scaled_dot_product_attention"."""
    t = node.target
    if node.op == "call_method":
        return str(t)
    packet = getattr(t, "overloadpacket", None)  # an ATen OpOverload
    if packet is not None:
        return packet.__name__
    return getattr(t, "__name__", str(t))


def get_attr_path(root: Any, target: str) -> Optional[Any]:
    """The object at dotted `target` under `root` (a submodule, parameter or buffer), or None."""
    obj = root
    for part in target.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def matches_any(predicates: Iterable[Callable[[nn.Module], bool]], module: nn.Module) -> bool:
    """True when some predicate accepts `module`; a predicate that raises does not match."""
    for pred in predicates:
        try:
            if pred(module):
                return True
        except Exception:  # noqa: BLE001, S112 - user predicates may not expect every module
            continue
    return False


def linear_types() -> Tuple[type, ...]:
    """nn.Linear, and transformers' Conv1D (GPT-2) when transformers is loaded."""
    if "transformers" in sys.modules:
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:
            return (nn.Linear,)
        return (nn.Linear, Conv1D)
    return (nn.Linear,)


SAME_VALUE_OPS = frozenset({"to", "alias", "contiguous", "clone", "detach", "_to_copy", "type"})
_CASTS = frozenset({"to", "_to_copy", "type"})


def same_value_op(node: fx.Node, ops: Iterable[str] = SAME_VALUE_OPS) -> bool:
    """True for a call of one of `ops` that returns its first input's value (same dtype and shape).

    Judged from ``meta["val"]``; without metadata, casts count as changing the value.
    """
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    name = op_name(node)
    if name not in ops:
        return False
    out, src = node.meta.get("val"), node.args[0].meta.get("val")
    if isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor):
        return out.dtype == src.dtype and out.shape == src.shape
    return name not in _CASTS
