"""GPU time per call from CUDA-graph replays (what the GEMM benchmarks report)."""

from __future__ import annotations

import math
import statistics
from typing import Callable, Sequence

import torch


def graph_time_ms(fns: Sequence[Callable[[], object]], min_ms: float = 2.0, replays: int = 10) -> float:
    """Median GPU time (ms) per call of `fns` (one per operand copy, called in turn) from CUDA-graph replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and tuning) outside the capture
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for f in fns:
        f()
    end.record()
    end.synchronize()
    inner = max(1, math.ceil(min_ms / max(start.elapsed_time(end), 1e-3)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            for f in fns:
                f()
    graph.replay()
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / (inner * len(fns))
