"""ONNX export of fake-quantized models.

    from modelopt_lite.export.onnx import check_onnx, export_onnx
    export_onnx(model, {"input_ids": ids, "attention_mask": mask}, "model.onnx")
    check_onnx(model, "model.onnx", other_inputs)  # {"max_abs_diff": ..., "cosine": ..., ...}

A deep copy of the model goes through ``torch.onnx.export(dynamo=True)``,
which translates the fake-quant custom op into a placeholder node that
keeps its input, its amax and its format. Each placeholder is then
replaced by a subgraph of standard operators (`onnx_nvfp4` builds them):
codes under DequantizeLinear when its input is a constant (a weight),
QuantizeLinear -> DequantizeLinear for a calibrated activation, the fake
quant formula for scales taken from each input, and NVFP4 in the flavour
asked for. A pre_quant_scale stays the Mul in front of its quantizer.
The file gets the opset's own IR version (21 -> 10, 23 -> 11), passes
onnx.checker and is written atomically.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import inspect
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("ONNX export needs the onnx extra: pip install 'modelopt_lite[onnx]'") from e

from ..quantization.formats import E8M0
from ..quantization.ops import format_from_spec
from ..quantization.tensor_quantizer import TensorQuantizer
from ..utils.fs import atomic_file
from . import onnx_nvfp4 as subgraphs
from .layers import ExportError

__all__ = ["export_onnx", "check_onnx", "NVFP4_FLAVOURS"]

NVFP4_FLAVOURS = subgraphs.FLAVOURS
_DOMAIN, _PLACEHOLDER = "modelopt_lite.export", "FakeQuant"
_MAX_DIM = 1 << 16


# ---------------------------------------------------------------- inputs and outputs
def _split_inputs(inputs) -> Tuple[tuple, Dict[str, torch.Tensor]]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise TypeError(f"inputs must be a tensor, a tuple of tensors or a dict of tensors, got {type(inputs).__name__}")


def _flatten(out, prefix: str = "") -> Tuple[List[str], List[torch.Tensor]]:
    """The output tensors in order, named by their keys (a Hugging Face output's fields) or positions."""
    if isinstance(out, torch.Tensor):
        return [prefix or "output"], [out]
    if isinstance(out, dict):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(f"{prefix or 'output'}_{i}", v) for i, v in enumerate(out)]
    else:
        return [], []
    names, tensors = [], []
    for key, value in items:
        n, t = _flatten(value, key)
        names, tensors = names + n, tensors + t
    return (["output"] if names == ["output_0"] else names), tensors


class _Flat(nn.Module):
    """Calls the model with positional then keyword inputs and returns its output tensors as a tuple.

    A decoder's cache is turned off, so the outputs are the model's values.
    """

    def __init__(self, model: nn.Module, n_args: int, keys: Sequence[str]):
        super().__init__()
        self.model, self.n_args, self.keys = model, n_args, list(keys)
        params = inspect.signature(model.forward).parameters
        self.no_cache = "use_cache" not in self.keys and (
            "use_cache" in params or hasattr(getattr(model, "config", None), "use_cache"))
        self.output_names: List[str] = []

    def forward(self, *flat):
        kwargs = dict(zip(self.keys, flat[self.n_args:]))
        if self.no_cache:
            kwargs["use_cache"] = False
        self.output_names, tensors = _flatten(self.model(*flat[:self.n_args], **kwargs))
        return tuple(tensors)


