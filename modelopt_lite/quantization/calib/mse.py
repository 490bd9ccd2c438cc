"""MSE-search calibration: the amax that minimises the fake-quantization squared error.

``calibrator: mse``. The candidates are the max amax times each of
`multipliers` (by default 0.25, 0.275, ..., 1.0: 31 values, 1.0 included, so
the result is never worse than max calibration on the data searched). The
search is made at the quantizer's own granularity: one choice per tensor,
per channel or per block, each keeping the candidate with the lowest summed
squared error (ties go to the larger amax).

Activations take two passes over the data:

1. the running max per tensor/channel/block (a MaxCalibrator inside);
   `next_pass()` reduces it across ranks and asks for the data again;
2. for every candidate, the squared error of fake quantization with that
   amax, accumulated in float64 per tensor/channel/block; `sync()` sums the
   errors across ranks and `compute_amax()` takes the argmin.

Weight quantizers (named ``*weight_quantizer``) see the whole weight on
every call, so they need no second pass: the calibrator keeps the last
weight it saw (a reference, no copy) and searches on it in `sync()`, which
also makes the one-call weight calibration of `calibrate_weight` (collect
once, then `load_calib_amax`) search.

Two-level formats (NVFP4): a weight is searched per 16-element block, with
the global amax fixed at the weight's max; the result is the static
per-block amax tensor (one per block), and the global is set on the
quantizer as `global_amax`. Activations (whose blocks are dynamic) search
the global amax. MX formats derive every scale from the data and have no
amax to search: they are refused.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

from ...utils.dist import all_reduce_optional
from ..formats import E4M3, E8M0, Blocking, QuantFormat, fake_quant
from ..formats.blocks import normalize_axes
from .base import CALIBRATORS, Calibrator
from .max import MaxCalibrator

__all__ = ["MseCalibrator", "DEFAULT_MULTIPLIERS"]

DEFAULT_MULTIPLIERS = tuple(k / 40 for k in range(10, 41))
"""0.25 to 1.0 in steps of 0.025."""


def is_weight_quantizer(name: str) -> bool:
    """True for quantizers named like ``<layer>.weight_quantizer`` (they see the whole weight each call)."""
    return name.rsplit(".", 1)[-1].endswith("weight_quantizer")


@CALIBRATORS.register("mse")
class MseCalibrator(Calibrator):
    """Per tensor/channel/block search of amax = multiplier * max for the lowest fake-quant squared error."""

    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS

    def __init__(self, quantizer, multipliers: Optional[Sequence[float]] = None):
        super().__init__(quantizer)
        values = tuple(float(m) for m in (self.multipliers if multipliers is None else multipliers))
        if not values or any(not 0 < m <= 4 for m in values) or list(values) != sorted(set(values)):
            raise ValueError(f"MSE multipliers must be increasing, distinct and in (0, 4], got {values}")
        self.multipliers = values
        self._max = MaxCalibrator(quantizer)
        self._searching = False  # activations: in the second pass
        self._kept: Optional[torch.Tensor] = None  # weights: the last tensor seen
        self._block_base: Optional[torch.Tensor] = None  # two-level weights: per-block max
        self._errors: Optional[torch.Tensor] = None  # float64, [candidates, *amax shape]

    # ----------------------------------------------------------- helpers
    @property
    def _is_weight(self) -> bool:
        return is_weight_quantizer(self.quantizer.name)

    def _format(self) -> QuantFormat:
        fmt = self.quantizer.fmt
        if fmt.scale is E8M0:
            raise ValueError(
                f"quantizer {self.quantizer.name!r}: {fmt.name} derives its power-of-two block scales from the "
                "data and has no amax to search; use `calibrator: max` (MX needs no calibration)"
            )
        return fmt

    def _per_block(self, x: torch.Tensor) -> bool:
        """Two-level weight with more than one block: search each block's amax."""
        fmt = self.quantizer.fmt
        if fmt.scale is not E4M3 or not self._is_weight:
            return False
        n = 1
        for s in Blocking(x.shape, fmt.blocks).scale_shape:
            n *= s
        return n > 1

    def _candidates(self, device) -> torch.Tensor:
        return torch.tensor(self.multipliers, dtype=torch.float64, device=device)

    # ----------------------------------------------------------- collection
    def collect(self, x: torch.Tensor) -> None:
        self._format()
        x = x.detach()
        if not self._searching:
            self._max.collect(x)
            if self._is_weight:
                self._kept = x
        else:
            base = self._max.compute_amax()
            errors = self._search(x, base, None)
            self._errors = errors if self._errors is None else self._errors + errors
        self.num_batches += 1

    def next_pass(self) -> bool:
        """Activations: reduce the max across ranks and ask for the data again (once)."""
        if self._is_weight or self._searching:
            return False
        self._max.sync()
        if self._max.compute_amax() is None:
            return False
        self._searching = True
        return True

    def _search(self, x: torch.Tensor, base: torch.Tensor, glob: Optional[torch.Tensor]) -> torch.Tensor:
        """Squared error of every candidate, float64 of shape [candidates, *base.shape].

        `base` is the max amax (single-level and two-level global search) or
        the per-block max (two-level per-block search, with `glob` the fixed
        global amax).
        """
        fmt = self._format()
        xf = x.float()
        out = []
        for m in self._candidates(base.device):
            amax = (base.double() * m).float()
            if glob is not None:
                fq = fake_quant(x, fmt, amax, global_amax=glob)
            else:
                fq = fake_quant(x, fmt, amax)
            sq = (xf - fq.float()).double() ** 2
            out.append(self._reduce(sq, fmt, glob is not None).reshape(base.shape))
        return torch.stack(out)

    @staticmethod
    def _reduce(sq: torch.Tensor, fmt: QuantFormat, per_block: bool) -> torch.Tensor:
        """Sum the squared errors to the granularity of the amax being searched."""
        if fmt.block_sizes and (fmt.scale is None or per_block):
            blocking = Blocking(sq.shape, fmt.blocks)
            return blocking.to_blocks(sq).sum(dim=blocking.inner_dims)
        if fmt.block_sizes or fmt.axis is None:
            return sq.sum()
        keep = normalize_axes(fmt.axis, sq.dim())
        dims = tuple(d for d in range(sq.dim()) if d not in keep)
        return sq.sum(dim=dims, keepdim=True) if dims else sq

    # ----------------------------------------------------------- reduction and result
    def sync(self) -> None:
        """Max, then (weights) the search on the kept weight, then the errors: each reduced across ranks.

        The same three reductions on every rank, whether or not it saw data.
        """
        self._max.sync()
        kept, self._kept = self._kept, None
        glob = self._max.compute_amax()
        per_block = kept is not None and glob is not None and self._per_block(kept)
        if per_block:
            blocking = Blocking(kept.shape, self.quantizer.fmt.blocks)
            self._block_base = blocking.block_amax(blocking.to_blocks(kept.float())).reshape(blocking.scale_shape)
        self._block_base = all_reduce_optional(self._block_base, "max")
        if kept is not None and glob is not None and self._errors is None:
            if per_block:
                self._errors = self._search(kept, self._block_base, glob.reshape(()))
            else:
                self._errors = self._search(kept, glob, None)
        self._errors = all_reduce_optional(self._errors, "sum")

    def compute_amax(self) -> Optional[torch.Tensor]:
        """The best candidate per tensor/channel/block (None when nothing was seen).

        A weight calibrator that was not synced yet runs `sync()` (and so its
        search) first. An activation calibrator asked before its second pass
        (no forward loop ran twice) returns the max amax, with a warning.
        """
        base = self._max.compute_amax()
        if base is None:
            return None
        if self._errors is None and self._kept is not None:
            self.sync()
        if self._errors is None:
            warnings.warn(f"quantizer {self.quantizer.name!r}: the MSE search needs a second pass over the data "
                          "(Calibrator.next_pass); using the max amax")
            return base
        k = self._errors.shape[0]
        best = k - 1 - torch.argmin(torch.flip(self._errors, (0,)), dim=0)
        chosen = self._candidates(best.device)[best]
        if self._block_base is not None:
            self.quantizer.global_amax = base.reshape(())
            return (self._block_base.double() * chosen).float()
        return (base.double() * chosen).float()

    def reset(self) -> None:
        super().reset()
        self._max.reset()
        self._searching = False
        self._kept = None
        self._block_base = None
        self._errors = None
