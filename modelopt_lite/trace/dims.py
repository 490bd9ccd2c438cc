"""What the symbol walk knows about each tensor, and the op tables it dispatches on.

Internal to `analyze_symbols`: a `_TVal` maps a tensor's dimensions
(negative indices) to the symbols that size them, or to BCAST for a
dimension known to be of size 1.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import fx, nn

from .symbols import Symbol

BCAST = "bcast"  # a dimension known to be of size 1


class _TVal:
    """What the walk knows about a tensor: its rank (if known), and symbols (or BCAST) by negative dim."""

    __slots__ = ("rank", "dims", "shape", "origin")

    def __init__(self, rank: Optional[int] = None, dims: Optional[Dict[int, Any]] = None, shape=None):
        self.rank = rank
        self.dims: Dict[int, Any] = dict(dims or {})
        self.shape = shape  # tuple of int | str (symbolic) | None when known
        self.origin = ""  # "model input" for graph inputs

    def symbols(self) -> List[Symbol]:
        return [v for v in self.dims.values() if isinstance(v, Symbol)]

    def neg(self, d: int) -> Optional[int]:
        return _neg(d, self.rank)


def _neg(d: int, rank: Optional[int]) -> Optional[int]:
    """Dimension `d` as a negative index, or None when it is positive and the rank is unknown."""
    if d < 0:
        return d
    return d - rank if rank is not None else None


def _opaque(shape) -> _TVal:
    """A tensor the walk knows nothing about but its shape."""
    return _TVal(shape=shape, rank=len(shape) if shape else None)


_PASS = {
    "relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh", "dropout", "dropout_", "contiguous", "clone", "to",
    "type", "float", "half", "bfloat16", "double", "alias", "detach", "neg", "abs", "rsqrt", "sqrt", "exp", "log",
    "softmax", "log_softmax", "_softmax", "hardtanh", "hardtanh_", "leaky_relu", "elu", "hardswish", "relu6", "mish",
    "_to_copy", "erf", "square", "reciprocal", "sin", "cos", "clamp", "clamp_min", "clamp_max", "hardsigmoid",
    "gelu_", "celu", "selu", "softplus", "logsigmoid", "_assert_tensor_metadata", "cpu", "cuda", "requires_grad_",
    "feature_dropout", "alpha_dropout", "native_dropout", "lift_fresh_copy", "copy", "masked_fill", "masked_fill_",
    "pow", "__pow__",
}
_ELEMENTWISE = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "floordiv", "iadd", "imul", "isub",
    "maximum", "minimum", "rsub", "__add__", "__mul__", "__sub__", "__truediv__", "__radd__", "__rmul__", "where",
    "fmod", "remainder", "addcmul", "lerp", "eq", "ne", "gt", "lt", "ge", "le", "logical_and", "logical_or",
    "__and__", "__or__", "and_", "or_",
}
_SIZE_QUERIES = {"getattr", "size", "dim", "numel", "sym_size", "sym_numel", "_assert_scalar", "sym_constrain_range_for_size"}
_REDUCE = {"mean", "sum", "amax", "amin", "var", "std", "norm", "prod", "logsumexp", "max", "min", "argmax", "argmin"}
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample)
_PASS_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                 nn.Dropout3d, nn.AlphaDropout, nn.Softmax, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.ReLU6,
                 nn.ELU, nn.Mish, nn.Softplus) + _POOL_MODULES


def _shape_of(node: Any) -> Optional[Tuple[Any, ...]]:
    """Sizes from the node's metadata: ints, or the symbolic size's expression as a string."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) if isinstance(s, int) else str(s) for s in val.shape)
    return None


def _same(a, b) -> bool:
    return a == b and a is not None or (a is None and b is None)


def _broadcasts(t: _TVal, d: int) -> bool:
    if t.rank is not None and d < -t.rank:
        return True
    if t.shape is not None and (d < -len(t.shape) or t.shape[d] == 1):
        return True
    return t.dims.get(d) == BCAST


def _out(x: _TVal, shape) -> _TVal:
    return _TVal(rank=x.rank if x.rank is not None else (len(shape) if shape else None), dims=x.dims, shape=shape)


def _without(t: _TVal, d: int) -> _TVal:
    return _TVal(rank=t.rank, dims={k: v for k, v in t.dims.items() if k != d}, shape=None)


def _drop_dims(t: _TVal, dims: List[int], shape) -> _TVal:
    out = _TVal(rank=(t.rank - len(dims)) if t.rank is not None else None, shape=shape)
    for d, v in t.dims.items():
        if d in dims:
            continue
        shift = sum(1 for r in dims if r > d)
        out.dims[d + shift] = v
    return out


def _map_args(a, env):
    if isinstance(a, fx.Node):
        return env.get(a)
    if isinstance(a, (list, tuple)):
        return type(a)(_map_args(x, env) for x in a) if not hasattr(a, "_fields") else tuple(_map_args(x, env) for x in a)
    if isinstance(a, dict):
        return {k: _map_args(v, env) for k, v in a.items()}
    return a


def _leaves(a):
    if isinstance(a, (list, tuple)):
        for x in a:
            yield from _leaves(x)
    elif isinstance(a, dict):
        for x in a.values():
            yield from _leaves(x)
    else:
        yield a
