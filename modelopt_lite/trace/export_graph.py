"""Capture a module with torch.export and normalise the result into an FX graph
of the same shape as one from the RobustTracer.

torch.export (non-strict) succeeds where symbolic tracing cannot, e.g. at
the top of transformers 5.x decoders. Its graph is ATen-level and takes
parameters as inputs; normalising it

- turns parameter, buffer and constant inputs back into ``get_attr`` nodes
  named by their attribute path in the module,
- collapses the ops of every leaf module call (the same leaf rule as the
  tracer: torch.nn layers, registered leaves) into one ``call_module`` node
  whose arguments are the call's tensor inputs,

so a ``Linear`` is one node in either graph. Nodes keep torch.export's
metadata, including ``meta["val"]`` (fake tensors with symbolic batch and
sequence sizes) and ``nn_module_stack``.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import fx, nn

from .graph_utils import get_attr_path, same_value_op
from .tracer import _short, is_leaf

__all__ = ["ExportCapture", "capture_with_export"]


@dataclass
class ExportCapture:
    graph: fx.Graph
    attrs: Dict[str, Any]  # get_attr / call_module targets that are not attributes of the module
    visited: Set[str] = field(default_factory=set)
    leaves_called: Set[str] = field(default_factory=set)
    dynamic: bool = True
    note: str = ""


def _dynamic_shapes(args: Tuple, kwargs: Dict[str, Any], sig: inspect.Signature, max_seq: Optional[int] = None,
                    auto: bool = False):
    """Batch (dim 0) and sequence (dim 1) of every input tensor of rank >= 2 are dynamic.

    With `auto`, torch.export picks the ranges itself (``Dim.AUTO``), which
    some model code needs (a range it narrows, e.g. below the maximum
    positions).
    """
    from torch.export import Dim

    if auto:
        batch = seq = Dim.AUTO
    else:
        batch = Dim("batch", min=1, max=1 << 16)
        seq = Dim("seq", min=2, max=max_seq or (1 << 20))

    def spec(v):
        if isinstance(v, torch.Tensor):
            if v.dim() >= 2 and v.shape[1] >= 2:
                return {0: batch, 1: seq}
            if v.dim() >= 1:
                return {0: batch}
            return None
        if isinstance(v, (list, tuple)):
            return type(v)(spec(x) for x in v)
        if isinstance(v, dict):
            return {k: spec(x) for k, x in v.items()}
        return None

    bound = sig.bind_partial(*args, **kwargs)
    return {name: spec(v) for name, v in bound.arguments.items()}


@contextlib.contextmanager
def _record_calls(module: nn.Module, visited: Set[str]):
    handles = []
    for name, sub in module.named_modules():
        handles.append(sub.register_forward_pre_hook(lambda m, a, n=name: visited.add(n)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_with_export(
    module: nn.Module,
    args: Tuple = (),
    kwargs: Optional[Dict[str, Any]] = None,
    dynamic: bool = True,
    max_seq: Optional[int] = None,
) -> ExportCapture:
    """Export `module` on example inputs (non-strict, no grad) and normalise the graph.

    With `dynamic`, batch and sequence sizes (up to `max_seq`) are symbolic; if torch.export
    rejects that (a size the code specialises on), the capture is retried
    with static shapes and `note` says why. Raises the export error when
    both fail.
    """
    kwargs = dict(kwargs or {})
    visited: Set[str] = set()
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), _record_calls(module, visited):
            ep, note, used_dynamic = None, "", False
            if dynamic:
                errors = []
                for auto in (False, True) if hasattr(torch.export.Dim, "AUTO") else (False,):
                    try:
                        shapes = _dynamic_shapes(args, kwargs, inspect.signature(module.forward), max_seq, auto)
                        ep = torch.export.export(module, tuple(args), kwargs=kwargs, dynamic_shapes=shapes, strict=False)
                        used_dynamic = True
                        break
                    except Exception as e:  # noqa: BLE001 - any failure: let torch choose, then static shapes
                        errors.append(_short(e))
                        visited.clear()
                if ep is None:
                    note = f"dynamic shapes rejected ({errors[0]}); captured with static shapes"
            if ep is None:
                ep = torch.export.export(module, tuple(args), kwargs=kwargs, strict=False)
    finally:
        module.train(was_training)
    graph, attrs, leaves = normalise(ep, module)
    return ExportCapture(graph=graph, attrs=attrs, visited=visited, leaves_called=leaves, dynamic=used_dynamic, note=note)


def _stack_paths(node: fx.Node) -> List[Tuple[str, str]]:
    """(key, module path) pairs of a node's module stack, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(key, val[0]) for key, val in stack.items() if isinstance(val, tuple)]


def _owning_leaf(node: fx.Node, module: nn.Module, cache: Dict[str, Optional[nn.Module]]) -> Optional[Tuple[str, str]]:
    """The outermost leaf module on the node's stack, as (call key, path)."""
    for key, path in _stack_paths(node):
        if path == "":
            continue
        if path not in cache:
            try:
                cache[path] = module.get_submodule(path)
            except AttributeError:
                cache[path] = None
        sub = cache[path]
        if sub is not None and is_leaf(sub):
            return key, path
    return None


