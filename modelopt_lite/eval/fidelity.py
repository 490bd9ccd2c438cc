"""Sentence-embedding fidelity: how close quantized embeddings stay to the float ones.

Embeddings are mean-pooled last hidden states, L2-normalised (the
sentence-transformers recipe for all-MiniLM-L6-v2). The report gives the
cosine similarity of each quantized embedding to its float one, and the
Spearman correlation between the two models' pairwise sentence
similarities (does the quantized model still rank pairs the same way).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch


@torch.no_grad()
def embed(forward: Callable, tokenizer, sentences: Sequence[str], batch_size: int = 32, device="cpu", max_length: int = 128) -> torch.Tensor:
    """Normalised mean-pooled embeddings, one row per sentence (float32, CPU)."""
    rows = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenize(tokenizer, sentences[i : i + batch_size], device, max_length)
        hidden = forward(batch).float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        rows.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(rows)


def tokenize(tokenizer, sentences: Sequence[str], device="cpu", max_length: int = 128):
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    keep = set(getattr(tokenizer, "model_input_names", None) or enc.keys())
    return {k: v.to(device) for k, v in enc.items() if k in keep}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equal-length sequences."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError("spearman needs two sequences of the same length >= 2")
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


@dataclass
class FidelityReport:
    sentences: int
    mean_cosine: float
    min_cosine: float
    spearman_pairwise: float

    def as_dict(self):
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"Fidelity on {self.sentences} held-out sentences:\n"
            f"  mean cosine(quantized, float) = {self.mean_cosine:.4f} (min {self.min_cosine:.4f})\n"
            f"  Spearman of pairwise similarities = {self.spearman_pairwise:.4f}"
        )


def fidelity_report(float_emb: torch.Tensor, quant_emb: torch.Tensor) -> FidelityReport:
    """Compare two embedding matrices of the same sentences (rows L2-normalised)."""
    cos = (float_emb * quant_emb).sum(-1)
    n = float_emb.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    sim_f = (float_emb @ float_emb.T)[iu[0], iu[1]]
    sim_q = (quant_emb @ quant_emb.T)[iu[0], iu[1]]
    return FidelityReport(
        sentences=n,
        mean_cosine=float(cos.mean()),
        min_cosine=float(cos.min()),
        spearman_pairwise=spearman(sim_f.numpy(), sim_q.numpy()),
    )
