"""`gptq`: Hessian-aware rounding of weights (GPTQ), then calibration of the other quantizers.

For every weight layer, with X its inputs on the calibration data, GPTQ
minimises ``||W_q X - W X||^2`` column by column: H = 2/n * sum x x^T,
damped (``H += damp * mean(diag H) * I``; an input that is always zero gets
``H_ii = 1`` and a zero weight column), U the upper Cholesky factor of H^-1;
column j is rounded to the grid, and its error, divided by U_jj, is spread
over the columns not yet rounded through row j of U (inside a lazy batch of
`block_size` columns, then onto the rest in one matrix product).

The grid is fixed before any column moves: the weight quantizer gets the
amax max calibration would give the original weight (per block for INT4,
per tensor / channel for FP8 and INT8; for NVFP4 a static amax per block
under a global amax that layers reading the same input share), and the
rounded weight is written back, so ``quantized_weight()`` and every export
reproduce the GPTQ result exactly. Formats whose scales come from the data
(MX) and weights tied to another module keep round-to-nearest (a warning).

Schedule. One batch of the forward loop first records the order in which
weight layers are called and which consecutive calls read the same tensor
(q/k/v, gate/up): those form a group with one Hessian, one factorisation
and one pass over their stacked rows. Rank 0's schedule is used on every
rank. Then:

* ``sequential: true`` (default): one run of the forward loop per group, in
  call order. The layers before the group already compute with their GPTQ
  weights and calibrated input quantizers, so each group is solved on the
  inputs the deployed model gives it (the paper's sequential variant), and
  the same run calibrates the group's own input quantizers. That is four
  runs per decoder layer: cheap when the model is one decoder layer
  (layer-wise calibration, which replays that layer's cached inputs, and
  then gives the same weights as a whole-model run), but a whole model pays
  four full passes per decoder layer. Layers the first batch did not reach
  are handled together in one last run.
* ``sequential: false``: one run collects every group's Hessian, and
  calibrates every input quantizer, on the float model; memory holds all
  Hessians at once (about 4 GB in float32 for a 1B-parameter Llama).

For large models use ``quantize(..., layerwise=True)``: a random 1.1B Llama
(512 calibration tokens, 2 shared CPU cores) took 14 minutes layer-wise,
60% of it in the solves (benchmarks/gptq_cost.py).

Hessians are float32 sums and token counts, summed across data-parallel
ranks. The other quantizers (outputs, KV cache, attention, weights GPTQ
skips) are calibrated last, on the model with its GPTQ weights.

Options: `damp` (0.01: the fraction of the mean Hessian diagonal added to
it), `block_size` (128 columns per lazy batch), `act_order` (False: when
True, columns are processed in descending order of their Hessian diagonal;
the scales stay those of the original layout), `sequential` (True).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ...utils.dist import all_reduce, all_reduce_optional, broadcast_object
from ..formats import E4M3, TINY_AMAX, Blocking, QuantFormat, block_amax, compute_amax, dequant_scale, quantize
from ..tensor_quantizer import TensorQuantizer
from .common import (capture_inputs, effective_input, quantizers_off, require_loop, run_loop, set_weight_matrix,
                     shared_weight_layers, weight_layers, weight_matrix)
from .max import run_calibration_passes
from .registry import ForwardLoop, register_algorithm

__all__ = ["gptq_calibrate", "gptq_quantize", "ColumnGrid", "inverse_hessian_factor"]

_MAX_DAMP_TRIES = 6  # a failed factorisation retries with 10x the damping, this many times
_TRI_BASE = 256  # triangular inverses below this size are solved directly
_SUB_BLOCK = 16  # columns whose errors are pushed on together inside a lazy batch


# --------------------------------------------------------------------------- the fixed grid
class ColumnGrid:
    """Fixed scales of an ``[out, in]`` weight, to round it one input column at a time.

    Scales are kept per group of columns that share them (one row of a
    table per input block, ``index[c]`` the row of column c), each row
    holding one scale per output row. Single-level formats keep
    ``mul = qmax / amax`` and ``deq = amax / qmax`` (rounding
    ``round(w * mul) * deq``); two-level formats keep the effective block
    scale ``eff = sb * s2`` (rounding ``round(w / eff) * eff``), and
    `zero_rows` marks rows whose global amax is tiny (all zero). This is the
    arithmetic of `formats.fake_quant`, element by element, so rounding
    every column gives ``fake_quant(w, fmt, amax, global_amax)`` bit for bit.
    """

    def __init__(self, element, index: List[int], mul=None, deq=None, eff=None, zero_rows=None):
        self.element, self.index = element, index
        self.mul, self.deq, self.eff, self.zero_rows = mul, deq, eff, zero_rows

    @classmethod
    def build(cls, w: torch.Tensor, fmt: QuantFormat, amax: torch.Tensor,
              global_amax: Optional[torch.Tensor] = None) -> "ColumnGrid":
        """The grid of `w` (``[out, in]``) under a fixed `amax` (see `formats.fake_quant`)."""
        if fmt.scale is not None and fmt.scale is not E4M3:
            raise ValueError(f"{fmt.name} derives its scales from the data; GPTQ needs fixed scales")
        shape = tuple(w.shape)
        elem = fmt.element
        if fmt.scale is None:
            a, index = _column_table(amax.float(), fmt, shape)
            mul = torch.where(a <= TINY_AMAX, torch.zeros_like(a), torch.full_like(a, elem.max_value) / a)
            return cls(elem, index, mul=mul, deq=dequant_scale(a, elem))
        qt = quantize(w.float(), fmt, amax, global_amax)  # the E4M3 block scales and s2 of this amax
        sb, index = _column_table(E4M3.decode(qt.block_scale), fmt, shape)
        glob = amax.float().amax() if global_amax is None else global_amax.float()
        zero = torch.full((shape[0],), bool(glob <= TINY_AMAX), device=w.device)
        return cls(elem, index, eff=sb * qt.global_scale.float(), zero_rows=zero)

    def column(self, w: torch.Tensor, c: int) -> torch.Tensor:
        """Input column `c` of the weight (values `w`, float32) rounded to the grid."""
        r = self.index[c]
        if self.mul is not None:
            return self.element.round(w * self.mul[r]) * self.deq[r]
        eff = self.eff[r]
        q = self.element.round(w / eff)
        return torch.where(self.zero_rows, w * 0, q) * eff

    def permute(self, perm: torch.Tensor) -> "ColumnGrid":
        """The grid of the weight with its columns in the order `perm` (the scales stay where they were)."""
        index = [self.index[int(c)] for c in perm]
        return ColumnGrid(self.element, index, self.mul, self.deq, self.eff, self.zero_rows)

    @staticmethod
    def stack(grids: List["ColumnGrid"]) -> "ColumnGrid":
        """The grid of the row-wise concatenation of weights (one element format, all single- or two-level)."""
        if len(grids) == 1:
            return grids[0]
        same = all(g.index == grids[0].index for g in grids)

        def cat(attr):
            if getattr(grids[0], attr) is None:
                return None
            if attr == "zero_rows":
                return torch.cat([g.zero_rows for g in grids])
            tables = [getattr(g, attr) if same else getattr(g, attr)[g.index] for g in grids]
            return torch.cat(tables, dim=1)

        index = grids[0].index if same else list(range(len(grids[0].index)))
        return ColumnGrid(grids[0].element, index, cat("mul"), cat("deq"), cat("eff"), cat("zero_rows"))


def _column_table(compact: torch.Tensor, fmt: QuantFormat, shape: Tuple[int, int]) -> Tuple[torch.Tensor, List[int]]:
    """A per-tensor / per-channel / per-block tensor as (table ``[groups, out]``, group of each input column)."""
    out_f, in_f = shape
    if fmt.block_sizes:
        b = Blocking(shape, fmt.blocks)
        per = compact.float().reshape(b.scale_shape)
        row_size, col_size = b.sizes.get(0, 1), b.sizes.get(1, 1)
        rows = per.repeat_interleave(row_size, dim=0)[:out_f] if row_size > 1 else per
        return rows.t().contiguous(), [c // col_size for c in range(in_f)]
    a = compact.float().expand(shape)
    if a.stride(1) == 0:  # one scale for every column (per tensor, per output channel)
        return a[:, :1].t().contiguous(), [0] * in_f
    return a.t().contiguous(), list(range(in_f))


# --------------------------------------------------------------------------- the GPTQ solve
def _lower_triangular_inverse(L: torch.Tensor) -> torch.Tensor:
    """L^-1 for lower-triangular L, by halves (matrix products instead of one wide triangular solve)."""
    n = L.shape[0]
    if n <= _TRI_BASE:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    h = n // 2
    a, d = _lower_triangular_inverse(L[:h, :h]), _lower_triangular_inverse(L[h:, h:])
    out = torch.zeros_like(L)
    out[:h, :h], out[h:, h:] = a, d
    out[h:, :h] = -(d @ (L[h:, :h] @ a))
    return out


def inverse_hessian_factor(h: torch.Tensor) -> Optional[torch.Tensor]:
    """Upper-triangular U with ``U^T U = H^-1`` (None when H is not positive definite).

    With J the order reversal, ``J H J = L L^T`` gives ``U = J L^-1 J``: one
    Cholesky factorisation and one triangular inverse, no explicit H^-1.
    """
    lr, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info) != 0:
        return None
    u = _lower_triangular_inverse(lr).flip(0, 1)
    return u if bool(torch.isfinite(u.diagonal()).all()) else None


def _prepare_hessian(h: torch.Tensor, damp: float, what: str) -> torch.Tensor:
    """U of a Hessian: dead inputs (H_ii = 0) get H_ii = 1, then damping (ten times more on failure)."""
    h = h.float().clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    mean = diag.mean()
    for attempt in range(_MAX_DAMP_TRIES):
        factor = damp * 10.0**attempt if damp > 0 else (0.0 if attempt == 0 else 1e-4 * 10.0 ** (attempt - 1))
        damped = h.clone()
        damped.diagonal().add_(float(factor * mean))
        u = inverse_hessian_factor(damped)
        if u is not None:
            return u
    raise RuntimeError(f"gptq: the Hessian of {what} is not positive definite even with damping "
                       f"{factor}; the calibration inputs may contain NaN or Inf")


def gptq_quantize(w: torch.Tensor, u: torch.Tensor, grid: ColumnGrid, block_size: int = 128,
                  perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GPTQ-round `w` (``[out, in]``) with the inverse-Hessian factor `u` on the fixed `grid`.

    `perm` (act order) is the column order; `u` must already be in that
    order, `w` and `grid` are in the original order. Returns the rounded
    weight (float32, original order). Inside a lazy batch of `block_size`
    columns the error is pushed on in sub-blocks of at most 16 columns (a
    matrix product per sub-block instead of one rank-1 update per column).
    """
    wt = w.float().t().contiguous()  # [in, out]: column j of W is row j
    if perm is not None:
        wt, grid = wt[perm], grid.permute(perm)
    cols = wt.shape[0]
    qt = torch.empty_like(wt)
    sub = min(_SUB_BLOCK, block_size)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        u1 = u[i1:i2, i1:i2]
        w1 = wt[i1:i2]  # a view: the batch is rounded in place
        err = torch.empty_like(w1)
        n = i2 - i1
        for j1 in range(0, n, sub):
            j2 = min(j1 + sub, n)
            for k in range(j1, j2):
                q = grid.column(w1[k], i1 + k)
                qt[i1 + k] = q
                e = (w1[k] - q) / u1[k, k]
                err[k] = e
                if k + 1 < j2:
                    w1[k + 1:j2].addmm_(u1[k, k + 1:j2].unsqueeze(1), e.unsqueeze(0), alpha=-1.0)
            if j2 < n:
                w1[j2:].addmm_(u1[j1:j2, j2:].t(), err[j1:j2], alpha=-1.0)
        if i2 < cols:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err, alpha=-1.0)
    if perm is not None:
        qt = qt[torch.argsort(perm)]
    return qt.t()


