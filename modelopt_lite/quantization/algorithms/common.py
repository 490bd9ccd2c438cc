"""Pieces the weight-aware algorithms (SmoothQuant, AWQ, GPTQ) share.

* `weight_layers`: the quantized linear-like layers whose weight quantizer is on;
* `weight_matrix` / `set_weight_matrix`: a layer's weight as ``[out, in]``
  (transformers' Conv1D stores ``[in, out]``);
* `fake_quant_weight`: an arbitrary ``[out, in]`` weight through a layer's
  weight format (amax from that weight, or given);
* `capture_inputs`: hooks that hand each layer's raw input (before its input
  quantizer) to a callback while a forward loop runs;
* `quantizers_off` / `run_loop`: a forward pass in float, or as is;
* `input_groups`: layers that read the same activation (q/k/v, gate/up),
  which must end with one smoothing scale.

Statistics the algorithms collect are reduced across data-parallel ranks
with `modelopt_lite.utils.dist`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..calib import batch_counter
from ..formats import fake_quant
from ..nn import QuantWeightModule
from ..tensor_quantizer import TensorQuantizer
from .registry import ForwardLoop

__all__ = [
    "weight_layers", "weight_matrix", "set_weight_matrix", "fake_quant_weight",
    "capture_inputs", "quantizers_off", "run_loop", "require_loop", "first_call_inputs", "input_groups",
    "trace_model", "partition_by_input", "effective_input", "subsample_tokens", "shared_weight_layers",
]


def weight_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, layer) for every quantized layer with a 2-D weight and an enabled weight quantizer."""
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantWeightModule) or not m.weight_quantizer.is_enabled:
            continue
        if getattr(m, "weight", None) is None or m.weight.dim() != 2:
            continue
        out.append((name, m))
    return out


def _axis_last(module: nn.Module) -> bool:
    return bool(getattr(module, "weight_axis_last", False))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in]`` (a view of the parameter's data)."""
    w = module.weight.data
    return w.t() if _axis_last(module) else w


@torch.no_grad()
def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Write an ``[out, in]`` weight back into the layer's parameter, in its dtype and layout."""
    target = module.weight.data
    target.copy_((w.t() if _axis_last(module) else w).to(target.dtype))


@torch.no_grad()
def fake_quant_weight(module: nn.Module, w: torch.Tensor, amax: Optional[torch.Tensor] = None,
                      global_amax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`w` (``[out, in]``) quantized and dequantized in the layer's weight format.

    Without `amax` the scales come from `w` itself, as max calibration of
    that weight would give them.
    """
    q: TensorQuantizer = module.weight_quantizer
    return fake_quant(w, q.fmt, amax, global_amax)


def effective_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as its GEMM sees it: after the input quantizer's pre_quant_scale (when set)."""
    pqs = module.input_quantizer.pre_quant_scale
    return x if pqs is None else x * pqs.to(device=x.device, dtype=x.dtype)


def subsample_tokens(x: torch.Tensor, n: Optional[int]) -> torch.Tensor:
    """`x` as ``[tokens, features]``, at most `n` tokens taken at an even stride (all when `n` is None)."""
    x = x.reshape(-1, x.shape[-1])
    if n is None or x.shape[0] <= n:
        return x
    stride = x.shape[0] // n
    return x[::stride][:n]


def shared_weight_layers(model: nn.Module, names: Sequence[str]) -> List[str]:
    """Those of `names` whose weight parameter also belongs to another module (tied embeddings)."""
    owners: Dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    return [n for n in names if owners.get(id(model.get_submodule(n).weight), 0) > 1]


@contextlib.contextmanager
def capture_inputs(layers: Dict[str, nn.Module], callback: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``callback(name, x)`` with each layer's input tensor on every forward, before its quantizers."""

    def make(name):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                callback(name, args[0].detach())

        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def quantizers_off(model: nn.Module) -> Iterator[None]:
    """Every TensorQuantizer of `model` passes its input through (the float model), then is restored."""
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.is_enabled]
    for q in quantizers:
        q.disable()
    try:
        yield
    finally:
        for q in quantizers:
            q.enable()


def require_loop(name: str, forward_loop: Optional[ForwardLoop]) -> ForwardLoop:
    """Algorithms that read activations cannot run without data: say so."""
    if forward_loop is None:
        raise ValueError(f"algorithm {name!r} needs calibration data: pass forward_loop to quantize()/calibrate()")
    return forward_loop


@torch.no_grad()
def run_loop(model: nn.Module, forward_loop: ForwardLoop) -> None:
    """Run the user's forward loop once (batches counted for error messages)."""
    with batch_counter(model):
        forward_loop(model)


def first_call_inputs(model: nn.Module, forward_loop: ForwardLoop) -> Optional[Tuple[tuple, dict]]:
    """The (args, kwargs) of the model's first call in the forward loop (example inputs for tracing).

    The loop is stopped right after that call's inputs are seen, so this
    costs no forward pass.
    """
    seen: Dict[str, Tuple[tuple, dict]] = {}

    class _Stop(Exception):
        """Ends the forward loop once the first call's inputs are kept."""

    def hook(module, args, kwargs):
        seen["inputs"] = (tuple(args), dict(kwargs))
        raise _Stop

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with contextlib.suppress(_Stop):
            forward_loop(model)
    finally:
        handle.remove()
    return seen.get("inputs")


def trace_model(model: nn.Module, forward_loop: ForwardLoop, who: str, otherwise: str):
    """The model's graphs, traced in float with the loop's first inputs; None (with a warning) when it cannot be traced."""
    from ...trace import recursive_trace

    try:
        with quantizers_off(model):
            example = first_call_inputs(model, forward_loop)
            return recursive_trace(model, example_inputs=example)
    except Exception as e:  # noqa: BLE001 - the graph improves the result, it is not required
        import warnings

        warnings.warn(f"{who}: could not trace the model ({type(e).__name__}: {e}); {otherwise}")
        return None


def partition_by_input(layers: Dict[str, nn.Module], graphs) -> List[List[str]]:
    """`layers` partitioned by the activation they read (from `graphs`; all alone without them), in model order."""
    from ...trace import shared_input_groups

    found = [[n for n in g if n in layers] for g in shared_input_groups(graphs)] if graphs is not None else []
    multi = [g for g in found if len(g) > 1]
    grouped = {n for g in multi for n in g}
    out = multi + [[n] for n in layers if n not in grouped]
    order = {n: i for i, n in enumerate(layers)}
    return sorted(out, key=lambda g: order[g[0]])


def input_groups(model: nn.Module, layers: Dict[str, nn.Module], forward_loop: Optional[ForwardLoop]) -> List[List[str]]:
    """`layers` partitioned by the activation they read: q/k/v together, gate/up together, the rest alone.

    Found in the model's graph (traced with the loop's first inputs); when
    the model cannot be traced every layer is its own group. Smoothing
    scales are searched per group, so fused layers end with one scale.
    """
    graphs = None
    if forward_loop is not None and len(layers) > 1:
        graphs = trace_model(model, forward_loop, "grouping layers that share an input", "each layer is smoothed on its own")
    return partition_by_input(layers, graphs)
