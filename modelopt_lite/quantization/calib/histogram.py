"""Histogram calibration: percentile, entropy (KL divergence) and MSE amax selection.

The calibrator builds a histogram of |x| over every batch and picks the amax
from it. Registered names (``calibrator:`` in a config):

============================ ==============================================
``histogram``, ``percentile`` the 99.99th percentile of |x|
``percentile_99.9``           the 99.9th percentile
``percentile_99.999``         the 99.999th percentile
``entropy``                   the threshold whose quantized distribution is
                              closest (KL divergence) to the data's
``histogram_mse``             the threshold with the lowest squared
                              fake-quantization error over the histogram
============================ ==============================================

Other settings: subclass `HistogramCalibrator` (class attributes `method`,
`percentile`, `num_bins`, `start_bin`) and register the subclass in
CALIBRATORS.

Only per-tensor quantizers can use a histogram; per-channel and block
formats take the MSE search (``calibrator: mse``) instead.

Bins are exact and independent of the data order and of the rank: the range
is [0, R) with R a power of two (the smallest above the running abs-max) and
`num_bins` bins of width R / num_bins. When a batch exceeds R, R doubles as
often as needed and groups of 2^d adjacent bins merge, which gives exactly
the histogram the larger range would have counted (the bin index is computed
with exact float64 power-of-two arithmetic). `sync()` reduces R with a max
and the counts (int64) with a sum, so data-parallel calibration gives every
rank the histogram one process would count on all the data.

Exact zeros are counted apart. Percentiles count them; the entropy and MSE
searches leave them out, since every format represents zero exactly (with
them, the spike of a post-ReLU histogram's first bin dominates the KL
divergence and drags the amax down).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...utils.dist import all_reduce_optional
from ..formats import QuantFormat, fake_quant
from .base import CALIBRATORS, Calibrator

__all__ = ["HistogramCalibrator", "PercentileCalibrator", "EntropyCalibrator", "HistogramMseCalibrator"]

_ZERO_EXP = -160
"""Range exponent of a histogram that has seen only zeros (below any float32 magnitude)."""
_CHUNK = 1 << 22
_MATRIX = 1 << 21
_METHODS = ("percentile", "entropy", "mse")


def _range_exponent(amax: float) -> int:
    """The e with 2^(e-1) <= amax < 2^e (the smallest power-of-two range strictly above amax)."""
    if amax <= 0:
        return _ZERO_EXP
    _, e = torch.frexp(torch.tensor(amax, dtype=torch.float64))
    return int(e)


def coarsen(counts: torch.Tensor, shift: int) -> torch.Tensor:
    """Merge groups of 2^shift adjacent bins: the histogram of a range 2^shift times larger."""
    if shift <= 0:
        return counts
    index = torch.arange(counts.numel(), device=counts.device) >> min(shift, 62)
    return torch.zeros_like(counts).index_add_(0, index, counts)


@CALIBRATORS.register("histogram")
class HistogramCalibrator(Calibrator):
    """Histogram of |x| with power-of-two range; amax by percentile, entropy or MSE.

    `method` is "percentile" (the amax is the upper edge of the bin where
    the cumulative count reaches `percentile` percent), "entropy" (the
    TensorRT KL-divergence search, with quantization levels taken from the
    quantizer's own element format) or "mse" (the candidate amax with the
    lowest sum over bins of count * (centre - fake_quant(centre))^2). The
    entropy and MSE candidates are i bin widths, i up to the bin that holds
    the largest |x|, so the amax never exceeds the data's max by more than
    one bin; ties go to the larger amax.
    """

    method = "percentile"
    percentile = 99.99
    num_bins = 2048
    start_bin = 128
    """The entropy search tries thresholds from this many bins up (TensorRT's choice)."""

    def __init__(self, quantizer, method: Optional[str] = None, percentile: Optional[float] = None,
                 num_bins: Optional[int] = None):
        super().__init__(quantizer)
        self.method = self.method if method is None else method
        self.percentile = float(self.percentile if percentile is None else percentile)
        self.num_bins = int(self.num_bins if num_bins is None else num_bins)
        if self.method not in _METHODS:
            raise ValueError(f"histogram method must be one of {_METHODS}, got {self.method!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if not 16 <= self.num_bins <= 1 << 20:
            raise ValueError(f"num_bins must be between 16 and 2^20, got {self.num_bins}")
        self._exp: Optional[int] = None
        self._counts: Optional[torch.Tensor] = None  # int64 [num_bins]: nonzero |x|
        self._zeros: Optional[torch.Tensor] = None  # int64 scalar: exact zeros

    # ----------------------------------------------------------- collection
    def _check_format(self) -> QuantFormat:
        fmt = self.quantizer.fmt
        if fmt.axis is not None or fmt.block_sizes:
            raise ValueError(
                f"quantizer {self.quantizer.name!r}: the histogram calibrators take per-tensor formats only, "
                f"not {fmt.name} {fmt.granularity}; use `calibrator: mse` (MSE search per channel/block) "
                "or `calibrator: max`"
            )
        return fmt

    def collect(self, x: torch.Tensor) -> None:
        self._check_format()
        x = x.detach()
        amax = x.abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
        self.check_finite(amax)
        exp = _range_exponent(float(amax))
        if self._counts is None:
            self._exp = exp
            self._counts = torch.zeros(self.num_bins, dtype=torch.int64, device=x.device)
            self._zeros = torch.zeros((), dtype=torch.int64, device=x.device)
        elif exp > self._exp:
            self._counts = coarsen(self._counts, exp - self._exp)
            self._exp = exp
        flat = x.reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            part = flat[start : start + _CHUNK].double().abs()
            zeros = (part == 0).sum()
            self._zeros += zeros
            self._counts += self._count(part, self._exp)
            self._counts[0] -= zeros
        self.num_batches += 1

    def _count(self, magnitudes: torch.Tensor, exp: int) -> torch.Tensor:
        """Counts of float64 |x| in the bins of [0, 2^exp): index floor(|x| * num_bins / 2^exp), exact."""
        scale = float(self.num_bins) * 2.0**-exp if exp > _ZERO_EXP else 0.0
        index = torch.floor(magnitudes * scale).long().clamp_(max=self.num_bins - 1)
        return torch.bincount(index, minlength=self.num_bins)

    def sync(self) -> None:
        """All ranks: the largest range, every local histogram coarsened to it, counts summed."""
        local = None if self._counts is None else torch.tensor([self._exp - _ZERO_EXP + 1], dtype=torch.int64)
        agreed = all_reduce_optional(local, "max")
        if agreed is None:
            return
        exp = int(agreed.item()) + _ZERO_EXP - 1
        counts = None
        if self._counts is not None:
            counts = torch.cat([coarsen(self._counts, exp - self._exp), self._zeros.reshape(1)])
        counts = all_reduce_optional(counts, "sum")
        self._counts, self._zeros, self._exp = counts[:-1], counts[-1], exp

    def reset(self) -> None:
        super().reset()
        self._exp = None
        self._counts = None
        self._zeros = None

    # ----------------------------------------------------------- results
    def histogram(self):
        """(counts, bin_width): the int64 counts of |x| (exact zeros in bin 0) and the bin width; None before data."""
        if self._counts is None:
            return None
        counts = self._counts.clone()
        counts[0] += self._zeros
        return counts, 2.0**self._exp / self.num_bins

    def compute_amax(self) -> Optional[torch.Tensor]:
        if self._counts is None:
            return None
        device = self._counts.device
        if self._exp == _ZERO_EXP or int(self._counts.sum()) == 0:
            return torch.zeros((), device=device)
        counts = self._counts.double()
        width = 2.0**self._exp / self.num_bins
        if self.method == "percentile":
            counts[0] += self._zeros.double()
            cdf = torch.cumsum(counts, 0)
            target = torch.tensor([self.percentile / 100.0 * float(cdf[-1])], dtype=torch.float64, device=device)
            index = min(int(torch.searchsorted(cdf, target)), self.num_bins - 1)
            return torch.tensor((index + 1) * width, dtype=torch.float32, device=device)
        fmt = self._check_format()
        last = int(torch.nonzero(self._counts).max()) + 1  # candidates end at the edge above the largest |x|
        first = min(self.start_bin, last) if self.method == "entropy" else 1
        score = _entropy_scores if self.method == "entropy" else _mse_scores
        scores = torch.cat([score(counts, width, fmt, bins) for bins in _chunks(first, last)])
        best = _last_argmin(scores)
        return torch.tensor((best + first) * width, dtype=torch.float32, device=device)


def _last_argmin(scores: torch.Tensor) -> int:
    """Index of the minimum; the last one on ties (the larger amax)."""
    return scores.numel() - 1 - int(torch.argmin(torch.flip(scores, (0,))))


def _chunks(first: int, last: int):
    """Candidate thresholds first..last (in bins) in chunks whose rows x columns stay under _MATRIX."""
    rows = max(1, _MATRIX // max(last, 1))
    for start in range(first, last + 1, rows):
        yield torch.arange(start, min(start + rows, last + 1))


def _quantized_centres(bins: torch.Tensor, cols: int, width: float, fmt: QuantFormat) -> torch.Tensor:
    """Row r: the centres of bins 0..cols-1 fake-quantized with amax bins[r] * width in the quantizer's format."""
    centres = (torch.arange(cols, dtype=torch.float64, device=bins.device) + 0.5) * width
    amax = (bins.double() * width).float().unsqueeze(1)
    grid = centres.float().expand(bins.numel(), cols).contiguous()
    return fake_quant(grid, QuantFormat(fmt.element, axis=(0,)), amax)


def _mse_scores(counts: torch.Tensor, width: float, fmt: QuantFormat, bins: torch.Tensor) -> torch.Tensor:
    """Sum over bins of count * (centre - fake_quant(centre))^2 for the candidate thresholds `bins`."""
    device = counts.device
    bins = bins.to(device)
    cols = int(torch.nonzero(counts).max()) + 1
    centres = ((torch.arange(cols, dtype=torch.float64, device=device) + 0.5) * width).float()
    quantized = _quantized_centres(bins, cols, width, fmt)
    return ((centres - quantized).double() ** 2 * counts[:cols]).sum(1)


def _entropy_scores(counts: torch.Tensor, width: float, fmt: QuantFormat, bins: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) for the candidate thresholds `bins` (TensorRT's entropy calibration, any element format).

    For a threshold of i bins, P is bins 0..i-1 with every count above
    them folded into bin i-1; Q is the same bins without those outliers,
    merged over the bins whose centres quantize to the same level and
    spread back evenly over the bins where P is not zero. Computed per
    level group: KL = sum_j p_j log p_j - sum_groups P_g log q_g.
    """
    device = counts.device
    bins = bins.to(device)
    k, cols = bins.numel(), int(bins.max())
    total = counts.sum()
    tail = torch.flip(torch.cumsum(torch.flip(counts, (0,)), 0), (0,))  # tail[j]: counts at j and above
    tail = torch.cat([tail, tail.new_zeros(1)])
    h = counts[:cols]
    hlogh = torch.where(h > 0, h * torch.log(h.clamp(min=1.0)), torch.zeros_like(h))
    prefix = torch.cat([h.new_zeros(1), torch.cumsum(hlogh, 0)])  # prefix[j]: sum of h log h below j

    quantized = _quantized_centres(bins, cols, width, fmt)
    changes = (quantized[:, 1:] != quantized[:, :-1]).long()
    group = torch.cat([changes.new_zeros(k, 1), torch.cumsum(changes, 1)], 1)
    ngroups = int(group[:, -1].max()) + 1
    inside = torch.arange(cols, device=device).unsqueeze(0) < bins.unsqueeze(1)
    gid = torch.where(inside, group, torch.full_like(group, ngroups))  # bins above the threshold: a spare column
    kept = torch.zeros(k, ngroups + 1, dtype=torch.float64, device=device).scatter_add_(1, gid, h.expand(k, cols))
    support = torch.zeros_like(kept).scatter_add_(1, gid, (h > 0).double().expand(k, cols))
    last_group = group.gather(1, (bins - 1).unsqueeze(1))
    support.scatter_add_(1, last_group, (h[bins - 1] == 0).double().unsqueeze(1))  # bin i-1 holds the outliers
    folded = kept.scatter_add(1, last_group, tail[bins].unsqueeze(1))
    kept, support, folded = kept[:, :ngroups], support[:, :ngroups], folded[:, :ngroups]

    inside_total = (total - tail[bins]).unsqueeze(1)
    tiny = torch.finfo(torch.float64).tiny
    log_q = torch.log(kept.clamp(min=tiny)) - torch.log(support.clamp(min=1.0)) - torch.log(inside_total.clamp(min=1.0))
    cross = torch.where(folded > 0, folded * log_q, torch.zeros_like(folded)).sum(1) / total
    end = tail[bins - 1]
    self_term = (prefix[bins - 1] + end * torch.log(end.clamp(min=1.0))) / total - torch.log(total)
    scores = self_term - cross
    impossible = ((folded > 0) & (kept == 0)).any(1)  # Q is zero where P is not
    return torch.where(impossible, torch.full_like(scores, float("inf")), scores)


@CALIBRATORS.register("percentile")
class PercentileCalibrator(HistogramCalibrator):
    """The 99.99th percentile of |x|."""

    method = "percentile"
    percentile = 99.99


@CALIBRATORS.register("percentile_99.9")
class Percentile999Calibrator(HistogramCalibrator):
    """The 99.9th percentile of |x|."""

    method = "percentile"
    percentile = 99.9


@CALIBRATORS.register("percentile_99.999")
class Percentile99999Calibrator(HistogramCalibrator):
    """The 99.999th percentile of |x|."""

    method = "percentile"
    percentile = 99.999


@CALIBRATORS.register("entropy")
class EntropyCalibrator(HistogramCalibrator):
    """The threshold minimising the KL divergence between the data and its quantized histogram."""

    method = "entropy"


@CALIBRATORS.register("histogram_mse")
class HistogramMseCalibrator(HistogramCalibrator):
    """The threshold minimising the fake-quantization squared error over the histogram."""

    method = "mse"
