"""The ONNX subgraphs of the quantization formats, NVFP4 foremost (the builder behind `onnx.py`).

* Constants (weights) are quantized once by the format code and stored as
  codes: INT8/FP8 under DequantizeLinear (per tensor or per channel), INT4
  and other blocks under a blocked DequantizeLinear (opset 21).
* Calibrated activations: QuantizeLinear -> DequantizeLinear, scale amax /
  qmax. In the portable flavour QuantizeLinear names its type with
  `output_dtype` and has no zero point, which keeps ONNX Runtime's CPU
  optimizer from two rewrites that change results: dropping a Relu in
  front of a FLOAT8 QuantizeLinear, and turning INT8 into UINT8 for
  kernels that saturate on AVX2; and an FP8 DequantizeLinear is followed by
  its saturation bound (a Clip that changes nothing), as ONNX Runtime would
  otherwise fuse FP8 DequantizeLinear -> MatMul into an integer kernel
  without FP8 support. The tensorrt flavour keeps the conventional form:
  zero points, DequantizeLinear feeding the GEMM.
* Scales from each input (per token, per block): ReduceMax(Abs), then fake
  quant's formula, q = round(x * qmax / amax), out = q * (amax / qmax).
* NVFP4 (E2M1 in blocks along the last axis, E4M3 block scales under a
  float32 global scale s2), two flavours. ``tensorrt``: weights are a
  FLOAT4E2M1 initializer under two DequantizeLinear nodes (the
  FLOAT8E4M3FN block scales dequantized by s2, then the blocked FP4 one;
  opset 23); activations go through TensorRT's
  ``trt::TRT_FP4DynamicQuantize`` and the same two DequantizeLinear. ONNX
  Runtime cannot run it. ``portable``: weights are E2M1 codes two per byte,
  unpacked by BitwiseAnd/BitShift and looked up in a 16-value table
  (Gather), scaled per block by DequantizeLinear(FP8 block scale, s2);
  activations are cut into blocks, the block scale rounded to E4M3 by a
  saturating Cast round trip and the elements to E2M1 by Round per binade.

Run-time subgraphs repeat the float32 arithmetic of `formats.fake_quant`
in its order, so they give the PyTorch fake-quant values.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from ..quantization.formats import (E2M1, E4M3, TINY_AMAX, Blocking, FloatFormat, IntFormat, QuantFormat, dequant_scale,
                                    quantize)
from ..quantization.formats.blocks import normalize_axes

FLAVOURS = ("portable", "tensorrt")
TRT_DOMAIN = "trt"

FLOAT8 = {"e4m3": TensorProto.FLOAT8E4M3FN, "e5m2": TensorProto.FLOAT8E5M2}


# ---------------------------------------------------------------- the graph builder
class Graph:
    """Adds nodes and initializers to an ONNX graph under fresh names (prefixed by `scope`)."""

    def __init__(self, graph):
        self.graph, self.scope, self.nodes, self.domains = graph, "", [], set()
        self.taken = {v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}
        self.taken |= {o for n in graph.node for o in (*n.output, n.name)}
        self._small: Dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        base = name = f"{self.scope}.{hint}" if self.scope else hint
        i = 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def const(self, value, hint: str = "") -> str:
        """An initializer (a TensorProto, array or float); small unnamed constants are shared."""
        if isinstance(value, TensorProto):
            t = value
        else:
            arr = np.asarray(value, dtype=np.float32) if isinstance(value, float) else np.asarray(value)
            if not hint and arr.size <= 16:
                key = (arr.dtype.str, arr.shape, arr.tobytes())
                if key not in self._small:
                    scope, self.scope = self.scope, ""
                    self._small[key] = self.const(numpy_helper.from_array(arr), "const")
                    self.scope = scope
                return self._small[key]
            t = numpy_helper.from_array(arr)
        t.name = self.fresh(hint or "const")
        self.graph.initializer.append(t)
        return t.name

    def int64(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: Sequence[str], outputs: int = 1, domain: str = "", **attrs):
        outs = [self.fresh(f"{op_type}_out") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), domain=domain,
                                           **attrs))
        if domain:
            self.domains.add(domain)
        return outs[0] if outputs == 1 else outs

    def annotate(self, name: str, elem_type: int) -> None:
        self.graph.value_info.append(helper.make_tensor_value_info(name, elem_type, None))


# ---------------------------------------------------------------- rounding and blocks
def round_to_grid(g, y: str, elem) -> str:
    """Round float32 `y` (already scaled) onto `elem`'s grid: nearest, ties to even, saturating."""
    if isinstance(elem, IntFormat):
        if elem.frac_bits:
            raise ValueError("fixed-point elements (MXINT8) are not exported")
        return g.op("Clip", [g.op("Round", [y]), g.const(float(elem.qmin_code)), g.const(float(elem.qmax_code))])
    top = elem.max_value
    yc = g.op("Clip", [y, g.const(-top), g.const(top)])
    if elem.name in FLOAT8:  # a saturating cast rounds to nearest even, subnormals included
        return g.op("Cast", [g.op("Cast", [yc], to=FLOAT8[elem.name])], to=TensorProto.FLOAT)
    # FP6/FP4: one Round per binade [2^e, 2^(e+1)), quantum 2^(e - mbits); subnormals share the lowest.
    mag = g.op("Abs", [yc])
    out = None
    for e in range(elem.emax, elem.min_exp - 1, -1):
        quantum = 2.0 ** (e - elem.mbits)
        r = g.op("Mul", [g.op("Round", [g.op("Mul", [yc, g.const(1.0 / quantum)])]), g.const(quantum)])
        out = r if out is None else g.op("Where", [g.op("Less", [mag, g.const(2.0 ** (e + 1))]), r, out])
    return out


