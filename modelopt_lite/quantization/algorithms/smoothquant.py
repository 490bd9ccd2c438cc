"""`smoothquant`: move activation outliers into the weights, then max-calibrate.

For every weight layer whose input quantizer is on, the per-input-channel
abs-max of its (float) input is collected over the forward loop. Layers
that read the same activation (q/k/v, gate/up, found in the traced graph)
share one scale per channel::

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

(max|W_j| is the largest |weight| of input column j over the group's
layers; s_j = 1 where either statistic is 0; s is clamped to
[SCALE_MIN, SCALE_MAX]). Each weight's input column j is multiplied by
s_j and the activation is divided by s, which leaves the float model's
output unchanged. The division is folded into the layer that produces the
activation when the graph shows that its output is read only by the group:
a LayerNorm/RMSNorm (its weight and bias) or a linear layer (its output
rows and bias). Post-norm models such as BERT, whose norm output also feeds
the residual, keep the division as ``input_quantizer.pre_quant_scale = 1/s``
instead. Every fold is checked numerically on a probe input and undone when
the producer does not scale as expected (Gemma's ``1 + weight`` norms).

Options: `alpha` (0.5: the migration strength, 0 keeps the activation, 1
moves all of its range into the weight), `fold` (True; False keeps every
scale as a pre_quant_scale). Under torch.distributed the activation maxima
are reduced across ranks (max) before the scales are computed.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence

import torch
from torch import fx, nn

from ...utils.dist import all_reduce_optional
from .common import (capture_inputs, effective_input, partition_by_input, quantizers_off, require_loop, run_loop,
                     set_weight_matrix, shared_weight_layers, trace_model, weight_layers, weight_matrix)
from .max import max_calibrate
from .registry import ForwardLoop, register_algorithm

__all__ = ["smoothquant", "smoothing_scale", "scale_weight_columns", "divide_input", "apply_smoothing",
           "SCALE_MIN", "SCALE_MAX"]

SCALE_MIN = 1e-4
SCALE_MAX = 1e4
"""Smoothing scales are clamped to this range (a dead channel must not blow up its weight column)."""


def smoothing_scale(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """The SmoothQuant scale per input channel: act^alpha / weight^(1-alpha), 1 where either is 0, clamped."""
    a = act_amax.double()
    w = weight_amax.double()
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp(SCALE_MIN, SCALE_MAX).float()


@torch.no_grad()
def scale_weight_columns(modules: Sequence[nn.Module], s: torch.Tensor) -> None:
    """Multiply input column j of each layer's weight by s_j."""
    for m in modules:
        w = weight_matrix(m)
        set_weight_matrix(m, w.float() * s.to(device=w.device, dtype=torch.float32).reshape(1, -1))


@torch.no_grad()
def divide_input(modules: Sequence[nn.Module], s: torch.Tensor) -> None:
    """Divide each layer's input by s: its input quantizer's pre_quant_scale becomes (old or 1) / s."""
    for m in modules:
        scale = s.to(device=m.weight.device, dtype=torch.float32)
        old = m.input_quantizer.pre_quant_scale
        base = torch.ones_like(scale) if old is None else old.to(device=scale.device, dtype=torch.float32)
        m.input_quantizer.pre_quant_scale = base / scale


def apply_smoothing(modules: Sequence[nn.Module], s: torch.Tensor) -> None:
    """W' = W * s (per input column) and input / s through pre_quant_scale: the float output is unchanged."""
    scale_weight_columns(modules, s)
    divide_input(modules, s)


