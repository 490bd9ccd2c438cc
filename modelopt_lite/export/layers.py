"""One quantized linear layer -> the tensors a deployable checkpoint stores for it.

`layer_algo` names a layer's checkpoint format from its quantizers;
`export_linear` computes the tensors (Hugging Face suffixes: ``weight``,
``weight_scale``, ``weight_scale_2``, ``input_scale``, ``pre_quant_scale``)
without touching the layer; `dequantize_weight` turns them back into the
weight the fake-quant layer computes with, bit for bit. Formats and scale
formulas: ../shared/specs/CHECKPOINTS.md section 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

from ..quantization.formats import E2M1, E4M3, QuantFormat, QuantizedTensor, dequant_scale, dequantize, quantize
from ..quantization.formats.elements import IntFormat
from ..quantization.tensor_quantizer import TensorQuantizer
from .packing import pack_int4_rows, pack_nibbles_last, unpack_int4_rows, unpack_nibbles_last

__all__ = ["ExportError", "GroupValues", "layer_algo", "export_linear", "dequantize_weight", "kv_cache_algo",
           "kv_scale", "float_weight", "quantize_weight", "input_scale", "algo_quantizers", "ALGOS"]

FP8_MAX = E4M3.max_value
NVFP4_GLOBAL = E2M1.max_value * E4M3.max_value  # 6 * 448

ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "NVFP4", "W4A16_NVFP4", "W4A8_NVFP4_FP8", "W4A16_AWQ", "W4A8_AWQ",
         "W8A8_SQ_PER_CHANNEL", "W8A16")
"""Checkpoint formats (quant_algo names) a quantized linear can be written in."""

_SUPPORTED = (
    "FP8 (fp8), FP8_PER_CHANNEL_PER_TOKEN (fp8_pc_pt), NVFP4 (nvfp4), W4A16_NVFP4 (w4a16_nvfp4), "
    "W4A8_NVFP4_FP8 (w4a8_nvfp4_fp8), W4A16_AWQ (int4 blocks, no activation quantization), "
    "W4A8_AWQ (int4 blocks + FP8 activations), W8A8_SQ_PER_CHANNEL (int8), W8A16 (int8_wo)"
)


class ExportError(ValueError):
    """The model cannot be written in the requested checkpoint format."""


def _on(q: Optional[TensorQuantizer]) -> Optional[TensorQuantizer]:
    return q if isinstance(q, TensorQuantizer) and q.is_enabled else None


def _kind(q: Optional[TensorQuantizer]) -> Optional[str]:
    """A short name of a quantizer's format and granularity (None when off)."""
    if q is None:
        return None
    f = q.fmt
    blocks = f.blocks
    if f.name == "nvfp4" or (f.scale is E4M3 and f.element.name == "e2m1"):
        return f"nvfp4/{blocks.get(-1) or blocks.get(1)}" + ("/fp8-global" if f.global_fp8 else "")
    if f.name == "fp8_e4m3":
        if f.block_sizes and list(blocks) == [-1] and blocks[-1] is None:
            return "fp8/token"
        if f.axis == (0,):
            return "fp8/channel"
        if f.axis is None and not f.block_sizes:
            return "fp8/tensor"
    if isinstance(f.element, IntFormat) and not f.element.unsigned and not f.element.frac_bits:
        bits = f.element.bits
        if bits == 8 and f.axis == (0,):
            return "int8/channel"
        if bits == 8 and f.axis is None and not f.block_sizes:
            return "int8/tensor"
        if bits == 4 and f.block_sizes and list(blocks) == [-1] and blocks[-1] and f.scale is None:
            return "int4/block"
    return f"{f.name} {f.granularity}"