def to_blocks(g, x: str, rank: int, k: int, block: int):
    """View `x` (static last dimension `k`) as [..., n_blocks, block], zero-padding the last axis.

    Returns the blocked value and a function that turns a blocked result back
    into the shape of `x`. Leading (batch, sequence) dimensions stay dynamic.
    """
    nb = -(-k // block)
    pad = nb * block - k
    if pad:
        x = g.op("Pad", [x, g.int64([0] * rank + [0] * (rank - 1) + [pad])])
    xb = g.op("Reshape", [x, g.int64([0] * (rank - 1) + [nb, block])])

    def restore(yb: str) -> str:
        y = g.op("Reshape", [yb, g.int64([0] * (rank - 1) + [nb * block])])
        if pad:
            y = g.op("Slice", [y, g.int64([0]), g.int64([k]), g.int64([-1])])
        return y

    return xb, restore


def last_axis_block(fmt: QuantFormat, rank: int) -> int:
    """The block size of a format blocked along the last axis only (anything else is refused)."""
    blocks = {(a % rank if rank else a): b for a, b in fmt.blocks.items()}
    if list(blocks) != [rank - 1] or blocks[rank - 1] is None:
        raise ValueError(f"{fmt.name} is exported with blocks along the last axis only, got {fmt.blocks}")
    return blocks[rank - 1]


def is_two_level(fmt: QuantFormat) -> bool:
    """E4M3 block scales under a global scale (NVFP4 and kin); compared by value, not identity."""
    return fmt.scale == E4M3 and isinstance(fmt.element, FloatFormat)


# ---------------------------------------------------------------- single-level: constants, calibrated activations
def _code_tensor(codes: torch.Tensor, elem) -> TensorProto:
    """Integer or FP8 codes as an initializer (INT4: two per byte, first element in the low nibble)."""
    if isinstance(elem, IntFormat) and not elem.frac_bits:
        arr = codes.numpy()
        if elem.bits != 4:
            return numpy_helper.from_array(arr.astype(np.uint8 if elem.unsigned else np.int8))
        nib = (arr.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
        nib = np.concatenate([nib, np.zeros(nib.size % 2, np.uint8)])
        kind = TensorProto.UINT4 if elem.unsigned else TensorProto.INT4
        return helper.make_tensor("", kind, list(codes.shape), (nib[0::2] | (nib[1::2] << 4)).tobytes(), raw=True)
    if isinstance(elem, FloatFormat) and elem.name in FLOAT8:
        raw = codes.contiguous().view(torch.uint8).numpy().tobytes()
        return helper.make_tensor("", FLOAT8[elem.name], list(codes.shape), raw, raw=True)
    raise ValueError(f"{elem.name} weights have no ONNX code type (INT8, INT4, FP8 and NVFP4 are exported)")


def quantized_constant(g: Graph, w: torch.Tensor, amax, fmt: QuantFormat, flavour: str, global_amax=None) -> str:
    """A constant quantized once: codes under DequantizeLinear (per tensor, channel or block).

    `global_amax`: NVFP4 static per-block amaxes under a global shared by a fused layer.
    """
    if is_two_level(fmt):
        return nvfp4_weight(g, w, amax, fmt, flavour, global_amax)
    qt = quantize(w, fmt, amax)
    codes = g.const(_code_tensor(qt.codes, fmt.element), "weight")
    attrs: Dict[str, int] = {}
    if fmt.block_sizes:
        blocking = Blocking(w.shape, fmt.blocks)
        scale = dequant_scale(qt.amax.reshape(blocking.scale_shape), fmt.element)
        axis = max(blocking.sizes)
        for a, size in blocking.sizes.items():  # 2D blocks: repeat the scales along the other blocked axes
            if a != axis:
                scale = scale.repeat_interleave(size, dim=a).narrow(a, 0, w.shape[a])
        attrs = {"axis": axis, "block_size": blocking.sizes[axis]}
    elif fmt.axis is not None:
        axes = normalize_axes(fmt.axis, w.dim())
        if len(axes) != 1:
            raise ValueError(f"per-channel scales over axes {fmt.axis} have no DequantizeLinear form")
        scale, attrs = dequant_scale(qt.amax.reshape(-1), fmt.element), {"axis": axes[0]}
    else:
        scale = dequant_scale(qt.amax.reshape(()), fmt.element)
    return g.op("DequantizeLinear", [codes, g.const(scale.numpy(), "weight_scale")], **attrs)


def static_qdq(g: Graph, x: str, rank: int, amax: torch.Tensor, fmt: QuantFormat, flavour: str) -> str:
    """A calibrated activation: QuantizeLinear -> DequantizeLinear with scale amax / qmax."""
    elem, attrs, keep = fmt.element, {}, [1] * rank
    if fmt.axis is not None:
        axes = normalize_axes(fmt.axis, rank)
        if len(axes) != 1:
            raise ValueError(f"per-channel scales over axes {fmt.axis} have no QuantizeLinear form")
        attrs, keep[axes[0]], amax = {"axis": axes[0]}, -1, amax.reshape(-1)
    else:
        amax = amax.reshape(())
    scale = dequant_scale(amax, elem)
    bound = scale.reshape(keep)
    if isinstance(elem, IntFormat) and elem.frac_bits:
        raise ValueError("fixed-point elements (MXINT8) are not exported")
    if isinstance(elem, FloatFormat) and elem.name not in FLOAT8:  # FP6/FP4 elements: the formula
        s = torch.where(scale == 0, torch.zeros_like(amax), torch.full_like(amax, elem.max_value) / amax)
        q = round_to_grid(g, g.op("Mul", [x, g.const(s.reshape(keep).numpy(), "input_multiplier")]), elem)
        return g.op("Mul", [q, g.const(bound.numpy(), "input_scale")])
    s_dq = g.const(scale.numpy(), "input_scale")
    s_q = s_dq if bool((scale > 0).all()) else g.const(torch.where(scale > 0, scale, 1.0).numpy(), "input_scale_q")
    if isinstance(elem, FloatFormat):
        code_type, lo, hi = FLOAT8[elem.name], -elem.max_value, elem.max_value
        clamp = flavour == "portable"  # see the module docstring
    else:
        code_type = TensorProto.UINT8 if elem.unsigned else TensorProto.INT8
        lo, hi = elem.qmin_code, elem.qmax_code
        clamp = (lo, hi) != ((0, 255) if elem.unsigned else (-128, 127))  # narrow range or fewer bits
    if flavour == "tensorrt":  # the zero point names the type, as TensorRT's Q/DQ patterns expect
        zp = g.const(helper.make_tensor("", code_type, list(scale.shape), bytes(scale.numel()), raw=True), "zero_point")
        y = g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, s_q, zp], **attrs), s_dq, zp], **attrs)
    else:
        q = g.op("QuantizeLinear", [x, s_q], output_dtype=code_type, **attrs)
        y = g.op("DequantizeLinear", [q, s_dq], **attrs)
    if not clamp:
        return y
    if scale.dim() == 0:
        return g.op("Clip", [y, g.const((scale * lo).numpy(), "input_min"), g.const((scale * hi).numpy(), "input_max")])
    y = g.op("Max", [y, g.const((bound * lo).numpy(), "input_min")])
    return g.op("Min", [y, g.const((bound * hi).numpy(), "input_max")])


