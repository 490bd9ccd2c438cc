"""GraphCollection and recursive_trace: graphs that together cover a model.

`recursive_trace` traces the root with the RobustTracer. When that fails,
it captures the root with torch.export instead (when example inputs are
known or can be made, as for Hugging Face models), and otherwise goes down
breadth first: every module that could not be traced, by either route, is
marked failed and its children are traced on their own.
"""

from __future__ import annotations

import inspect
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Type

import torch
from torch import fx, nn

from .export_graph import capture_with_export
from .graph_utils import get_attr_path, linear_types
from .tracer import RobustTracer, TraceFailure, _short

__all__ = ["GraphCollection", "GraphEntry", "recursive_trace", "example_inputs_for"]

Inputs = Tuple[Tuple[Any, ...], Dict[str, Any]]


@dataclass
class GraphEntry:
    """One graph of a collection: the module it is the graph of, and how it was captured."""

    name: str
    module: nn.Module
    graph: fx.Graph
    method: str  # "fx" or "export"
    attrs: Dict[str, Any] = field(default_factory=dict)
    note: str = ""  # why export was used, or what it gave up (static shapes)
    covered: Set[str] = field(default_factory=set)  # full names of modules whose computation the graph shows

    def graph_module(self) -> fx.GraphModule:
        """A runnable GraphModule over the module's own parameters."""
        if not self.attrs:
            return fx.GraphModule(self.module, self.graph)
        root: Dict[str, Any] = {}
        for node in self.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                root[node.target] = self.attrs[node.target] if node.target in self.attrs else get_attr_path(self.module, node.target)
        return fx.GraphModule(root, self.graph, class_name=type(self.module).__name__ + "Graph")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


class GraphCollection:
    """The graphs of a model, keyed by the module each one is the graph of (breadth-first order)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._names: Dict[nn.Module, str] = {}
        for name, m in model.named_modules(remove_duplicate=True):
            self._names.setdefault(m, name)
        self._entries: Dict[nn.Module, GraphEntry] = {}
        self._failed: Dict[nn.Module, str] = {}
        self._shown: Set[nn.Module] = set()  # modules some graph shows, failed ones included

    # --- mapping-like access -------------------------------------------
    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, module: nn.Module) -> bool:
        return module in self._entries

    def __getitem__(self, module: nn.Module) -> fx.Graph:
        return self._entries[module].graph

    def items(self) -> Iterator[Tuple[nn.Module, fx.Graph]]:
        return ((m, e.graph) for m, e in self._entries.items())

    def entries(self) -> List[GraphEntry]:
        return list(self._entries.values())

    def entry(self, module: nn.Module) -> GraphEntry:
        return self._entries[module]

    def name_of(self, module: nn.Module) -> str:
        return self._names[module]

    def graph_module(self, module: nn.Module) -> fx.GraphModule:
        return self._entries[module].graph_module()

    # --- status ----------------------------------------------------------
    def is_failed(self, module: nn.Module) -> bool:
        return module in self._failed

    def failure_msg(self, module: nn.Module) -> Optional[str]:
        return self._failed.get(module)

    def failures(self) -> Dict[str, str]:
        return {self._names[m]: msg for m, msg in self._failed.items()}

    def covered_modules(self) -> Set[nn.Module]:
        """Modules whose computation some graph shows (a module shared under two names counts once)."""
        return self._shown - self._failed.keys()

    def covered_names(self) -> Set[str]:
        return {self._names[m] for m in self.covered_modules()}

    def is_unvisited(self, module: nn.Module) -> bool:
        """True for a module no graph shows the computation of, that did not fail either."""
        if _is_container(module):
            return all(self.is_unvisited(c) for c in module.children())
        return module not in self._failed and module not in self.covered_modules()

    def coverage(self, of: Optional[Tuple[Type[nn.Module], ...]] = None) -> Tuple[int, int]:
        """(modules covered by some graph, all modules), optionally only modules of the types `of`."""
        covered = self.covered_modules()
        mods = [m for m in self._names if (of is None or isinstance(m, of)) and not _is_container(m)]
        return sum(m in covered for m in mods), len(mods)

    def summary(self) -> str:
        cov, total = self.coverage()
        lin_cov, lin_total = self.coverage(linear_types())
        lines = [f"GraphCollection of {type(self.model).__name__}: {len(self)} graph(s), "
                 f"{cov}/{total} modules covered ({lin_cov}/{lin_total} linear layers)"]
        for e in self._entries.values():
            nodes = sum(1 for _ in e.graph.nodes)
            how = e.method + (f" ({e.note})" if e.note else "")
            lines.append(f"  graph {e.name or '<root>'} [{type(e.module).__name__}]: {nodes} nodes, "
                         f"{len(e.covered)} modules, by {how}")
        if self._failed:
            lines.append(f"  failed ({len(self._failed)}):")
            for m, msg in self._failed.items():
                lines.append(f"    {self._names[m] or '<root>'} [{type(m).__name__}]: {msg}")
        unvisited = [n for m, n in self._names.items() if not _is_container(m) and self.is_unvisited(m)]
        if unvisited:
            shown = ", ".join(unvisited[:8]) + (f" and {len(unvisited) - 8} more" if len(unvisited) > 8 else "")
            lines.append(f"  unvisited ({len(unvisited)}): {shown}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_markdown_(self) -> str:
        return "```\n" + self.summary() + "\n```"

    # --- building --------------------------------------------------------
    def _add(self, entry: GraphEntry) -> None:
        self._entries[entry.module] = entry
        for name in entry.covered:
            try:
                self._shown.add(self.model.get_submodule(name))
            except AttributeError:
                pass

    def _fail(self, module: nn.Module, msg: str) -> None:
        self._failed[module] = msg


def _is_container(module: nn.Module) -> bool:
    """ModuleList and ModuleDict hold layers but compute nothing themselves."""
    return isinstance(module, (nn.ModuleList, nn.ModuleDict))


def example_inputs_for(model: nn.Module, batch: int = 2, seq: int = 8) -> Optional[Inputs]:
    """Example inputs for a Hugging Face model built from its config (token ids; cache off), else None."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "main_input_name"):
        return None
    params = inspect.signature(model.forward).parameters
    kwargs: Dict[str, Any] = {}
    main = model.main_input_name
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if main == "input_ids":
        vocab = getattr(config, "vocab_size", None) or 100
        gen = torch.Generator().manual_seed(0)
        kwargs["input_ids"] = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            kwargs["decoder_input_ids"] = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    elif main == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        kwargs["pixel_values"] = torch.randn(batch, getattr(config, "num_channels", 3), size, size).to(device)
    else:
        return None
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return (), kwargs


