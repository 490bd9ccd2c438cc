"""Fidelity of a quantized ONNX model: both models run in ONNX Runtime on the same batches."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

__all__ = ["OutputFidelity", "QuantReport", "compare_models"]


@dataclass
class OutputFidelity:
    """One output over every evaluation batch: cosine, max |difference|, ||q - f|| / ||f||."""

    name: str
    cosine: float
    max_abs_diff: float
    relative_l2: float


@dataclass
class QuantReport:
    """What `quantize_onnx` did and how close the quantized model stays to the float one."""

    input_path: str
    output_path: str
    mode: str
    method: Optional[str]
    quantized_nodes: Dict[str, int]
    qdq_nodes: Dict[str, int]
    outputs: List[OutputFidelity]
    eval_batches: int
    eval_source: str
    input_bytes: int = 0
    output_bytes: int = 0
    skipped: Dict[str, str] = field(default_factory=dict)
    amax: Dict[str, float] = field(default_factory=dict)

    @property
    def min_cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=float("nan"))

    def __str__(self) -> str:
        method = f", calibration {self.method}" if self.method else ""
        lines = [f"ONNX PTQ {self.mode}{method}: {self.input_path} -> {self.output_path}"]
        if self.input_bytes and self.output_bytes:
            lines.append(f"  size: {self.input_bytes / 2**20:.2f} MiB -> {self.output_bytes / 2**20:.2f} MiB "
                         f"({self.output_bytes / self.input_bytes:.2f}x)")
        quantized = ", ".join(f"{k} {v}" for k, v in self.quantized_nodes.items()) or "none"
        lines.append(f"  quantized nodes: {quantized} ({sum(self.quantized_nodes.values())} in all)")
        lines.append("  inserted: " + (", ".join(f"{k} {v}" for k, v in sorted(self.qdq_nodes.items())) or "nothing"))
        if self.amax:
            lines.append(f"  calibrated tensors: {len(self.amax)}")
        if self.skipped:
            lines.append(f"  left in float: {len(self.skipped)} node(s) (excluded or no quantizable weight)")
        if not self.outputs:
            lines.append("  fidelity: not measured (no evaluation data)")
            return "\n".join(lines)
        lines.append(f"  fidelity on {self.eval_source} ({self.eval_batches} batches), ONNX Runtime CPU, default "
                     "graph optimizations:")
        width = max([len("output")] + [len(o.name) for o in self.outputs])
        lines.append(f"    {'output':<{width}}  {'cosine':>9}  {'max abs diff':>12}  {'rel L2':>9}")
        for o in self.outputs:
            lines.append(f"    {o.name:<{width}}  {o.cosine:9.6f}  {o.max_abs_diff:12.5g}  {o.relative_l2:9.5f}")
        return "\n".join(lines)


class _Accumulator:
    def __init__(self):
        self.dot = self.ff = self.qq = self.dd = 0.0
        self.max_abs = 0.0
        self.seen = False

    def add(self, f: np.ndarray, q: np.ndarray) -> None:
        f = np.asarray(f, dtype=np.float64).reshape(-1)
        q = np.asarray(q, dtype=np.float64).reshape(-1)
        if f.shape != q.shape:
            raise ValueError(f"the quantized model's output has {q.size} values, the float model's {f.size}")
        d = q - f
        self.seen = True
        self.dot += float(f @ q)
        self.ff += float(f @ f)
        self.qq += float(q @ q)
        self.dd += float(d @ d)
        if d.size:
            self.max_abs = max(self.max_abs, float(np.abs(d).max()))

    def result(self, name: str) -> OutputFidelity:
        norm = math.sqrt(self.ff * self.qq)
        cosine = self.dot / norm if norm else float(self.dd == 0.0)
        rel = math.sqrt(self.dd / self.ff) if self.ff else (0.0 if self.dd == 0.0 else math.inf)
        return OutputFidelity(name, cosine, self.max_abs, rel)


def compare_models(float_session, quant_session, batches: Sequence[Mapping[str, np.ndarray]]) -> List[OutputFidelity]:
    """Per output of the float model: fidelity of the quantized model over `batches` (float outputs only)."""
    names = [o.name for o in float_session.get_outputs()]
    quant_names = {o.name for o in quant_session.get_outputs()}
    names = [n for n in names if n in quant_names]
    acc = {n: _Accumulator() for n in names}
    for batch in batches:
        ref = float_session.run(names, dict(batch))
        got = quant_session.run(names, dict(batch))
        for n, r, q in zip(names, ref, got):
            r = np.asarray(r)
            if np.issubdtype(r.dtype, np.floating):
                acc[n].add(r, q)
    return [acc[n].result(n) for n in names if acc[n].seen]
