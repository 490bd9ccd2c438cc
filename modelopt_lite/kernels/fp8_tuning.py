"""Config lists and the per-shape tuner of the FP8 GEMM.

Each GEMM shape is keyed on (device, M bucket, N, K, A prologue mode); the
first call with a new key times every candidate of its regime (median of a
short `triton.testing.do_bench`, L2 flushed between runs) and keeps the
fastest for the life of the process. Regimes:

* M <= 16: 16-row tiles (mma.sync), narrow N tiles, long K steps, optional
  split-K so that small-N layers still fill the multiprocessors;
* M <= 64: 64-row wgmma tiles (one warpgroup), optional split-K;
* M <= 256: 64/128-row tiles with 128/256 columns;
* larger M: 256x128 / 128x128x256 wgmma tiles, grouped order, warp
  specialization, and persistent variants (the persistent 128x256 kernel
  leads with fast accumulation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

from .common import ShapeTuner, m_bucket, m_regime

__all__ = ["GemmConfig", "candidate_configs", "m_bucket", "tune", "TUNER", "REGIMES", "lookup"]


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 1
    persistent: bool = False
    group_m: int = 8
    tma: bool = True
    """Load through TMA descriptors where the operands allow it (else plain pointer loads)."""
    ws: bool = False
    """Compiler warp specialization of the main loop."""

    def __str__(self):
        extra = (f" sk{self.split_k}" if self.split_k > 1 else "") + (" P" if self.persistent else "")
        extra += ("" if self.tma else " ptr") + (" WS" if self.ws else "")
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}{extra}"


def _c(bm, bn, bk, w, s, split=1, persistent=False, tma=True, ws=False):
    return GemmConfig(bm, bn, bk, w, s, split, persistent, tma=tma, ws=ws)


REGIMES: Dict[str, List[GemmConfig]] = {
    # memory-bound: mostly pointer loads (no descriptor set-up on the host), split-K to fill the machine
    "m16": [_c(16, 128, 256, 4, 3, 4, tma=False), _c(16, 64, 256, 4, 4, 4, tma=False), _c(16, 64, 256, 4, 4, 4),
            _c(16, 64, 256, 4, 4, 2, tma=False), _c(16, 64, 256, 4, 4, tma=False), _c(16, 128, 128, 4, 4, tma=False)],
    "m64": [_c(64, 64, 256, 4, 4, 2, tma=False), _c(64, 32, 256, 4, 4, tma=False), _c(64, 64, 256, 4, 4, tma=False),
            _c(64, 128, 128, 4, 4, 2, tma=False), _c(64, 128, 128, 4, 4, tma=False)],
    "m256": [_c(64, 128, 128, 4, 4, 2), _c(64, 128, 128, 4, 4), _c(64, 128, 256, 4, 3), _c(128, 64, 256, 4, 3),
             _c(256, 64, 128, 8, 3, 2), _c(256, 128, 128, 8, 3, ws=True)],
    # float32 promotion every 128 products stalls the tensor cores; warp specialization (TMA producer warps)
    # hides part of it
    "large": [_c(256, 128, 128, 8, 3, ws=True), _c(256, 128, 128, 8, 3, persistent=True, ws=True),
              _c(128, 128, 256, 8, 3, persistent=True), _c(128, 128, 256, 8, 3, ws=True), _c(256, 128, 128, 8, 3)],
    # tensor-core accumulation (no promotion stalls): the persistent kernel overlaps epilogues with loads
    "large_fast": [_c(128, 256, 128, 8, 3, persistent=True, ws=True), _c(128, 256, 128, 8, 3, persistent=True),
                   _c(256, 128, 128, 8, 3, persistent=True, ws=True), _c(128, 128, 256, 8, 3, persistent=True)],
}
"""Candidate configs per regime (module-level so that a sweep can replace a list)."""


def _regime(M: int, fast_accum: bool = False) -> str:
    regime = m_regime(M)
    return "large_fast" if fast_accum and regime == "large" else regime


def candidate_configs(M: int, N: int, K: int, quant_a: bool, tma: bool, fast_accum: bool = False) -> List[GemmConfig]:
    """The regime's configs that apply: no persistent kernel without TMA or with the A prologue, and no
    split-K where each split would get fewer than two K steps."""
    out = []
    for cfg in REGIMES[_regime(M, fast_accum)]:
        if cfg.persistent and (quant_a or not tma):
            continue
        if quant_a and cfg.block_m >= 64:  # the A prologue is meant for a few rows (mma.sync tiles)
            continue
        if cfg.split_k > 1 and math.ceil(K / cfg.block_k) < 2 * cfg.split_k:
            continue
        out.append(cfg)
    if not out:  # every candidate filtered: a plain tile config always works
        out = [GemmConfig(16 if quant_a else 64, 64, 64, 4, 3, tma=False)]
    return out


TUNER = ShapeTuner("FP8 GEMM", "MODELOPT_LITE_FP8_TUNE", warmup=2, rep=10)
"""The configs chosen per (M bucket, N, K, mode): `TUNER.tuned`, their timings and failures
(MODELOPT_LITE_FP8_TUNE=0 takes each shape's first candidate untimed)."""
tune = TUNER.tune
lookup = TUNER.lookup