_TABLE = {
    ("fp8/tensor", "fp8/tensor"): "FP8",
    ("fp8/channel", "fp8/token"): "FP8_PER_CHANNEL_PER_TOKEN",
    ("nvfp4/16", "nvfp4/16"): "NVFP4",
    ("nvfp4/16", None): "W4A16_NVFP4",
    ("nvfp4/32/fp8-global", "fp8/tensor"): "W4A8_NVFP4_FP8",
    ("int4/block", None): "W4A16_AWQ",
    ("int4/block", "fp8/tensor"): "W4A8_AWQ",
    ("int8/channel", "int8/tensor"): "W8A8_SQ_PER_CHANNEL",
    ("int8/channel", None): "W8A16",
}


def layer_algo(name: str, module: nn.Module) -> Optional[str]:
    """The checkpoint format of a quantized layer; None when it is not quantized (excluded)."""
    w = _on(getattr(module, "weight_quantizer", None))
    i = _on(getattr(module, "input_quantizer", None))
    if w is None and i is None:
        return None
    if w is None:
        raise ExportError(f"layer {name!r}: its input is quantized ({i.extra_repr()}) but its weight is not; "
                          f"checkpoint formats quantize weights. Supported: {_SUPPORTED}")
    key = (_kind(w), _kind(i))
    algo = _TABLE.get(key)
    if algo is None:
        raise ExportError(f"layer {name!r}: weight {w.extra_repr()!r} with input "
                          f"{i.extra_repr() if i else 'not quantized'!r} has no checkpoint format. "
                          f"Supported: {_SUPPORTED}")
    if i is not None and algo != "FP8_PER_CHANNEL_PER_TOKEN" and (not i.uses_static_amax or i.amax is None):
        raise ExportError(f"layer {name!r}: the input quantizer has no calibrated amax ({i.extra_repr()}); "
                          "static activation scales need calibration with a forward loop")
    if w.pre_quant_scale is not None:
        raise ExportError(f"layer {name!r}: pre_quant_scale belongs on the input quantizer, not the weight quantizer")
    return algo


