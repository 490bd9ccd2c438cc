"""Layer-wise calibration: one decoder layer at a time, for models whose activations do not fit.

`layerwise_calibrate` runs the user's forward loop once, only up to the
first decoder layer, keeping that layer's inputs for every batch. Then, for
each layer in turn, the calibration algorithm runs on that layer alone with
a forward loop that replays the kept inputs, and the layer's outputs become
the next layer's inputs. Only one layer's inputs and outputs (for all
batches) are alive at any time, and algorithms that hold per-layer state
(GPTQ Hessians, AWQ statistics) hold it for one layer.

`feed="quantized"` (the default) gives each layer the outputs of the
already quantized layers before it, as a deployed model computes them, and
equals the sequential algorithms (GPTQ) of a full pass. `feed="float"`
gives each layer float inputs, and equals the non-sequential algorithms
(max, SmoothQuant, AWQ) of a full pass, within rounding.

Quantizers outside the decoder layers (an enabled `lm_head`, a pooler) are
max-calibrated afterwards in one pass of the whole model.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from .algorithms import calibrate
from .algorithms.common import quantizers_off
from .algorithms.max import run_calibration_passes
from .algorithms.registry import finalize_uncalibrated
from .tensor_quantizer import TensorQuantizer

__all__ = ["layerwise_calibrate", "find_decoder_layers"]

Inputs = Tuple[tuple, Dict[str, Any]]
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")
FEEDS = ("quantized", "float")


def _has_quantizer(module: nn.Module) -> bool:
    return any(isinstance(m, TensorQuantizer) for m in module.modules())


def find_decoder_layers(model: nn.Module, path: Optional[str] = None) -> Tuple[str, nn.ModuleList]:
    """The model's stack of repeated layers: `path` when given, else the longest ModuleList of
    same-class modules that hold quantizers (``model.layers``, ``encoder.layer``)."""
    if path is not None:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"layerwise: the model has no module {path!r}") from None
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise ValueError(f"layerwise: {path!r} is a {type(found).__name__}, not a non-empty ModuleList of layers")
        return path, found
    best: Optional[Tuple[str, nn.ModuleList]] = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if len({type(c) for c in m}) != 1 or not all(_has_quantizer(c) for c in m):
            continue
        if best is None or len(m) > len(best[1]):
            best = (name, m)
    if best is None:
        raise ValueError("layerwise: found no ModuleList of repeated quantized layers in the model; "
                         "pass layerwise='<path of the layer list>' (e.g. 'model.layers')")
    return best


class _Stop(Exception):
    """Raised in the first decoder layer to end the model's forward once its inputs are kept."""


@contextlib.contextmanager
def _stop_at(model: nn.Module, layer: nn.Module, kept: List[Inputs]) -> Iterator[None]:
    """Keep `layer`'s inputs on each model call and skip the rest of the model (the call returns None)."""

    def hook(module, args, kwargs):
        kept.append(_detach_cache(tuple(args), dict(kwargs)))
        raise _Stop

    original = model.forward

    def forward(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except _Stop:
            return None

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    model.forward = forward
    try:
        yield
    finally:
        handle.remove()
        del model.forward


def _detach_cache(args: tuple, kwargs: Dict[str, Any]) -> Inputs:
    """Replays must not grow a KV cache: the cache is dropped and use_cache turned off."""
    for key in _CACHE_KWARGS:
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def _hidden(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"layerwise: a decoder layer returned {type(out).__name__}; expected a tensor or a tuple "
                    "starting with the hidden states")


def _with_hidden(inputs: Inputs, hidden: torch.Tensor) -> Inputs:
    args, kwargs = inputs
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise ValueError("layerwise: cannot find the hidden states among the decoder layer's inputs "
                     "(expected the first positional argument or `hidden_states=`)")


def _replay(inputs: List[Inputs]) -> Callable[[nn.Module], None]:
    def loop(layer: nn.Module) -> None:
        for args, kwargs in inputs:
            layer(*args, **kwargs)

    return loop


@torch.no_grad()
def layerwise_calibrate(
    model: nn.Module,
    algorithm: Union[str, Dict[str, Any], None],
    forward_loop: Callable[[nn.Module], Any],
    layers: Union[bool, str, None] = True,
    feed: str = "quantized",
) -> nn.Module:
    """Calibrate `model` with `algorithm`, one decoder layer at a time (see the module docstring).

    `layers`: True to find the layer stack, or its module path.
    """
    if forward_loop is None:
        raise ValueError("layerwise calibration needs a forward_loop: it calibrates each layer on the data")
    if feed not in FEEDS:
        raise ValueError(f"layerwise: feed must be one of {FEEDS}, got {feed!r}")
    _, stack = find_decoder_layers(model, layers if isinstance(layers, str) else None)
    inside = {id(q) for layer in stack for q in layer.modules() if isinstance(q, TensorQuantizer)}
    outside = [q for q in model.modules() if isinstance(q, TensorQuantizer) and id(q) not in inside]

    kept: List[Inputs] = []
    with quantizers_off(model), _stop_at(model, stack[0], kept):
        forward_loop(model)
    if not kept:
        raise ValueError("layerwise: the forward loop never reached the first decoder layer "
                         f"({type(stack[0]).__name__}); check the loop calls the model")

    for i, layer in enumerate(stack):
        calibrate(layer, algorithm, _replay(kept))
        if i + 1 < len(stack):
            ctx = quantizers_off(layer) if feed == "float" else contextlib.nullcontext()
            with ctx:
                kept = [_with_hidden(inp, _hidden(layer(*inp[0], **inp[1]))) for inp in kept]
    del kept

    needing = [q for q in outside if q.needs_calibration and q.amax is None]
    if needing:
        for q in needing:
            q.calibrator.reset()
        with contextlib.ExitStack() as stack_ctx:
            if feed == "float":
                for layer in stack:
                    stack_ctx.enter_context(quantizers_off(layer))
            run_calibration_passes(model, forward_loop, needing)
        for q in needing:
            q.load_calib_amax()
    finalize_uncalibrated(model, had_data=True)
    return model
