"""Capture a model as a GraphModule in which the layers the fusions rewrite are ``call_module`` nodes.

Two ways, tried in order by `capture`:

* FX (`RobustTracer`): `TensorQuantizer` and `CompressedLinear` modules stay leaves, as do the
  quantized layers (registered leaves) and the torch.nn layers;
* torch.export, when FX fails on the model or on one of its submodules and example inputs are
  given (Hugging Face decoders). torch.export inlines every module, so the linear layers the
  fusions work on (plain ``nn.Linear``, `QuantLinear`, `CompressedLinear`) are first made opaque:
  during the export each such layer's forward calls the ``modelopt_lite::capture_leaf`` op,
  whose fake implementation gives the output's shape; afterwards each op node becomes a
  ``call_module`` of the original layer object (installed in the exported module at its path).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
from torch import fx, nn

__all__ = ["capture", "capture_fx", "export_with_leaves", "split_inputs"]

logger = logging.getLogger("modelopt_lite.transforms")

_LEAVES: Dict[int, nn.Module] = {}  # token -> layer, only while an export runs


@torch.library.custom_op("modelopt_lite::capture_leaf", mutates_args=())
def capture_leaf(x: torch.Tensor, token: int) -> torch.Tensor:
    """``layer(x)`` for the layer registered under `token` (exists only while `export_with_leaves` runs)."""
    layer = _LEAVES.get(token)
    if layer is None:
        raise RuntimeError("modelopt_lite::capture_leaf ran outside a capture: the graph still holds a "
                           "placeholder for a layer; capture the model again with optimize()")
    return layer(x)


@capture_leaf.register_fake
def _(x, token):
    layer = _LEAVES[token]
    return x.new_empty((*x.shape[:-1], layer.out_features))


def _export_leaf(m: nn.Module) -> bool:
    """Layers kept opaque during export: the ones the linear fusions read as modules."""
    from ..quantization.compress import CompressedLinear
    from .fuse_linear import is_quant_linear

    return type(m) is nn.Linear or isinstance(m, CompressedLinear) or is_quant_linear(m)


@contextlib.contextmanager
def _opaque_layers(model: nn.Module) -> Iterator[Dict[int, Tuple[str, nn.Module]]]:
    """Patch each export leaf's forward to call ``capture_leaf``; yields token -> (path, layer)."""
    leaves: Dict[int, Tuple[str, nn.Module]] = {}
    for path, m in model.named_modules():
        if not path or not _export_leaf(m) or id(m) in _LEAVES:
            continue
        token = id(m)
        _LEAVES[token], leaves[token] = m, (path, m)
        original = m.forward

        def forward(*args, _tok=token, _orig=original, **kwargs):
            if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
                return torch.ops.modelopt_lite.capture_leaf(args[0], _tok)
            return _orig(*args, **kwargs)

        m.forward = forward
    try:
        yield leaves
    finally:
        for token, (_, m) in leaves.items():
            del m.forward  # the class's forward again
            _LEAVES.pop(token, None)


def export_with_leaves(model: nn.Module, args: Tuple[Any, ...], kwargs: Optional[Dict[str, Any]] = None,
                       dynamic_shapes: Any = None) -> fx.GraphModule:
    """torch.export of `model` (non-strict) with its linear layers as ``call_module`` nodes.
    `dynamic_shapes` is torch.export's argument; without it the graph takes only the example shapes."""
    with _opaque_layers(model) as leaves:
        gm = torch.export.export(model, tuple(args), kwargs=kwargs or None, dynamic_shapes=dynamic_shapes,
                                 strict=False).module()
    op = torch.ops.modelopt_lite.capture_leaf.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not op:
            continue
        x, token = node.args
        path, layer = leaves[token]
        if not gm.add_submodule(path, layer):
            raise RuntimeError(f"cannot install layer {path!r} in the exported module")
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def capture_fx(model: nn.Module):
    """(GraphModule, tracer) from the RobustTracer with quantizers and compressed layers as leaves."""
    from ..quantization.compress import CompressedLinear
    from ..quantization.tensor_quantizer import TensorQuantizer
    from ..trace.tracer import RobustTracer

    tracer = RobustTracer(leaves=(TensorQuantizer, CompressedLinear))
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__), tracer


def split_inputs(example_inputs: Any) -> Tuple[Optional[Tuple[Any, ...]], Dict[str, Any]]:
    """(positional inputs or None, keyword inputs) from a tensor, a tuple or a dict."""
    if example_inputs is None:
        return None, {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def capture(model: nn.Module, args: Optional[Tuple[Any, ...]] = None, kwargs: Optional[Dict[str, Any]] = None,
            dynamic_shapes: Any = None) -> Tuple[fx.GraphModule, str]:
    """A GraphModule of `model` and how it was made: ``"fx"`` or ``"export"`` (see the module docstring)."""
    from ..trace.tracer import TraceFailure

    try:
        gm, tracer = capture_fx(model)
        if not tracer.failures or args is None:
            return gm, "fx"
        # Submodules FX could not trace would hide inside opaque nodes: export sees through them.
        logger.info("FX could not trace %s inside %s; using torch.export", ", ".join(sorted(tracer.failures)),
                    type(model).__name__)
    except TraceFailure as e:
        if args is None:
            raise TraceFailure(f"torch.fx cannot trace {type(model).__name__} ({e}); pass example_inputs so "
                               "that optimize() can capture it with torch.export") from e
        logger.info("FX trace of %s failed (%s); using torch.export", type(model).__name__, e)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return export_with_leaves(model, args, kwargs, dynamic_shapes), "export"
    finally:
        model.train(was_training)
