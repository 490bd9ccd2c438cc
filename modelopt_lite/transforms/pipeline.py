"""`optimize`: capture a model as a GraphModule and run the configured transforms on it.

The pipeline comes from ``modelopt_lite/configs/transforms/default.yaml``; a user config
(YAML path or dict) overrides its entries by key. Each transform logs one line on the
``modelopt_lite.transforms`` logger: ``[SUMMARY] <key>: matches=N``, ``... disabled`` or
``... skipped (<reason>)``; the same goes into ``gm.meta["transform_report"]``.
"""

from __future__ import annotations

import logging
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import yaml
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .capture import capture, split_inputs
from .registry import (Transform, TransformConfig, TransformConfigError, TransformContext, build_transform,
                       get_transform, register_transform)
from ..utils.fs import write_text_atomic

__all__ = ["DEFAULT_CONFIG", "TransformResult", "capture", "format_graph", "load_pipeline", "optimize"]

logger = logging.getLogger("modelopt_lite.transforms")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "transforms" / "default.yaml"


@dataclass(frozen=True)
class TransformResult:
    """One row of the report: status is "applied", "disabled" or "skipped"."""

    key: str
    status: str
    matches: int = 0
    reason: str = ""

    def summary(self) -> str:
        if self.status == "applied":
            return f"[SUMMARY] {self.key}: matches={self.matches}"
        if self.status == "skipped":
            return f"[SUMMARY] {self.key}: skipped ({self.reason})"
        return f"[SUMMARY] {self.key}: disabled"


# ------------------------------------------------------------------ config
def _entries(doc: Any, where: str) -> List[Dict[str, Any]]:
    if isinstance(doc, Mapping):
        extra = set(doc) - {"transforms", "defaults"}
        if extra:
            raise TransformConfigError(f"{where}: unknown top-level keys {sorted(extra)}; a pipeline config has "
                                       "'transforms:' (a list) and optionally 'defaults:' (true/false)")
        doc = doc.get("transforms", None)
    if not isinstance(doc, list):
        raise TransformConfigError(f"{where}: expected a mapping with a list under 'transforms:'")
    out, seen = [], set()
    for i, e in enumerate(doc):
        if not isinstance(e, Mapping) or not isinstance(e.get("key"), str):
            raise TransformConfigError(f"{where}: entry {i} must be a mapping with a string 'key', got {e!r}")
        get_transform(e["key"])  # unknown keys: error listing the known ones
        if e["key"] in seen:
            raise TransformConfigError(f"{where}: transform {e['key']!r} is listed twice")
        seen.add(e["key"])
        out.append(dict(e))
    return out


def _read(config: Union[str, os.PathLike, Mapping, list, None]) -> Tuple[Any, str]:
    if config is None or isinstance(config, (Mapping, list)):
        return config, "user config"
    path = Path(config)
    if not path.is_file():
        raise TransformConfigError(f"transform config {str(path)!r} does not exist")
    return yaml.safe_load(path.read_text()), str(path)


def load_pipeline(config: Union[str, os.PathLike, Mapping, None] = None) -> List[Tuple[str, Transform]]:
    """The ordered (key, transform) list: the default pipeline with `config`'s entries merged by key.
    A user entry for a registered transform missing from the default is appended at the end.
    With ``defaults: false`` at the top of `config`, only its own entries run, in its order."""
    base = _entries(yaml.safe_load(DEFAULT_CONFIG.read_text()), str(DEFAULT_CONFIG))
    doc, where = _read(config)
    if isinstance(doc, Mapping) and "defaults" in doc:
        if not isinstance(doc["defaults"], bool):
            raise TransformConfigError(f"{where}: 'defaults' must be true or false, got {doc['defaults']!r}")
        if not doc["defaults"]:
            base = []
    if doc is not None:
        by_key = {e["key"]: e for e in base}
        for e in _entries(doc, where):
            if e["key"] in by_key:
                by_key[e["key"]].update(e)
            else:
                base.append(e)
    out = []
    for e in base:
        key = e.pop("key")
        out.append((key, build_transform(key, e)))
    return out


# ------------------------------------------------------------------ dumps
def _meta_str(node: fx.Node) -> str:
    from .pattern import node_meta

    shape, dtype = node_meta(node)
    if dtype is None:
        return ""
    return f"  :: {tuple(shape)} {str(dtype).replace('torch.', '')}"


