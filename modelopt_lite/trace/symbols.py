"""Symbols: the hyperparameter dimensions of layers, and the registry that says which a layer has.

A `Symbol` is one dimension of one layer (a Linear's out_features, an
attention module's heads). Its state is one of

- free: nothing constrains it and nothing asked to search it;
- searchable: it may be changed (pruned, searched) and leads its group;
- constant: it must keep its size (it touches a model input or output, an
  untraceable module, a raw parameter, an op the analysis does not know);
- dynamic: it follows a parent symbol: change the parent and it changes too.

`cl_type` says how a symbol crosses layers: INCOMING symbols are sizes a
layer reads (in_features), OUTGOING sizes it produces (out_features), NONE
internal ones (heads, depth). `elastic_dims` are the tensor dimensions the
symbol sizes, negative (from the end) or, for channel-first layers, 1.
"""

from __future__ import annotations

import enum
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple, Type

from torch import nn

from ..utils import Registry
from .graph_utils import linear_types, matches_any
from .tracer import register_container, register_leaf, register_leaf_predicate

__all__ = ["CLType", "Symbol", "ConcatSymbol", "SymInfo", "SymMap", "register_sym_info"]


class CLType(enum.Enum):
    NONE = "none"
    INCOMING = "incoming"
    OUTGOING = "outgoing"


class Symbol:
    """One dimension of one layer; see the module docstring for the states."""

    def __init__(self, size: Optional[int], is_searchable: bool = False, cl_type: CLType = CLType.NONE,
                 elastic_dims: Tuple[int, ...] = ()):
        self.size = size
        self.cl_type = cl_type
        self.elastic_dims: Set[int] = set(elastic_dims)
        self._searchable = is_searchable
        self._constant = False
        self.parent: Optional["Symbol"] = None
        self.reason: str = ""  # why it is constant
        self.name: str = ""  # qualified name, set by SymMap: "layers.0.fc1.out_features"
        self.min_size: int = 0  # depth symbols: how far it may shrink

    # --- state -----------------------------------------------------------
    @property
    def is_constant(self) -> bool:
        return self._constant

    @property
    def is_dynamic(self) -> bool:
        return not self._constant and self.parent is not None

    @property
    def is_searchable(self) -> bool:
        return not self._constant and self.parent is None and self._searchable

    @property
    def is_free(self) -> bool:
        return not (self._constant or self.parent is not None or self._searchable)

    @property
    def state(self) -> str:
        if self._constant:
            return "constant"
        if self.parent is not None:
            return "dynamic"
        return "searchable" if self._searchable else "free"

    @property
    def is_cross_layer(self) -> bool:
        return self.cl_type is not CLType.NONE

    @property
    def is_incoming(self) -> bool:
        return self.cl_type is CLType.INCOMING

    @property
    def is_outgoing(self) -> bool:
        return self.cl_type is CLType.OUTGOING

    def disable(self, reason: str = "") -> None:
        """Make the symbol constant."""
        self._constant = True
        self.parent = None
        self.reason = self.reason or reason

    def link_to(self, parent: "Symbol") -> None:
        """Make the symbol dynamic, following `parent`."""
        if parent is self:
            raise ValueError("a symbol cannot be linked to itself")
        self.parent = parent

    def __repr__(self) -> str:
        extra = f" -> {self.parent.name}" if self.parent is not None else ""
        extra += f" ({self.reason})" if self._constant and self.reason else ""
        return f"Symbol({self.name or '?'}={self.size}, {self.state}, {self.cl_type.value}{extra})"


class ConcatSymbol(Symbol):
    """The dimension a concat produces: the sum of its parts (one part may be None: a fixed-size input)."""

    def __init__(self, parts: List[Optional[Symbol]], size: Optional[int] = None, elastic_dims=()):
        super().__init__(size, cl_type=CLType.NONE, elastic_dims=elastic_dims)
        self.parts = parts