def _default_input_names(model: nn.Module, n_args: int, keys: Sequence[str]) -> List[str]:
    params = [p.name for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [params[i] if i < len(params) else f"input_{i}" for i in range(n_args)] + list(keys)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


# ---------------------------------------------------------------- torch export
def _placeholder_op():
    """An onnxscript op for the placeholder, whose schema is registered on first use."""
    try:
        import onnxscript
    except ImportError:
        raise ImportError("torch's ONNX exporter needs onnxscript: pip install 'modelopt_lite[onnx]'") from None
    if not onnx.defs.has(_PLACEHOLDER, _DOMAIN):
        schema = onnx.defs.OpSchema
        param, optional = schema.FormalParameter, schema.FormalParameterOption.Optional
        floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
        onnx.defs.register_schema(schema(
            _PLACEHOLDER, _DOMAIN, 1, inputs=[param("x", "T"), param("amax", "A", param_option=optional),
                                              param("global_amax", "A", param_option=optional)],
            outputs=[param("y", "T")], type_constraints=[("T", floats, ""), ("A", floats, "")],
            attributes=[schema.Attribute("spec", schema.AttrType.STRING, "the format as JSON")]))
    return getattr(onnxscript.values.Opset(_DOMAIN, 1), _PLACEHOLDER)


def _dynamic_shapes(flat, names: List[str], dynamic_axes, auto: bool):
    """torch.export dynamic shapes: dims 0 ("batch") and 1 ("seq"), or {input: {axis: name}}."""
    from torch.export import Dim

    if dynamic_axes is True:
        wanted = {n: {a: ("batch", "seq")[a] for a in range(min(t.dim(), 2))} for n, t in zip(names, flat)}
    else:
        wanted = {n: dict(v) if isinstance(v, dict) else {int(a): f"{n}_{a}" for a in v}
                  for n, v in dynamic_axes.items()}
        if set(wanted) - set(names):
            raise ValueError(f"dynamic_axes names unknown inputs {sorted(set(wanted) - set(names))}; inputs: {names}")
    dims: Dict[str, Any] = {}
    spec = []
    for n in names:
        axes = wanted.get(n, {})
        spec.append({a: Dim.AUTO if auto else dims.setdefault(d, Dim(d, min=1, max=_MAX_DIM))
                     for a, d in axes.items()} or None)
    return (tuple(spec),)


def _torch_export(wrapper: _Flat, flat: tuple, names: List[str], dynamic_axes, opset: int):
    op = _placeholder_op()

    def translate(x, amax=None, spec: str = ""):
        return op(x, amax, spec=spec)

    def translate_blocks(x, block_amax, global_amax, spec: str = ""):
        return op(x, block_amax, global_amax, spec=spec)

    def run(shapes):
        with warnings.catch_warnings():  # inputs sharing "batch"/"seq" is what we ask for
            warnings.filterwarnings("ignore", message=r".*axis name: \w+ will not be used")
            return torch.onnx.export(
                wrapper, flat, dynamo=True, opset_version=opset, verbose=False, dynamic_shapes=shapes,
                custom_translation_table={torch.ops.modelopt_lite.fake_quant.default: translate,
                                          torch.ops.modelopt_lite.fake_quant_blocks.default: translate_blocks}).model_proto

    if not dynamic_axes:
        return run(None)
    try:
        return run(_dynamic_shapes(flat, names, dynamic_axes, auto=False))
    except Exception as named_error:  # let torch.export keep what it can dynamic
        try:
            return run(_dynamic_shapes(flat, names, dynamic_axes, auto=True))
        except Exception:
            raise named_error from None


# ---------------------------------------------------------------- lowering the placeholders
def _lower_one(g: subgraphs.Graph, node, consts, types, flavour: str) -> str:
    spec = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "spec")
    fmt = format_from_spec(spec.decode() if isinstance(spec, bytes) else spec)
    if fmt.scale == E8M0:
        raise ValueError(f"{fmt.name} (E8M0 block scales) has no ONNX export")
    x = node.input[0]
    amax_name = node.input[1] if len(node.input) > 1 else ""
    amax = consts(amax_name) if amax_name else None
    if amax_name and amax is None:
        raise ValueError("its amax is not a constant of the graph")
    glob_name = node.input[2] if len(node.input) > 2 else ""
    glob = consts(glob_name) if glob_name else None  # NVFP4 per-block amaxes under a shared global
    if glob_name and glob is None:
        raise ValueError("its global amax is not a constant of the graph")
    elem_type, dims = types.get(x, (TensorProto.FLOAT, None))
    w = consts(x)
    if w is not None:
        y = subgraphs.quantized_constant(g, w, amax, fmt, flavour, glob)
    else:
        if not dims:
            raise ValueError(f"input {x!r} needs a known rank")
        per_tensor = amax is not None and not fmt.block_sizes and not subgraphs.is_two_level(fmt)
        if not per_tensor and not isinstance(dims[-1], int):  # blocks and dynamic scales reshape by it
            raise ValueError(f"input {x!r} needs a static last dimension for {fmt.name} {fmt.granularity}")
        xf = x if elem_type == TensorProto.FLOAT else g.op("Cast", [x], to=TensorProto.FLOAT)
        rank, k = len(dims), dims[-1]
        if subgraphs.is_two_level(fmt):
            y = subgraphs.nvfp4_activation(g, xf, rank, k, amax, fmt, flavour)
        elif amax is None:
            y = subgraphs.dynamic_quant(g, xf, rank, k, fmt)
        elif fmt.block_sizes:
            raise ValueError("static per-block activation scales have no form with dynamic shapes")
        else:
            y = subgraphs.static_qdq(g, xf, rank, amax, fmt, flavour)
    return y if elem_type == TensorProto.FLOAT else g.op("Cast", [y], to=elem_type)