# ---------------------------------------------------------------- single-level: scales from each input
def dynamic_quant(g, x: str, rank: int, k: int, fmt: QuantFormat) -> str:
    """amax from each input (per tensor, channel, token or block); fake quant's formula with standard ops."""
    restore = None
    if fmt.block_sizes:
        blocks = {a % rank: b for a, b in fmt.blocks.items()}
        if list(blocks) != [rank - 1]:
            raise ValueError(f"dynamic blocks are exported along the last axis only, got {fmt.blocks}")
        block = blocks[rank - 1] or k
        if block != k:
            x, restore = to_blocks(g, x, rank, k, block)
        amax = g.op("ReduceMax", [g.op("Abs", [x]), g.int64([-1])], keepdims=1)
    elif fmt.axis is not None:
        keep = normalize_axes(fmt.axis, rank)
        reduce = [d for d in range(rank) if d not in keep]
        amax = g.op("ReduceMax", [g.op("Abs", [x]), g.int64(reduce)], keepdims=1)
    else:
        amax = g.op("ReduceMax", [g.op("Abs", [x])], keepdims=0)
    qmax = g.const(float(fmt.element.max_value))
    tiny = g.op("LessOrEqual", [amax, g.const(TINY_AMAX)])
    zero = g.const(0.0)
    s = g.op("Where", [tiny, zero, g.op("Div", [qmax, amax])])
    scale = g.op("Where", [tiny, zero, g.op("Div", [amax, qmax])])
    y = g.op("Mul", [round_to_grid(g, g.op("Mul", [x, s]), fmt.element), scale])
    return restore(y) if restore else y