def float_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in]`` (transformers' Conv1D stores ``[in, out]``, quantized or not)."""
    w = module.weight.detach()
    conv1d = getattr(module, "weight_axis_last", False) or type(module).__name__ == "Conv1D"
    return w.t() if conv1d else w


@dataclass
class GroupValues:
    """Values every member of a fused group (q/k/v, gate/up) must share."""

    input_amax: Optional[torch.Tensor] = None
    weight_amax: Optional[torch.Tensor] = None  # per-tensor / global weight amax (FP8, NVFP4)
    pre_quant_scale: Optional[torch.Tensor] = None
    weight_scale_2: Optional[torch.Tensor] = None  # W4A8 AWQ: max |code * scale| / 448 over the group


def _weight_amax(q: TensorQuantizer, shared: GroupValues) -> Optional[torch.Tensor]:
    """The per-tensor/channel/block amax, or for two-level formats the global one (the group's when fused)."""
    if shared.weight_amax is not None:
        return shared.weight_amax
    if q.fmt.amax_is_global:
        return q.effective_global_amax()
    return q.amax if q.uses_static_amax else None


def quantize_weight(module: nn.Module, shared: GroupValues) -> QuantizedTensor:
    q = module.weight_quantizer
    w = float_weight(module)
    resmooth = _resmooth_factor(module, shared)
    glob = None
    if resmooth is not None:
        # Smoothing scales unified after calibration: block amaxes no longer fit, only the global does.
        w = (w.float() * resmooth).to(w.dtype)
        amax = None if q.fmt.scale is None and q.fmt.block_sizes else _weight_amax(q, shared)
    elif q.fmt.amax_is_global and q.amax is not None and q.amax.numel() > 1:
        amax, glob = q.amax, _weight_amax(q, shared)  # static per-block amaxes under the (shared) global
    else:
        amax = _weight_amax(q, shared)
    with torch.no_grad():
        return quantize(w, q.fmt, None if amax is None else amax.to(w.device),
                        None if glob is None else glob.to(w.device))


def _resmooth_factor(module: nn.Module, shared: GroupValues) -> Optional[torch.Tensor]:
    """Per-input-column factor s_own / s_shared when a group's smoothing scales had to be unified."""
    own = module.input_quantizer.pre_quant_scale
    if shared.pre_quant_scale is None or own is None or torch.equal(own, shared.pre_quant_scale):
        return None
    return (own.float() / shared.pre_quant_scale.float()).reshape(1, -1)


def _scalar(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().reshape(()).clone()


def export_linear(module: nn.Module, algo: str, shared: Optional[GroupValues] = None,
                  dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear (HF suffixes), computed from a copy."""
    shared = shared or GroupValues()
    dtype = dtype or module.weight.dtype
    qt = quantize_weight(module, shared)
    iq = module.input_quantizer
    out: Dict[str, torch.Tensor] = {}
    if algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W8A8_SQ_PER_CHANNEL", "W8A16"):
        out["weight"] = qt.codes
        scale = dequant_scale(qt.amax, qt.fmt.element)
        out["weight_scale"] = _scalar(scale) if algo == "FP8" else scale.reshape(-1).float().clone()
    elif algo in ("NVFP4", "W4A16_NVFP4", "W4A8_NVFP4_FP8"):
        out["weight"] = pack_nibbles_last(qt.codes)
        out["weight_scale"] = qt.block_scale
        out["weight_scale_2"] = _scalar(qt.global_scale)
    elif algo in ("W4A16_AWQ", "W4A8_AWQ"):
        out["weight"] = pack_int4_rows(qt.codes)
        out["weight_scale"] = dequant_scale(qt.amax, qt.fmt.element).float().clone()
        if algo == "W4A8_AWQ":
            ws2 = shared.weight_scale_2 if shared.weight_scale_2 is not None else w4a8_weight_scale_2(qt)
            out["weight_scale_2"] = _scalar(ws2)
    else:
        raise ExportError(f"unknown checkpoint format {algo!r}")
    if algo not in ("W4A16_NVFP4", "W4A16_AWQ", "W8A16", "FP8_PER_CHANNEL_PER_TOKEN"):
        amax = shared.input_amax if shared.input_amax is not None else iq.amax
        out["input_scale"] = _scalar(input_scale(amax, iq.fmt))
    pqs = shared.pre_quant_scale if shared.pre_quant_scale is not None else iq.pre_quant_scale
    if pqs is not None:
        out["pre_quant_scale"] = pqs.detach().to(dtype).reshape(-1).clone()
    elif algo == "W8A8_SQ_PER_CHANNEL":
        out["pre_quant_scale"] = torch.ones(qt.codes.shape[1], dtype=dtype)
    return out


def input_scale(amax: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Static activation scale: amax / qmax, or amax / (6 * 448) for NVFP4's global scale."""
    amax = amax.detach().float()
    if fmt.scale is E4M3:
        return torch.where(amax <= 0, torch.ones_like(amax), amax / torch.full_like(amax, NVFP4_GLOBAL))
    s = dequant_scale(amax, fmt.element)
    return torch.where(s == 0, torch.ones_like(s), s)


def w4a8_weight_scale_2(qt: QuantizedTensor) -> torch.Tensor:
    """max |code * weight_scale| / 448 for one INT4 weight (W4A8 AWQ's second scale)."""
    deq = dequantize(QuantizedTensor(qt.codes, qt.fmt, torch.float32, amax=qt.amax))
    m = deq.abs().amax()
    ws2 = m / torch.tensor(FP8_MAX)
    ws2 = torch.where(m / ws2 > FP8_MAX, torch.nextafter(ws2, torch.tensor(float("inf"))), ws2)  # keep the ratio <= 448
    return torch.where(m > 0, ws2, torch.ones_like(m))


def dequantize_weight(tensors: Dict[str, torch.Tensor], algo: str, fmt: QuantFormat, dtype: torch.dtype) -> torch.Tensor:
    """Exported tensors back to the ``[out, in]`` weight the fake-quant layer computes with.

    `fmt` is the weight quantizer's format (block sizes). For AWQ and
    SmoothQuant this is the smoothed weight (the runtime multiplies the
    activation by ``pre_quant_scale``).
    """
    w, scale = tensors["weight"], tensors["weight_scale"]
    if algo in ("NVFP4", "W4A16_NVFP4", "W4A8_NVFP4_FP8"):
        qt = QuantizedTensor(unpack_nibbles_last(w), fmt, dtype, block_scale=scale.reshape(w.shape[0], -1),
                             global_scale=tensors["weight_scale_2"].float().reshape(()))
        return dequantize(qt)
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        codes = unpack_int4_rows(w)
    else:
        codes = w
    q = fmt.element.decode(codes).float()
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        block = fmt.blocks[-1]
        s = scale.float().repeat_interleave(block, dim=1)[:, : q.shape[1]]
    elif scale.numel() == 1:
        s = scale.float().reshape(())
    else:
        s = scale.float().reshape(-1, 1)
    return (q * s).to(dtype)


def kv_cache_algo(q: Optional[TensorQuantizer]) -> Optional[str]:
    """"FP8" or "NVFP4" for a calibrated KV-cache quantizer, None when off."""
    q = _on(q)
    if q is None:
        return None
    kind = _kind(q)
    if kind == "fp8/tensor":
        algo = "FP8"
    elif kind and kind.startswith("nvfp4/"):
        algo = "NVFP4"
    else:
        raise ExportError(f"KV-cache quantizer {q.name!r} ({q.extra_repr()}): checkpoints carry FP8 (per tensor) "
                          "or NVFP4 KV-cache scales only")
    if q.amax is None:
        raise ExportError(f"KV-cache quantizer {q.name!r} is not calibrated; run calibration with a forward loop")
    return algo


def kv_scale(q: TensorQuantizer) -> torch.Tensor:
    """k_scale / v_scale, float32 scalars: amax / 448 for FP8, amax / (6 * 448) for NVFP4."""
    amax = q.amax.detach().float().amax()
    bound = NVFP4_GLOBAL if q.fmt.scale is E4M3 else FP8_MAX
    return _scalar(torch.where(amax > 0, amax / torch.tensor(bound), torch.ones_like(amax)))


_NVFP4_BLOCKS = {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}}
_FP8_TENSOR = {"num_bits": "e4m3", "axis": None}


def algo_quantizers(algo: str, group_size: Optional[int] = None):
    """(weight, input) quantizer attributes that produce the checkpoint format `algo` (input None: off)."""
    g = group_size
    table = {
        "FP8": (_FP8_TENSOR, _FP8_TENSOR),
        "FP8_PER_CHANNEL_PER_TOKEN": ({"num_bits": "e4m3", "axis": 0},
                                      {"num_bits": "e4m3", "block_sizes": {-1: None, "type": "dynamic"}}),
        "NVFP4": (_NVFP4_BLOCKS, _NVFP4_BLOCKS),
        "W4A16_NVFP4": (_NVFP4_BLOCKS, None),
        "W4A8_NVFP4_FP8": ({"num_bits": "e2m1", "block_sizes": {-1: g or 32, "type": "dynamic", "scale_bits": "e4m3",
                                                             "global_scale": "fp8"}},
                           _FP8_TENSOR),
        "W4A16_AWQ": ({"num_bits": 4, "block_sizes": {-1: g or 128}}, None),
        "W4A8_AWQ": ({"num_bits": 4, "block_sizes": {-1: g or 128}}, _FP8_TENSOR),
        "W8A8_SQ_PER_CHANNEL": ({"num_bits": 8, "axis": 0}, {"num_bits": 8, "axis": None}),
        "W8A16": ({"num_bits": 8, "axis": 0}, None),
    }
    if algo not in table:
        raise ExportError(f"unknown quant_algo {algo!r}; known: {', '.join(table)}")
    return table[algo]