@register_algorithm("smoothquant")
@torch.no_grad()
def smoothquant(model: nn.Module, forward_loop: Optional[ForwardLoop] = None, alpha: float = 0.5,
                fold: bool = True) -> Dict[str, str]:
    """Smooth every weight layer with an enabled input quantizer, then max-calibrate (see the module doc).

    Returns, per smoothed layer, where its activation division went: the
    name of the norm or linear it was folded into, or ``"pre_quant_scale"``.
    """
    loop = require_loop("smoothquant", forward_loop)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"algorithm smoothquant: alpha must be a number in [0, 1], got {alpha!r}")
    if not isinstance(fold, bool):
        raise TypeError(f"algorithm smoothquant: fold must be true or false, got {fold!r}")
    layers = {n: m for n, m in weight_layers(model) if m.input_quantizer.is_enabled}
    placed: Dict[str, str] = {}
    if layers:
        graphs = trace_model(model, loop, "smoothquant",
                             "every layer is smoothed on its own and keeps its scale as pre_quant_scale")
        groups = partition_by_input(layers, graphs)
        act = _activation_maxima(model, loop, layers)
        tied = set(shared_weight_layers(model, list(layers)))
        plans = []
        for group in groups:
            stats = [act[n] for n in group if act[n] is not None]
            in_dims = {weight_matrix(layers[n]).shape[1] for n in group} | {a.numel() for a in stats}
            if tied & set(group):
                warnings.warn(f"smoothquant: {group} share their weight with another module; left unsmoothed")
                continue
            if not stats:
                warnings.warn(f"smoothquant: {group} saw no calibration data; left unsmoothed")
                continue
            if len(in_dims) != 1:
                warnings.warn(f"smoothquant: the inputs of {group} do not match their weights' input size; left unsmoothed")
                continue
            x_amax = torch.stack([a.float() for a in stats]).amax(dim=0)
            w_amax = torch.stack([weight_matrix(layers[n]).abs().amax(dim=0).float().to(x_amax.device)
                                  for n in group]).amax(dim=0)
            plans.append((group, smoothing_scale(x_amax, w_amax, float(alpha))))
        for group, s in plans:
            scale_weight_columns([layers[n] for n in group], s)
        sites = _call_sites(graphs) if fold and graphs is not None else None
        for group, s in plans:
            target = _fold(model, sites, group, s) if sites is not None else None
            if target is None:
                divide_input([layers[n] for n in group], s)
            for n in group:
                placed[n] = target or "pre_quant_scale"
    else:
        warnings.warn("smoothquant: no weight layer has an enabled input quantizer; running max calibration only")
    max_calibrate(model, loop)
    return placed


def _activation_maxima(model: nn.Module, loop: ForwardLoop, layers: Dict[str, nn.Module]) -> Dict[str, Optional[torch.Tensor]]:
    """Per layer, max |x_j| of its float input over the loop, reduced across ranks (None: never called)."""
    stats: Dict[str, torch.Tensor] = {}

    def collect(name: str, x: torch.Tensor) -> None:
        xe = effective_input(layers[name], x)
        amax = xe.reshape(-1, xe.shape[-1]).abs().amax(dim=0).float()
        if not bool(torch.isfinite(amax).all()):
            raise ValueError(f"smoothquant: NaN or Inf in the input of layer {name!r}")
        stats[name] = amax if name not in stats else torch.maximum(stats[name], amax)

    with quantizers_off(model), capture_inputs(layers, collect):
        run_loop(model, loop)
    # Every rank reduces every layer, in the same order.
    return {n: all_reduce_optional(stats.get(n), "max") for n in layers}


# ------------------------------------------------------------------ folding
def _full(entry, target: str) -> str:
    return f"{entry.name}.{target}" if entry.name else target


def _call_sites(graphs) -> Dict[str, list]:
    sites: Dict[str, list] = {}
    for entry in graphs.entries():
        for node in entry.graph.nodes:
            if node.op == "call_module":
                sites.setdefault(_full(entry, node.target), []).append((entry, node))
    return sites


def _source(entry, node: fx.Node) -> Optional[fx.Node]:
    """The node whose value reaches `node`'s first input, looking through ops that keep the value (dropout, casts)."""
    from ...trace.fanout import same_value

    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    while src is not None and same_value(entry.module, src):
        src = src.args[0] if src.args and isinstance(src.args[0], fx.Node) else None
    return src


