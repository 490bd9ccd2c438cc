"""`awq_clip`: search each weight block's amax for the lowest output error, then calibrate activations.

For every weight layer with per-block weight scales (INT4 blocks of 128,
NVFP4 blocks of 16, the W4A8 formats), each block's amax is shrunk by the
ratios of `shrink_grid` (default 1.0, 0.95, ..., 0.5) and the ratio with
the lowest output error over the calibration tokens is kept:

    err(o, b, r) = sum_t ((Q_r(W) - W)[o, block b] . x_t[block b]) ** 2

i.e. the error block b of output channel o adds to that channel's output
(cross terms between blocks are left out, as in AWQ). Since the error is a
quadratic form, the forward loop only accumulates each layer's block
Gram matrices ``H_b = sum_t x_t[b] x_t[b]^T`` (float64, block x block per
block, reduced with sum across ranks); the candidates are evaluated after
the pass, without storing activations. The input is taken as the layer's
GEMM sees it (after its pre_quant_scale, so this also runs on AWQ-smoothed
weights) and in float (quantizers off).

The result is a static per-block weight amax (`weight_quantizer.amax` of
the block scale shape). Two-level formats (NVFP4) keep the global amax of
the search in `weight_quantizer.global_amax`: the layer's weight max, or
with `groups` (fused q/k/v, gate/up) the group's. Activation quantizers,
and static quantizers of layers not searched, are max-calibrated in the
same forward pass; the weight amaxes set here are not re-calibrated.

Options: `shrink_grid` (the ratios, each in (0, 1]), `max_tokens_per_batch`
(None: every token; n: n tokens per batch, evenly strided, to save time).
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...utils.dist import all_reduce_optional
from ..formats import Blocking, block_amax, fake_quant
from ..tensor_quantizer import TensorQuantizer
from .common import capture_inputs, effective_input, require_loop, subsample_tokens, weight_layers, weight_matrix
from .max import run_calibration_passes
from .registry import ForwardLoop, calibrate_weight, register_algorithm

__all__ = ["awq_clip", "clip_and_calibrate", "check_clip_format", "DEFAULT_SHRINK_GRID"]

DEFAULT_SHRINK_GRID = tuple(round(1.0 - 0.05 * k, 2) for k in range(11))
"""Block amax ratios tried by default: 1.0, 0.95, ..., 0.5."""


def check_clip_format(name: str, q: TensorQuantizer) -> int:
    """The block size along the input dimension of a layer's weight format; ValueError when it has none."""
    fmt = q.fmt
    blocks = fmt.blocks
    why = None
    if not q.uses_static_amax:
        why = "its scales are derived from the data at run time (MX or dynamic), so there is no amax to clip"
    elif not fmt.block_sizes or set(blocks) not in ({-1}, {1}) or blocks.get(-1, blocks.get(1)) is None:
        why = "the search needs one scale per block of the input dimension (e.g. block_sizes {-1: 128})"
    if why:
        raise ValueError(f"awq_clip: layer {name!r}: weight format {fmt.name} {fmt.granularity} is not supported: "
                         f"{why}. Use awq_lite, mse or max for this layer, or disable it")
    return int(blocks.get(-1, blocks.get(1)))


def _check_grid(shrink_grid: Optional[Sequence[float]]) -> List[float]:
    grid = list(DEFAULT_SHRINK_GRID if shrink_grid is None else shrink_grid)
    if not grid or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0
                       for r in grid):
        raise ValueError(f"awq_clip: shrink_grid must be a non-empty list of ratios in (0, 1], got {shrink_grid!r}")
    return [float(r) for r in grid]


