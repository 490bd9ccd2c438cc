"""The one-call API: quantize, and the helpers around it."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms import calibrate
from .config import QuantizeConfig
from .layerwise import layerwise_calibrate
from .conversion import named_quantizers, replace_quant_modules, set_quantizer_by_cfg
from .nn import QuantWeightModule
from .presets import get_config
from .tensor_quantizer import TensorQuantizer

__all__ = ["quantize", "fold_weight", "create_forward_loop", "share_input_amax_by_graph"]

ConfigLike = Union[str, Dict[str, Any], QuantizeConfig]


def quantize(
    model: nn.Module,
    config: ConfigLike,
    forward_loop: Optional[Callable[[nn.Module], Any]] = None,
    share_input_amax: bool = True,
    layerwise: Union[bool, str, Dict[str, Any]] = False,
) -> nn.Module:
    """Quantize `model` in place and return it.

    Registered layers get input, weight and output quantizers, set from
    `config` (a preset name or qformat, a YAML path, a dict or a
    QuantizeConfig), then calibrated by running `forward_loop(model)`.
    Without a loop, weights are calibrated from themselves and static
    activation quantizers become dynamic (with a warning).

    With `share_input_amax` (the default), layers that read the same
    activation (q/k/v, gate/up: found in the model's graph) end with one
    input amax, the largest of theirs, as fused QKV and gate-up kernels and
    checkpoints need; their per-tensor weight amaxes (FP8, and NVFP4's
    global amax) are unified the same way. The groups are kept in
    ``model._modelopt_lite_shared_inputs``.

    With `layerwise` the algorithm runs on one decoder layer at a time, each
    fed the outputs of the quantized layers before it, so peak activation
    memory is one layer's (see `layerwise.layerwise_calibrate`): True finds
    the layer stack, a string names it (``"model.layers"``), a dict gives
    ``{"layers": path, "feed": "quantized" | "float"}``.
    Under torch.distributed every statistic is reduced across ranks, so each
    rank ends with the same quantizers as one process calibrating on all the
    ranks' data.
    """
    cfg = get_config(config)
    converted = replace_quant_modules(model)
    if converted == 0 and not any(True for _ in named_quantizers(model)):
        warnings.warn("quantize: the model has no layer of a registered class; nothing was quantized")
    set_quantizer_by_cfg(model, cfg)
    with _first_call_inputs(model) as seen:
        if layerwise:
            options = layerwise if isinstance(layerwise, dict) else {"layers": layerwise}
            unknown = set(options) - {"layers", "feed"}
            if unknown:
                raise ValueError(f"quantize: layerwise options are 'layers' and 'feed', got {sorted(unknown)}")
            layerwise_calibrate(model, cfg.algorithm, forward_loop, options.get("layers", True), options.get("feed", "quantized"))
        else:
            calibrate(model, cfg.algorithm, forward_loop)
    if share_input_amax:
        share_input_amax_by_graph(model, example_inputs=seen.get("inputs"))
    model._modelopt_lite_quant_config = cfg.model_dump(mode="json", exclude_unset=True)
    from ..opt.modes import record_mode

    record_mode(model, "quantize", {"quant_config": model._modelopt_lite_quant_config,
                                    "share_input_amax": bool(share_input_amax)})
    return model


@contextlib.contextmanager
def _first_call_inputs(model: nn.Module):
    """Keep the (args, kwargs) of the model's first call: example inputs for tracing."""
    seen: Dict[str, Any] = {}

    def hook(module, args, kwargs):
        seen.setdefault("inputs", (tuple(args), dict(kwargs)))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def share_input_amax_by_graph(model: nn.Module, example_inputs=None, graphs=None) -> List[List[str]]:
    """Give layers that read the same activation one input amax (the largest); returns the groups.

    Only quantizers that are enabled, static and calibrated, with the same
    format and amax shape, are merged. When the model cannot be traced at
    all, nothing changes (with a warning).
    """
    from ..trace import recursive_trace, residual_writers, shared_input_groups

    def has_input_quantizer(m: nn.Module) -> bool:
        return isinstance(getattr(m, "input_quantizer", None), TensorQuantizer)

    def calibrated(m: nn.Module) -> bool:
        return any(isinstance(q, TensorQuantizer) and q.amax is not None
                   for q in (m.input_quantizer, getattr(m, "weight_quantizer", None)))

    if not any(has_input_quantizer(m) and calibrated(m) for m in model.modules()):
        model._modelopt_lite_shared_inputs = []
        return []
    try:
        graphs = graphs if graphs is not None else recursive_trace(model, example_inputs=example_inputs)
    except Exception as e:  # noqa: BLE001 - sharing is an improvement, not a requirement
        warnings.warn(f"quantize: could not trace the model to find shared inputs ({type(e).__name__}: {e})")
        return []
    groups = shared_input_groups(graphs, want=has_input_quantizer)
    applied: List[List[str]] = []
    for names in groups:
        modules = [model.get_submodule(n) for n in names]
        if _merge_amax([m.input_quantizer for m in modules]):
            applied.append(names)
        # One per-tensor weight scale per fused GEMM (q/k/v, gate/up), as runtimes requantize to it.
        weights = [getattr(m, "weight_quantizer", None) for m in modules]
        if all(isinstance(q, TensorQuantizer) for q in weights):
            if not _merge_global_amax(weights):
                _merge_amax(weights, per_tensor_only=True)
    model._modelopt_lite_shared_inputs = applied
    model._modelopt_lite_residual_writers = residual_writers(graphs, want=has_input_quantizer)
    return applied


def _merge_amax(quantizers: List[TensorQuantizer], per_tensor_only: bool = False) -> bool:
    """Give static quantizers of one format their largest amax; False when they cannot share."""
    usable = [q for q in quantizers if q.is_enabled and q.uses_static_amax and q.amax is not None]
    if len(usable) < 2 or (per_tensor_only and len(usable) < len(quantizers)):
        return False
    ref = usable[0]
    if any(q._spec != ref._spec or q.amax.shape != ref.amax.shape for q in usable):
        return False
    if per_tensor_only and ref.amax.numel() != 1:
        return False
    with torch.no_grad():
        shared = torch.stack([q.amax for q in usable]).amax(dim=0)
        for q in usable:
            q.amax = shared.clone()
    return True


def _merge_global_amax(quantizers: List[TensorQuantizer]) -> bool:
    """Two-level formats with static per-block amaxes: one global amax for the group (the largest)."""
    if not all(q.is_enabled and q.fmt.amax_is_global and q.amax is not None for q in quantizers):
        return False
    if all(q.amax.numel() == 1 for q in quantizers) or any(q._spec != quantizers[0]._spec for q in quantizers):
        return False
    with torch.no_grad():
        shared = torch.stack([q.effective_global_amax() for q in quantizers]).amax()
        for q in quantizers:
            if q.amax.numel() > 1:
                q.global_amax = shared
            else:
                q.amax = shared.clone()
    return True


def fold_weight(model: nn.Module) -> nn.Module:
    """Bake fake-quantized weights into the parameters and turn weight quantizers off."""
    for module in model.modules():
        if isinstance(module, QuantWeightModule):
            module.fold_weight()
    return model


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def create_forward_loop(
    data: Iterable, num_batches: Optional[int] = None, desc: str = "Calibrating", progress: bool = True
) -> Callable[[nn.Module], None]:
    """A forward loop over a DataLoader or a list of batches, with a progress bar.

    A dict batch is called as ``model(**batch)``, a tuple or list as
    ``model(*batch)``, anything else as ``model(batch)``; tensors move to the
    model's device.
    """

    def loop(model: nn.Module) -> None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        total = num_batches
        if total is None and hasattr(data, "__len__"):
            total = len(data)
        for i, batch in enumerate(tqdm(data, total=total, desc=desc, disable=not progress, leave=False)):
            if num_batches is not None and i >= num_batches:
                break
            batch = to_device(batch, device)
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (list, tuple)):
                model(*batch)
            else:
                model(batch)

    return loop
