"""A readable table of the quantizers of a model, and the bytes its weights take."""

from __future__ import annotations

from torch import nn

from .conversion import named_quantizers
from .nn import QuantWeightModule


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of the weights of quantized layers: `before` (float), `after` (as stored now), and layer counts."""
    from .compress import CompressedLinear

    before = after = compressed = quantized = 0
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            before += m.original_nbytes
            after += m.compressed_nbytes
            compressed += 1
        elif isinstance(m, QuantWeightModule) and m.weight_quantizer.is_enabled:
            n = m.weight.numel() * m.weight.element_size()
            before += n
            after += n
            quantized += 1
    return {"before": before, "after": after, "compressed_layers": compressed, "uncompressed_layers": quantized}


def quant_summary(model: nn.Module) -> str:
    """The table print_quant_summary prints: quantizer, format, granularity, amax range, enabled; then weight bytes."""
    from .compress import CompressedLinear

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
    for name, m in model.named_modules():
        if isinstance(m, CompressedLinear):
            rows.append((f"{name}.weight", m.fmt.name, m.fmt.granularity, f"stored {m.kind}", "yes"))
    header = ("quantizer", "format", "granularity", "amax", "enabled")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    enabled = sum(r[4] == "yes" for r in rows)
    out.append(f"{len(rows)} quantizers, {enabled} enabled, {len(rows) - enabled} disabled")
    b = weight_bytes(model)
    if b["compressed_layers"]:
        ratio = b["before"] / b["after"] if b["after"] else float("inf")
        out.append(f"weights of quantized layers: {_mib(b['before'])} before compression, {_mib(b['after'])} after "
                   f"({ratio:.2f}x smaller; {b['compressed_layers']} layers compressed, "
                   f"{b['uncompressed_layers']} not)")
    elif b["uncompressed_layers"]:
        out.append(f"weights of quantized layers: {_mib(b['before'])}, stored in float "
                   "(compress(model) stores them quantized)")
    return "\n".join(out)


def print_quant_summary(model: nn.Module) -> None:
    """Print one line per quantizer, a count, and the bytes of the quantized layers' weights."""
    print(quant_summary(model))