class _BlockGram:
    """Accumulates sum_t x_t[b] x_t[b]^T per input block b of one layer."""

    def __init__(self, in_features: int, block: int):
        self.in_features, self.block = in_features, block
        self.nblocks = -(-in_features // block)
        self.gram: Optional[torch.Tensor] = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[1] != self.in_features:
            raise ValueError(f"awq_clip: input of size {x.shape[1]} for a weight of {self.in_features} input features")
        pad = self.nblocks * self.block - self.in_features
        xb = F.pad(x, (0, pad)).reshape(x.shape[0], self.nblocks, self.block)
        g = torch.einsum("tbk,tbl->bkl", xb, xb).double()
        self.gram = g if self.gram is None else self.gram + g
        self.tokens += x.shape[0]


@torch.no_grad()
def _best_block_amax(module: nn.Module, gram: torch.Tensor, grid: List[float], global_amax: Optional[torch.Tensor]):
    """Per-block amax (block scale shape) minimising sum_b delta_b^T H_b delta_b, and the ratio chosen per block."""
    q: TensorQuantizer = module.weight_quantizer
    fmt = q.fmt
    w = weight_matrix(module).float()
    base = block_amax(w, fmt)
    blocking = Blocking(w.shape, fmt.blocks)
    h = gram.to(w.device)
    errors = []
    for r in grid:
        wq = fake_quant(w, fmt, base * r, global_amax)
        delta = blocking.to_blocks(wq.float() - w).double().reshape(w.shape[0], -1, h.shape[-1])
        errors.append((torch.einsum("obk,bkl->obl", delta, h) * delta).sum(dim=-1))
    err = torch.stack(errors)  # [ratios, out, blocks]
    best = err.argmin(dim=0)  # ties keep the larger ratio (the grid starts at 1.0)
    ratios = torch.tensor(grid, dtype=torch.float32, device=w.device)[best]
    return (base * ratios.reshape(base.shape)), ratios


@torch.no_grad()
def clip_and_calibrate(model: nn.Module, forward_loop: ForwardLoop, shrink_grid: Optional[Sequence[float]] = None,
                       max_tokens_per_batch: Optional[int] = None,
                       groups: Optional[List[List[str]]] = None) -> Dict[str, float]:
    """Run the clipping search (see the module doc) and calibrate the other quantizers; returns the mean ratio per layer."""
    grid = _check_grid(shrink_grid)
    if max_tokens_per_batch is not None and (isinstance(max_tokens_per_batch, bool)
                                             or not isinstance(max_tokens_per_batch, int) or max_tokens_per_batch < 1):
        raise ValueError(f"awq_clip: max_tokens_per_batch must be a positive int or null, got {max_tokens_per_batch!r}")
    layers = dict(weight_layers(model))
    grams = {n: _BlockGram(weight_matrix(m).shape[1], check_clip_format(n, m.weight_quantizer)) for n, m in layers.items()}
    searched = {id(m.weight_quantizer) for m in layers.values()}
    others = [q for q in model.modules() if isinstance(q, TensorQuantizer) and q.needs_calibration and id(q) not in searched]
    first = {"pass": True}

    def collect(name: str, x: torch.Tensor) -> None:
        if first["pass"]:
            grams[name].add(effective_input(layers[name], subsample_tokens(x, max_tokens_per_batch)))

    def loop_once(m: nn.Module) -> None:
        try:
            forward_loop(m)
        finally:
            first["pass"] = False

    for q in others:
        q.calibrator.reset()
    frozen = [m.weight_quantizer for m in layers.values()]
    for q in frozen:
        q.disable_quant()  # the search and the activations see the float weights, as max calibration does
    try:
        with capture_inputs(layers, collect):
            run_calibration_passes(model, loop_once, others)
    finally:
        for q in frozen:
            q.enable_quant()
    for q in others:
        q.load_calib_amax()

    shared = _group_global_amax(layers, groups)
    chosen: Dict[str, float] = {}
    unseen = []
    for name, m in layers.items():  # every rank reduces every layer, in the same order
        gram = all_reduce_optional(grams[name].gram, "sum")
        if gram is None:
            unseen.append(name)
            calibrate_weight(m)
            continue
        q = m.weight_quantizer
        glob = shared.get(name)
        if q.fmt.amax_is_global and glob is None:
            glob = weight_matrix(m).float().abs().amax()
        amax, ratios = _best_block_amax(m, gram, grid, glob)
        q.amax = amax
        if q.fmt.amax_is_global:
            q.global_amax = glob
        chosen[name] = float(ratios.mean())
    if unseen:
        warnings.warn(f"awq_clip: {len(unseen)} layer(s) saw no calibration data and keep max weight scales: "
                      f"{', '.join(unseen[:5])}")
    return chosen


def _group_global_amax(layers: Dict[str, nn.Module], groups: Optional[List[List[str]]]) -> Dict[str, torch.Tensor]:
    """Two-level formats: one global amax per fused group (the largest weight max of its members)."""
    out: Dict[str, torch.Tensor] = {}
    for g in groups or []:
        members = [n for n in g if n in layers and layers[n].weight_quantizer.fmt.amax_is_global]
        if len(members) < 2:
            continue
        shared = torch.stack([weight_matrix(layers[n]).float().abs().amax().cpu() for n in members]).amax()
        for n in members:
            out[n] = shared.to(layers[n].weight.device)
    return out


@register_algorithm("awq_clip")
@torch.no_grad()
def awq_clip(model: nn.Module, forward_loop: Optional[ForwardLoop] = None,
             shrink_grid: Optional[Sequence[float]] = None, max_tokens_per_batch: Optional[int] = None) -> Dict[str, float]:
    """AWQ weight clipping (see the module doc); returns the mean chosen shrink ratio per layer."""
    loop = require_loop("awq_clip", forward_loop)
    return clip_and_calibrate(model, loop, shrink_grid, max_tokens_per_batch)
