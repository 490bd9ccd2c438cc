"""Candidates and sensitivity scores of `auto_quantize`.

Each candidate format is applied to the whole model and calibrated once; each
quantizable layer then keeps a snapshot of its calibrated quantizers in that
format (and of its weight when the format's algorithm changed it), which can
be swapped in and out of the layer (`using`).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .algorithms import calibrate
from .api import to_device
from .config import QuantizeConfig
from .conversion import named_quantizers, set_quantizer_by_cfg
from .nn import QuantWeightModule
from .tensor_quantizer import TensorQuantizer

__all__ = ["LayerSnapshot", "format_snapshots", "using", "run_step", "logits_of", "gradient_scores", "kl_scores",
           "weight_bits", "layer_quantizers"]

_WEIGHT_PRESERVING = {None, "max", "mse"}


@dataclass
class LayerSnapshot:
    """One layer's calibrated quantizers in one format, its weight element bits, and its changed parameters."""

    quantizers: Dict[str, TensorQuantizer]
    bits: float
    params: Dict[str, torch.Tensor] = field(default_factory=dict)


def layer_quantizers(module: nn.Module) -> Dict[str, TensorQuantizer]:
    """The layer's own quantizers by attribute name (input, weight, output, ...)."""
    return {n: c for n, c in module.named_children() if isinstance(c, TensorQuantizer)}


def weight_bits(q: TensorQuantizer) -> float:
    """Nominal bits of one weight element: the element format's code bits (scales not counted)."""
    e = q.fmt.element
    bits = getattr(e, "code_bits", None)
    return float(bits if bits is not None else e.bits)


def reset_quantizers(model: nn.Module) -> None:
    """Every quantizer off and uncalibrated (no amax, global amax or pre_quant_scale)."""
    for _, q in named_quantizers(model):
        q.disable()
        q.amax = None
        q._global_amax = None
        q.pre_quant_scale = None
        q.disable_calib()
        q.enable_quant()


def _algorithm_name(cfg: QuantizeConfig) -> Optional[str]:
    return cfg.algorithm.get("method") if isinstance(cfg.algorithm, dict) else cfg.algorithm


