"""RobustTracer: torch.fx symbolic tracing that survives submodules it cannot trace.

When the code of a submodule cannot be traced (data-dependent control
flow, unsupported Python), the tracer records the failure and its message,
treats that submodule as a leaf (one opaque ``call_module`` node) and traces
again, until the trace goes through. Only a failure in the root's own code
ends the trace.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Type

from torch import fx, nn

from .graph_utils import matches_any

__all__ = ["RobustTracer", "TraceFailure", "register_leaf", "unregister_leaf", "is_registered_leaf", "register_container", "LEAF_TYPES"]

LEAF_TYPES: Set[Type[nn.Module]] = set()
"""Module types traced as one node (subclasses included)."""
LEAF_PREDICATES: List[Callable[[nn.Module], bool]] = []
"""Tests that make a module a leaf (e.g. Hugging Face RMSNorm classes, matched by shape)."""
CONTAINER_TYPES: Set[Type[nn.Module]] = set()
CONTAINER_PREDICATES: List[Callable[[nn.Module], bool]] = []
"""Modules always traced through, even when a leaf rule matches (Sequential, attention)."""


def _check_types(types) -> None:
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"expected nn.Module subclasses, got {t!r}")


def register_leaf(*types: Type[nn.Module]) -> None:
    """Declare module types (and their subclasses) leaves: never traced through."""
    _check_types(types)
    LEAF_TYPES.update(types)


def unregister_leaf(*types: Type[nn.Module]) -> None:
    for t in types:
        LEAF_TYPES.discard(t)


def register_leaf_predicate(predicate: Callable[[nn.Module], bool]) -> None:
    """Declare every module for which `predicate(module)` is true a leaf."""
    LEAF_PREDICATES.append(predicate)


def register_container(*types: Type[nn.Module], predicate: Optional[Callable[[nn.Module], bool]] = None) -> None:
    """Declare modules that are always traced through (their insides matter to the analysis)."""
    _check_types(types)
    CONTAINER_TYPES.update(types)
    if predicate is not None:
        CONTAINER_PREDICATES.append(predicate)


def is_registered_leaf(module: nn.Module) -> bool:
    if LEAF_TYPES and isinstance(module, tuple(LEAF_TYPES)):
        return True
    return matches_any(LEAF_PREDICATES, module)


def is_container(module: nn.Module) -> bool:
    if CONTAINER_TYPES and isinstance(module, tuple(CONTAINER_TYPES)):
        return True
    return matches_any(CONTAINER_PREDICATES, module)


def is_default_leaf(module: nn.Module) -> bool:
    """torch.fx's rule: layers from torch.nn are leaves, except containers."""
    mod = type(module).__module__
    from_torch = mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")
    return from_torch and not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def is_leaf(module: nn.Module) -> bool:
    """The leaf rule shared by the FX tracer and the torch.export normalisation."""
    if is_container(module):
        return False
    return is_registered_leaf(module) or is_default_leaf(module)


class TraceFailure(RuntimeError):
    """The root's own code could not be traced."""


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(e).__name__}: {first}"[:300]


class RobustTracer(fx.Tracer):
    """An FX tracer that turns untraceable submodules into leaves and retries.

    After `trace`, ``failures`` maps qualified names of the submodules that
    could not be traced to their error messages, ``visited`` holds every
    module whose forward ran during the final trace (inlined or as a leaf)
    and ``leaves_called`` the modules that appear as ``call_module`` nodes.
    """

    def __init__(self, leaves: Iterable[Type[nn.Module]] = (), max_retries: int = 1000, **kwargs):
        super().__init__(**kwargs)
        self.extra_leaf_types = tuple(leaves)
        self.max_retries = max_retries
        self.failures: Dict[str, str] = {}
        self._failed_ids: Set[int] = set()
        self.visited: Set[str] = set()
        self.leaves_called: Set[str] = set()
        self._culprit: Optional[Tuple[str, nn.Module, str]] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self._failed_ids or is_leaf(m):
            return True
        return bool(self.extra_leaf_types) and isinstance(m, self.extra_leaf_types)

    def call_module(self, m: nn.Module, forward: Callable, args: Tuple, kwargs: Dict[str, Any]) -> Any:
        name = self.path_of_module(m)
        self.visited.add(name)
        if self.is_leaf_module(m, name):
            self.leaves_called.add(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            # The innermost module sees the error first; outer modules let it pass.
            if self._culprit is None:
                self._culprit = (name, m, _short(e))
            raise

    def _reset_scope(self) -> None:
        # A trace that raised leaves fx's module bookkeeping half-popped.
        from collections import OrderedDict

        from torch.fx.proxy import Scope

        self.scope = Scope("", None)
        self.module_stack = OrderedDict()
        self.num_calls = {}

    def trace(self, root: nn.Module, concrete_args: Optional[Dict[str, Any]] = None) -> fx.Graph:
        for _ in range(self.max_retries):
            self._culprit = None
            self.visited = set()
            self.leaves_called = set()
            self._reset_scope()
            try:
                return super().trace(root, concrete_args)
            except Exception as e:
                culprit = self._culprit
                if culprit is None or culprit[1] is root or id(culprit[1]) in self._failed_ids:
                    raise TraceFailure(_short(e)) from e
                name, module, msg = culprit
                self.failures[name] = msg
                self._failed_ids.add(id(module))
        raise TraceFailure(f"trace did not become stable after {self.max_retries} retries")
