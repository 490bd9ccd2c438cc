"""Symbol rules for ops that move, split, merge or select tensor dimensions.

A mixin of the symbol walk (`analyzer._Walker`): indexing and slicing,
transpose and permute, (un)squeeze, expand, concat, flatten and reshape,
including the reshapes into and out of attention heads.
"""

from __future__ import annotations

from typing import List

from torch import nn

from .dims import BCAST, _drop_dims, _neg, _opaque, _out, _same, _TVal, _without
from .symbols import ConcatSymbol, Symbol, attention_dims


class LayoutRules:
    """Rules for dimension-moving ops; needs the walker's link/disable/info/elementwise."""

    def slice(self, node, x: _TVal, args, kwargs, shape, name) -> _TVal:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        d = x.neg(dim) if isinstance(dim, int) else None
        if d is None:
            self.disable_all([x], f"{node.name}: {name} of unknown rank")
            return _opaque(shape)
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
            return out
        self.disable_all([src], f"{node.name}: indexing")
        return _opaque(shape)

    def permute(self, node, x: _TVal, args, shape, name) -> _TVal:
        rank = x.rank if x.rank is not None else (len(shape) if shape else None)
        if name in ("transpose", "swapaxes"):
            a, b = _neg(args[1], rank), _neg(args[2], rank)
            if a is None or b is None:
                self.disable_all([x], f"{node.name}: transpose of unknown rank")
                return _TVal(shape=shape)
            out = _TVal(rank=rank, shape=shape)
            for d, v in x.dims.items():
                out.dims[{a: b, b: a}.get(d, d)] = v
            return out
        if name == "t":
            if rank not in (None, 2):
                self.disable_all([x], f"{node.name}: unsupported permute")
                return _TVal(shape=shape)
            perm, rank = [1, 0], 2
        else:
            perm = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        if rank is None:
            self.disable_all([x], f"{node.name}: permute of unknown rank")
            return _TVal(shape=shape)
        out = _TVal(rank=rank, shape=shape)
        for new_i, old_i in enumerate(perm):
            old = _neg(old_i, rank)
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

    def expand(self, x: _TVal, shape) -> _TVal:
        """Broadcast to a larger shape: symbols keep their place from the right."""
        if shape is None:
            return _TVal(dims={d: v for d, v in x.dims.items() if isinstance(v, Symbol)})
        return _TVal(rank=len(shape), dims={d: v for d, v in x.dims.items() if isinstance(v, Symbol) or shape[d] == 1},
                     shape=shape)

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
