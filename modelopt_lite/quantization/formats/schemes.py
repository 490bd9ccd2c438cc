"""Quantization schemes: an element format plus how its scales are derived.

Three scale kinds cover every format the project ships:

* float32 scales from an amax (per tensor, per channel, per token or per
  block): INTn, FP8, FP6, FP4, block-wise INT, FP8 2D blocks;
* two-level scales: E4M3 block scales under a float32 global scale (NVFP4);
* E8M0 power-of-two block scales (MXFP8, MXFP6, MXFP4, MXINT8).

`fake_quant`, `quantize` and `dequantize` share one core, so
`dequantize(quantize(x))` equals `fake_quant(x)` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .blocks import Blocking, channel_amax, normalize_axes
from .elements import E4M3, E8M0, ElementFormat, FloatFormat, IntFormat, parse_format

__all__ = ["QuantFormat", "QuantizedTensor", "fake_quant", "quantize", "dequantize", "compute_amax", "block_amax", "dequant_scale", "TINY_AMAX"]

TINY_AMAX = 2.0**-24
"""An amax at or below this quantizes every value to zero."""

_SCALE_FORMATS = {None: None, "e4m3": E4M3, "e8m0": E8M0}


@dataclass(frozen=True)
class QuantFormat:
    """What a tensor is quantized to and at what granularity.

    `axis` keeps one scale per index of those dimensions; `block_sizes`
    ({axis: size or None}) gives one scale per block; `scale` is the format
    of block scales (None for float32 from amax, E4M3 for two-level, E8M0
    for MX).
    """

    element: ElementFormat
    axis: Optional[Tuple[int, ...]] = None
    block_sizes: Optional[Tuple[Tuple[int, Optional[int]], ...]] = None
    scale: Optional[FloatFormat] = None
    global_fp8: bool = False
    """Two-level only: the global scale is amax / 448 (not amax / (qmax * 448)), so that
    element x block scale fits FP8, as W4A8 NVFP4-FP8 GEMMs need."""

    def __post_init__(self):
        if self.axis is not None and self.block_sizes:
            raise ValueError("use either axis (per channel) or block_sizes, not both")
        if self.scale is not None and not self.block_sizes:
            raise ValueError(f"{self.scale.name} scales need block_sizes")
        if self.scale is E8M0 and isinstance(self.element, IntFormat) and self.element.bits != 8:
            raise ValueError("MX integer elements are 8-bit (MXINT8)")
        if self.global_fp8 and self.scale is not E4M3:
            raise ValueError("global_scale: fp8 applies to two-level formats (E4M3 block scales) only")

    @classmethod
    def create(cls, num_bits=8, axis=None, block_sizes=None, scale_bits=None, unsigned=False, narrow_range=False,
               global_fp8=False):
        """Build from config-style attributes (`num_bits` int, (E, M) or name)."""
        scale = _parse_scale(scale_bits)
        if scale is E8M0 and (num_bits == 8 or num_bits in ("int8",)):
            element = IntFormat(8, narrow_range=True, frac_bits=6)
        else:
            element = parse_format(num_bits, unsigned=unsigned, narrow_range=narrow_range)
        if axis is not None:
            axis = (axis,) if isinstance(axis, int) else tuple(axis)
        blocks = None
        if block_sizes:
            blocks = tuple(sorted((int(k), None if v is None else int(v)) for k, v in block_sizes.items()))
        return cls(element, axis, blocks, scale, global_fp8)

    @property
    def blocks(self) -> Dict[int, Optional[int]]:
        return dict(self.block_sizes or ())

    @property
    def name(self) -> str:
        e = self.element
        if self.scale is E8M0:
            if isinstance(e, IntFormat):
                return "mxint8"
            return {"e4m3": "mxfp8", "e5m2": "mxfp8_e5m2", "e3m2": "mxfp6", "e2m3": "mxfp6_e2m3", "e2m1": "mxfp4"}[e.name]
        if self.scale is E4M3 and e.name == "e2m1":
            return "nvfp4"
        if isinstance(e, IntFormat):
            base = e.name
        else:
            base = {8: "fp8", 6: "fp6", 4: "fp4"}[e.code_bits] + "_" + e.name
        return base + (f"({self.scale.name} scales)" if self.scale is not None else "")

    @property
    def granularity(self) -> str:
        if self.block_sizes:
            items = self.blocks
            if all(v is None for v in items.values()) and list(items) == [-1]:
                return "per-token"
            return "block(" + ",".join(f"{k}:{'all' if v is None else v}" for k, v in sorted(items.items(), reverse=True)) + ")"
        if self.axis is not None:
            return f"per-channel(axis={','.join(map(str, self.axis))})"
        return "per-tensor"

    @property
    def amax_is_global(self) -> bool:
        """True when the calibrated amax is one per-tensor value (two-level formats)."""
        return self.scale is E4M3

    @property
    def needs_amax(self) -> bool:
        """MX formats derive everything from the data; the others use an amax."""
        return self.scale is not E8M0


def _parse_scale(scale_bits) -> Optional[FloatFormat]:
    if scale_bits is None:
        return None
    key = scale_bits.lower() if isinstance(scale_bits, str) else "e%dm%d" % tuple(scale_bits)
    if key not in ("e4m3", "e8m0"):
        raise ValueError(f"block scale format must be e4m3 [4, 3] or e8m0 [8, 0], got {scale_bits!r}")
    return _SCALE_FORMATS[key]


@dataclass
class QuantizedTensor:
    """Codes plus what is needed to dequantize them exactly.

    `codes` has the original shape (FP8 as torch float8, everything else as
    int8/uint8 one code per element). Single-level formats keep `amax`;
    two-level formats keep `block_scale` (float8_e4m3fn, one per block) and
    `global_scale` (float32 s2); MX keeps `block_scale` as E8M0 codes.
    """

    codes: torch.Tensor
    fmt: QuantFormat
    dtype: torch.dtype
    amax: Optional[torch.Tensor] = None
    block_scale: Optional[torch.Tensor] = None
    global_scale: Optional[torch.Tensor] = None

    @property
    def shape(self):
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


def compute_amax(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The amax a max calibrator stores for `x`: per tensor, channel or block.

    Two-level and MX formats store one per-tensor amax (their block scales
    are computed from the data at run time).
    """
    if fmt.block_sizes and fmt.scale is None:
        blocking = Blocking(x.shape, fmt.blocks)
        return blocking.block_amax(blocking.to_blocks(x.detach()))
    if fmt.block_sizes:
        return x.detach().abs().amax().float()
    return channel_amax(x.detach(), fmt.axis)


