"""Find and replace subgraphs of FX graphs, the patterns written as small Python functions.

    from modelopt_lite.transforms.pattern import Pattern, find_matches, replace_match, has_dtype

    @Pattern
    def relu_of_add(x, y):
        return torch.relu(x + y)

    for m in find_matches(gm, relu_of_add, constraints={"x": has_dtype(torch.float16)}):
        replace_match(gm, m, lambda x, y: torch.clamp_min(x + y, 0))
    gm.graph.lint(); gm.recompile()

Targets are compared by a normalised name, so ``torch.relu``, ``F.relu``, ``Tensor.relu`` and
``aten.relu.default`` match each other (and ``operator.add`` matches ``aten.add.Tensor``).
The pattern's parameters are wildcards: each matches any node or literal, the same one at every
use. A `ModuleSlot` called in a pattern matches a ``call_module`` node whose module passes a
type or predicate test.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Type, Union

import torch
from torch import fx, nn

__all__ = [
    "Match",
    "ModuleSlot",
    "Pattern",
    "canonical_target",
    "find_matches",
    "has_dtype",
    "has_rank",
    "node_meta",
    "replace_match",
]

_OPERATOR_NAMES = {
    operator.add: "add", operator.iadd: "add_", operator.sub: "sub", operator.mul: "mul", operator.imul: "mul_",
    operator.truediv: "div", operator.floordiv: "floor_divide", operator.matmul: "matmul", operator.neg: "neg",
    operator.pow: "pow", operator.getitem: "getitem", operator.mod: "remainder",
}
_COPIED_META = ("val", "tensor_meta", "stack_trace", "nn_module_stack")


def canonical_target(node_or_target: Any, op: str = "call_function") -> Any:
    """The name a call is compared by: the op's name for torch functions, Tensor methods and aten
    ops ("relu"), ``"ns::name"`` for custom ops, the object itself for any other function."""
    target = node_or_target.target if isinstance(node_or_target, fx.Node) else node_or_target
    if isinstance(node_or_target, fx.Node):
        op = node_or_target.op
    if op == "call_method":
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        qual = target._schema.name if isinstance(target, torch._ops.OpOverload) else target._qualified_op_name
        ns, _, name = qual.partition("::")
        return name if ns in ("aten", "prims") else qual
    if target in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[target]
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None)
    if name and (mod == "torch" or mod.startswith("torch.nn.functional") or mod.startswith("torch._C")):
        return name
    return target


def _param_info(node: fx.Node, gm: Optional[nn.Module]) -> Tuple[List[str], Dict[str, Any]]:
    """Parameter names and defaults of the callee (empty when unknown)."""
    target = node.target
    try:
        if isinstance(target, torch._ops.OpOverload):
            args = target._schema.arguments
            return [a.name for a in args], {a.name: a.default_value for a in args if a.has_default_value()}
        if node.op == "call_function" and callable(target):
            sig = inspect.signature(target)
            params = list(sig.parameters.values())
            return [p.name for p in params], {p.name: p.default for p in params if p.default is not p.empty}
    except (ValueError, TypeError):
        pass
    return [], {}


class ModuleSlot(nn.Module):
    """A stand-in for a module in a pattern: matches ``call_module`` nodes whose module is an
    instance of `types` (a type or tuple of types) or passes `predicate(module)`; both when both are given."""

    def __init__(self, types: Union[Type[nn.Module], Tuple[Type[nn.Module], ...], None] = None,
                 predicate: Optional[Callable[[nn.Module], bool]] = None):
        super().__init__()
        if types is None and predicate is None:
            raise ValueError("ModuleSlot needs a module type, a predicate, or both")
        self.types = types
        self.predicate = predicate

    def accepts(self, module: nn.Module) -> bool:
        if self.types is not None and not isinstance(module, self.types):
            return False
        return self.predicate is None or bool(self.predicate(module))

    def forward(self, *args, **kwargs):
        raise RuntimeError("a ModuleSlot only stands for a module inside a Pattern; it cannot be run")


class _PatternTracer(fx.Tracer):
    def __init__(self):
        super().__init__()
        self.slots: Dict[int, str] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ModuleSlot) or super().is_leaf_module(m, qualname)

    def path_of_module(self, mod: nn.Module) -> str:
        if isinstance(mod, ModuleSlot):
            if id(mod) not in self.slots:
                name = f"slot{len(self.slots)}"
                self.root.add_module(name, mod)
                self.slots[id(mod)] = name
            return self.slots[id(mod)]
        return super().path_of_module(mod)


class _FnModule(nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class Pattern:
    """A pattern traced from `fn`: with symbolic_trace, or, when `example_args` are given, with
    torch.export (aten ops). Usable as a decorator. `fn` must return one value."""

    def __init__(self, fn: Callable, example_args: Optional[Sequence[Any]] = None, name: Optional[str] = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "pattern")
        if example_args is None:
            tracer = _PatternTracer()
            graph = tracer.trace(fn)  # a function root: its parameters become placeholders
            self.gm = fx.GraphModule(tracer.root, graph)
        else:
            self.gm = torch.export.export(_FnModule(fn), tuple(example_args)).module()
        outs = [n for n in self.gm.graph.nodes if n.op == "output"][0].args[0]
        if isinstance(outs, (tuple, list)):
            if len(outs) != 1:
                raise ValueError(f"pattern {self.name!r} must return one value, it returns {len(outs)}")
            outs = outs[0]
        if not isinstance(outs, fx.Node) or outs.op == "placeholder":
            raise ValueError(f"pattern {self.name!r} must compute something from its inputs, not return an input")
        self.anchor: fx.Node = outs
        self.nodes: List[fx.Node] = []  # the computation nodes reachable from the anchor, in graph order
        seen: Set[fx.Node] = set()
        stack = [outs]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "get_attr":
                raise ValueError(f"pattern {self.name!r} reads the attribute {n.target!r}; pass constants as arguments")
            stack.extend(n.all_input_nodes)
        self.nodes = [n for n in self.gm.graph.nodes if n in seen and n.op != "placeholder"]
        self.placeholders = [n for n in self.gm.graph.nodes if n in seen and n.op == "placeholder"]

    def __call__(self, *args):
        return self.fn(*args)

    def names(self) -> List[str]:
        return [n.name for n in self.placeholders + self.nodes]

    def __repr__(self) -> str:
        return f"Pattern({self.name}: {', '.join(str(canonical_target(n)) for n in self.nodes)})"


@dataclass
class Match:
    """One occurrence of a pattern. ``bindings``: pattern parameter name -> graph node or literal;
    ``nodes``: pattern node name -> graph node; ``anchor``: the graph node of the pattern's output."""

    pattern: Pattern
    anchor: fx.Node
    bindings: Dict[str, Any] = field(default_factory=dict)
    nodes: Dict[str, fx.Node] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        """The graph node (or literal) bound to a pattern name; a binding whose node an earlier
        `replace_match` replaced resolves to the replacement."""
        if name in self.bindings:
            return _live(self.bindings[name])
        return self.nodes[name]

    @property
    def graph_nodes(self) -> List[fx.Node]:
        return list(self.nodes.values())