def _scope(node) -> str:
    """The quantizer's module path: from the exporter's name scopes, else its amax buffer, else the output."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            with contextlib.suppress(ValueError, SyntaxError):
                scopes = ast.literal_eval(p.value)
                if len(scopes) >= 2 and scopes[-2]:
                    return scopes[-2].removeprefix("model.")
    if len(node.input) > 1 and node.input[1].endswith("._amax"):
        return node.input[1][: -len("._amax")].removeprefix("model.")
    return node.output[0]


def _lower(proto, flavour: str) -> None:
    """Replace every placeholder by its quantization subgraph, in place."""
    graph = proto.graph
    tensors = {t.name: t for t in graph.initializer}
    tensors.update({n.output[0]: n.attribute[0].t for n in graph.node
                    if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    types = {name: (t.data_type, list(t.dims)) for name, t in tensors.items()}
    for v in (*graph.input, *graph.value_info, *graph.output):
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
        types[v.name] = (tt.elem_type, dims if tt.HasField("shape") else None)

    def consts(name: str) -> Optional[torch.Tensor]:
        if name not in tensors:
            return None
        arr = numpy_helper.to_array(tensors[name])
        if arr.dtype.kind not in "fiu":  # bfloat16 (ml_dtypes)
            return torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(arr.copy())

    g = subgraphs.Graph(graph)
    nodes, replaced = [], set()
    for node in graph.node:
        if node.domain != _DOMAIN:
            nodes.append(node)
            continue
        g.scope, g.nodes = _scope(node), []
        try:
            result = _lower_one(g, node, consts, types, flavour)
        except ValueError as e:
            raise ExportError(f"{g.scope}: {e}") from None
        for n in g.nodes:  # the last value takes the placeholder's output name
            n.output[:] = [node.output[0] if o == result else o for o in n.output]
            n.input[:] = [node.output[0] if i == result else i for i in n.input]
        nodes += g.nodes
        replaced.update(node.input)
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output[0] in replaced and n.output[0] not in used)]
    inits = [t for t in graph.initializer if t.name not in replaced or t.name in used]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(inits)
    opsets = [o for o in proto.opset_import if o.domain != _DOMAIN]
    proto.ClearField("opset_import")
    proto.opset_import.extend(opsets)
    for d in sorted(g.domains):
        proto.opset_import.add(domain=d, version=1)


def _set_names(graph, names: List[str]) -> None:
    """Name the graph inputs then outputs, and drop the wrapper's "model." from initializer names."""
    if len(set(names)) != len(names):
        raise ValueError(f"input and output names must be unique, got {names}")
    io = [v.name for v in (*graph.input, *graph.output)]
    mapping = dict(zip(io, names))
    others = [t.name for t in graph.initializer] + [o for n in graph.node for o in n.output]
    taken = set(names) | set(others) | set(io)
    for name in others:
        if name in mapping:
            continue
        new = name[len("model."):] if name.startswith("model.") and name[len("model."):] not in taken else name
        if new in names:  # a value already holds a wanted name
            new = f"{name}_{len(taken)}"
        if new != name:
            mapping[name] = new
            taken.add(new)
    for n in graph.node:
        n.input[:] = [mapping.get(i, i) for i in n.input]
        n.output[:] = [mapping.get(o, o) for o in n.output]
    for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        v.name = mapping.get(v.name, v.name)


def _needed_opset(model: nn.Module, flavour: str) -> int:
    """21 (blocked DequantizeLinear, QuantizeLinear output_dtype); 23 for FLOAT4E2M1 weights."""
    two_level = False
    for name, q in model.named_modules():
        if isinstance(q, TensorQuantizer) and q.is_enabled:
            if q.fmt.scale == E8M0:
                raise ExportError(f"{name}: {q.fmt.name} (E8M0 block scales) has no ONNX export")
            two_level |= subgraphs.is_two_level(q.fmt)
    return 23 if two_level and flavour == "tensorrt" else 21