def format_snapshots(model: nn.Module, name: str, cfg: QuantizeConfig, forward_loop: Callable[[nn.Module], Any],
                     share: Callable[[nn.Module], None]) -> Dict[str, LayerSnapshot]:
    """Calibrate the whole model in `cfg`; return the snapshots of the layers whose weight it quantizes.

    The model is left with every quantizer disabled and its original
    parameters. `share` gives shared-input layers one amax, as `quantize`
    does. An algorithm that changes parameters outside the quantized layers
    (smoothing folded into a norm) cannot be chosen per layer: ValueError.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantWeightModule)}
    keep = _algorithm_name(cfg) not in _WEIGHT_PRESERVING
    originals = {n: p.detach().clone() for n, p in model.named_parameters()} if keep else {}
    reset_quantizers(model)
    set_quantizer_by_cfg(model, cfg)
    snaps: Dict[str, LayerSnapshot] = {}
    try:
        calibrate(model, cfg.algorithm, forward_loop)
        share(model)
        own = {f"{n}.{k}" if n else k for n, m in layers.items() for k, _ in m.named_parameters(recurse=False)}
        outside = [n for n, p in model.named_parameters() if keep and n not in own and not torch.equal(p, originals[n])]
        if outside:
            raise ValueError(f"auto_quantize: the algorithm of {name} changed parameters outside the quantized "
                             f"layers ({', '.join(outside[:3])}), so it cannot be chosen layer by layer; use a "
                             "variant that keeps its changes in the layers (e.g. smoothquant with fold: false)")
        for lname, m in layers.items():
            if not m.weight_quantizer.is_enabled:
                continue
            prefix = f"{lname}." if lname else ""
            changed = {k: p.detach().clone() for k, p in m.named_parameters(recurse=False)
                       if keep and not torch.equal(p.detach(), originals[prefix + k])}
            snaps[lname] = LayerSnapshot({k: copy.deepcopy(q) for k, q in layer_quantizers(m).items()},
                                         weight_bits(m.weight_quantizer), changed)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in originals:
                    p.copy_(originals[n])
        reset_quantizers(model)
    return snaps


@contextlib.contextmanager
def using(module: nn.Module, snap: Optional[LayerSnapshot]) -> Iterator[None]:
    """Run `module` with the quantizers (and changed parameters) of `snap`; None: all its quantizers off."""
    if snap is None:
        saved = {n: q.is_enabled for n, q in layer_quantizers(module).items()}
        for q in layer_quantizers(module).values():
            q.disable()
        try:
            yield
        finally:
            for n, q in layer_quantizers(module).items():
                if saved[n]:
                    q.enable()
        return
    old_q = layer_quantizers(module)
    old_p = {k: module._parameters[k] for k in snap.params}
    for k, q in snap.quantizers.items():
        setattr(module, k, q)
    for k, p in snap.params.items():
        module._parameters[k] = nn.Parameter(p, requires_grad=False)
    try:
        yield
    finally:
        for k, q in old_q.items():
            setattr(module, k, q)
        for k, p in old_p.items():
            module._parameters[k] = p


def run_step(model: nn.Module, batch: Any, forward_step: Optional[Callable[[nn.Module, Any], Any]]) -> Any:
    """One forward: `forward_step(model, batch)`, or the batch called as `create_forward_loop` does."""
    if forward_step is not None:
        return forward_step(model, batch)
    param = next(model.parameters(), None)
    batch = to_device(batch, param.device if param is not None else torch.device("cpu"))
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, `.logits`, ``["logits"]`` or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"auto_quantize: cannot find logits in a model output of type {type(output).__name__}; "
                    "pass a forward_step that returns the logits tensor")


def _loss(output: Any, batch: Any, loss_func: Optional[Callable[[Any, Any], torch.Tensor]]) -> torch.Tensor:
    if loss_func is not None:
        loss = loss_func(output, batch)
    else:
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if loss is None:
            raise ValueError("auto_quantize(method='gradient') needs loss_func(output, batch) -> scalar loss "
                             "(or a model output with a .loss, e.g. batches with labels)")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError("auto_quantize: loss_func must return a scalar tensor computed from the model output")
    return loss.reshape(())


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters without gradients and the model in eval mode, both restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def gradient_scores(model: nn.Module, snaps: Dict[str, Dict[str, LayerSnapshot]], batches: List[Any],
                    forward_step, loss_func) -> Dict[str, Dict[str, float]]:
    """Per layer and format: sum over batches of ``sum((dL/dy * (y_q - y)) ** 2)``, y the float layer output.

    Each layer's output change is computed in its output's gradient hook, from
    the layer's inputs, so nothing beyond what backward keeps is stored.
    """
    scores = {layer: {f: 0.0 for f in fmts} for layer, fmts in snaps.items()}
    busy = [False]
    handles = []

    def pre_hook(module, args, kwargs):
        if busy[0] or not torch.is_grad_enabled():
            return None
        args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                     and not a.requires_grad else a for a in args)
        return args, kwargs

    def make_hook(layer: str):
        def hook(module, args, kwargs, out):
            if busy[0] or not isinstance(out, torch.Tensor) or not out.requires_grad:
                return
            x = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            y = out.detach()

            def on_grad(g):
                busy[0] = True
                try:
                    with torch.no_grad():
                        for fmt, snap in snaps[layer].items():
                            with using(module, snap):
                                dy = module(*x, **kwargs).float() - y.float()
                            scores[layer][fmt] += float(((g.float() * dy) ** 2).sum())
                finally:
                    busy[0] = False

            out.register_hook(on_grad)
        return hook

    for layer in snaps:
        m = model.get_submodule(layer)
        handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(make_hook(layer), with_kwargs=True))
    try:
        with _frozen(model), torch.enable_grad():
            for batch in batches:
                output = run_step(model, batch, forward_step)
                _loss(output, batch, loss_func).backward()
    finally:
        for h in handles:
            h.remove()
    return scores


def kl_scores(model: nn.Module, groups: List[List[str]], options: List[List[str]],
              snaps: Dict[str, Dict[str, LayerSnapshot]], batches: List[Any], forward_step) -> List[Dict[str, float]]:
    """Per group and format: KL(float || group quantized) of the output distributions, summed over batches.

    Each batch contributes the KL divergence of the softmax over the last
    dimension, summed over it and averaged over the other positions.
    """
    with _frozen(model), torch.no_grad():
        ref = [F.log_softmax(logits_of(run_step(model, b, forward_step)).float(), dim=-1) for b in batches]
        out: List[Dict[str, float]] = []
        for members, fmts in zip(groups, options):
            row: Dict[str, float] = {}
            for fmt in fmts:
                with contextlib.ExitStack() as stack:
                    for layer in members:
                        stack.enter_context(using(model.get_submodule(layer), snaps[layer][fmt]))
                    total = 0.0
                    for b, logp in zip(batches, ref):
                        logq = F.log_softmax(logits_of(run_step(model, b, forward_step)).float(), dim=-1)
                        positions = max(logp.numel() // max(logp.shape[-1], 1), 1)
                        total += float(F.kl_div(logq, logp, log_target=True, reduction="sum")) / positions
                row[fmt] = total
            out.append(row)
    return out