def _live(value: Any) -> Any:
    while isinstance(value, fx.Node) and getattr(value, "_erased", False) and "replaced_by" in value.meta:
        value = value.meta["replaced_by"]
    return value


def node_meta(node: Any) -> Tuple[Optional[torch.Size], Optional[torch.dtype]]:
    """(shape, dtype) of a node from ``meta["val"]`` or ``meta["tensor_meta"]``; (None, None) if absent."""
    if not isinstance(node, fx.Node):
        return None, None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.shape, val.dtype
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "dtype"):
        return tm.shape, tm.dtype
    return None, None


def has_dtype(*dtypes: torch.dtype) -> Callable[[Any], bool]:
    """Predicate: the node's tensor metadata says one of `dtypes` (False when there is no metadata)."""
    return lambda node: node_meta(node)[1] in dtypes


def has_rank(*ranks: int) -> Callable[[Any], bool]:
    """Predicate: the node's tensor has one of `ranks` dimensions (False when there is no metadata)."""
    return lambda node: node_meta(node)[0] is not None and len(node_meta(node)[0]) in ranks


_MISSING = object()


class _Matcher:
    def __init__(self, gm: fx.GraphModule, pattern: Pattern, constraints: Mapping[str, Callable[[Any], bool]]):
        self.gm, self.pattern, self.constraints = gm, pattern, constraints
        self.node_map: Dict[fx.Node, fx.Node] = {}
        self.used: Set[fx.Node] = set()
        self.bind: Dict[fx.Node, Any] = {}

    def value(self, pv: Any, gv: Any) -> bool:
        if isinstance(pv, fx.Node):
            return self.node(pv, gv)
        if isinstance(pv, (list, tuple)):
            return (isinstance(gv, (list, tuple)) and len(pv) == len(gv)
                    and all(self.value(a, b) for a, b in zip(pv, gv)))
        if isinstance(pv, dict):
            return isinstance(gv, dict) and pv.keys() == gv.keys() and all(self.value(pv[k], gv[k]) for k in pv)
        if isinstance(gv, fx.Node):
            return False
        return type(pv) is type(gv) and pv == gv

    def node(self, pn: fx.Node, gn: Any) -> bool:
        check = self.constraints.get(pn.name)
        if pn.op == "placeholder":
            if pn in self.bind:
                return self.bind[pn] is gn or (not isinstance(gn, fx.Node) and self.bind[pn] == gn)
            if check is not None and not check(gn):
                return False
            self.bind[pn] = gn
            return True
        if not isinstance(gn, fx.Node):
            return False
        if pn in self.node_map:
            return self.node_map[pn] is gn
        if gn in self.used or not self._same_call(pn, gn):
            return False
        if check is not None and not check(gn):
            return False
        self.node_map[pn] = gn
        self.used.add(gn)
        return self._same_args(pn, gn)

    def _same_call(self, pn: fx.Node, gn: fx.Node) -> bool:
        if pn.op == "call_module":
            if gn.op != "call_module":
                return False
            slot = self.pattern.gm.get_submodule(pn.target)
            module = self.gm.get_submodule(gn.target)
            return slot.accepts(module) if isinstance(slot, ModuleSlot) else type(slot) is type(module)
        if pn.op not in ("call_function", "call_method") or gn.op not in ("call_function", "call_method"):
            return False
        return canonical_target(pn) == canonical_target(gn)

    def _same_args(self, pn: fx.Node, gn: fx.Node) -> bool:
        pnames, pdef = _param_info(pn, self.pattern.gm)
        gnames, gdef = _param_info(gn, self.gm)
        pa, ga = list(pn.args), list(gn.args)
        for i in range(max(len(pa), len(ga))):
            if i < len(pa) and i < len(ga):
                if not self.value(pa[i], ga[i]):
                    return False
            elif not _is_default(pa[i] if i < len(pa) else ga[i], pnames if i < len(pa) else gnames,
                                 pdef if i < len(pa) else gdef, i):
                return False
        for k in set(pn.kwargs) | set(gn.kwargs):
            if k in pn.kwargs and k in gn.kwargs:
                if not self.value(pn.kwargs[k], gn.kwargs[k]):
                    return False
            elif k in pn.kwargs:
                if pdef.get(k, _MISSING) is _MISSING or not _literal_eq(pn.kwargs[k], pdef[k]):
                    return False
            elif gdef.get(k, _MISSING) is _MISSING or not _literal_eq(gn.kwargs[k], gdef[k]):
                return False
        return True