def format_graph(gm: fx.GraphModule) -> str:
    """One line per node: ``name = op target(args, kwargs) :: shape dtype``."""
    lines = []
    for n in gm.graph.nodes:
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            target = str(n.target)
        args = ", ".join([repr(a) for a in n.args] + [f"{k}={v!r}" for k, v in n.kwargs.items()])
        lines.append(f"{n.name} = {n.op} {target}({args}){_meta_str(n)}")
    return "\n".join(lines) + "\n"




# ------------------------------------------------------------------ pipeline
def _propagate(gm: fx.GraphModule, ctx: TransformContext) -> None:
    if ctx.example_inputs is None or ctx.kwargs:
        return  # ShapeProp feeds placeholders positionally; graphs with keyword inputs keep their export metadata
    ShapeProp(gm).propagate(*ctx.example_inputs)


def optimize(model_or_gm: Union[nn.Module, fx.GraphModule], example_inputs: Any = None,
             config: Union[str, os.PathLike, Mapping, None] = None, dump_dir: Union[str, os.PathLike, None] = None,
             log: bool = True, dynamic_shapes: Any = None) -> fx.GraphModule:
    """Run the transform pipeline; return the GraphModule (a given GraphModule is rewritten in place).

    `example_inputs`: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    The report (a list of `TransformResult`) is ``gm.meta["transform_report"]``.
    `dynamic_shapes` goes to torch.export when the model is captured that way (e.g.
    ``{"input_ids": {1: torch.export.Dim("seq", max=4096)}}``): without it an exported graph
    accepts only the example inputs' shapes."""
    args, kwargs = split_inputs(example_inputs)
    if isinstance(model_or_gm, fx.GraphModule):
        gm, how, model = model_or_gm, "given", None
    elif isinstance(model_or_gm, nn.Module):
        gm, how = capture(model_or_gm, args, kwargs, dynamic_shapes)
        model = model_or_gm
    else:
        raise TypeError(f"optimize() takes an nn.Module or a GraphModule, got {type(model_or_gm).__name__}")
    pipeline = load_pipeline(config)
    ctx = TransformContext(example_inputs=args, kwargs=kwargs, model=model, capture=how)
    dump = Path(dump_dir) if dump_dir is not None else None
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
    _propagate(gm, ctx)
    report: List[TransformResult] = []
    for i, (key, t) in enumerate(pipeline):
        if not t.config.enabled:
            result = TransformResult(key, "disabled")
        elif (reason := t.applicable(gm, ctx)) is not None:
            result = TransformResult(key, "skipped", reason=str(reason))
        else:
            if dump is not None:
                write_text_atomic(dump / f"{i:02d}_{key}_before.txt", format_graph(gm))
            matches = int(t.apply(gm, ctx))
            gm.graph.lint()
            gm.recompile()
            if matches:
                _propagate(gm, ctx)
            if dump is not None:
                write_text_atomic(dump / f"{i:02d}_{key}_after.txt", format_graph(gm))
            result = TransformResult(key, "applied", matches)
        report.append(result)
        if log:
            logger.info(result.summary())
    gm.meta["transform_report"] = report
    gm.meta["transform_capture"] = how
    return gm


# ------------------------------------------------------------------ built-in transforms
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.ipow, operator.iand, operator.ior, operator.ixor, operator.setitem}


def _module_may_mutate(m: nn.Module) -> bool:
    """Modules from torch.nn (unless ``inplace=True``) and from this package leave their inputs alone;
    any other leaf module is treated as one that may write into them."""
    origin = type(m).__module__
    if origin.startswith("torch.") or origin.startswith("modelopt_lite."):
        return bool(getattr(m, "inplace", False))
    return True


