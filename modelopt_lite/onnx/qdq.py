"""Which tensors of an ONNX graph to quantize, and the QuantizeLinear/DequantizeLinear nodes that do it.

Quantized operators: MatMul, Gemm and Conv (top-level graph only).

* Activations (``int8``, ``fp8``): every float input of those operators that
  is not an initializer gets one QuantizeLinear -> DequantizeLinear pair,
  per tensor, symmetric (zero point 0), scale = amax / 127 (INT8) or
  amax / 448 (FLOAT8E4M3FN). A tensor read by several quantized operators
  is quantized once.
* Weights (float initializers: MatMul's B of rank 2, Gemm's B, Conv's W):
  codes stored as an initializer under a DequantizeLinear. ``int8`` and
  ``fp8``: per output channel (MatMul B[K, N]: axis 1; Gemm: axis 0 with
  transB, else 1; Conv W[O, I, ...]: axis 0), scale = amax / 127 or
  amax / 448. ``int4``: blocks along the input dimension (128, else the
  largest divisor of K up to 128; a whole row when that is below 32 and K
  is larger), scale = block amax / 7, DequantizeLinear with `block_size`.

Three ONNX Runtime 1.31 rewrites at its default optimization level break
FP8 graphs; the FP8 placement avoids them, and gives the same output at
the default level as with every optimization off:

* a Relu in front of a FLOAT8 QuantizeLinear is deleted (valid only for
  integer zero points at the bottom of the range): the pair of a Relu's
  output goes on the Relu's input instead, with the same scale (for a
  symmetric grid, relu(dq(q(x))) == dq(q(relu(x)))), so every reader of
  the Relu sees quantized values;
* DequantizeLinear(FLOAT8) on both inputs of a MatMul becomes
  MatMulIntegerToFloat, which rejects FLOAT8: activations dequantize with
  a float16 scale followed by a Cast to float32 (the scale is rounded up
  to a float16 value, and QuantizeLinear uses the same value);
* a QuantizeLinear after a Transpose/Reshape is propagated above it and
  the data movement then runs on FLOAT8, which the CPU kernels reject: the
  pair goes above such operators (Transpose, Reshape, Squeeze, Unsqueeze,
  Flatten, Identity move values without changing them, so the amax is the
  same), and their other readers see quantized values too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MODES", "QUANTIZABLE_OPS", "QuantPlan", "plan_quantization", "insert_qdq", "int4_block"]

MODES = ("int8", "fp8", "int4")
QUANTIZABLE_OPS = ("MatMul", "Gemm", "Conv")
OPSET = {"int8": 13, "fp8": 19, "int4": 21}
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)
_FP8_MAX = 448.0
_TINY = 1e-12


@dataclass
class WeightSite:
    node: int
    slot: int
    name: str
    out_axis: int
    in_axis: int


@dataclass
class QuantPlan:
    """The activations (tensor -> consumer edges) and weights to quantize, and the nodes involved."""

    mode: str
    activations: Dict[str, List[Tuple[int, int]]] = field(default_factory=dict)
    weights: List[WeightSite] = field(default_factory=list)
    nodes: Set[int] = field(default_factory=set)
    skipped: Dict[str, str] = field(default_factory=dict)

    def counts(self, model: onnx.ModelProto) -> Dict[str, int]:
        return dict(sorted(Counter(model.graph.node[i].op_type for i in self.nodes).items()))


def _elem_types(model: onnx.ModelProto) -> Dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model) if model.ByteSize() < 2**31 - 2**20 else model
    except Exception:  # a model onnx cannot infer still quantizes where the types are declared
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)
             if v.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _weight_axes(node: onnx.NodeProto, slot: int, rank: int) -> Optional[Tuple[int, int]]:
    """(output-channel axis, input axis) of a weight in `slot`, or None when it is not a weight slot."""
    if slot != 1:
        return None
    if node.op_type == "MatMul":
        return (1, 0) if rank == 2 else None
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return ((0, 1) if trans_b else (1, 0)) if rank == 2 else None
    if node.op_type == "Conv":
        return (0, 1) if rank >= 3 else None
    return None


def plan_quantization(model: onnx.ModelProto, mode: str, op_types_to_exclude: Sequence[str] = (),
                      nodes_to_exclude: Sequence[str] = ()) -> QuantPlan:
    """The tensors and weights `insert_qdq` will quantize in `mode`."""
    if mode not in MODES:
        raise ValueError(f"unknown quantize_mode {mode!r}; choose one of {', '.join(MODES)}")
    unknown = sorted(set(op_types_to_exclude) - set(QUANTIZABLE_OPS))
    if unknown:
        raise ValueError(f"op_types_to_exclude: {', '.join(unknown)} are not quantized anyway; "
                         f"the quantized operators are {', '.join(QUANTIZABLE_OPS)}")
    names = {n.name for n in model.graph.node}
    missing = sorted(set(nodes_to_exclude) - names)
    if missing:
        raise ValueError(f"nodes_to_exclude: no node named {', '.join(map(repr, missing))} in the graph")
    inits = {t.name: t for t in model.graph.initializer}
    types = _elem_types(model)
    plan = QuantPlan(mode)
    for index, node in enumerate(model.graph.node):
        if node.op_type not in QUANTIZABLE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in op_types_to_exclude or node.name in nodes_to_exclude:
            plan.skipped[node.name or f"#{index}"] = "excluded"
            continue
        slots = [0, 1]
        for slot in slots:
            if slot >= len(node.input) or not node.input[slot]:
                continue
            name = node.input[slot]
            if name in inits:
                w = inits[name]
                axes = _weight_axes(node, slot, len(w.dims))
                if axes is None or w.data_type not in _FLOATS:
                    plan.skipped[node.name or f"#{index}"] = f"constant input {name!r} is not a weight it can quantize"
                    continue
                plan.weights.append(WeightSite(index, slot, name, *axes))
                plan.nodes.add(index)
            elif mode != "int4":
                if types.get(name, TensorProto.FLOAT) not in _FLOATS:
                    continue
                plan.activations.setdefault(name, []).append((index, slot))
                plan.nodes.add(index)
    return plan


def int4_block(k: int) -> int:
    """The INT4 block length along an input dimension of `k`."""
    if k % 128 == 0:
        return 128
    best = max(d for d in range(1, min(k, 128) + 1) if k % d == 0)
    return k if best < 32 and k > 128 else best


class _Names:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.used = {n for node in g.node for n in list(node.input) + list(node.output)}
        self.used |= {t.name for t in g.initializer} | {v.name for v in g.input} | {n.name for n in g.node}

    def __call__(self, base: str) -> str:
        name, n = base, 1
        while name in self.used:
            name, n = f"{base}_{n}", n + 1
        self.used.add(name)
        return name


def _act_scale(amax: float, mode: str, half: bool) -> float:
    if mode == "int8":
        return max(amax, _TINY) / 127.0
    scale = max(amax, 1e-6) / _FP8_MAX
    if half:  # the smallest float16 value not below the scale: Q (float32) and DQ (float16) agree exactly
        s16 = np.float16(scale)
        if float(s16) < scale:
            s16 = np.nextafter(s16, np.float16(np.inf))
        scale = float(s16)
    return scale


def _weight_codes(w: np.ndarray, site: WeightSite, mode: str):
    """(codes tensor array, scale array, DequantizeLinear attributes)."""
    w = w.astype(np.float32)
    if mode == "int4":
        k = w.shape[site.in_axis]
        block = int4_block(k)
        moved = np.moveaxis(w, site.in_axis, -1)
        blocks = moved.reshape(moved.shape[:-1] + (k // block, block))
        amax = np.abs(blocks).max(-1)
        scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
        codes = np.clip(np.round(blocks / scale[..., None]), -8, 7).reshape(moved.shape)
        codes = np.moveaxis(codes, -1, site.in_axis).astype(ml_dtypes.int4)
        return codes, np.moveaxis(scale, -1, site.in_axis), {"axis": site.in_axis, "block_size": block}
    reduce = tuple(a for a in range(w.ndim) if a != site.out_axis)
    amax = np.abs(w).max(axis=reduce)
    bound = 127.0 if mode == "int8" else _FP8_MAX
    scale = np.where(amax > 0, amax / bound, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[site.out_axis] = -1
    scaled = w / scale.reshape(shape)
    if mode == "int8":
        codes = np.clip(np.round(scaled), -127, 127).astype(np.int8)
    else:
        codes = np.clip(scaled, -_FP8_MAX, _FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return codes, scale, {"axis": site.out_axis}


def insert_qdq(model: onnx.ModelProto, plan: QuantPlan, amax: Dict[str, float]) -> Dict[str, int]:
    """Quantize in place following `plan` with activation ranges `amax`; returns {"QuantizeLinear": n, ...} added."""
    g = model.graph
    name = _Names(model)
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    added: List[onnx.NodeProto] = []
    new_inits: List[TensorProto] = []
    rewire: Dict[Tuple[int, int], str] = {}
    types = _elem_types(model) if plan.activations else {}
    mode = plan.mode

    weight_done: Dict[str, str] = {}
    for site in plan.weights:
        key = f"{site.name}|{site.out_axis}|{site.in_axis}"
        if key not in weight_done:
            w = numpy_helper.to_array(inits[site.name])
            codes, scale, attrs = _weight_codes(w, site, mode)
            q_name = name(f"{site.name}_{mode}")
            s_name = name(f"{site.name}_scale")
            out = name(f"{site.name}_dequantized")
            new_inits.append(numpy_helper.from_array(codes, q_name))
            new_inits.append(numpy_helper.from_array(scale.astype(w.dtype), s_name))
            inputs = [q_name, s_name]
            if mode == "int8":
                z_name = name(f"{site.name}_zero_point")
                new_inits.append(numpy_helper.from_array(np.zeros(scale.shape, np.int8), z_name))
                inputs.append(z_name)
            added.append(helper.make_node("DequantizeLinear", inputs, [out], name=name(f"{site.name}_DequantizeLinear"),
                                          **attrs))
            weight_done[key] = out
        rewire[(site.node, site.slot)] = weight_done[key]

    edits: List[Tuple[onnx.NodeProto, int, str]] = [(g.node[n], s, new) for (n, s), new in rewire.items()]
    for t, edges in plan.activations.items():
        a = amax.get(t)
        if a is None:
            raise ValueError(f"no calibrated amax for tensor {t!r}")
        dtype = types.get(t, TensorProto.FLOAT)
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        targets = [(g.node[n], s) for n, s in edges]
        source = t
        if mode == "fp8":
            source, targets = _fp8_anchor(t, targets, producer, inits)
        half = mode == "fp8" and dtype == TensorProto.FLOAT
        scale = _act_scale(a, mode, half)
        s_name, z_name = name(f"{t}_scale"), name(f"{t}_zero_point")
        q_out, dq_out = name(f"{t}_quantized"), name(f"{t}_dequantized")
        new_inits.append(numpy_helper.from_array(np.array(scale, dtype=np_dtype), s_name))
        if mode == "int8":
            new_inits.append(numpy_helper.from_array(np.array(0, np.int8), z_name))
        else:
            new_inits.append(numpy_helper.from_array(np.array(0, np.float32).astype(ml_dtypes.float8_e4m3fn), z_name))
        added.append(helper.make_node("QuantizeLinear", [source, s_name, z_name], [q_out],
                                      name=name(f"{t}_QuantizeLinear")))
        if half:
            s16, h16 = name(f"{t}_scale_fp16"), name(f"{t}_dequantized_fp16")
            new_inits.append(numpy_helper.from_array(np.array(scale, np.float16), s16))
            added.append(helper.make_node("DequantizeLinear", [q_out, s16, z_name], [h16],
                                          name=name(f"{t}_DequantizeLinear")))
            added.append(helper.make_node("Cast", [h16], [dq_out], to=TensorProto.FLOAT, name=name(f"{t}_Cast")))
        else:
            added.append(helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out],
                                          name=name(f"{t}_DequantizeLinear")))
        edits.extend((node, slot, dq_out) for node, slot in targets)

    for node, slot, new in edits:
        node.input[slot] = new
    g.initializer.extend(new_inits)
    _prepend(model, added)
    _drop_unused(model)
    return dict(Counter(n.op_type for n in added))


_MOVEMENT = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity")


def _fp8_anchor(t: str, targets, producer, inits):
    """Where an FP8 pair goes: above data-movement operators and above a Relu (see the module notes)."""
    seen = set()
    while t in producer and t not in seen:
        seen.add(t)
        p = producer[t]
        if p.domain not in ("", "ai.onnx") or not p.input or p.input[0] in inits:
            break
        if p.op_type in _MOVEMENT:
            t, targets = p.input[0], [(p, 0)]
            continue
        if p.op_type == "Relu":
            t, targets = p.input[0], [(p, 0)]
        break
    return t, targets


def _prepend(model: onnx.ModelProto, added: List[onnx.NodeProto]) -> None:
    """Add `added` and order every node topologically (the new nodes read tensors produced anywhere)."""
    g = model.graph
    nodes = list(g.node) + added
    produced = {o for n in nodes for o in n.output}
    available = set()
    pending = nodes
    order: List[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(x in available or x not in produced for x in node.input):
                order.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError("the graph has a cycle; cannot order the quantized graph")
        pending = rest
    g.ClearField("node")
    g.node.extend(order)


def _drop_unused(model: onnx.ModelProto) -> None:
    """Remove the initializers (and their graph-input entries) no node reads any more."""
    g = model.graph
    used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= {x for sub in a.g.node for x in sub.input}
    dropped = {t.name for t in g.initializer if t.name not in used}
    if not dropped:
        return
    keep = [t for t in g.initializer if t.name not in dropped]
    g.ClearField("initializer")
    g.initializer.extend(keep)
    inputs = [v for v in g.input if v.name not in dropped]
    if len(inputs) != len(g.input):
        g.ClearField("input")
        g.input.extend(inputs)
