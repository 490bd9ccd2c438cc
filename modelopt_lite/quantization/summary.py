"""A readable table of the quantizers of a model."""

from __future__ import annotations

from torch import nn

from .conversion import named_quantizers


def quant_summary(model: nn.Module) -> str:
    """The table print_quant_summary prints: quantizer, format, granularity, amax range, enabled."""
    rows = []
    for name, q in named_quantizers(model):
        enabled = q.is_enabled
        rows.append(
            (
                name,
                q.fmt.name if enabled else "-",
                q.fmt.granularity + (" dynamic" if enabled and q.is_dynamic else "") if enabled else "-",
                q.describe_amax() if enabled else "-",
                "yes" if enabled else "no",
            )
        )
    header = ("quantizer", "format", "granularity", "amax", "enabled")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    enabled = sum(r[4] == "yes" for r in rows)
    out.append(f"{len(rows)} quantizers, {enabled} enabled, {len(rows) - enabled} disabled")
    return "\n".join(out)


def print_quant_summary(model: nn.Module) -> None:
    """Print one line per quantizer and a count."""
    print(quant_summary(model))