def block_amax(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Per-block abs-max of `x` for a block format, one value per block (the blocking's scale shape).

    For single-level block formats this is what a max calibrator stores; for
    two-level formats (NVFP4) it is the static per-block amax that searches
    (MSE, AWQ clipping, GPTQ) start from.
    """
    if not fmt.block_sizes:
        raise ValueError(f"{fmt.name} {fmt.granularity} has no blocks")
    blocking = Blocking(x.shape, fmt.blocks)
    return blocking.block_amax(blocking.to_blocks(x.detach().float())).reshape(blocking.scale_shape)


def _check_input(x: torch.Tensor, fmt: QuantFormat):
    if not x.is_floating_point():
        raise TypeError(f"cannot quantize a {x.dtype} tensor; expected float32, float16 or bfloat16")
    if isinstance(fmt.element, IntFormat) and fmt.element.unsigned and bool((x < 0).any()):
        raise ValueError(f"negative values given to an unsigned {fmt.element.name} quantizer")


def _fit_amax(amax: torch.Tensor, target_shape, what: str) -> torch.Tensor:
    amax = amax.float()
    if amax.numel() == 1:
        return amax.reshape(())
    n = 1
    for s in target_shape:
        n *= s
    if amax.numel() != n:
        raise ValueError(f"{what} amax has {amax.numel()} values; expected 1 or {n} (shape {tuple(target_shape)})")
    return amax.reshape(target_shape)


def _core(x: torch.Tensor, fmt: QuantFormat, amax: Optional[torch.Tensor], global_amax: Optional[torch.Tensor] = None):
    """Quantize to grid values. Returns (q, blocking, scales) with q in float32."""
    if global_amax is not None and fmt.scale is not E4M3:
        raise ValueError(f"global_amax applies to two-level formats (NVFP4) only, not {fmt.name}")
    _check_input(x, fmt)
    xf = x.float()
    elem = fmt.element
    blocking = Blocking(x.shape, fmt.blocks) if fmt.block_sizes else None
    if blocking is not None:
        xf = blocking.to_blocks(xf)

    if fmt.scale is None:
        if amax is None:
            amax = blocking.block_amax(xf) if blocking else channel_amax(xf, fmt.axis)
        if blocking is not None:
            amax = _fit_amax(amax, blocking.scale_shape, "block")
        else:
            amax = _fit_amax(amax, _keep_shape(x, fmt.axis) if fmt.axis is not None else (), "per-tensor/channel")
        full = blocking.expand(amax) if blocking is not None else amax
        s = _multiplier(full, elem)
        return elem.round(xf * s), blocking, {"s": s, "scale": dequant_scale(full, elem), "amax": amax}

    if blocking is None:
        raise ValueError("two-level and MX formats need block_sizes")
    qmax = elem.max_value
    if fmt.scale is E4M3 and amax is not None and amax.numel() > 1:
        # Static per-block amaxes (from an MSE or clipping search); the global is theirs unless given.
        bamax = blocking.expand(_fit_amax(amax, blocking.scale_shape, "block"))
        amax = amax.float().amax() if global_amax is None else global_amax
    else:
        bamax = blocking.expand(blocking.block_amax(xf))
        if global_amax is not None:
            amax = global_amax
    if fmt.scale is E4M3:
        gamax = bamax.amax() if amax is None else _fit_amax(amax, (), "global")
        tiny = gamax <= TINY_AMAX
        bound = E4M3.max_value if fmt.global_fp8 else qmax * E4M3.max_value
        s2 = torch.where(tiny, torch.ones_like(gamax), gamax / torch.full_like(gamax, bound))
        sb = E4M3.round(torch.clamp(bamax / (qmax * s2), max=E4M3.max_value))
        sb = torch.where(sb == 0, torch.ones_like(sb), sb)
        eff = sb * s2
        q = elem.round(xf / eff)
        q = torch.where(tiny, xf * 0, q)
        return q, blocking, {"sb": sb, "s2": s2}

    # E8M0 (MX): X = 2^(floor(log2(block_amax)) - emax_elem)
    _, e = torch.frexp(bamax)
    xexp = torch.clamp(e - 1 - elem.emax, -127, 127)
    xexp = torch.where(bamax == 0, torch.zeros_like(xexp), xexp)
    X = torch.ldexp(torch.ones_like(bamax), xexp.float())
    X = torch.where(torch.isfinite(bamax), X, torch.full_like(X, float("nan")))  # NaN or Inf: the block is NaN
    q = elem.round(xf / X)
    return q, blocking, {"X": X}


def dequant_scale(amax: torch.Tensor, elem) -> torch.Tensor:
    """The float32 dequantization multiplier amax / qmax that checkpoints store (0 where amax is tiny)."""
    amax = amax.float()
    qmax = torch.full_like(amax, elem.max_value)
    return torch.where(amax <= TINY_AMAX, torch.zeros_like(amax), amax / qmax)


def _multiplier(amax: torch.Tensor, elem) -> torch.Tensor:
    """s = qmax / amax, or 0 where amax is at or below TINY_AMAX (all values become 0)."""
    qmax = torch.full_like(amax, elem.max_value)  # tensor / tensor: one correctly rounded division
    return torch.where(amax <= TINY_AMAX, torch.zeros_like(amax), qmax / amax)


def _keep_shape(x: torch.Tensor, axis) -> Tuple[int, ...]:
    keep = normalize_axes(axis, x.dim())
    return tuple(n if d in keep else 1 for d, n in enumerate(x.shape))


def _dequant_values(q: torch.Tensor, fmt: QuantFormat, scales: dict) -> torch.Tensor:
    if "scale" in scales:
        return q * scales["scale"]
    if "sb" in scales:
        return q * (scales["sb"] * scales["s2"])
    return q * scales["X"]


def fake_quant(x: torch.Tensor, fmt: QuantFormat, amax: Optional[torch.Tensor] = None,
               global_amax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantize then dequantize `x`, computed in float32, returned in x's dtype.

    `amax`: per tensor / per channel / per block for single-level formats,
    unused for MX; None computes it from `x` (dynamic quantization). For
    two-level formats it is either the global amax (a scalar; block amaxes
    come from the data) or static per-block amaxes (one per block, e.g.
    from an MSE search), whose global is `global_amax` when given (a fused
    layer's shared value) and otherwise their maximum.
    """
    q, blocking, scales = _core(x, fmt, amax, global_amax)
    out = _dequant_values(q, fmt, scales)
    if blocking is not None:
        out = blocking.from_blocks(out)
    return out.to(x.dtype)


def quantize(x: torch.Tensor, fmt: QuantFormat, amax: Optional[torch.Tensor] = None,
             global_amax: Optional[torch.Tensor] = None) -> QuantizedTensor:
    """Quantize `x` to codes and scales (see `fake_quant` for `amax` and `global_amax`)."""
    q, blocking, scales = _core(x, fmt, amax, global_amax)
    if not fmt.element.has_nan and bool(torch.isnan(q).any()):
        raise ValueError(f"NaN in the input cannot be encoded as {fmt.name} codes")
    codes = fmt.element.encode(q)
    if blocking is not None:
        codes = blocking.from_blocks(codes)
    qt = QuantizedTensor(codes=codes, fmt=fmt, dtype=x.dtype)
    if "scale" in scales:
        qt.amax = scales["amax"]
    elif "sb" in scales:
        qt.block_scale = E4M3.encode(scales["sb"].reshape(blocking.scale_shape))
        qt.global_scale = scales["s2"]
    else:
        qt.block_scale = E8M0.encode(scales["X"].reshape(blocking.scale_shape))
    return qt


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """Codes and scales back to a tensor in the original dtype."""
    fmt = qt.fmt
    q = fmt.element.decode(qt.codes)
    blocking = Blocking(qt.codes.shape, fmt.blocks) if fmt.block_sizes else None
    if blocking is not None:
        q = blocking.to_blocks(q)
    if fmt.scale is None:
        amax = blocking.expand(qt.amax) if blocking is not None else qt.amax
        scales = {"scale": dequant_scale(amax, fmt.element)}
    elif fmt.scale is E4M3:
        scales = {"sb": blocking.expand(E4M3.decode(qt.block_scale)), "s2": qt.global_scale}
    else:
        scales = {"X": blocking.expand(E8M0.decode(qt.block_scale))}
    out = _dequant_values(q, fmt, scales)
    if blocking is not None:
        out = blocking.from_blocks(out)
    return out.to(qt.dtype)