def _literal_eq(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


def _is_default(value: Any, names: List[str], defaults: Dict[str, Any], i: int) -> bool:
    return i < len(names) and names[i] in defaults and _literal_eq(value, defaults[names[i]])


def find_matches(gm: fx.GraphModule, pattern: Union[Pattern, Callable], constraints: Optional[Mapping[str, Callable[[Any], bool]]] = None,
                 where: Optional[Callable[[Match], bool]] = None, allow_outside_users: bool = False) -> List[Match]:
    """Non-overlapping matches of `pattern` in `gm`, in graph order of their output nodes.

    `constraints` maps a pattern parameter or node name to a predicate on the graph node (e.g.
    `has_dtype`); `where` tests a whole match. Unless `allow_outside_users`, a matched node other than
    the output must have no users outside the match."""
    if not isinstance(pattern, Pattern):
        pattern = Pattern(pattern)
    constraints = dict(constraints or {})
    unknown = set(constraints) - set(pattern.names())
    if unknown:
        raise ValueError(f"constraints name {sorted(unknown)} which are not in pattern {pattern.name!r}; "
                         f"its names are {pattern.names()}")
    claimed: Set[fx.Node] = set()
    matches: List[Match] = []
    for gn in gm.graph.nodes:
        if gn in claimed or gn.op not in ("call_function", "call_method", "call_module"):
            continue
        m = _Matcher(gm, pattern, constraints)
        if not m.node(pattern.anchor, gn) or len(m.node_map) != len(pattern.nodes):
            continue
        matched = set(m.node_map.values())
        if matched & claimed:
            continue
        if not allow_outside_users and any(
                u not in matched for g in matched if g is not gn for u in g.users):
            continue
        match = Match(pattern, gn, {p.name: v for p, v in m.bind.items()}, {p.name: g for p, g in m.node_map.items()})
        if where is not None and not where(match):
            continue
        claimed |= matched
        matches.append(match)
    return matches


def replace_match(gm: fx.GraphModule, match: Match, replacement: Optional[Callable] = None, *,
                  builder: Optional[Callable[[fx.GraphModule, Match], Any]] = None) -> Any:
    """Replace `match` in `gm` and return the new output (a node, or a bound value).

    Give either `replacement`, a function whose parameters are named like (a subset of) the
    pattern's parameters, traced and inlined before the match's output node; or `builder(gm, match)`,
    called with the insertion point set there, returning the new output node. Users of the match's
    output are rewired, the matched nodes without remaining users are erased, and ``val``,
    ``tensor_meta``, ``stack_trace`` and ``nn_module_stack`` are copied onto the new output node.
    Call ``gm.graph.lint(); gm.recompile()`` when done with the rewrites."""
    if (replacement is None) == (builder is None):
        raise ValueError("replace_match needs exactly one of `replacement` (a function) or `builder`")
    graph, anchor = gm.graph, match.anchor
    before = set(graph.nodes)
    with graph.inserting_before(anchor):
        if builder is not None:
            new = builder(gm, match)
        else:
            new = _inline(gm, match, replacement)
    created = [n for n in graph.nodes if n not in before]
    anchor.replace_all_uses_with(new) if isinstance(new, fx.Node) else _replace_with_value(anchor, new)
    if isinstance(new, fx.Node) and new in created:
        for k in _COPIED_META:
            if k in anchor.meta:
                new.meta[k] = anchor.meta[k]
    for n in created:
        for k in ("stack_trace", "nn_module_stack"):
            if k in anchor.meta and k not in n.meta:
                n.meta[k] = anchor.meta[k]
    anchor.meta["replaced_by"] = new  # lets later matches that bound this node find its replacement
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(match.graph_nodes, key=lambda n: -order[n]):
        if not n.users and n is not new:
            graph.erase_node(n)
    return new


def _replace_with_value(anchor: fx.Node, value: Any) -> None:
    for user in list(anchor.users):
        user.args = fx.node.map_arg(user.args, lambda a: value if a is anchor else a)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is anchor else a)


def _inline(gm: fx.GraphModule, match: Match, fn: Callable) -> Any:
    rgraph = _PatternTracer().trace(fn)
    val_map: Dict[fx.Node, Any] = {}
    out = None
    for n in rgraph.nodes:
        if n.op == "placeholder":
            if n.target not in match.bindings:
                raise ValueError(f"replacement parameter {n.target!r} is not a parameter of pattern "
                                 f"{match.pattern.name!r}; use names from {sorted(match.bindings)}")
            val_map[n] = match[n.target]
        elif n.op == "output":
            out = fx.node.map_arg(n.args[0], lambda a: val_map[a])
        elif n.op in ("call_function", "call_method"):
            val_map[n] = gm.graph.node_copy(n, lambda a: val_map[a])
        else:
            raise ValueError(f"a replacement function may only call functions and methods, not {n.op} "
                             f"{n.target!r}; use a builder for module calls")
    if isinstance(out, (tuple, list)):
        raise ValueError("a replacement must return one value")
    return out