def normalise(ep, module: nn.Module) -> Tuple[fx.Graph, Dict[str, Any], Set[str]]:
    from torch.export.graph_signature import InputKind

    src = ep.graph_module.graph
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs if hasattr(s.arg, "name")}
    attrs: Dict[str, Any] = {}
    own_state: Dict[fx.Node, str] = {}  # get_attr source nodes -> attribute path

    # Groups of consecutive nodes that belong to one call of one leaf module.
    cache: Dict[str, Optional[nn.Module]] = {}
    group_of: Dict[fx.Node, int] = {}
    groups: List[Tuple[str, List[fx.Node]]] = []
    last_key = None
    for node in src.nodes:
        if node.op != "call_function":
            last_key = None
            continue
        owner = _owning_leaf(node, module, cache)
        if owner is None:
            last_key = None
            continue
        if owner[0] != last_key:
            groups.append((owner[1], []))
            last_key = owner[0]
        groups[-1][1].append(node)
        group_of[node] = len(groups) - 1

    own_state_ids: Dict[str, Set[int]] = {}

    def state_ids(path: str) -> Set[int]:
        """ids of a leaf's parameters and buffers (its whole subtree is its state; tied weights included)."""
        if path not in own_state_ids:
            leaf = cache[path]
            own_state_ids[path] = {id(t) for t in list(leaf.parameters()) + list(leaf.buffers())}
        return own_state_ids[path]

    # For each group: its tensor inputs from outside, and its one output used outside.
    plan: Dict[int, Tuple[List[fx.Node], fx.Node]] = {}
    alias_of: Dict[fx.Node, fx.Node] = {}
    for gi, (path, members) in enumerate(groups):
        mset = set(members)
        inputs: List[fx.Node] = []
        ok = True
        for m in members:
            for inp in m.all_input_nodes:
                if inp in mset or inp in inputs:
                    continue
                spec = specs.get(inp.name)
                if inp.op == "placeholder" and spec is not None and spec.kind != InputKind.USER_INPUT:
                    if spec.target and id(get_attr_path(module, spec.target)) in state_ids(path):
                        continue  # the leaf's own parameter or buffer (possibly tied under another name)
                    ok = False  # reads state of another module: keep the ops
                if isinstance(inp.meta.get("val"), torch.Tensor):
                    inputs.append(inp)
        outputs = [m for m in members if any(u not in mset for u in m.users)]
        # Outputs that are the group's input unchanged (a no-op dtype cast the
        # caller keeps using, e.g. a residual) read the input directly.
        aliases = {}
        for o in outputs:
            src_node = _identity_source(o, mset)
            if src_node is not None and src_node in inputs:
                aliases[o] = src_node
        outputs = [o for o in outputs if o not in aliases]
        if ok and inputs and len(outputs) == 1 and isinstance(outputs[0].meta.get("val"), torch.Tensor):
            plan[gi] = (inputs, outputs[0])
            alias_of.update(aliases)

    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    leaves: Set[str] = set()
    for node in src.nodes:
        if node.op == "placeholder":
            spec = specs.get(node.name)
            if spec is not None and spec.kind != InputKind.USER_INPUT:
                target = spec.target
                new = graph.get_attr(target)
                if spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ) or get_attr_path(module, target) is None:
                    attrs[target] = ep.constants.get(target) if target in ep.constants else _lookup(ep, target)
                own_state[new] = target
            else:
                val = node.meta.get("val")
                default = inspect.Parameter.empty if isinstance(val, torch.Tensor) else val
                new = graph.placeholder(node.name, default_value=default)
            new.meta = dict(node.meta)
            env[node] = new
            continue
        if node in alias_of:
            env[node] = env[alias_of[node]]
            continue
        gi = group_of.get(node)
        if gi is not None and gi in plan:
            inputs, out = plan[gi]
            if node is not out:
                continue
            path = groups[gi][0]
            new = graph.call_module(path, tuple(env[i] for i in inputs))
            new.meta = dict(out.meta)
            leaves.add(path)
            env[node] = new
            continue
        if node.op == "get_attr":
            attrs[node.target] = getattr(ep.graph_module, node.target)
        if node.op == "output" and _single_output(ep) and len(node.args[0]) == 1:
            new = graph.output(env[node.args[0][0]])  # the module returns one tensor, not a tuple
            new.meta = dict(node.meta)
            env[node] = new
            continue
        new = graph.node_copy(node, lambda n: env[n])
        env[node] = new
    _drop_dead_size_nodes(graph)
    graph.lint()
    return graph, attrs, leaves


def _identity_source(node: fx.Node, members) -> Optional[fx.Node]:
    """The outside node whose value `node` repeats through no-op casts and copies, or None."""
    cur = node
    while cur in members:
        if not same_value_op(cur):
            return None
        cur = cur.args[0]
    return cur


def _single_output(ep) -> bool:
    spec = getattr(getattr(ep, "call_spec", None), "out_spec", None)
    return spec is not None and spec.is_leaf()


def _drop_dead_size_nodes(graph: fx.Graph) -> None:
    """Remove size computations left without users by collapsing (nothing with side effects)."""
    import operator

    size_ops = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default}
    for node in reversed(list(graph.nodes)):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
        elif node.op == "call_function" and not node.users:
            if node.target in size_ops or getattr(node.target, "__module__", None) in ("_operator", "operator") or node.target is operator.getitem:
                graph.erase_node(node)


def _lookup(ep, target: str):
    state = ep.state_dict
    if target in state:
        return state[target]
    raise KeyError(f"torch.export input {target!r} not found")
