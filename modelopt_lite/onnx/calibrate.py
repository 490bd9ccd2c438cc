"""Activation statistics for ONNX models, collected with ONNX Runtime (numpy only, no PyTorch).

    stats = collect_statistics(model, ["x", "h"], batches, method="entropy", fmt="int8")
    stats["x"]  # the calibrated amax of tensor "x"

The tensors are made graph outputs of a copy of the model, which runs in
ONNX Runtime (CPU, all graph optimizations off so the tensors are the
model's own) over every batch. Methods:

* ``max``: the largest |x|.
* ``percentile``: the upper edge of the histogram bin where the cumulative
  count of |x| reaches `percentile` percent (99.99 by default).
* ``entropy``: the threshold whose quantized histogram is closest to the
  data's (KL divergence, TensorRT's INT8 search); the quantization levels
  are those of the target grid (INT8: 127 uniform steps; FP8 E4M3: the
  FLOAT8E4M3FN values up to 448).

Histograms have `num_bins` bins over [0, 2^e), 2^e the smallest power of two
above the running max; when a batch exceeds it, the range doubles and groups
of adjacent bins merge, so the result does not depend on the batch order.
Exact zeros are kept apart: percentiles count them, the entropy search
leaves them out (every grid holds zero exactly). With few samples the
entropy search first merges pairs of bins until there are 16 samples per
bin or 128 bins left; with 128 bins it returns the max (a KL search over a
sparse histogram clips far too much).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Sequence

import ml_dtypes
import numpy as np
import onnx

__all__ = ["METHODS", "MaxStatistic", "HistogramStatistic", "collect_statistics", "entropy_amax"]

METHODS = ("max", "percentile", "entropy")
_ZERO_EXP = -160
_MIN_PER_BIN = 16
"""The entropy search merges pairs of bins until it has this many nonzero samples per bin (or 128 bins)."""


def _range_exponent(amax: float) -> int:
    """The e with 2^(e-1) <= amax < 2^e."""
    if amax <= 0:
        return _ZERO_EXP
    return math.frexp(amax)[1]


class MaxStatistic:
    """The running max of |x|."""

    def __init__(self):
        self.amax = 0.0
        self.count = 0

    def collect(self, x: np.ndarray) -> None:
        if x.size:
            self.amax = max(self.amax, float(np.abs(x).max()))
        self.count += 1

    def compute_amax(self) -> float:
        return self.amax


class HistogramStatistic:
    """Histogram of |x| over a power-of-two range that grows by merging bins; amax by percentile or entropy."""

    def __init__(self, method: str = "percentile", percentile: float = 99.99, num_bins: int = 2048,
                 fmt: str = "int8", start_bin: int = 128):
        if method not in ("percentile", "entropy"):
            raise ValueError(f"histogram method must be 'percentile' or 'entropy', got {method!r}")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.method, self.percentile, self.num_bins = method, float(percentile), int(num_bins)
        self.fmt, self.start_bin = fmt, start_bin
        self.exp: Optional[int] = None
        self.counts = np.zeros(self.num_bins, dtype=np.int64)
        self.zeros = 0
        self.amax = 0.0
        self.count = 0

    def collect(self, x: np.ndarray) -> None:
        mag = np.abs(np.asarray(x, dtype=np.float64).reshape(-1))
        self.count += 1
        if not mag.size:
            return
        if not np.isfinite(mag).all():
            raise ValueError("calibration produced NaN or Inf activations; check the calibration data")
        amax = float(mag.max())
        self.amax = max(self.amax, amax)
        exp = _range_exponent(amax)
        if self.exp is None:
            self.exp = exp
        elif exp > self.exp:
            self.counts = self._coarsen(self.counts, exp - self.exp)
            self.exp = exp
        zeros = int(np.count_nonzero(mag == 0))
        self.zeros += zeros
        if self.exp == _ZERO_EXP:
            return
        index = np.minimum(np.floor(mag * (self.num_bins * 2.0 ** -self.exp)).astype(np.int64), self.num_bins - 1)
        counts = np.bincount(index, minlength=self.num_bins)
        counts[0] -= zeros
        self.counts += counts

    @staticmethod
    def _coarsen(counts: np.ndarray, shift: int) -> np.ndarray:
        index = np.arange(counts.size) >> min(shift, 62)
        return np.bincount(index, weights=counts, minlength=counts.size).astype(np.int64)

    @property
    def width(self) -> float:
        return 2.0 ** self.exp / self.num_bins

    def compute_amax(self) -> float:
        if self.exp is None or self.exp == _ZERO_EXP or not self.counts.any():
            return 0.0
        if self.method == "percentile":
            cdf = np.cumsum(self.counts.astype(np.float64))
            cdf += self.zeros
            index = min(int(np.searchsorted(cdf, self.percentile / 100.0 * cdf[-1])), self.num_bins - 1)
            return min((index + 1) * self.width, self.amax)
        counts, width = self.counts, self.width
        while counts.size > self.start_bin and counts.sum() < _MIN_PER_BIN * counts.size:
            counts, width = counts.reshape(-1, 2).sum(1), width * 2  # too few samples for this many bins
        return min(entropy_amax(counts, width, self.fmt, self.start_bin), self.amax)


def _levels(x: np.ndarray, fmt: str) -> np.ndarray:
    """x in [0, 1] (a fraction of the threshold) rounded to the grid of `fmt`, as level keys."""
    if fmt == "int8":
        return np.round(x * 127.0)
    if fmt == "fp8":
        return (x * 448.0).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    raise ValueError(f"entropy calibration grid must be 'int8' or 'fp8', got {fmt!r}")


def entropy_amax(counts: np.ndarray, width: float, fmt: str = "int8", start_bin: int = 128) -> float:
    """The threshold (a multiple of `width`) with the lowest KL(P || Q) over the histogram `counts`.

    For a threshold of i bins, P is bins 0..i-1 with every count above them
    added to bin i-1; Q takes the same bins without those outliers, sums
    the bins whose centres round to the same grid level and spreads each
    sum evenly over its bins where P is not zero. Ties go to the larger
    threshold.
    """
    h = counts.astype(np.float64)
    nz = np.nonzero(h)[0]
    if not nz.size:
        return 0.0
    last = int(nz[-1]) + 1
    first = min(start_bin, last)
    tail = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])  # tail[j]: counts at bin j and above
    best, best_score = last, math.inf
    rows = max(1, (1 << 20) // last)
    for start in range(first, last + 1, rows):
        cand = np.arange(start, min(start + rows, last + 1))
        scores = _kl_scores(h[:last], tail, cand, fmt)
        for i, s in zip(cand, scores):
            if s <= best_score:
                best, best_score = int(i), float(s)
    return best * width


def _kl_scores(h: np.ndarray, tail: np.ndarray, cand: np.ndarray, fmt: str) -> np.ndarray:
    k, cols = cand.size, h.size
    j = np.arange(cols)
    inside = j[None, :] < cand[:, None]
    p = np.where(inside, h[None, :], 0.0)
    rows = np.arange(k)
    p[rows, cand - 1] += tail[cand]
    level = _levels((j[None, :] + 0.5) / cand[:, None], fmt)
    gid = np.concatenate([np.zeros((k, 1), np.int64), np.cumsum(level[:, 1:] != level[:, :-1], 1)], 1)
    ngroups = int(gid.max()) + 2
    gid = np.where(inside, gid, ngroups - 1) + rows[:, None] * ngroups
    kept = np.where(inside, h[None, :], 0.0)
    nonzero = (p > 0) & inside
    sums = np.bincount(gid.ravel(), weights=kept.ravel(), minlength=k * ngroups)
    support = np.bincount(gid.ravel(), weights=nonzero.ravel().astype(np.float64), minlength=k * ngroups)
    q = np.where(nonzero, sums[gid] / np.maximum(support[gid], 1.0), 0.0)
    p /= p.sum(1, keepdims=True)
    qsum = q.sum(1, keepdims=True)
    q /= np.where(qsum > 0, qsum, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(np.where(q > 0, q, 1e-300))), 0.0)
    scores = terms.sum(1)
    scores[((p > 0) & (q == 0)).any(1)] = math.inf
    return scores


def make_statistic(method: str, fmt: str, percentile: float = 99.99, num_bins: int = 2048):
    if method == "max":
        return MaxStatistic()
    if method in ("percentile", "entropy"):
        return HistogramStatistic(method, percentile=percentile, num_bins=num_bins, fmt=fmt)
    raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")


def collect_statistics(model: onnx.ModelProto, tensors: Sequence[str], batches: Iterable[Mapping[str, np.ndarray]],
                       method: str = "max", fmt: str = "int8", percentile: float = 99.99,
                       num_bins: int = 2048) -> Dict[str, float]:
    """The calibrated amax of every tensor in `tensors`, running `model` in ONNX Runtime over `batches`."""
    from .io import make_session

    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    graph_inputs = {i.name for i in model.graph.input}
    outputs = [t for t in tensors if t not in graph_inputs]
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    for name in outputs:
        if name not in existing:
            augmented.graph.output.append(onnx.ValueInfoProto(name=name))
    session = make_session(augmented, optimize=False)
    stats = {t: make_statistic(method, fmt, percentile, num_bins) for t in tensors}
    seen = 0
    for batch in batches:
        values = session.run(outputs, dict(batch)) if outputs else []
        got: Dict[str, np.ndarray] = dict(zip(outputs, values))
        for t in tensors:
            stats[t].collect(np.asarray(batch[t] if t in graph_inputs else got[t]))
        seen += 1
    if not seen:
        raise ValueError("the calibration data holds no batch")
    return {t: float(s.compute_amax()) for t, s in stats.items()}

