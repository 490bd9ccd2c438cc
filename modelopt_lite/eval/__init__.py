"""Fidelity of a quantized model against its float original."""

from .fidelity import FidelityReport, embed, fidelity_report, spearman

__all__ = ["FidelityReport", "embed", "fidelity_report", "spearman"]