# --------------------------------------------------------------------------- Hessian collection
class _Hessian:
    """Sum of x^T x and token count of one group of layers that read the same input."""

    def __init__(self, members: List[str]):
        self.sum: Optional[torch.Tensor] = None
        self.rows = 0
        self.member_rows = {m: 0 for m in members}
        self._last: Optional[torch.Tensor] = None  # the last raw input added (members share it)
        self._took_last: set = set()

    def add(self, name: str, raw: torch.Tensor, x: torch.Tensor) -> None:
        n = x.numel() // x.shape[-1]
        self.member_rows[name] += n
        if self._last is not None and _same_input(raw, self._last) and name not in self._took_last:
            self._took_last.add(name)
            return
        xf = x.reshape(-1, x.shape[-1]).float()
        prod = xf.t() @ xf
        self.sum = prod if self.sum is None else self.sum.add_(prod)
        self.rows += n
        self._last, self._took_last = raw, {name}

    def release(self) -> None:
        self._last, self._took_last = None, set()


class _Stop(Exception):
    """Ends the schedule discovery after the model's first call."""


def _same_input(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype and a.device == b.device)


def _same_scale(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.input_quantizer.pre_quant_scale, b.input_quantizer.pre_quant_scale
    return (sa is None and sb is None) or (sa is not None and sb is not None and torch.equal(sa, sb))


def _discover(model: nn.Module, layers: Dict[str, nn.Module], loop: ForwardLoop) -> Tuple[List[List[str]], List[str]]:
    """(groups in first-call order during the model's first call, layers it did not reach); rank 0's on every rank.

    Consecutive calls on the same input tensor (and the same pre_quant_scale)
    form a group.
    """
    order: List[List[str]] = []
    seen: set = set()
    prev: List = [None, None]  # the previous call's (input, layer)

    def record(name: str, x: torch.Tensor) -> None:
        if name not in seen:
            seen.add(name)
            px, pname = prev
            if (px is not None and pname in order[-1] and _same_input(px, x)
                    and _same_scale(layers[pname], layers[name])):
                order[-1].append(name)
            else:
                order.append([name])
        prev[0], prev[1] = x, name

    calls = [0]

    def stop_second(module, args):
        calls[0] += 1
        if calls[0] > 1:
            raise _Stop

    handle = model.register_forward_pre_hook(stop_second)
    try:
        with contextlib.suppress(_Stop), capture_inputs(layers, record):  # one batch is enough
            run_loop(model, loop)
    finally:
        handle.remove()
        prev[0] = None
    return broadcast_object((order, [n for n in layers if n not in seen]), src=0)


def _collect(model: nn.Module, layers: Dict[str, nn.Module], loop: ForwardLoop, groups: List[List[str]],
             inputs: List[TensorQuantizer]) -> List[Tuple[Optional[torch.Tensor], int]]:
    """Run the loop once; per group, (H = 2/n sum x x^T reduced across ranks, or None when unseen; n).

    The same run calibrates `inputs` (the groups' input quantizers, with
    more runs if their calibrators ask); they end on, with their amax.
    """
    stats = [_Hessian(g) for g in groups]
    of = {name: s for g, s in zip(groups, stats) for name in g}
    hooked = {n: layers[n] for n in of}

    def add(name: str, raw: torch.Tensor) -> None:
        x = effective_input(layers[name], raw)
        w_in = weight_matrix(layers[name]).shape[1]
        if x.shape[-1] != w_in:
            raise ValueError(f"gptq: layer {name!r} received inputs with {x.shape[-1]} features; its weight has {w_in}")
        of[name].add(name, raw, x)

    for q in inputs:
        q.enable()
        q.calibrator.reset()
        q.disable_quant()
        q.enable_calib()
    handle = model.register_forward_hook(lambda *a: [s.release() for s in stats])  # inputs live for one call
    try:
        with capture_inputs(hooked, add):
            run_loop(model, loop)
    finally:
        handle.remove()
        for s in stats:
            s.release()
        for q in inputs:
            q.disable_calib()
            q.enable_quant()
    out = []
    for g, s in zip(groups, stats):  # the same order on every rank
        odd = float(any(r != s.rows for r in s.member_rows.values()))
        rows, odd = all_reduce(torch.tensor([float(s.rows), odd], dtype=torch.float64), "sum").tolist()
        if odd:
            raise RuntimeError(f"gptq: layers {g} read the same input tensor in the model's first call but "
                               "different ones later; their Hessians cannot be shared")
        total = all_reduce_optional(s.sum, "sum")
        n = int(rows)
        out.append((None if total is None or n == 0 else total * (2.0 / n), n))
    again = [q for q in inputs if q.calibrator.next_pass()]
    if again:
        run_calibration_passes(model, loop, again)
    for q in inputs:
        if not q.load_calib_amax():
            q.disable()  # never reached: left to `finalize_uncalibrated` once the quantizers are restored
    return out


# --------------------------------------------------------------------------- per group
def _fix_amax(members: List[nn.Module], originals: List[torch.Tensor]) -> None:
    """Give each weight quantizer the amax of its original weight (shared where one scale must be)."""
    for m, w in zip(members, originals):
        q: TensorQuantizer = m.weight_quantizer
        q.amax = block_amax(w, q.fmt) if q.fmt.amax_is_global else compute_amax(w, q.fmt)
        if q.fmt.amax_is_global:
            q.global_amax = None
    two_level = [m.weight_quantizer for m in members if m.weight_quantizer.fmt.amax_is_global]
    if len(two_level) > 1:
        shared = torch.stack([q.amax.amax() for q in two_level]).amax()
        for q in two_level:
            q.global_amax = shared
    per_tensor = [m.weight_quantizer for m in members
                  if not m.weight_quantizer.fmt.amax_is_global and m.weight_quantizer.amax.numel() == 1]
    if len(per_tensor) > 1 and len({q._spec for q in per_tensor}) == 1:
        shared = torch.stack([q.amax.reshape(()) for q in per_tensor]).amax()
        for q in per_tensor:
            q.amax = shared


def _quantize_group(names: List[str], layers: Dict[str, nn.Module], hessian: Optional[torch.Tensor],
                    damp: float, block_size: int, act_order: bool) -> None:
    members = [layers[n] for n in names]
    originals = [weight_matrix(m).detach().float().clone() for m in members]
    _fix_amax(members, originals)
    if hessian is None:
        return  # never reached by the data: round to nearest with the fixed amax
    dead = hessian.diagonal() == 0
    perm = torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order else None
    u = _prepare_hessian(hessian if perm is None else hessian[perm][:, perm], damp, ", ".join(names))
    grids = []
    for m, w in zip(members, originals):
        q = m.weight_quantizer
        glob = q.global_amax if q.fmt.amax_is_global else None
        w[:, dead] = 0.0
        grids.append(ColumnGrid.build(w, q.fmt, q.amax, glob))
    kinds: Dict[Tuple[bool, str], List[int]] = {}
    for i, g in enumerate(grids):
        kinds.setdefault((g.mul is None, g.element.name), []).append(i)
    for idx in kinds.values():  # members of one kind are solved together, their rows stacked
        stacked = torch.cat([originals[i] for i in idx], dim=0)
        result = gptq_quantize(stacked, u, ColumnGrid.stack([grids[i] for i in idx]), block_size, perm)
        start = 0
        for i in idx:
            rows = originals[i].shape[0]
            set_weight_matrix(members[i], result[start:start + rows])
            start += rows


# --------------------------------------------------------------------------- the algorithm
def _check_options(damp, block_size, act_order, sequential) -> None:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0.0 <= float(damp) <= 1.0:
        raise ValueError(f"algorithm gptq: damp must be a number in [0, 1] (a fraction of the mean Hessian diagonal, "
                         f"e.g. 0.01), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"algorithm gptq: block_size must be a positive integer (columns per lazy batch), "
                         f"got {block_size!r}")
    for name, v in (("act_order", act_order), ("sequential", sequential)):
        if not isinstance(v, bool):
            raise TypeError(f"algorithm gptq: {name} must be true or false, got {v!r}")


def _gptq_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The weight layers GPTQ can solve; warns about the ones that keep round-to-nearest."""
    candidates = {n: m for n, m in weight_layers(model)}
    tied = set(shared_weight_layers(model, list(candidates)))
    skipped = []
    out = {}
    for name, m in candidates.items():
        q = m.weight_quantizer
        fixed = q.uses_static_amax and q.fmt.scale in (None, E4M3)
        if fixed and q.fmt.amax_is_global:  # one NVFP4 block: its scale would come from the data
            fixed = Blocking(tuple(weight_matrix(m).shape), q.fmt.blocks).scale_shape != (1, 1)
        if name in tied or not fixed:
            skipped.append(f"{name} ({'tied weight' if name in tied else q.fmt.name + ' ' + q.fmt.granularity})")
        else:
            out[name] = m
    if skipped:
        warnings.warn(f"gptq: {len(skipped)} layer(s) keep round-to-nearest (tied weights, or scales that "
                      f"come from the data): {', '.join(skipped[:5])}")
    return out


@register_algorithm("gptq")
@torch.no_grad()
def gptq_calibrate(model: nn.Module, forward_loop: Optional[ForwardLoop] = None, damp: float = 0.01,
                   block_size: int = 128, act_order: bool = False, sequential: bool = True) -> None:
    """GPTQ every weight layer whose format has fixed scales, then max-calibrate the rest (see the module doc)."""
    loop = require_loop("gptq", forward_loop)
    _check_options(damp, block_size, act_order, sequential)
    layers = _gptq_layers(model)
    inputs = {n: m.input_quantizer for n, m in layers.items() if m.input_quantizer.needs_calibration}
    done = {id(m.weight_quantizer) for m in layers.values()} | {id(q) for q in inputs.values()}
    with quantizers_off(model):
        groups, unreached = _discover(model, layers, loop) if layers else ([], [])
        late = [[n] for n in unreached]
        if sequential:
            stages = [[g] for g in groups] + ([late] if late else [])
        else:
            stages = [groups + late] if groups or late else []
        for stage in stages:
            stage_inputs = [inputs[n] for g in stage for n in g if n in inputs]
            for names, (h, _) in zip(stage, _collect(model, layers, loop, stage, stage_inputs)):
                _quantize_group(names, layers, h, float(damp), block_size, act_order)
                for n in names:
                    layers[n].weight_quantizer.enable()
    rest = [q for q in model.modules() if isinstance(q, TensorQuantizer) and q.needs_calibration and id(q) not in done]
    if rest:
        for q in rest:
            q.calibrator.reset()
        run_calibration_passes(model, loop, rest)
        for q in rest:
            q.load_calib_amax()