def _writes_in_place(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether `n` may write into a tensor (in-place ops, in-place methods, unknown leaf modules)."""
    if n.op == "call_function":
        if n.target in _INPLACE_OPERATORS:
            return True
        if isinstance(n.target, torch._ops.OpOverload):
            return n.target._schema.is_mutable
        name = getattr(n.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.endswith("__")
    if n.op == "call_module":
        return _module_may_mutate(gm.get_submodule(n.target))
    return False


def _has_mutation(gm: fx.GraphModule) -> bool:
    return any(_writes_in_place(gm, n) for n in gm.graph.nodes)


_COPY_TARGETS = {torch.ops.aten.clone.default, torch.ops.aten.alias.default, torch.ops.aten.detach.default,
                 torch.clone, torch.detach}
_COPY_METHODS = {"clone", "detach"}


def _bypass(gm: fx.GraphModule, node: fx.Node) -> None:
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)


@register_transform("remove_identity")
class RemoveIdentity(Transform):
    """Drops calls that return their input's values unchanged: ``nn.Identity`` modules, dropout
    modules in eval mode, and clone/detach/alias (only in graphs without in-place ops, and a clone
    only when it keeps the memory format)."""

    class Config(TransformConfig):
        remove_dropout: bool = True
        remove_copies: bool = True

    def _is_identity(self, gm: fx.GraphModule, n: fx.Node, copies_ok: bool) -> bool:
        if not n.args or not isinstance(n.args[0], fx.Node):
            return False
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if type(m) is nn.Identity:
                return len(n.args) == 1 and not n.kwargs
            drop = isinstance(m, nn.modules.dropout._DropoutNd) and not m.training
            return self.config.remove_dropout and drop and len(n.args) == 1 and not n.kwargs
        if not copies_ok or len(n.args) != 1:
            return False
        if n.kwargs and set(n.kwargs) - {"memory_format"} or n.kwargs.get("memory_format", torch.preserve_format) \
                is not torch.preserve_format:
            return False
        return (n.op == "call_function" and n.target in _COPY_TARGETS) or (n.op == "call_method" and n.target in _COPY_METHODS)

    def apply(self, gm: fx.GraphModule, ctx: TransformContext) -> int:
        copies_ok = self.config.remove_copies and not _has_mutation(gm)
        hits = [n for n in gm.graph.nodes if self._is_identity(gm, n, copies_ok)]
        for n in hits:
            _bypass(gm, n)
        return len(hits)


@register_transform("eliminate_dead_code")
class EliminateDeadCode(Transform):
    """``graph.eliminate_dead_code()`` keeping nodes that may write in place; matches = nodes
    removed. Optionally deletes submodules no node calls any more."""

    class Config(TransformConfig):
        remove_unused_modules: bool = True

    def apply(self, gm: fx.GraphModule, ctx: TransformContext) -> int:
        before = len(gm.graph.nodes)
        # FX's own purity test lets in-place method calls go (x.add_(1) with its result unused).
        gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or _writes_in_place(gm, n))
        if self.config.remove_unused_modules:
            _delete_unused_submodules(gm)
        return before - len(gm.graph.nodes)


def _delete_unused_submodules(gm: fx.GraphModule) -> None:
    """Drop submodules no node reaches any more, without touching the insides of modules that are still used.

    The graph's leaf modules are the user's own objects (shared with the model it was captured from), so
    only references held by the GraphModule's own path containers are removed; FX's
    `delete_all_unused_submodules` would also delete, say, an unused quantizer inside a used layer.
    """
    used = set()
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            parts = str(n.target).split(".")
            used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    leaves = {n.target for n in gm.graph.nodes if n.op == "call_module"}  # FX path containers are plain Modules
    for name, _ in sorted(gm.named_modules(remove_duplicate=False), key=lambda kv: -kv[0].count(".")):
        if not name or name in used:
            continue
        parent_name, _, child = name.rpartition(".")
        if any(parent_name == leaf or parent_name.startswith(leaf + ".") for leaf in leaves):
            continue  # inside a module the graph calls: it belongs to that module
        parent = gm.get_submodule(parent_name) if parent_name else gm
        if parent is not gm and type(parent) is not nn.Module:
            continue  # a user module (shared with the model): never edit it
        if child in parent._modules:
            del parent._modules[child]


@register_transform("fold_fake_quant_disabled")
class FoldFakeQuantDisabled(Transform):
    """Removes calls to TensorQuantizer modules that are disabled and have no pre_quant_scale
    (they return their input unchanged)."""

    def _quantizer_nodes(self, gm: fx.GraphModule) -> List[Tuple[fx.Node, nn.Module]]:
        from ..quantization.tensor_quantizer import TensorQuantizer

        out = []
        for n in gm.graph.nodes:
            if n.op == "call_module":
                m = gm.get_submodule(n.target)
                if isinstance(m, TensorQuantizer):
                    out.append((n, m))
        return out

    def applicable(self, gm: fx.GraphModule, ctx: TransformContext) -> Optional[str]:
        return None if self._quantizer_nodes(gm) else "no quantizer modules in the graph"

    def apply(self, gm: fx.GraphModule, ctx: TransformContext) -> int:
        hits = [n for n, m in self._quantizer_nodes(gm)
                if not m.is_enabled and m.pre_quant_scale is None and len(n.args) == 1 and not n.kwargs
                and isinstance(n.args[0], fx.Node)]
        for n in hits:
            _bypass(gm, n)
        return len(hits)
