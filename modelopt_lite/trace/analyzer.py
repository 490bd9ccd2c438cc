"""analyze_symbols: walk a model's graphs and link the symbols of its layers.

Every tensor in a graph gets a map from its dimensions (negative indices)
to the symbol groups that size them. Layers with a symbol rule read their
input's feature dimension (linking it to their INCOMING symbol) and write
their OUTGOING symbol; pass-through ops forward the map; element-wise ops
with several tensor inputs link the symbols they combine (residual adds,
the SwiGLU multiply); concat makes a ConcatSymbol of its parts; reshapes
into and out of heads link projections to their attention module's head
symbols. Anything the walk does not understand, and every model input and
output, is a boundary: the symbols that reach it become constant.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from .collection import GraphCollection, recursive_trace
from .symbols import CLType, ConcatSymbol, Symbol, SymMap, attention_dims

__all__ = ["analyze_symbols"]

BCAST = "bcast"  # a dimension known to be of size 1


class _UnionFind:
    def __init__(self):
        self.parent: Dict[Symbol, Symbol] = {}
        self.order: Dict[Symbol, int] = {}

    def add(self, s: Symbol) -> Symbol:
        if s not in self.parent:
            self.parent[s] = s
            self.order[s] = len(self.order)
        return s

    def find(self, s: Symbol) -> Symbol:
        self.add(s)
        while self.parent[s] is not s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: Symbol, b: Symbol) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            if self.order[rb] < self.order[ra]:
                ra, rb = rb, ra
            self.parent[rb] = ra


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
        if d < 0:
            return d
        return d - self.rank if self.rank is not None else None


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t.__name__
    return getattr(t, "__name__", str(t))


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


class _Walker:
    def __init__(self, symmap: SymMap, gc: GraphCollection):
        self.symmap = symmap
        self.gc = gc
        self.uf = _UnionFind()
        self.reasons: Dict[Symbol, str] = {}
        self.concats: List[ConcatSymbol] = []
        self.touched: set = set()
        self.module_io: Dict[str, Tuple[_TVal, _TVal]] = {}

    # --- group operations --------------------------------------------------
    def link(self, a: Any, b: Any) -> None:
        if isinstance(a, Symbol) and isinstance(b, Symbol):
            self.uf.union(a, b)

    def disable(self, s: Any, reason: str) -> None:
        if isinstance(s, Symbol):
            root = self.uf.find(s)
            self.reasons.setdefault(root, reason)

    def disable_all(self, vals, reason: str) -> None:
        for v in _flatten(vals):
            if isinstance(v, _TVal):
                for s in v.symbols():
                    self.disable(s, reason)

    def info(self, module: nn.Module):
        if module in self.symmap:
            info = self.symmap[module]
            for s in info.symbols.values():
                self.uf.add(s)
            self.touched.add(module)
            return info
        return None

    # --- graph walk -----------------------------------------------------------
    def walk(self, prefix: str, root: nn.Module, graph: fx.Graph) -> None:
        env: Dict[fx.Node, Any] = {}
        self.env = env
        for node in graph.nodes:
            try:
                env[node] = self.visit(node, env, prefix, root)
            except Exception as e:  # noqa: BLE001 - an op the rules trip over is a boundary
                self.disable_all([env.get(a) for a in node.all_input_nodes], f"{node.name}: {type(e).__name__}")
                env[node] = _TVal(shape=_shape_of(node), rank=_rank(node))
        self._sequential_depth(prefix, root, graph, env)

    def visit(self, node: fx.Node, env, prefix: str, root: nn.Module):
        shape = _shape_of(node)
        if node.op == "placeholder":
            t = _TVal(rank=len(shape) if shape else None, shape=shape)
            t.origin = "model input" if prefix == "" else f"input of {prefix}"
            return t
        if node.op == "get_attr":
            return self._fixed(shape, node)
        if node.op == "output":
            self.disable_all(_map_args(node.args, env), "model output" if prefix == "" else f"output of {prefix}")
            return None
        args = _map_args(node.args, env)
        kwargs = _map_args(node.kwargs, env)
        if node.op == "call_module":
            return self.call_module(node, args, kwargs, prefix, root, shape)
        name = _op_name(node)
        tensors = [a for a in _flatten(args) if isinstance(a, _TVal)]
        if not tensors:
            return _TVal(shape=shape, rank=len(shape) if shape else None) if shape is not None else None
        x = args[0] if args and isinstance(args[0], _TVal) else tensors[0]
        if name in _SIZE_QUERIES:
            return None  # sizes, not tensors
        if name in ("getitem",):
            return self.getitem(node, args, shape)
        if name in ("slice", "narrow", "select", "index_select"):
            return self.slice(node, x, args, kwargs, shape, name)
        if name in _PASS:
            return _out(x, shape)
        if name in _ELEMENTWISE:
            return self.elementwise(tensors, shape, node)
        if name in _REDUCE:
            return self.reduce(node, x, args, kwargs, shape)
        if name in ("view", "reshape", "_unsafe_view", "flatten", "unflatten"):
            return self.reshape(node, x, args, shape, prefix, root, name)
        if name in ("transpose", "swapaxes", "permute", "t"):
            return self.permute(node, x, args, shape, name)
        if name in ("unsqueeze", "squeeze"):
            return self.unsqueeze(node, x, args, shape, name)
        if name in ("expand", "expand_as", "repeat", "broadcast_to"):
            return self.expand(x, shape, tensors, node)
        if name in ("cat", "concat", "concatenate"):
            return self.cat(node, args, kwargs, shape)
        if name in ("matmul", "bmm", "__matmul__"):
            return self.matmul(tensors, shape)
        if name == "scaled_dot_product_attention":
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            return self.sdpa(tensors[:3], shape, mask if isinstance(mask, _TVal) else None)
        # Unknown op: a boundary for every symbol that enters it.
        self.disable_all(tensors, f"op {name}")
        return _TVal(shape=shape, rank=len(shape) if shape else None)

    def _fixed(self, shape, node) -> _TVal:
        if shape is None:
            return _TVal()
        rank = len(shape)
        return _TVal(rank=rank, dims={i - rank: BCAST for i, s in enumerate(shape) if s == 1}, shape=shape)

    # --- modules -------------------------------------------------------------
    def call_module(self, node, args, kwargs, prefix, root, shape):
        path = node.target
        full = f"{prefix}.{path}" if prefix else path
        module = root.get_submodule(path)
        x = args[0] if args and isinstance(args[0], _TVal) else None
        tensors = [a for a in _flatten(list(args) + list(kwargs.values())) if isinstance(a, _TVal)]
        if self.gc.is_failed(module):
            self.disable_all(tensors, f"{full} could not be traced")
            return _TVal(shape=shape, rank=len(shape) if shape else None)
        info = self.info(module)
        if info is None:
            if isinstance(module, _PASS_MODULES) and x is not None:
                out = _out(x, shape)
                if isinstance(module, _POOL_MODULES):
                    out.dims = {d: v for d, v in out.dims.items() if isinstance(v, Symbol) and self._is_channel(d, out)}
                return out
            if isinstance(module, nn.Flatten) and x is not None:
                return self._flatten(x, module.start_dim, module.end_dim, shape)
            self.disable_all(tensors, f"module {full} ({type(module).__name__}) has no symbol rule")
            return _TVal(shape=shape, rank=len(shape) if shape else None)
        if x is None:
            self.disable_all(tensors, f"{full}: no tensor input")
            return _TVal(shape=shape)
        out = self.apply_rule(module, info, x, shape, full)
        self.module_io[full] = (x, out)
        return out

    def _is_channel(self, d, val: _TVal) -> bool:
        return val.rank is not None and d == 1 - val.rank

    def apply_rule(self, module, info, x: _TVal, shape, full: str) -> _TVal:
        syms = info.symbols
        rank = x.rank if x.rank is not None else (len(shape) if shape else None)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            rank = module.weight.dim()  # batched input: same rank as the weight
        if isinstance(module, nn.BatchNorm1d) and rank is None:
            rank = 2
        inc = [s for s in syms.values() if s.cl_type is CLType.INCOMING]
        outg = [s for s in syms.values() if s.cl_type is CLType.OUTGOING]
        out = _TVal(rank=rank, dims=dict(x.dims), shape=shape)
        for s in inc:
            d = self._dim(s, rank)
            if d is None:
                self.disable(s, f"{full}: input rank unknown")
                continue
            self._read(x, d, s, full)
        if info.is_shape_preserving:
            return out
        if isinstance(module, nn.Embedding):
            r = (x.rank + 1) if x.rank is not None else None
            return _TVal(rank=r, dims={-1: syms["embedding_dim"]}, shape=shape)
        for s in inc:
            d = self._dim(s, rank)
            if d is not None:
                out.dims.pop(d, None)
        for s in outg:
            d = self._dim(s, rank)
            if d is not None:
                out.dims[d] = s
        return out

    def _dim(self, s: Symbol, rank: Optional[int]) -> Optional[int]:
        d = next(iter(s.elastic_dims), None)
        if d is None:
            return None
        if d >= 0:
            return d - rank if rank is not None else None
        return d

    def _read(self, x: _TVal, d: int, s: Symbol, full: str) -> None:
        have = x.dims.get(d)
        if isinstance(have, Symbol):
            self.link(have, s)
        else:
            self.disable(s, x.origin or f"{full} reads a fixed-size input")

    # --- ops -----------------------------------------------------------------
    def elementwise(self, tensors: Sequence[_TVal], shape, node) -> _TVal:
        ranks = [t.rank for t in tensors]
        rank = len(shape) if shape is not None else (max(ranks) if all(r is not None for r in ranks) else None)
        out = _TVal(rank=rank, shape=shape)
        keys = set()
        for t in tensors:
            keys |= set(t.dims)
        if shape is not None:
            keys |= {i - len(shape) for i in range(len(shape))}
        for d in keys:
            syms = [t.dims.get(d) for t in tensors]
            real = [s for s in syms if isinstance(s, Symbol)]
            if not real:
                if all(s == BCAST for s in syms if s is not None) and all(s is not None for s in syms):
                    out.dims[d] = BCAST
                continue
            for s in real[1:]:
                self.link(real[0], s)
            for t, s in zip(tensors, syms):
                if s is None and not _broadcasts(t, d):
                    self.disable(real[0], f"{node.name}: combined with a fixed-size tensor")
            out.dims[d] = real[0]
        return out

    def reduce(self, node, x: _TVal, args, kwargs, shape) -> _TVal:
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = args[2] if len(args) > 2 and isinstance(args[2], bool) else kwargs.get("keepdim", False)
        if dims is None or isinstance(dims, _TVal):
            return _TVal(rank=0 if not keep else x.rank, shape=shape)
        dims = [dims] if isinstance(dims, int) else list(dims)
        negs = [x.neg(d) for d in dims]
        if any(d is None for d in negs):
            return _TVal(shape=shape, rank=len(shape) if shape else None)
        out = _TVal(rank=x.rank, dims=dict(x.dims), shape=shape)
        for d in negs:
            out.dims[d] = BCAST
        if not keep:
            out = _drop_dims(out, negs, shape)
        return out

    def slice(self, node, x: _TVal, args, kwargs, shape, name) -> _TVal:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        d = x.neg(dim) if isinstance(dim, int) else None
        if d is None:
            self.disable_all([x], f"{node.name}: {name} of unknown rank")
            return _TVal(shape=shape, rank=len(shape) if shape else None)
        full = name == "slice" and shape is not None and x.shape is not None and shape[d] == x.shape[d] and shape[d] is not None
        out = _TVal(rank=x.rank, dims=dict(x.dims), shape=shape)
        if not full:
            self.disable(x.dims.get(d), f"{node.name}: {name} along the dimension")
            out.dims.pop(d, None)
        if name == "select":
            out = _drop_dims(out, [d], shape)
        return out

    def getitem(self, node, args, shape):
        src, idx = args[0], args[1]
        if isinstance(src, (list, tuple)):
            return src[idx] if isinstance(idx, int) and idx < len(src) else None
        if not isinstance(src, _TVal):
            return None
        idx = idx if isinstance(idx, tuple) else (idx,)
        if all(i is Ellipsis or i is None or isinstance(i, (int, slice)) for i in idx) and sum(i is Ellipsis for i in idx) <= 1:
            # Basic indexing: map every input dim to its output position, fix sliced dims.
            if Ellipsis not in idx:
                idx = idx + (Ellipsis,)
            e = idx.index(Ellipsis)
            before, after = idx[:e], idx[e + 1:]
            out_rank = len(shape) if shape is not None else None
            out = _TVal(rank=out_rank, shape=shape)
            # From the end: dims after the ellipsis, then the ellipsis dims keep their negative index.
            n_after_out = sum(1 for i in after if not isinstance(i, int))
            d_in = -1
            d_out = -1
            for i in reversed(after):
                if i is None:
                    d_out -= 1
                    continue
                v = src.dims.get(d_in)
                if isinstance(i, int) or i != slice(None):
                    self.disable(v, f"{node.name}: indexing along the dimension")
                if not isinstance(i, int):
                    if isinstance(v, Symbol) and i == slice(None):
                        out.dims[d_out] = v
                    d_out -= 1
                d_in -= 1
            consumed_before = sum(1 for i in before if i is not None)
            for d, v in src.dims.items():
                if d > d_in:
                    continue
                if src.rank is not None and d - (-src.rank) < consumed_before:
                    # A dim indexed before the ellipsis.
                    pos = d + src.rank
                    item = [i for i in before if i is not None][pos]
                    if item != slice(None):
                        self.disable(v, f"{node.name}: indexing along the dimension")
                        continue
                    if out_rank is not None:
                        out.dims[pos - out_rank + sum(1 for i in before[:pos + 1] if i is None)] = v
                    continue
                if src.rank is None and consumed_before and isinstance(v, Symbol):
                    self.disable(v, f"{node.name}: indexing of unknown rank")
                    continue
                out.dims[d - (d_in + 1) + (d_out + 1)] = v
            del n_after_out
            return out
        self.disable_all([src], f"{node.name}: indexing")
        return _TVal(shape=shape, rank=len(shape) if shape else None)

    def permute(self, node, x: _TVal, args, shape, name) -> _TVal:
        rank = x.rank if x.rank is not None else (len(shape) if shape else None)
        if name == "t":
            perm = [1, 0] if rank in (None, 2) else None
            rank = 2
        elif name == "permute":
            perm = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        else:
            if rank is None and not (args[1] < 0 and args[2] < 0):
                self.disable_all([x], f"{node.name}: transpose of unknown rank")
                return _TVal(shape=shape)
            perm = None
            a, b = args[1], args[2]
        if rank is None and name == "permute":
            self.disable_all([x], f"{node.name}: permute of unknown rank")
            return _TVal(shape=shape)
        out = _TVal(rank=rank, shape=shape)
        if name in ("transpose", "swapaxes"):
            a, b = x.neg(a), x.neg(b)
            if rank is None:
                a, b = args[1], args[2]
            mapping = {a: b, b: a}
            for d, v in x.dims.items():
                out.dims[mapping.get(d, d)] = v
            return out
        if perm is None or rank is None:
            self.disable_all([x], f"{node.name}: unsupported permute")
            return _TVal(shape=shape)
        for new_i, old_i in enumerate(perm):
            old = old_i - rank if old_i >= 0 else old_i
            if old in x.dims:
                out.dims[new_i - rank] = x.dims[old]
        return out

    def unsqueeze(self, node, x: _TVal, args, shape, name) -> _TVal:
        d = args[1] if len(args) > 1 else None
        if name == "squeeze" and isinstance(d, int) and x.rank is not None:
            nd = x.neg(d)
            if x.shape is not None and x.shape[nd] != 1:
                return _out(x, shape)  # squeeze of a dim that is not 1: no-op
            return _drop_dims(_TVal(rank=x.rank, dims={k: v for k, v in x.dims.items() if k != nd}), [nd], shape)
        if name == "unsqueeze" and isinstance(d, int):
            rank = x.rank + 1 if x.rank is not None else None
            nd = d if d < 0 else (d - rank if rank is not None else None)
            if nd is None:
                self.disable_all([x], f"{node.name}: unsqueeze of unknown rank")
                return _TVal(shape=shape)
            out = _TVal(rank=rank, shape=shape)
            for k, v in x.dims.items():
                out.dims[k if k > nd else k - 1] = v
            out.dims[nd] = BCAST
            return out
        self.disable_all([x], f"{node.name}: squeeze")
        return _TVal(shape=shape)

    def expand(self, x: _TVal, shape, tensors, node) -> _TVal:
        if shape is None:
            out = _out(x, None)
            out.dims = {d: v for d, v in x.dims.items() if isinstance(v, Symbol)}
            out.rank = None
            return out
        out = _realign(x, shape)
        out.dims = {d: v for d, v in out.dims.items() if isinstance(v, Symbol) or shape[d] == 1}
        return out

    def cat(self, node, args, kwargs, shape) -> _TVal:
        parts = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if not isinstance(parts, (list, tuple)) or not all(isinstance(p, _TVal) for p in parts) or not isinstance(dim, int):
            self.disable_all(parts, f"{node.name}: concat")
            return _TVal(shape=shape)
        rank = next((p.rank for p in parts if p.rank is not None), len(shape) if shape else None)
        nd = dim if dim < 0 else (dim - rank if rank is not None else None)
        if nd is None:
            self.disable_all(parts, f"{node.name}: concat of unknown rank")
            return _TVal(shape=shape)
        out = self.elementwise([_without(p, nd) for p in parts], shape, node)
        out.rank = rank
        syms = [p.dims.get(nd) if isinstance(p.dims.get(nd), Symbol) else None for p in parts]
        if any(s is not None for s in syms):
            size = shape[nd] if shape is not None else None
            c = ConcatSymbol(syms, size=size)
            c.name = f"concat:{node.name}"
            self.uf.add(c)
            self.concats.append(c)
            out.dims[nd] = c
        return out

    def matmul(self, tensors, shape) -> _TVal:
        if len(tensors) != 2:
            self.disable_all(tensors, "matmul")
            return _TVal(shape=shape)
        a, b = tensors
        self.link(a.dims.get(-1), b.dims.get(-2))
        rank = len(shape) if shape is not None else None
        out = _TVal(rank=rank, shape=shape)
        for d in set(a.dims) | set(b.dims):
            if d <= -3:
                sa, sb = a.dims.get(d), b.dims.get(d)
                self.link(sa, sb)
                v = sa if isinstance(sa, Symbol) else sb
                if v is not None:
                    out.dims[d] = v
        if -2 in a.dims:
            out.dims[-2] = a.dims[-2]
        if -1 in b.dims:
            out.dims[-1] = b.dims[-1]
        return out

    def sdpa(self, qkv: Sequence[_TVal], shape, mask: Optional[_TVal] = None) -> _TVal:
        q, k, v = (list(qkv) + [None, None, None])[:3]
        if q is None or k is None or v is None:
            self.disable_all(qkv, "attention")
            return _TVal(shape=shape)
        if mask is not None:  # a per-head bias (T5, ALiBi) moves with the heads
            for d, s in mask.dims.items():
                if d == -3 and not _broadcasts(mask, d):
                    self.link(s, q.dims.get(-3))
                else:
                    self.disable(s, "attention mask")
        self.link(q.dims.get(-1), k.dims.get(-1))
        self.link(k.dims.get(-3), v.dims.get(-3))
        self.link(q.dims.get(-3), k.dims.get(-3))  # heads move with kv heads (whole groups in GQA)
        out = _TVal(rank=q.rank, dims=dict(q.dims), shape=shape)
        if -1 in v.dims:
            out.dims[-1] = v.dims[-1]
        else:
            out.dims.pop(-1, None)
        return out

    def _flatten(self, x: _TVal, start: int, end: int, shape) -> _TVal:
        rank = x.rank
        s, e = x.neg(start), x.neg(end)
        if s is None or e is None:
            self.disable_all([x], "flatten of unknown rank")
            return _TVal(rank=start + 1 if end == -1 else None, shape=shape)
        return self._merge(x, list(range(s, e + 1)), shape, rank - (e - s))

    def _merge(self, x: _TVal, span: List[int], shape, new_rank) -> _TVal:
        """Merge dims `span` (negative, ascending) into one."""
        syms = [x.dims.get(d) for d in span]
        real = [s for s in syms if isinstance(s, Symbol)]
        out = _TVal(rank=new_rank, shape=shape)
        last = span[-1]
        for d, v in x.dims.items():
            if d < span[0]:
                out.dims[d + (len(span) - 1)] = v
            elif d > last:
                out.dims[d] = v
        new_d = last
        if real:
            out.dims[new_d] = real[0]
            for s in real[1:]:
                self.disable(s, "merged into a wider dimension")
        return out

    def reshape(self, node, x: _TVal, args, shape, prefix, root, name) -> _TVal:
        if name == "flatten":
            start = args[1] if len(args) > 1 else 0
            end = args[2] if len(args) > 2 else -1
            return self._flatten(x, start, end, shape)
        target = shape
        if target is None:
            spec = args[1:] if not (len(args) == 2 and isinstance(args[1], (list, tuple))) else args[1]
            target = tuple(s if isinstance(s, int) else None for s in spec)
        in_shape = x.shape
        if in_shape is None and x.rank is None and len(target) >= 2 and isinstance(target[-1], int):
            # Rank unknown (no example inputs): a split of the last dim into (..., a, b).
            sym = x.dims.get(-1)
            b = target[-1]
            if isinstance(sym, Symbol) and sym.size and b > 0 and sym.size % b == 0:
                x = _TVal(rank=len(target) - 1, dims=x.dims)
        if in_shape is None and x.rank is not None:
            in_shape = tuple(v.size if isinstance(v, Symbol) else (1 if v == BCAST else None)
                             for v in (x.dims.get(i - x.rank) for i in range(x.rank)))
        if in_shape is None:
            self.disable_all([x], f"{node.name}: reshape of unknown shape")
            return _TVal(rank=len(target), shape=shape)
        return self._reshape(node, x, tuple(in_shape), tuple(target), shape, prefix, root)

    def _reshape(self, node, x: _TVal, ins, outs, shape, prefix, root) -> _TVal:
        n_in, n_out = len(ins), len(outs)
        out = _TVal(rank=n_out, shape=shape)
        # Common prefix (same size, or both unknown at the front) and common suffix.
        i = 0
        while i < min(n_in, n_out) - 1 and _same(ins[i], outs[i]) and not isinstance(x.dims.get(i - n_in), Symbol):
            out.dims.pop(i - n_out, None)
            if x.dims.get(i - n_in) == BCAST:
                out.dims[i - n_out] = BCAST
            i += 1
        j = 0
        while j < min(n_in, n_out) - i and ins[n_in - 1 - j] == outs[n_out - 1 - j] and ins[n_in - 1 - j] is not None:
            v = x.dims.get(-1 - j)
            if v is not None:
                out.dims[-1 - j] = v
            j += 1
        mid_in = list(range(i - n_in, -j)) if j else list(range(i - n_in, 0))
        mid_out = list(range(i - n_out, -j)) if j else list(range(i - n_out, 0))
        mid_in_v = [x.dims.get(d) for d in mid_in]
        mid_in_sizes = [ins[d] for d in mid_in]
        mid_out_sizes = [outs[d] for d in mid_out]
        sym_in = [(d, v) for d, v in zip(mid_in, mid_in_v) if isinstance(v, Symbol)]
        # Drop size-1 dims on both sides.
        keep_in = [(d, s) for d, s in zip(mid_in, mid_in_sizes) if s != 1]
        keep_out = [(d, s) for d, s in zip(mid_out, mid_out_sizes) if s != 1]
        for d, s in zip(mid_out, mid_out_sizes):
            if s == 1:
                out.dims[d] = BCAST
        if not sym_in:
            return out
        if len(keep_in) == 1 and len(keep_out) == 1:  # pure pass-through of one dim
            out.dims[keep_out[0][0]] = x.dims[keep_in[0][0]] if keep_in[0][0] in x.dims else None
            return out
        if len(keep_in) == 1 and len(keep_out) == 2 and len(sym_in) == 1:  # split into heads
            sym = sym_in[0][1]
            (d_a, a), (d_b, b) = keep_out
            a = a if isinstance(a, int) and a > 0 else None
            b = b if isinstance(b, int) and b > 0 else None
            size = sym.size if sym.size is not None else keep_in[0][1]
            if a is None and b and size and size % b == 0:
                a = size // b
            heads = self._head_symbols(node, prefix, root, a, b)
            if heads is not None:
                h_sym, hd_sym = heads
                self.link(sym, h_sym)
                out.dims[d_a] = sym
                out.dims[d_b] = hd_sym
                return out
            self.disable(sym, f"{node.name}: split of a dimension")
            return out
        if len(keep_out) == 1 and len(keep_in) >= 2:  # merge: the outer symbol carries
            syms = [x.dims.get(d) for d, _ in keep_in]
            if isinstance(syms[0], Symbol):
                out.dims[keep_out[0][0]] = syms[0]
                for s in syms[1:]:
                    if isinstance(s, Symbol):
                        self.disable(s, f"{node.name}: merged into a wider dimension")
                return out
        for _, s in sym_in:
            self.disable(s, f"{node.name}: reshape")
        return out

    def _head_symbols(self, node, prefix, root, a, b):
        """(heads or kv heads symbol, head_dim symbol) of the attention module around `node`, if sizes match."""
        stack = node.meta.get("nn_module_stack") or {}
        for val in reversed(list(stack.values())):
            if not isinstance(val, tuple):
                continue
            path = val[0]
            try:
                module = root.get_submodule(path) if path else root
            except AttributeError:
                continue
            info = self.info(module)
            if info is None or "num_heads" not in info or "head_dim" not in info:
                continue
            dims = attention_dims(module) if not isinstance(module, nn.MultiheadAttention) else None
            if dims is None:
                continue
            heads, kv, hd = dims
            if b != hd:
                return None
            if a == heads:
                return info["num_heads"], info["head_dim"]
            if a == kv and "num_kv_heads" in info:
                return info["num_kv_heads"], info["head_dim"]
            return None
        return None

    # --- module boundaries -----------------------------------------------------
    def _sequential_depth(self, prefix, root, graph, env) -> None:
        """Record (input, output) tensors of every module call with one of each (for Sequential depth)."""
        members: Dict[str, List[fx.Node]] = {}
        for node in graph.nodes:
            for val in (node.meta.get("nn_module_stack") or {}).values():
                if isinstance(val, tuple) and val[0]:
                    members.setdefault(val[0], []).append(node)
        for path, nodes in members.items():
            full = f"{prefix}.{path}" if prefix else path
            if full in self.module_io:
                continue
            mset = set(nodes)
            ins = {a for n in nodes for a in n.all_input_nodes if a not in mset and isinstance(env.get(a), _TVal)
                   and a.op != "get_attr"}
            outs = [n for n in nodes if any(u not in mset for u in n.users)]
            if len(ins) == 1 and len(outs) == 1 and isinstance(env.get(outs[0]), _TVal):
                self.module_io[full] = (env[next(iter(ins))], env[outs[0]])
        for module, info in self.symmap.items():
            if isinstance(module, nn.Sequential) and "depth" in info:
                self.uf.add(info["depth"])


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


def _realign(x: _TVal, shape) -> _TVal:
    """Map dims of x onto a new known shape of possibly larger rank (unsqueeze/expand), from the right."""
    out = _TVal(rank=len(shape), shape=shape)
    for d, v in x.dims.items():
        out.dims[d] = v
    return out


def _rank(node) -> Optional[int]:
    s = _shape_of(node)
    return len(s) if s is not None else None


def _map_args(a, env):
    if isinstance(a, fx.Node):
        return env.get(a)
    if isinstance(a, (list, tuple)):
        return type(a)(_map_args(x, env) for x in a) if not hasattr(a, "_fields") else tuple(_map_args(x, env) for x in a)
    if isinstance(a, dict):
        return {k: _map_args(v, env) for k, v in a.items()}
    return a


def _flatten(a):
    if isinstance(a, (list, tuple)):
        for x in a:
            yield from _flatten(x)
    elif isinstance(a, dict):
        for x in a.values():
            yield from _flatten(x)
    else:
        yield a


def analyze_symbols(model: nn.Module, graphs: Optional[GraphCollection] = None, **trace_kwargs) -> SymMap:
    """Link the symbols of every registered layer of `model` through its graphs.

    Traces with `recursive_trace(model, **trace_kwargs)` unless `graphs` is
    given. Afterwards every symbol is constant, searchable, dynamic (with its
    parent: the group's leading searchable symbol) or free, and
    ``symmap.groups`` lists the dimensions that must change together.
    """
    gc = graphs if graphs is not None else recursive_trace(model, **trace_kwargs)
    symmap = SymMap(model)
    w = _Walker(symmap, gc)
    for entry in gc.entries():
        w.walk(entry.name, entry.module, entry.graph)
    _resolve(symmap, gc, w)
    return symmap


def _resolve(symmap: SymMap, gc: GraphCollection, w: _Walker) -> None:
    uf = w.uf
    # Symbols of layers no graph reached, or that failed, are constant.
    for module, info in symmap.items():
        reason = None
        if gc.is_failed(module):
            reason = "module could not be traced"
        elif module not in w.touched and not isinstance(module, nn.Sequential):
            reason = "not reached by any graph"
        for s in info.symbols.values():
            uf.add(s)
            if s.is_constant:
                w.reasons.setdefault(uf.find(s), s.reason)
            if reason:
                w.reasons.setdefault(uf.find(s), reason)
    # A constant concat fixes its parts; repeat until nothing changes.
    changed = True
    while changed:
        changed = False
        for c in w.concats:
            if uf.find(c) in w.reasons:
                for p in c.parts:
                    if p is not None and uf.find(p) not in w.reasons:
                        w.reasons[uf.find(p)] = f"part of a fixed-size concat ({c.name})"
                        changed = True
    groups: Dict[Symbol, List[Symbol]] = {}
    for s in uf.parent:
        groups.setdefault(uf.find(s), []).append(s)
    symmap.groups = []
    for root, members in sorted(groups.items(), key=lambda kv: uf.order[kv[0]]):
        members.sort(key=lambda s: uf.order[s])
        reason = w.reasons.get(root)
        named = members
        for s in members:
            s.parent = None
        if reason is not None:
            for s in members:
                s.disable(reason)
        else:
            lead = next((s for s in members if s._searchable and s.cl_type is CLType.OUTGOING), None)
            lead = lead or next((s for s in members if s._searchable), None)
            if lead is not None:
                lead._searchable = True
                for s in members:
                    if s is not lead:
                        s.link_to(lead)
            else:
                for s in members[1:]:
                    s.link_to(members[0])
        # Concat symbols depend on their parts: list them after the parts' groups.
        if len(named) > 1 or not isinstance(named[0], ConcatSymbol):
            symmap.groups.append(named)
    _depth(symmap, w)


def _depth(symmap: SymMap, w: _Walker) -> None:
    """A Sequential may drop trailing layers whose output has the same symbols as their input."""
    for module, info in symmap.items():
        if not isinstance(module, nn.Sequential) or "depth" not in info:
            continue
        sym = info["depth"]
        if sym.is_constant:
            continue
        name = symmap._names[module]
        children = list(module._modules.keys())
        min_depth = len(children)
        for idx in reversed(range(len(children))):
            full = f"{name}.{children[idx]}" if name else children[idx]
            io = w.module_io.get(full)
            if io is None or not _same_groups(w, *io):
                break
            min_depth = idx
        sym.parent = None
        if min_depth >= len(children):
            sym.disable("no trailing layer keeps its input's shape")
        else:
            sym.min_size = max(min_depth, 1)


def _same_groups(w: _Walker, a: _TVal, b: _TVal) -> bool:
    keys = set(a.dims) | set(b.dims)
    for d in keys:
        x, y = a.dims.get(d), b.dims.get(d)
        if isinstance(x, Symbol) != isinstance(y, Symbol):
            return False
        if isinstance(x, Symbol) and w.uf.find(x) is not w.uf.find(y):
            return False
    return True