@torch.no_grad()
def _capture_module_inputs(model: nn.Module, example: Inputs, wanted: List[nn.Module]) -> Dict[nn.Module, Inputs]:
    """Run the model once and keep the first (args, kwargs) each wanted module is called with."""
    got: Dict[nn.Module, Inputs] = {}
    handles = []

    def hook(m, args, kwargs):
        if m not in got:
            got[m] = (tuple(args), dict(kwargs))

    for m in wanted:
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        model(*example[0], **example[1])
    except Exception:  # noqa: BLE001 - inputs are a best effort
        pass
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return got


def _propagate_shapes(gm: fx.GraphModule, inputs: Inputs) -> None:
    """Run the graph on real inputs and store each node's value as a meta tensor in ``meta['val']``."""

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta.setdefault("val", _to_meta(out))
            return out

    sig = inspect.signature(gm.forward)
    try:
        bound = sig.bind(*inputs[0], **inputs[1])
    except TypeError:
        placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        merged = dict(zip(placeholders, inputs[0]))
        merged.update({k: v for k, v in inputs[1].items() if k in placeholders})
        try:
            bound = sig.bind(**merged)
        except TypeError:
            return
    bound.apply_defaults()
    try:
        with torch.no_grad():
            Recorder(gm).run(*bound.arguments.values())
    except Exception:  # noqa: BLE001 - shapes are optional
        for n in gm.graph.nodes:
            n.meta.pop("val", None)


def _to_meta(value):
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value) if not hasattr(value, "_fields") else tuple(_to_meta(v) for v in value)
    if isinstance(value, (int, float, bool, torch.Size)):
        return value
    return None


def _fx_covered(prefix: str, tracer: RobustTracer) -> Set[str]:
    names = {_join(prefix, n) for n in tracer.visited} | {prefix}
    return names - {_join(prefix, n) for n in tracer.failures}