def _only_read_by(entry, node: fx.Node, members: set) -> bool:
    """True when every use of `node`'s value (through value-keeping ops) is the first input of a group member."""
    from ...trace.fanout import same_value

    todo = [node]
    while todo:
        cur = todo.pop()
        for user in cur.users:
            first = user.args[0] if user.args else None
            if first is cur and same_value(entry.module, user):
                todo.append(user)
                continue
            if user.op != "call_module" or first is not cur or _full(entry, user.target) not in members:
                return False
            if any(a is cur for a in list(user.args[1:]) + list(user.kwargs.values())):
                return False
    return True


def _fold(model: nn.Module, sites: Dict[str, list], group: List[str], s: torch.Tensor) -> Optional[str]:
    """Fold 1/s into the producer of the group's activation; its name, or None when that is not safe.

    `sites` maps module names to their call nodes in the graphs (`_call_sites`).
    """
    sources = set()
    where = None
    for n in group:
        calls = sites.get(n, [])
        if len(calls) != 1:
            return None
        entry, node = calls[0]
        src = _source(entry, node)
        if src is None or src.op != "call_module":
            return None
        sources.add((id(entry), src))
        where = (entry, src)
    if len(sources) != 1:
        return None
    entry, src = where
    name = _full(entry, src.target)
    if len(sites.get(name, [])) != 1 or not _only_read_by(entry, src, set(group)):
        return None
    try:
        producer = model.get_submodule(name)
    except AttributeError:
        return None
    if not isinstance(getattr(producer, "weight", None), torch.Tensor) or shared_weight_layers(model, [name]):
        return None  # a norm without affine weight, or a tied weight
    return name if _scale_output(producer, s) else None


@torch.no_grad()
def _scale_output(producer: nn.Module, s: torch.Tensor) -> bool:
    """Divide a norm's or linear's output channels by s (weight and bias); undo and return False if it does not hold."""
    weight = producer.weight
    bias = getattr(producer, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    n = s.numel()
    if weight.dim() == 1 and weight.numel() == n:
        in_dim = n
        rows = None
    elif weight.dim() == 2 and (hasattr(producer, "weight_quantizer") or isinstance(producer, nn.Linear)):
        w = weight_matrix(producer) if hasattr(producer, "weight_quantizer") else weight.data
        if w.shape[0] != n:
            return False
        in_dim, rows = w.shape[1], w
    else:
        return False
    if bias is not None and (bias.dim() != 1 or bias.numel() != n):
        return False
    inv = (1.0 / s.double()).to(weight.device)
    probe = torch.randn(2, 3, in_dim, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    saved_w, saved_b = weight.data.clone(), None if bias is None else bias.data.clone()
    try:
        with quantizers_off(producer):
            before = producer(probe)
            if rows is None:
                weight.data.copy_((weight.data.double() * inv).to(weight.dtype))
            else:
                new = (rows.double() * inv.reshape(-1, 1)).to(rows.dtype)
                if hasattr(producer, "weight_quantizer"):
                    set_weight_matrix(producer, new)
                else:
                    weight.data.copy_(new)
            if bias is not None:
                bias.data.copy_((bias.data.double() * inv).to(bias.dtype))
            after = producer(probe)
        ok = isinstance(after, torch.Tensor) and after.shape == before.shape and _scaled_like(after, before, s, weight.dtype)
    except Exception:  # noqa: BLE001 - a producer that cannot run on a probe is not folded into
        ok = False
    if not ok:
        weight.data.copy_(saved_w)
        if bias is not None:
            bias.data.copy_(saved_b)
    return ok


def _scaled_like(after: torch.Tensor, before: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> bool:
    """after * s == before within the rounding of `dtype`."""
    rtol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    want = before.double()
    got = after.double() * s.double().to(after.device)
    return bool(torch.allclose(got, want, rtol=rtol, atol=rtol * float(want.abs().amax())))