class SymInfo:
    """The symbols of one layer. `is_shape_preserving`: its output has its input's feature symbol."""

    def __init__(self, is_shape_preserving: bool = False, **symbols: Symbol):
        self.is_shape_preserving = is_shape_preserving
        self.symbols: Dict[str, Symbol] = symbols

    def __getitem__(self, name: str) -> Symbol:
        return self.symbols[name]

    def __contains__(self, name: str) -> bool:
        return name in self.symbols

    def items(self):
        return self.symbols.items()

    def __repr__(self) -> str:
        return "SymInfo(" + ", ".join(f"{k}={v.size}:{v.state}" for k, v in self.symbols.items()) + ")"


SymInfoFn = Callable[[nn.Module], SymInfo]
_BY_TYPE: Registry[SymInfoFn] = Registry("symbol rule")
_BY_PREDICATE: List[Tuple[Callable[[nn.Module], bool], SymInfoFn]] = []


def register_sym_info(*types: Type[nn.Module], leaf: bool = True, predicate: Optional[Callable[[nn.Module], bool]] = None):
    """Decorator: `fn(module) -> SymInfo` gives the symbols of modules of `types` (subclasses too).

    With `leaf` (the default), the tracer keeps such modules as one node, so
    the analysis applies the rule instead of looking inside. Containers whose
    insides matter (attention, Sequential) register with ``leaf=False``.
    `predicate` matches modules by a test instead of by type.
    """

    def add(fn: SymInfoFn) -> SymInfoFn:
        for t in types:
            _BY_TYPE.register(t, fn, overwrite=True)
        if predicate is not None:
            _BY_PREDICATE.append((predicate, fn))
        if leaf:
            register_leaf(*types)
            if predicate is not None:
                register_leaf_predicate(predicate)
        else:
            register_container(*types, predicate=predicate)
        return fn

    return add


def sym_info_rule(module: nn.Module) -> Optional[SymInfoFn]:
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE.get(cls)
    for pred, fn in _BY_PREDICATE:
        if matches_any((pred,), module):
            return fn
    return None


class SymMap:
    """The symbols of every registered layer of a model, keyed by module.

    `SymMap(model)` creates them in their initial states; `analyze_symbols`
    links them. The registry (`SymMap.register`) maps layer types to rules.
    """

    register = staticmethod(register_sym_info)

    def __init__(self, model: nn.Module):
        self.model = model
        self._infos: Dict[nn.Module, SymInfo] = {}
        self._names: Dict[nn.Module, str] = {}
        for name, module in model.named_modules():
            rule = sym_info_rule(module)
            if rule is None:
                continue
            info = rule(module)
            for key, sym in info.items():
                sym.name = f"{name}.{key}" if name else key
            self._infos[module] = info
            self._names[module] = name
        self.groups: List[List[Symbol]] = []  # filled by analyze_symbols
        self._by_name: Optional[Dict[str, Symbol]] = None

    def __contains__(self, module: nn.Module) -> bool:
        return module in self._infos

    def __getitem__(self, module: nn.Module) -> SymInfo:
        return self._infos[module]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def items(self):
        return self._infos.items()

    def named_modules(self) -> Iterator[Tuple[str, nn.Module]]:
        for m, n in self._names.items():
            yield n, m

    def named_symbols(self) -> Iterator[Tuple[str, Symbol]]:
        for info in self._infos.values():
            for sym in info.symbols.values():
                yield sym.name, sym

    def symbol(self, name: str) -> Symbol:
        if self._by_name is None:
            self._by_name = dict(self.named_symbols())
        if name in self._by_name:
            return self._by_name[name]
        raise KeyError(f"no symbol {name!r}; symbols look like 'layers.0.fc1.out_features'")

    def group_of(self, name: str) -> List[Symbol]:
        sym = self.symbol(name)
        for g in self.groups:
            if sym in g:
                return g
        return [sym]

    def dependents(self, name: str) -> List[str]:
        """Names of the other dimensions that must change when `name` changes.

        The symbol's own group, and every group that takes a concat of it
        (whose size is a sum with this one as a part), transitively.
        """
        out: List[str] = []
        todo = [self.group_of(name)]
        seen: Set[int] = set()
        while todo:
            group = todo.pop()
            if id(group) in seen:
                continue
            seen.add(id(group))
            out += [s.name for s in group if s.name != name and not isinstance(s, ConcatSymbol)]
            for g in self.groups:
                if any(isinstance(c, ConcatSymbol) and any(p in group for p in c.parts if p is not None) for c in g):
                    todo.append(g)
        return list(dict.fromkeys(out))

    def searchable(self) -> List[Symbol]:
        return [s for _, s in self.named_symbols() if s.is_searchable]

    def summary(self, max_groups: Optional[int] = None) -> str:
        syms = list(self.named_symbols())
        counts = {st: sum(1 for _, s in syms if s.state == st) for st in ("searchable", "dynamic", "free", "constant")}
        lines = [f"SymMap of {type(self.model).__name__}: {len(syms)} symbols in {len(self)} modules; "
                 + ", ".join(f"{v} {k}" for k, v in counts.items()) + f"; {len(self.groups)} linked groups"]
        shown = self.groups if max_groups is None else self.groups[:max_groups]
        for g in shown:
            head = g[0]
            state = head.state if not head.is_dynamic else head.parent.state
            why = f" ({head.reason})" if head.is_constant and head.reason else ""
            concat = next((c for c in g if isinstance(c, ConcatSymbol)), None)
            if concat is not None and not head.is_constant:
                parts = " + ".join(p.name if p is not None else "fixed" for p in concat.parts)
                state, why = "sum", f" of {parts}"
            names = ", ".join(s.name for s in g if not isinstance(s, ConcatSymbol))
            lines.append(f"  [{state}{why}] {names}")
        if max_groups is not None and len(self.groups) > max_groups:
            lines.append(f"  ... {len(self.groups) - max_groups} more groups")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary(max_groups=20)


