"""Configs, launch and per-shape tuning of the 4-bit weight GEMMs (see `w4_gemm`).

A config picks the path ("mma": `_w4_mm_kernel`, decode in registers;
"dequant": dequantize into a scratch weight, then cuBLAS) and, for "mma",
the row tile BN, the activation tile BM (M padded to >= 16), TG granules per
K step, warps, pipeline stages and the split-K factor (> 0: that many; 0, -1,
-3: enough splits to fill the multiprocessors about 1, 2, 4 times).

Each (device, kind, block, dtype, M bucket, N, K) is tuned on first use: the
candidates of its regime are timed (median of `triton.testing.do_bench`, L2
flushed between runs) and the fastest kept for the life of the process.
MODELOPT_LITE_W4_TUNE=0 and the interpreter take the first candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from . import interpret_mode, triton_available
from .common import COUNTER_SLOTS, ShapeTuner, m_bucket, m_regime, num_sms, split_k_counters
from .w4_layout import NV_Q, int4_quarter

__all__ = ["W4Config", "candidate_configs", "config_fits", "launch", "run_w4", "tune", "TUNER",
           "REGIMES", "m_bucket", "resolve_split", "last_compiled", "dequantize_into"]



@dataclass(frozen=True)
class W4Config:
    """One way to run the GEMM (see the module docstring for the fields)."""

    path: str = "mma"
    bn: int = 128
    bm: int = 16
    tg: int = 4
    warps: int = 4
    stages: int = 4
    split: int = 0

    def __str__(self):
        if self.path == "dequant":
            return "dequant+cuBLAS"
        return f"bn{self.bn} bm{self.bm} tg{self.tg} w{self.warps} s{self.stages} split{self.split}"


def _c(bn, bm, tg, w, s, split=0):
    return W4Config("mma", bn, bm, tg, w, s, split)


_DEQ = W4Config("dequant")

REGIMES: Dict[Tuple[str, str], List[W4Config]] = {
    ("nvfp4", "m16"): [_c(64, 16, 4, 4, 4, -1), _c(128, 16, 4, 4, 4), _c(128, 16, 4, 4, 4, -1), _c(64, 16, 4, 4, 3, -3),
                       _c(128, 16, 4, 8, 4)],
    ("int4", "m16"): [_c(128, 16, 1, 4, 4, -1), _c(128, 16, 1, 4, 4), _c(64, 16, 1, 4, 3, -3), _c(128, 16, 1, 8, 4, -1),
                      _c(128, 16, 2, 4, 3, -1)],
    ("nvfp4", "m64"): [_c(128, 64, 2, 8, 4), _c(256, 64, 2, 8, 4), _c(128, 32, 4, 4, 4)],
    ("int4", "m64"): [_c(128, 64, 1, 8, 4), _c(128, 32, 1, 4, 4), _c(64, 64, 1, 4, 4)],
    ("nvfp4", "m256"): [_c(128, 256, 1, 8, 3), _c(128, 64, 2, 8, 4), _c(256, 128, 1, 16, 3), _DEQ],
    ("int4", "m256"): [_c(128, 128, 1, 8, 2), _c(128, 64, 1, 8, 4), _DEQ],
    ("nvfp4", "large"): [_DEQ, _c(256, 128, 2, 16, 3)],
    ("int4", "large"): [_DEQ, _c(128, 128, 1, 8, 2)],
}
"""Candidates per (kind, regime); module-level so that a sweep can replace a list."""


def _granule(p) -> int:
    return 4 * (NV_Q if p.kind == "nvfp4" else int4_quarter(p.block))


def _n_iters(cfg: W4Config, p, K: int) -> int:
    return -(-K // (_granule(p) * cfg.tg))


def resolve_split(cfg: W4Config, p, M: int, sms: int) -> int:
    """The split-K factor of a config for this problem (<= 0: about 1 - split CTAs per multiprocessor)."""
    n_iters = _n_iters(cfg, p, p.k)
    tiles = -(-p.n // cfg.bn) * -(-M // cfg.bm)
    if cfg.split > 0:
        split = cfg.split
    else:
        target = sms * (1 - cfg.split)
        split = 1
        while tiles * split * 2 <= target + tiles and split * 2 <= max(1, n_iters // 2):
            split *= 2
    split = max(1, min(split, n_iters))
    return 1 if tiles > COUNTER_SLOTS else split


def config_fits(cfg: W4Config, p) -> bool:
    """A config runs for this weight: row tile dividing the padded N, K step dividing the padded K."""
    if cfg.path == "dequant":
        return True
    return not (p.npad % cfg.bn or p.kpad % (_granule(p) * cfg.tg))


def candidate_configs(p, M: int) -> List[W4Config]:
    """The configs of M's regime that fit this weight."""
    return [cfg for cfg in REGIMES[(p.kind, m_regime(M))] if config_fits(cfg, p)]


# ------------------------------------------------------------------------------------------------ launch

_LAST: List[object] = [None]


