"""ONNX export of plugins: each plugin op becomes one node of its own domain.

    from modelopt_lite.plugins.onnx import export_onnx, translation_table
    program = torch.onnx.export(model, args, dynamo=True, custom_translation_table=translation_table())
    # or: export_onnx(model, args, "model.onnx")

The node's op type is the plugin name, its domain the plugin class's ``domain`` (default
``modelopt_lite.plugins``, version 1, which the model's opset_import lists), its inputs the op's tensors and
its attributes the plugin's ``__init__`` arguments, typed: int (bools as 0/1), float, string. An ONNX schema is
registered for the node on first export (variadic inputs, ``num_outputs`` outputs, any tensor types) so
that onnxscript can build it. Its type and shape inference runs the plugin's ``shape_dtype_inference`` on the ONNX input types,
with symbolic dimensions as sympy symbols (a computed size becomes a ``dim_param`` naming the expression), so
``onnx.shape_inference`` and the exporter's optimizer keep the output types. ``export_onnx`` also restores the
traced output types of plugin nodes after optimizing, should inference give up (it then leaves them unset).
A runtime needs its own kernel for the domain to run the model.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

import torch

from .base import PluginError, attribute_types, get_plugin, parse_attributes, plugin_op, registered_plugins

__all__ = ["translation_table", "export_onnx", "onnx_attribute_type"]

_TENSOR_TYPES = ["float", "float16", "bfloat16", "double", "int8", "int16", "int32", "int64", "uint8", "uint16",
                 "uint32", "uint64", "bool", "float8e4m3fn", "float8e5m2"]
_VERSION = 1


def _imports():
    try:
        import onnx
        import onnxscript
    except ImportError:
        raise ImportError("ONNX export of plugins needs onnx and onnxscript: pip install 'modelopt_lite[onnx]'") from None
    return onnx, onnxscript


def onnx_attribute_type(t: type):
    """The ONNX AttrType of a plugin attribute type (bool is stored as INT)."""
    onnx, _ = _imports()
    kinds = onnx.defs.OpSchema.AttrType
    return {bool: kinds.INT, int: kinds.INT, float: kinds.FLOAT, str: kinds.STRING}[t]


def _attr_types(name: str, values: Dict[str, Any]) -> Dict[str, type]:
    declared = attribute_types(get_plugin(name))
    return {k: declared.get(k) or type(v) for k, v in values.items()}


def _ensure_schema(name: str, domain: str, n_out: int, types: Dict[str, type]) -> None:
    onnx, _ = _imports()
    if onnx.defs.has(name, domain):
        schema = onnx.defs.get_schema(name, _VERSION, domain)
        missing = sorted(set(types) - set(schema.attributes))
        if missing:
            raise PluginError(f"the ONNX schema {domain}::{name} registered earlier lacks attributes {missing}; "
                              f"export in a fresh process")
        return
    s = onnx.defs.OpSchema
    param, variadic = s.FormalParameter, s.FormalParameterOption.Variadic
    constraint = [f"tensor({t})" for t in _TENSOR_TYPES]
    schema = s(
        name, domain, _VERSION,
        doc=f"modelopt_lite plugin {name}",
        inputs=[param("inputs", "T", param_option=variadic, is_homogeneous=False)],
        outputs=[param(f"output_{i}", f"U{i}") for i in range(n_out)],  # fixed count: the exporter reads it
        type_constraints=[("T", constraint, "any tensor")] + [(f"U{i}", constraint, "any tensor")
                                                               for i in range(n_out)],
        attributes=[s.Attribute(k, onnx_attribute_type(t), f"plugin attribute {k}", required=False)
                    for k, t in sorted(types.items())])
    schema.set_type_and_shape_inference_function(_infer(name))
    onnx.defs.register_schema(schema)


_DTYPES = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.uint16: 4, torch.int16: 5, torch.int32: 6,
           torch.int64: 7, torch.bool: 9, torch.float16: 10, torch.float64: 11, torch.uint32: 12, torch.uint64: 13,
           torch.bfloat16: 16, torch.float8_e4m3fn: 17, torch.float8_e5m2: 19}
_ONNX_DTYPES = {v: k for k, v in _DTYPES.items()}


def _sym_inputs(ctx):
    import sympy

    from .base import SymTensor
    inputs = []
    for i in range(ctx.get_num_inputs()):
        t = ctx.get_input_type(i)
        if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        dtype = _ONNX_DTYPES.get(t.tensor_type.elem_type)
        if dtype is None:
            return None
        dims = []
        for j, d in enumerate(t.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(sympy.Symbol(d.dim_param or f"unk__{i}_{j}", integer=True, positive=True))
        inputs.append(SymTensor(dtype, dims))
    return inputs


def _infer(name: str):
    """An ONNX type and shape inference function that runs the plugin's shape_dtype_inference."""
    def infer(ctx) -> None:
        onnx, _ = _imports()
        cls = get_plugin(name)
        try:
            inputs = _sym_inputs(ctx)
            if inputs is None:
                return
            declared = attribute_types(cls)
            kwargs = {}
            for k, t in declared.items():
                a = ctx.get_attribute(k)
                if a is not None and a.name:
                    v = onnx.helper.get_attribute_value(a)
                    kwargs[k] = bool(v) if t is bool else v.decode() if isinstance(v, bytes) else v
            specs = cls(**kwargs).shape_dtype_inference(inputs)
            specs = [specs] if not isinstance(specs, (list, tuple)) else list(specs)
        except Exception:  # no types rather than a failed inference: the exporter keeps the traced ones
            return
        for i, spec in enumerate(specs[:ctx.get_num_outputs()]):
            dims = []
            for d in spec.shape:
                try:
                    dims.append(int(d))
                except TypeError:
                    dims.append(str(d))
            ctx.set_output_type(i, onnx.helper.make_tensor_type_proto(_DTYPES[spec.dtype], dims))
    return infer