# --- built-in rules -------------------------------------------------------


@register_sym_info(nn.Linear)
def _linear(m: nn.Linear) -> SymInfo:
    return SymInfo(
        in_features=Symbol(m.in_features, cl_type=CLType.INCOMING, elastic_dims=(-1,)),
        out_features=Symbol(m.out_features, is_searchable=True, cl_type=CLType.OUTGOING, elastic_dims=(-1,)),
    )


@register_sym_info(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(m: nn.Conv2d) -> SymInfo:
    if m.groups == 1:
        return SymInfo(
            in_channels=Symbol(m.in_channels, cl_type=CLType.INCOMING, elastic_dims=(1,)),
            out_channels=Symbol(m.out_channels, is_searchable=True, cl_type=CLType.OUTGOING, elastic_dims=(1,)),
        )
    if m.groups == m.in_channels == m.out_channels:
        # Depthwise: each channel is its own filter, so channels pass through.
        return SymInfo(is_shape_preserving=True,
                       channels=Symbol(m.in_channels, cl_type=CLType.INCOMING, elastic_dims=(1,)))
    info = SymInfo(
        in_channels=Symbol(m.in_channels, cl_type=CLType.INCOMING, elastic_dims=(1,)),
        out_channels=Symbol(m.out_channels, cl_type=CLType.OUTGOING, elastic_dims=(1,)),
    )
    for s in info.symbols.values():
        s.disable(f"grouped convolution (groups={m.groups})")
    return info


@register_sym_info(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _batchnorm(m) -> SymInfo:
    return SymInfo(is_shape_preserving=True,
                   num_features=Symbol(m.num_features, cl_type=CLType.INCOMING, elastic_dims=(1,)))


@register_sym_info(nn.GroupNorm)
def _groupnorm(m: nn.GroupNorm) -> SymInfo:
    return SymInfo(is_shape_preserving=True,
                   num_channels=Symbol(m.num_channels, cl_type=CLType.INCOMING, elastic_dims=(1,)))


def _last_dim_norm(m) -> SymInfo:
    shape = getattr(m, "normalized_shape", None)
    size = shape[-1] if shape else m.weight.shape[-1]
    return SymInfo(is_shape_preserving=True,
                   num_features=Symbol(int(size), cl_type=CLType.INCOMING, elastic_dims=(-1,)))


register_sym_info(nn.LayerNorm)(_last_dim_norm)
if hasattr(nn, "RMSNorm"):
    register_sym_info(nn.RMSNorm)(_last_dim_norm)


def looks_like_norm(m: nn.Module) -> bool:
    """Hugging Face RMSNorm / LayerNorm classes: a 1-D weight, no children."""
    name = type(m).__name__
    w = getattr(m, "weight", None)
    return (name.endswith(("RMSNorm", "LayerNorm", "RmsNorm")) and isinstance(w, nn.Parameter)
            and w.dim() == 1 and next(m.children(), None) is None)


register_sym_info(predicate=looks_like_norm)(_last_dim_norm)


@register_sym_info(nn.Embedding)
def _embedding(m: nn.Embedding) -> SymInfo:
    vocab = Symbol(m.num_embeddings, cl_type=CLType.NONE)
    vocab.disable("vocabulary size")
    return SymInfo(
        num_embeddings=vocab,
        embedding_dim=Symbol(m.embedding_dim, is_searchable=True, cl_type=CLType.OUTGOING, elastic_dims=(-1,)),
    )


@register_sym_info(nn.Sequential, leaf=False)
def _sequential(m: nn.Sequential) -> SymInfo:
    return SymInfo(depth=Symbol(len(m), is_searchable=True, cl_type=CLType.NONE))


def _is_conv1d(m: nn.Module) -> bool:
    return isinstance(m, linear_types()[1:])


@register_sym_info(predicate=_is_conv1d)
def _hf_conv1d(m) -> SymInfo:
    return SymInfo(
        in_features=Symbol(int(m.nx), cl_type=CLType.INCOMING, elastic_dims=(-1,)),
        out_features=Symbol(int(m.nf), is_searchable=True, cl_type=CLType.OUTGOING, elastic_dims=(-1,)),
    )


# --- attention -------------------------------------------------------------

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_HEAD_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_HEAD_DIM = ("head_dim", "attention_head_size", "key_value_proj_dim", "d_kv")


def _first_int(objs, names) -> Optional[int]:
    for obj in objs:
        for n in names:
            v = getattr(obj, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def attention_dims(m: nn.Module) -> Optional[Tuple[int, int, int]]:
    """(heads, kv_heads, head_dim) of an attention module, or None."""
    if isinstance(m, nn.MultiheadAttention):
        return m.num_heads, m.num_heads, m.head_dim
    config = getattr(m, "config", None)
    objs = [m] + ([config] if config is not None else [])
    heads = _first_int(objs, HEAD_COUNT_ATTRS)
    head_dim = _first_int(objs, _HEAD_DIM)
    if heads is None:
        return None
    if head_dim is None:
        hidden = _first_int(objs, ("hidden_size", "embed_dim", "d_model"))
        if hidden is None or hidden % heads:
            return None
        head_dim = hidden // heads
    kv = _first_int(objs, KV_HEAD_COUNT_ATTRS)
    groups = getattr(m, "num_key_value_groups", None)
    if kv is None and isinstance(groups, int) and groups > 0 and heads % groups == 0:
        kv = heads // groups
    return heads, kv or heads, head_dim


_PROJECTION_SETS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"), ("c_attn",),
                    ("qkv_proj",), ("Wqkv",), ("query_key_value",))


def looks_like_attention(m: nn.Module) -> bool:
    if isinstance(m, nn.MultiheadAttention):
        return False
    has_proj = any(all(isinstance(getattr(m, p, None), nn.Module) for p in ps) for ps in _PROJECTION_SETS)
    return has_proj and attention_dims(m) is not None


@register_sym_info(predicate=looks_like_attention, leaf=False)
def _attention(m: nn.Module) -> SymInfo:
    heads, kv_heads, head_dim = attention_dims(m)
    info = SymInfo(num_heads=Symbol(heads, is_searchable=True), head_dim=Symbol(head_dim))
    if kv_heads != heads:
        info.symbols["num_kv_heads"] = Symbol(kv_heads, is_searchable=True)
    return info


@register_sym_info(nn.MultiheadAttention)
def _mha(m: nn.MultiheadAttention) -> SymInfo:
    return SymInfo(is_shape_preserving=True,
                   embed_dim=Symbol(m.embed_dim, cl_type=CLType.INCOMING, elastic_dims=(-1,)),
                   num_heads=Symbol(m.num_heads))