# ---------------------------------------------------------------- NVFP4 weights
def _fp4_tensor(codes: torch.Tensor) -> TensorProto:
    """E2M1 codes as a FLOAT4E2M1 initializer (two per byte, first element in the low nibble)."""
    flat = codes.reshape(-1).to(torch.uint8).numpy()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor("", TensorProto.FLOAT4E2M1, list(codes.shape), packed.tobytes(), raw=True)


def _fp8_tensor(values: torch.Tensor) -> TensorProto:
    raw = values.to(torch.float8_e4m3fn).contiguous().view(torch.uint8).numpy().tobytes()
    return helper.make_tensor("", TensorProto.FLOAT8E4M3FN, list(values.shape), raw, raw=True)


def nvfp4_weight(g, w: torch.Tensor, amax, fmt: QuantFormat, flavour: str, global_amax=None) -> str:
    """A constant weight quantized to a two-level format; returns its float32 dequantized value."""
    rank = w.dim()
    block = last_axis_block(fmt, rank)
    qt = quantize(w, fmt, amax, global_amax)
    s2 = g.const(qt.global_scale.float().reshape(()).numpy(), "weight_scale_2")
    sb = g.const(_fp8_tensor(qt.block_scale), "weight_scale")
    scale = g.op("DequantizeLinear", [sb, s2])  # float(sb) * s2, one per block
    if flavour == "tensorrt":
        if fmt.element != E2M1:
            raise ValueError(f"the tensorrt flavour exports E2M1 elements only, not {fmt.element.name}")
        codes = g.const(_fp4_tensor(qt.codes), "weight")
        return g.op("DequantizeLinear", [codes, scale], axis=-1, block_size=block)
    if fmt.element.code_bits != 4:
        raise ValueError(f"the portable flavour packs 4-bit elements only, not {fmt.element.name}")
    shape = list(w.shape)
    k = shape[-1]
    kp = k + k % 2
    codes = qt.codes.to(torch.uint8)
    if kp != k:
        codes = torch.nn.functional.pad(codes, (0, 1))
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).numpy()
    p = g.const(packed, "weight_packed")
    lo = g.op("BitwiseAnd", [p, g.const(np.array(15, np.uint8))])
    hi = g.op("BitShift", [p, g.const(np.array(4, np.uint8))], direction="RIGHT")
    pairs = g.op("Concat", [g.op("Unsqueeze", [lo, g.int64([-1])]), g.op("Unsqueeze", [hi, g.int64([-1])])], axis=-1)
    idx = g.op("Cast", [g.op("Reshape", [pairs, g.int64(shape[:-1] + [kp])])], to=TensorProto.INT64)
    table = fmt.element.decode(torch.arange(2 ** fmt.element.code_bits, dtype=torch.uint8)).numpy()
    vals = g.op("Gather", [g.const(table), idx])
    if kp != k:
        vals = g.op("Slice", [vals, g.int64([0]), g.int64([k]), g.int64([-1])])
    vb, restore = to_blocks(g, vals, rank, k, block)
    return restore(g.op("Mul", [vb, g.op("Unsqueeze", [scale, g.int64([-1])])]))