def _onnx_value(v):
    return int(v) if type(v) is bool else v


def _translation(name: str) -> Callable:
    def translate(inputs, attrs: str = ""):
        _, onnxscript = _imports()
        cls = get_plugin(name)
        values = parse_attributes(attrs)
        _ensure_schema(name, cls.domain, cls.num_outputs, _attr_types(name, values))
        op = getattr(onnxscript.values.Opset(cls.domain, _VERSION), name)
        return op(*inputs, **{k: _onnx_value(v) for k, v in values.items()})

    translate.__name__ = f"plugin_{name}"
    return translate


def translation_table(names: Optional[list] = None) -> Dict[Any, Callable]:
    """``custom_translation_table`` entries for the registered plugins (or those named)."""
    names = sorted(registered_plugins()) if names is None else list(names)
    return {plugin_op(n): _translation(n) for n in names}


def export_onnx(model: torch.nn.Module, args: tuple, path: Optional[os.PathLike] = None, **kwargs):
    """``torch.onnx.export(model, args, dynamo=True)`` with the plugins' translations; returns the ONNXProgram.

    Extra keyword arguments go to ``torch.onnx.export`` (``dynamic_shapes``, ``opset_version``, ...); a
    ``custom_translation_table`` given there is merged over the plugins' entries. With ``path`` the model is
    also saved there.
    """
    table = translation_table()
    table.update(kwargs.pop("custom_translation_table", None) or {})
    kwargs.setdefault("verbose", False)
    optimize = kwargs.pop("optimize", True)
    program = torch.onnx.export(model, args, dynamo=True, custom_translation_table=table, optimize=False, **kwargs)
    if optimize:
        domains = {cls.domain for cls in registered_plugins().values()}
        traced = {v.name: (v.type, v.shape) for node in program.model.graph.all_nodes()
                  if node.domain in domains for v in node.outputs}
        program.optimize()
        for node in program.model.graph.all_nodes():
            for v in node.outputs if node.domain in domains else ():
                if v.type is None and v.name in traced:
                    v.type, v.shape = traced[v.name]
    if path is not None:
        program.save(os.fspath(path))
    return program
