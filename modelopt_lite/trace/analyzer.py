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

from torch import fx, nn

from .collection import GraphCollection, recursive_trace
from .dims import (
    _ELEMENTWISE, _PASS, _PASS_MODULES, _POOL_MODULES, _REDUCE, _SIZE_QUERIES, BCAST, _broadcasts, _drop_dims,
    _leaves, _map_args, _opaque, _out, _shape_of, _TVal,
)
from .graph_utils import op_name
from .layout_rules import LayoutRules
from .symbols import CLType, ConcatSymbol, Symbol, SymMap

__all__ = ["analyze_symbols"]

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


class _Walker(LayoutRules):
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
        for v in _leaves(vals):
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
        for node in graph.nodes:
            try:
                env[node] = self.visit(node, env, prefix, root)
            except Exception as e:  # noqa: BLE001 - an op the rules trip over is a boundary
                self.disable_all([env.get(a) for a in node.all_input_nodes], f"{node.name}: {type(e).__name__}")
                env[node] = _opaque(_shape_of(node))
        self._record_module_io(prefix, graph, env)

    def visit(self, node: fx.Node, env, prefix: str, root: nn.Module):
        shape = _shape_of(node)
        if node.op == "placeholder":
            t = _TVal(rank=len(shape) if shape else None, shape=shape)
            t.origin = "model input" if prefix == "" else f"input of {prefix}"
            return t
        if node.op == "get_attr":
            return self._fixed(shape)
        if node.op == "output":
            self.disable_all(_map_args(node.args, env), "model output" if prefix == "" else f"output of {prefix}")
            return None
        args = _map_args(node.args, env)
        kwargs = _map_args(node.kwargs, env)
        if node.op == "call_module":
            return self.call_module(node, args, kwargs, prefix, root, shape)
        name = op_name(node)
        tensors = [a for a in _leaves(args) if isinstance(a, _TVal)]
        if not tensors:
            return _opaque(shape) if shape is not None else None
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
            return self.expand(x, shape)
        if name in ("cat", "concat", "concatenate"):
            return self.cat(node, args, kwargs, shape)
        if name in ("matmul", "bmm", "__matmul__"):
            return self.matmul(tensors, shape)
        if name == "scaled_dot_product_attention":
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            return self.sdpa(tensors[:3], shape, mask if isinstance(mask, _TVal) else None)
        # Unknown op: a boundary for every symbol that enters it.
        self.disable_all(tensors, f"op {name}")
        return _opaque(shape)

    def _fixed(self, shape) -> _TVal:
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
        tensors = [a for a in _leaves(list(args) + list(kwargs.values())) if isinstance(a, _TVal)]
        if self.gc.is_failed(module):
            self.disable_all(tensors, f"{full} could not be traced")
            return _opaque(shape)
        info = self.info(module)
        if info is None:
            if isinstance(module, _PASS_MODULES) and x is not None:
                out = _out(x, shape)
                if isinstance(module, _POOL_MODULES):
                    out.dims = {d: v for d, v in out.dims.items() if isinstance(v, Symbol) and self._is_channel(d, out)}
                return out
            if isinstance(module, nn.Flatten) and x is not None:
                return self._leaves(x, module.start_dim, module.end_dim, shape)
            self.disable_all(tensors, f"module {full} ({type(module).__name__}) has no symbol rule")
            return _opaque(shape)
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
            return _opaque(shape)
        out = _TVal(rank=x.rank, dims=dict(x.dims), shape=shape)
        for d in negs:
            out.dims[d] = BCAST
        if not keep:
            out = _drop_dims(out, negs, shape)
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

    # --- module boundaries -----------------------------------------------------
    def _record_module_io(self, prefix, graph, env) -> None:
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
        if len(members) > 1 or not isinstance(members[0], ConcatSymbol):
            symmap.groups.append(members)
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
