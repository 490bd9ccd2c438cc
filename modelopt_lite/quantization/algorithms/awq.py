"""`awq_lite` and `awq_full`: activation-aware weight scaling (AWQ), then calibration.

`awq_lite` searches, for every group of weight layers that read the same
activation (q/k/v, gate/up, found in the traced graph; other layers alone),
one per-input-channel scale s that protects the channels carrying large
activations:

    s(alpha) = m ** alpha / sqrt(max(m ** alpha) * min(m ** alpha)),   m_j = mean |x_j|

for alpha in 0, alpha_step, ..., 1 (alpha = 0 is s = 1, no smoothing, so
the search never ends worse than max calibration on its own loss). The
normalisation centres s around 1. Each candidate is scored on the
calibration data by the float64 sum, over every token and every layer of
the group, of ``||Q(W * s) (x / s) - W x||^2``, where Q is the layer's
weight format (scales from the scaled weight itself, as max calibration
gives them) and, when the layer's input quantizer is on (W4A8, NVFP4
W4A4), ``x / s`` is also fake-quantized in the input's format (scales from
each batch). The best alpha's scale is applied: W' = W * s, and
``input_quantizer.pre_quant_scale = 1 / s`` (identical in a group; it
applies also while the input quantizer is off, for weight-only formats).

The forward loop runs once to collect mean |x| (sums and token counts,
reduced with sum across ranks), once more to score the candidates inside
forward hooks, batch by batch (losses reduced with sum across ranks; no
activation is stored), then max calibration runs on the smoothed model.

`awq_full` is the awq_lite search followed by the `awq_clip` block amax
search on the smoothed weights (see awq_clip.py), whose pass also
calibrates the activations.

Options: `alpha_step` (0.1), `max_tokens_per_batch` (None: every token is
scored; n: n tokens per batch, evenly strided); awq_full also takes
`shrink_grid`.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ...utils.dist import all_reduce
from ..formats import fake_quant
from .awq_clip import check_clip_format, clip_and_calibrate
from .common import (capture_inputs, effective_input, fake_quant_weight, input_groups, quantizers_off, require_loop,
                     run_loop, shared_weight_layers, subsample_tokens, weight_layers, weight_matrix)
from .max import max_calibrate
from .registry import ForwardLoop, register_algorithm
from .smoothquant import apply_smoothing

__all__ = ["awq_lite", "awq_full", "awq_lite_search", "awq_scales", "alpha_grid"]

_SCALE_FLOOR = 1e-4  # mean |x| below this counts as this (a dead channel keeps a finite scale)
_CHUNK = 4096  # tokens scored at once


def alpha_grid(alpha_step: float) -> List[float]:
    """0, alpha_step, 2 * alpha_step, ... up to and including 1."""
    if isinstance(alpha_step, bool) or not isinstance(alpha_step, (int, float)) or not 0.0 < float(alpha_step) <= 1.0:
        raise ValueError(f"awq: alpha_step must be a number in (0, 1], got {alpha_step!r}")
    n = int(1.0 / float(alpha_step) + 1e-9)
    grid = [round(k * float(alpha_step), 10) for k in range(n + 1)]
    if grid[-1] < 1.0 - 1e-9:
        grid.append(1.0)
    return grid


def awq_scales(act_mean: torch.Tensor, alphas: Sequence[float]) -> torch.Tensor:
    """The candidate scales, one row per alpha: m^alpha normalised by sqrt(max * min) (see the module doc)."""
    m = act_mean.double().clamp_min(_SCALE_FLOOR)
    a = torch.tensor(list(alphas), dtype=torch.float64, device=m.device).reshape(-1, 1)
    s = m.reshape(1, -1).pow(a)
    s = s / (s.amax(dim=1, keepdim=True) * s.amin(dim=1, keepdim=True)).sqrt()
    return s.float()


def _check_tokens(max_tokens_per_batch) -> None:
    if max_tokens_per_batch is not None and (isinstance(max_tokens_per_batch, bool)
                                             or not isinstance(max_tokens_per_batch, int) or max_tokens_per_batch < 1):
        raise ValueError(f"awq: max_tokens_per_batch must be a positive int or null, got {max_tokens_per_batch!r}")


def _mean_abs(model: nn.Module, loop: ForwardLoop, layers: Dict[str, nn.Module]) -> Dict[str, Tuple[torch.Tensor, float]]:
    """Per layer (sum_t |x_t|, token count) of its float input, summed across ranks."""
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}

    def collect(name: str, x: torch.Tensor) -> None:
        xe = effective_input(layers[name], x)
        xe = xe.reshape(-1, xe.shape[-1])
        part = xe.abs().sum(dim=0, dtype=torch.float64)
        if not bool(torch.isfinite(part).all()):
            raise ValueError(f"awq: NaN or Inf in the input of layer {name!r}")
        sums[name] = part if name not in sums else sums[name] + part
        counts[name] = counts.get(name, 0) + xe.shape[0]

    with quantizers_off(model), capture_inputs(layers, collect):
        run_loop(model, loop)
    sizes = [weight_matrix(m).shape[1] for m in layers.values()]
    parts = []
    for (name, m), size in zip(layers.items(), sizes):
        s = sums.get(name)
        if s is not None and s.numel() != size:
            raise ValueError(f"awq: layer {name!r} got inputs of {s.numel()} features for a weight of {size}")
        s = torch.zeros(size, dtype=torch.float64) if s is None else s.cpu()
        parts.append(torch.cat([s, torch.tensor([float(counts.get(name, 0))], dtype=torch.float64)]))
    flat = all_reduce(torch.cat(parts), "sum") if parts else torch.zeros(0, dtype=torch.float64)
    out, offset = {}, 0
    for name, size in zip(layers, sizes):
        out[name] = (flat[offset:offset + size], float(flat[offset + size]))
        offset += size + 1
    return out


@torch.no_grad()
def _candidate_loss(module: nn.Module, x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 [alphas]: sum over the tokens of x of ||Q(W s)(x / s) - W x||^2 (x as the GEMM sees it)."""
    w = weight_matrix(module)
    wf = w.float()
    iq = module.input_quantizer
    scales = scales.to(wf.device)
    losses = torch.zeros(scales.shape[0], dtype=torch.float64, device=wf.device)
    chunks = [x[i:i + _CHUNK].float() for i in range(0, x.shape[0], _CHUNK)]
    refs = [xc @ wf.t() for xc in chunks]
    for i, s in enumerate(scales):
        wq = fake_quant_weight(module, (wf * s).to(w.dtype)).float().t()
        for xc, ref in zip(chunks, refs):
            xs = xc / s
            if iq.is_enabled:
                xs = fake_quant(xs.to(x.dtype), iq.fmt).float()
            diff = torch.addmm(ref, xs, wq, beta=-1.0)
            losses[i] += torch.sum(diff * diff, dtype=torch.float64)
    return losses