# ---------------------------------------------------------------- public API
def export_onnx(model: nn.Module, example_inputs, path: Union[str, os.PathLike], *, nvfp4_flavour: str = "portable",
                opset: Optional[int] = None, dynamic_axes: Union[bool, Dict[str, Any]] = True,
                input_names: Optional[Sequence[str]] = None, output_names: Optional[Sequence[str]] = None,
                overwrite: bool = False) -> Path:
    """Write the fake-quantized `model` as an ONNX file; returns its path.

    `example_inputs`: a tensor, a tuple of tensors or a dict of keyword
    tensors (Hugging Face: input_ids, attention_mask); outputs are flattened
    (BERT: last_hidden_state, pooler_output; a decoder runs without cache).
    `nvfp4_flavour`: "portable" (standard operators that ONNX Runtime runs)
    or "tensorrt" (FLOAT4E2M1 weights, TRT_FP4DynamicQuantize, opset 23;
    FP8 DequantizeLinear feeds GEMMs directly, which ONNX Runtime's CPU
    provider cannot run).
    `opset`: at least 21 (23 for the tensorrt flavour of NVFP4), which is
    the default. `dynamic_axes`: True makes dims 0 ("batch") and 1 ("seq")
    of every input dynamic, {input: {axis: name}} chooses, False keeps the
    example shapes. The model is not changed (a copy is exported); an
    existing `path` is refused unless `overwrite`; the file appears whole or
    not at all.
    """
    if nvfp4_flavour not in NVFP4_FLAVOURS:
        raise ValueError(f"nvfp4_flavour must be one of {NVFP4_FLAVOURS}, got {nvfp4_flavour!r}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    args, kwargs = _split_inputs(example_inputs)
    flat = args + tuple(kwargs.values())
    if not all(isinstance(t, torch.Tensor) for t in flat):
        raise TypeError("every example input must be a tensor")
    needed = _needed_opset(model, nvfp4_flavour)
    opset = needed if opset is None else int(opset)
    if not needed <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset {opset} is out of range: this model needs {needed} to "
                         f"{onnx.defs.onnx_opset_version()} (the installed onnx)")
    in_names = list(input_names) if input_names is not None else _default_input_names(model, len(args), kwargs)
    if len(in_names) != len(flat):
        raise ValueError(f"{len(in_names)} input names for {len(flat)} inputs")

    wrapper = _Flat(copy.deepcopy(model), len(args), list(kwargs)).eval()
    with torch.no_grad():
        wrapper(*flat)  # names the outputs
    proto = _torch_export(wrapper, flat, in_names, dynamic_axes, opset)
    if next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) != opset:
        raise ExportError(f"torch.onnx.export did not write opset {opset}")
    _lower(proto, nvfp4_flavour)
    out_names = list(output_names) if output_names is not None else wrapper.output_names
    if len(in_names) != len(proto.graph.input) or len(out_names) != len(proto.graph.output):
        raise ValueError(f"the graph has {len(proto.graph.input)} inputs and {len(proto.graph.output)} outputs; "
                         f"names given: {in_names}, {out_names}")
    _set_names(proto.graph, in_names + out_names)
    proto.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    proto.producer_name = "modelopt_lite"
    helper.set_model_props(proto, {"modelopt_lite.nvfp4_flavour": nvfp4_flavour})
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    with atomic_file(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return path


def check_onnx(model: nn.Module, path: Union[str, os.PathLike], inputs, *,
               providers: Sequence[str] = ("CPUExecutionProvider",),
               session_config: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run the ONNX file in ONNX Runtime on `inputs` and compare it with `model` (run in eval mode).

    Returns {"outputs": n, "names": [...], "max_abs_diff", "max_rel_diff"
    (the largest |difference| over the output's largest |value|, worst
    output), "cosine" (lowest over the outputs)}. The session has ONNX
    Runtime's defaults plus `session_config` entries. Note that by default
    ONNX Runtime runs DequantizeLinear(INT4/INT8 weight) -> MatMul as
    MatMulNBits with int8 activations ("session.qdq_matmulnbits_accuracy_level"
    "4"); "1" computes in float32.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), options, providers=list(providers))
    args, kwargs = _split_inputs(inputs)
    flat = args + tuple(kwargs.values())
    metas = session.get_inputs()
    if len(metas) != len(flat):
        raise ValueError(f"the ONNX model takes {len(metas)} inputs, got {len(flat)}")
    feeds = {k: v for k, v in kwargs.items() if k in {m.name for m in metas}}
    for meta, t in zip(metas, flat):
        feeds.setdefault(meta.name, t)
    got = session.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})
    with torch.no_grad(), _eval_mode(model):
        ref = _Flat(model, len(args), list(kwargs))(*flat)
    if len(ref) != len(got):
        raise ValueError(f"the ONNX model has {len(got)} outputs, the model {len(ref)}")
    abs_d, rel_d, cos = 0.0, 0.0, 1.0
    for r, o in zip(ref, got):
        r = r.detach().cpu().double().numpy().reshape(-1)
        o = np.asarray(o, dtype=np.float64).reshape(-1)
        d = float(np.abs(r - o).max()) if r.size else 0.0
        abs_d, rel_d = max(abs_d, d), max(rel_d, d / max(float(np.abs(r).max(initial=0.0)), 1e-30))
        norm = float(np.linalg.norm(r) * np.linalg.norm(o))
        cos = min(cos, float(r @ o) / norm if norm else float(d == 0.0))
    return {"outputs": len(got), "names": [o.name for o in session.get_outputs()],
            "max_abs_diff": abs_d, "max_rel_diff": rel_d, "cosine": cos}
