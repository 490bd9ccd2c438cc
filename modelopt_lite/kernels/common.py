"""What the GEMM kernels share: multiprocessor counts, split-K arrival counters and per-shape tuning."""

from __future__ import annotations

import os
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from . import interpret_mode

__all__ = ["COUNTER_SLOTS", "num_sms", "split_k_counters", "m_bucket", "m_regime", "ShapeTuner"]

COUNTER_SLOTS = 8192
"""Output tiles a split-K launch may have: one int32 arrival counter each."""

_counters: Dict[Tuple[str, Optional[int], str], torch.Tensor] = {}
_sms: Dict[Tuple[str, Optional[int]], int] = {}


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (4 elsewhere: the interpreter's grids stay small)."""
    key = (device.type, device.index)
    if key not in _sms:
        _sms[key] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return _sms[key]


def split_k_counters(device: torch.device, owner: str) -> torch.Tensor:
    """Zeroed split-K arrival counters, one buffer per (device, kernel family).

    The last split to arrive at a tile resets its counter, so the buffer is zero between launches;
    split-K launches of one family on one device must be ordered (one stream, or synchronized).
    """
    key = (device.type, device.index, owner)
    buf = _counters.get(key)
    if buf is None:
        buf = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
        _counters[key] = buf
    return buf


def m_bucket(M: int) -> int:
    """Tuning bucket of M: the next power of two (at least 16, at most 16384)."""
    return min(max(16, 1 << max(0, (M - 1).bit_length())), 16384)


def m_regime(M: int) -> str:
    """Which candidate list a GEMM of M rows tunes over: m16, m64, m256 or large."""
    if M <= 16:
        return "m16"
    if M <= 64:
        return "m64"
    if M <= 256:
        return "m256"
    return "large"


class ShapeTuner:
    """Picks, once per key (device, shape bucket, ...), the fastest of a few kernel configs by timing them.

    Under the Triton interpreter, with one candidate, or with the environment variable `env_var` set to 0,
    the first candidate is taken untimed. `warm_first` times the first candidate once before the others
    (compiles it and warms the clocks); `second_look` re-times that many leaders and keeps each one's best.
    """

    def __init__(self, what: str, env_var: str, warmup: int = 2, rep: int = 10, warm_first: bool = False,
                 second_look: int = 0):
        self.what, self.env_var = what, env_var
        self.warmup, self.rep, self.warm_first, self.second_look = warmup, rep, warm_first, second_look
        self.tuned: Dict[Hashable, object] = {}
        self.timings: Dict[Hashable, List[Tuple[object, float]]] = {}
        self.errors: Dict[Tuple[Hashable, object], str] = {}

    def lookup(self, key: Hashable):
        return self.tuned.get(key)

    def tune(self, key: Hashable, candidates: Sequence, run: Callable[[object], object]):
        hit = self.tuned.get(key)
        if hit is not None:
            return hit
        if len(candidates) == 1 or interpret_mode() or os.environ.get(self.env_var, "1") == "0":
            self.tuned[key] = candidates[0]
            return candidates[0]
        import triton
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources

        def bench(cfg) -> float:
            try:
                return triton.testing.do_bench(lambda: run(cfg), warmup=self.warmup, rep=self.rep,
                                               return_mode="median")
            except (OutOfResources, CompilationError, RuntimeError, ValueError) as exc:  # a config that cannot run
                self.errors[(key, cfg)] = f"{type(exc).__name__}: {str(exc)[:300]}"
                return float("inf")

        if self.warm_first:
            bench(candidates[0])
        times = {cfg: bench(cfg) for cfg in candidates}
        for cfg in sorted(times, key=times.get)[:self.second_look]:  # short timings are noisy
            times[cfg] = min(times[cfg], bench(cfg))
        results = [(cfg, times[cfg]) for cfg in candidates]
        best, best_t = min(results, key=lambda r: r[1])
        if best_t == float("inf"):
            raise RuntimeError(f"no {self.what} config ran for key {key}: {[str(c) for c in candidates]}; "
                               f"errors: {[self.errors.get((key, c)) for c in candidates]}")
        self.tuned[key] = best
        self.timings[key] = results
        return best