@torch.no_grad()
def awq_lite_search(model: nn.Module, forward_loop: ForwardLoop, alpha_step: float = 0.1,
                    max_tokens_per_batch: Optional[int] = None) -> Tuple[Dict[str, float], List[List[str]]]:
    """The awq_lite search and smoothing, without the final calibration.

    Returns (the alpha chosen per layer, the groups of layers sharing a scale).
    """
    alphas = alpha_grid(alpha_step)
    _check_tokens(max_tokens_per_batch)
    layers = dict(weight_layers(model))
    if not layers:
        warnings.warn("awq: no weight layer has an enabled weight quantizer; nothing to search")
        return {}, []
    groups = input_groups(model, layers, forward_loop)
    stats = _mean_abs(model, forward_loop, layers)
    tied = set(shared_weight_layers(model, list(layers)))
    candidates: Dict[int, torch.Tensor] = {}
    group_of: Dict[str, int] = {}
    unseen = []
    for gi, group in enumerate(groups):
        total = sum(stats[n][0] for n in group)
        count = sum(stats[n][1] for n in group)
        if tied & set(group):
            warnings.warn(f"awq: {group} share their weight with another module; left unsmoothed")
            continue
        if count == 0:
            unseen.extend(group)
            continue
        candidates[gi] = awq_scales(total / count, alphas).to(layers[group[0]].weight.device)
        for n in group:
            group_of[n] = gi
    if unseen:
        warnings.warn(f"awq: {len(unseen)} layer(s) saw no calibration data and are not smoothed: {', '.join(unseen[:5])}")

    losses = {gi: torch.zeros(len(alphas), dtype=torch.float64) for gi in candidates}

    def score(name: str, x: torch.Tensor) -> None:
        gi = group_of[name]
        xe = effective_input(layers[name], subsample_tokens(x, max_tokens_per_batch))
        loss = _candidate_loss(layers[name], xe.reshape(-1, xe.shape[-1]), candidates[gi])
        losses[gi] += loss.cpu()

    active = {n: layers[n] for n in group_of}
    with quantizers_off(model), capture_inputs(active, score):
        run_loop(model, forward_loop)
    order = sorted(losses)
    reduced = all_reduce(torch.stack([losses[gi] for gi in order]), "sum") if order else None
    chosen: Dict[str, float] = {}
    for row, gi in enumerate(order):
        best = int(torch.argmin(reduced[row]))  # ties keep the smaller alpha
        apply_smoothing([layers[n] for n in groups[gi]], candidates[gi][best])
        for n in groups[gi]:
            chosen[n] = alphas[best]
    return chosen, groups


@register_algorithm("awq_lite")
@torch.no_grad()
def awq_lite(model: nn.Module, forward_loop: Optional[ForwardLoop] = None, alpha_step: float = 0.1,
             max_tokens_per_batch: Optional[int] = None) -> Dict[str, float]:
    """AWQ scale search (see the module doc), then max calibration; returns the alpha chosen per layer."""
    loop = require_loop("awq_lite", forward_loop)
    chosen, _ = awq_lite_search(model, loop, alpha_step, max_tokens_per_batch)
    max_calibrate(model, loop)
    return chosen


@register_algorithm("awq_full")
@torch.no_grad()
def awq_full(model: nn.Module, forward_loop: Optional[ForwardLoop] = None, alpha_step: float = 0.1,
             shrink_grid: Optional[Sequence[float]] = None,
             max_tokens_per_batch: Optional[int] = None) -> Dict[str, Tuple[float, float]]:
    """awq_lite's scale search, then awq_clip's block amax search; returns (alpha, mean shrink ratio) per layer."""
    loop = require_loop("awq_full", forward_loop)
    for name, m in weight_layers(model):  # refuse formats the clip search cannot handle before any work
        check_clip_format(name, m.weight_quantizer)
    alphas, groups = awq_lite_search(model, loop, alpha_step, max_tokens_per_batch)
    ratios = clip_and_calibrate(model, loop, shrink_grid, max_tokens_per_batch, groups=groups)
    return {n: (alphas.get(n, 0.0), r) for n, r in ratios.items()}