# ---------------------------------------------------------------- NVFP4 activations
def _global_scale(fmt: QuantFormat, amax: torch.Tensor, block: int) -> torch.Tensor:
    """s2 for a calibrated global amax, computed by the format code itself."""
    return quantize(torch.zeros(block), fmt, amax.float().reshape(())).global_scale.float().reshape(())


def _global_bound(fmt: QuantFormat) -> float:
    """The divisor of the global amax: qmax * 448, or 448 when element x block scale must fit FP8."""
    return E4M3.max_value if getattr(fmt, "global_fp8", False) else fmt.element.max_value * E4M3.max_value


def nvfp4_activation(g, x: str, rank: int, k: int, amax, fmt: QuantFormat, flavour: str) -> str:
    """Dynamic block quantization of float32 `x` (static last dimension `k`) to a two-level format.

    `amax` is the calibrated global amax (a tensor), or None to take it from
    each input. Returns the float32 fake-quantized value.
    """
    elem = fmt.element
    block = last_axis_block(fmt, rank)
    qmax = elem.max_value
    tiny = None
    if amax is not None:
        if float(amax.float().max()) <= TINY_AMAX:
            return g.op("Mul", [x, g.const(0.0)])
        s2_t = _global_scale(fmt, amax, block)
        s2 = g.const(s2_t.numpy(), "input_scale")
        qs2 = g.const((s2_t * qmax).numpy())
    else:
        gamax = g.op("ReduceMax", [g.op("Abs", [x])], keepdims=0)
        tiny = g.op("LessOrEqual", [gamax, g.const(TINY_AMAX)])
        s2 = g.op("Where", [tiny, g.const(1.0), g.op("Div", [gamax, g.const(_global_bound(fmt))])])
        qs2 = g.op("Mul", [s2, g.const(qmax)])
    if flavour == "tensorrt":
        if elem != E2M1:
            raise ValueError(f"the tensorrt flavour exports E2M1 elements only, not {elem.name}")
        xq, sx = g.op("TRT_FP4DynamicQuantize", [x, s2], outputs=2, domain=TRT_DOMAIN, axis=-1,
                      block_size=block, scale_type=TensorProto.FLOAT8E4M3FN)
        g.annotate(xq, TensorProto.FLOAT4E2M1)
        g.annotate(sx, TensorProto.FLOAT8E4M3FN)
        y = g.op("DequantizeLinear", [xq, g.op("DequantizeLinear", [sx, s2])], axis=-1, block_size=block)
    else:
        xb, restore = to_blocks(g, x, rank, k, block)
        bamax = g.op("ReduceMax", [g.op("Abs", [xb]), g.int64([-1])], keepdims=1)
        sb = round_to_grid(g, g.op("Min", [g.op("Div", [bamax, qs2]), g.const(E4M3.max_value)]), E4M3)
        sb = g.op("Where", [g.op("Equal", [sb, g.const(0.0)]), g.const(1.0), sb])
        eff = g.op("Mul", [sb, s2])
        q = round_to_grid(g, g.op("Div", [xb, eff]), elem)
        y = restore(g.op("Mul", [q, eff]))
    if tiny is not None:
        y = g.op("Where", [tiny, g.const(0.0), y])
    return y