def last_compiled():
    """The compiled kernel of the last GEMM launch (for inspection: registers, spills, TTGIR, SASS)."""
    return _LAST[0]




def _ipb(p) -> int:
    """INT4 K-slices per scale block (1, 2 or 4) when blocks tile the granules, else 1 (a scale per slice)."""
    q = int4_quarter(p.block)
    g = 4 * q
    if p.block % g == 0 or g % p.block == 0:
        return min(4, max(1, p.block // q))
    return 1


def dequantize_into(p, out: torch.Tensor) -> torch.Tensor:
    """The Triton dequantization kernel: `out` [n, k] (bf16/fp16/fp32) = dequantize_w4(p, out.dtype)."""
    from .w4_kernels import _w4_dequant_kernel

    q = NV_Q if p.kind == "nvfp4" else int4_quarter(p.block)
    tg = 4 if p.kind == "nvfp4" else 1  # 64 rows x 256 codes per program, 8 warps: < 64 registers
    bn = 64
    gs = p.global_scale if p.global_scale is not None else p.scales
    scales = p.scales.view(torch.int32) if p.kind == "nvfp4" else p.scales
    grid = (-(-p.n // bn), -(-p.k // (4 * q * tg)))
    _w4_dequant_kernel[grid](p.data.view(torch.int16), scales, gs, out, p.n, p.k, p.kpad // 4, scales.shape[1],
                             out.stride(0), KIND=0 if p.kind == "nvfp4" else 1, Q=q, BLOCK=p.block, BN=bn, TG=tg,
                             ASM=not interpret_mode(), num_warps=8)
    return out


def launch(cfg: W4Config, x2: torch.Tensor, p, bias: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Run one config: out [M, n] = x2 [M, k] @ W^T (+ bias). The dequant path allocates an [n, k] scratch
    weight in x2.dtype per call (from the caching allocator)."""
    if cfg.path == "dequant":
        w = dequantize_into(p, torch.empty((p.n, p.k), dtype=x2.dtype, device=x2.device))
        if bias is None:
            return torch.mm(x2, w.t(), out=out)
        return torch.addmm(bias.to(x2.dtype), x2, w.t(), out=out)
    from .w4_kernels import _w4_mm_kernel

    M = x2.shape[0]
    q = NV_Q if p.kind == "nvfp4" else int4_quarter(p.block)
    split = resolve_split(cfg, p, M, num_sms(x2.device))
    n_iters = _n_iters(cfg, p, p.k)
    cnt = split_k_counters(x2.device, "w4")
    ws = torch.empty((split, M, p.n), dtype=torch.float32, device=x2.device) if split > 1 else cnt.view(torch.float32)
    scales = p.scales.view(torch.int32) if p.kind == "nvfp4" else p.scales
    gs = p.global_scale if p.global_scale is not None else p.scales
    grid = (-(-p.n // cfg.bn), -(-M // cfg.bm), split)
    _LAST[0] = _w4_mm_kernel[grid](
        x2, p.data.view(torch.int16), scales, gs, bias if bias is not None else out, out, ws, cnt,
        M, p.n, p.k, x2.stride(0), out.stride(0), p.kpad // 4, scales.shape[1], n_iters, split, int(bias is not None),
        KIND=0 if p.kind == "nvfp4" else 1, F16=x2.dtype == torch.float16, BN=cfg.bn, BM=cfg.bm,
        TG=cfg.tg, Q=q, BLOCK=p.block, IPB=_ipb(p) if p.kind == "int4" else 1,
        EVEN_K=p.k % (4 * q * cfg.tg) == 0,
        ASM=not interpret_mode(), num_warps=cfg.warps, num_stages=cfg.stages)
    return out


# ------------------------------------------------------------------------------------------------- tuning

TUNER = ShapeTuner("4-bit GEMM", "MODELOPT_LITE_W4_TUNE", warmup=5, rep=20, warm_first=True, second_look=3)
"""The configs chosen per (device, kind, block, dtype, M bucket, n, k): `TUNER.tuned`, their timings and
failures (MODELOPT_LITE_W4_TUNE=0 takes each shape's first candidate untimed)."""
tune = TUNER.tune


def run_w4(x2: torch.Tensor, p, bias: Optional[torch.Tensor] = None, config: Optional[W4Config] = None,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x2 [M, k] (contiguous rows) times the packed weight -> [M, n] in x2.dtype; tunes per shape."""
    if not triton_available():
        raise RuntimeError("the 4-bit GEMM kernels need Triton")
    M = x2.shape[0]
    if out is None:
        out = torch.empty((M, p.n), dtype=x2.dtype, device=x2.device)
    if M == 0:
        return out
    if config is None:
        key = (x2.device.index, p.kind, p.block, x2.dtype, m_bucket(M), p.n, p.k)
        config = tune(key, candidate_configs(p, M), lambda cfg: launch(cfg, x2, p, bias, out))
    return launch(config, x2, p, bias, out)