def recursive_trace(
    model: nn.Module,
    concrete_args: Optional[Dict[str, Any]] = None,
    example_inputs: Optional[Any] = None,
    *,
    use_export: bool = True,
    leaves: Tuple[Type[nn.Module], ...] = (),
    dynamic: bool = True,
) -> GraphCollection:
    """Trace `model` into a GraphCollection.

    `concrete_args` fixes root inputs for symbolic tracing. `example_inputs`
    (a tuple of positional inputs, a dict of keyword inputs, or a pair
    ``(args, kwargs)``) enables the torch.export route and shape metadata;
    Hugging Face models get token ids built from their config when none are
    given. `leaves` are extra module types never traced through.
    """
    gc = GraphCollection(model)
    example = _normalise_inputs(example_inputs) if example_inputs is not None else example_inputs_for(model)
    if example is not None and getattr(model, "config", None) is not None and "use_cache" not in example[1]:
        if "use_cache" in inspect.signature(model.forward).parameters:
            example = (example[0], {**example[1], "use_cache": False})  # a KV cache object cannot be exported
    inputs_cache: Dict[nn.Module, Inputs] = {}
    if example is not None:
        inputs_cache[model] = example

    def prefetch_inputs(modules: List[nn.Module]) -> None:
        """One forward pass records the inputs of all `modules` not yet recorded."""
        wanted = [m for m in modules if m not in inputs_cache]
        if use_export and example is not None and wanted:
            inputs_cache.update(_capture_module_inputs(model, example, wanted))

    def inputs_of(module: nn.Module) -> Optional[Inputs]:
        prefetch_inputs([module])
        return inputs_cache.get(module)

    # Each queue item: (module, concrete_args, error if it already failed inside its parent's trace).
    queue = deque([(model, concrete_args, None)])
    seen: Set[nn.Module] = set()
    while queue:
        module, cargs, failed_in_parent = queue.popleft()
        if module in seen:
            continue
        seen.add(module)
        name = gc.name_of(module)
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            queue.extend((child, None, None) for child in module.children())
            continue
        if failed_in_parent is None:
            tracer = RobustTracer(leaves=leaves)
            try:
                graph = tracer.trace(module, cargs)
            except TraceFailure as e:
                failed_in_parent = str(e)
            else:
                entry = GraphEntry(name, module, graph, "fx", covered=_fx_covered(name, tracer))
                gc._add(entry)
                if module in inputs_cache:
                    _propagate_shapes(entry.graph_module(), inputs_cache[module])
                subs = [module.get_submodule(sub_name) for sub_name in tracer.failures]
                for sub, msg in zip(subs, tracer.failures.values()):
                    gc._fail(sub, msg)
                    queue.append((sub, None, msg))
                prefetch_inputs(subs)
                continue
        # FX could not trace this module: torch.export, else its children one by one.
        result = _try_export(name, module, inputs_of(module) if use_export else None, failed_in_parent, dynamic)
        if isinstance(result, GraphEntry):
            gc._failed.pop(module, None)
            gc._add(result)
            continue
        gc._fail(module, failed_in_parent + (f"; torch.export: {result}" if result else ""))
        queue.extend((child, None, None) for child in module.children())
    return gc


def _try_export(name, module, inputs, fx_error, dynamic):
    """A GraphEntry from torch.export, or the export error message (None when not attempted)."""
    if inputs is None:
        return None
    try:
        cap = capture_with_export(module, inputs[0], inputs[1], dynamic=dynamic, max_seq=_max_positions(module))
    except Exception as e:  # noqa: BLE001 - report, then go down a level
        return _short(e)
    note = "FX failed: " + fx_error + (f"; {cap.note}" if cap.note else "")
    covered = {_join(name, n) for n in cap.visited} | {name}
    return GraphEntry(name, module, cap.graph, "export", attrs=cap.attrs, note=note, covered=covered)


def _max_positions(module: nn.Module) -> Optional[int]:
    config = getattr(module, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 2:
            return value
    return None


def _normalise_inputs(example) -> Inputs:
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, tuple) and len(example) == 2 and isinstance(example[1], dict) and isinstance(example[0], (tuple, list)):
        return tuple(example[0]), dict(example[1])
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}
