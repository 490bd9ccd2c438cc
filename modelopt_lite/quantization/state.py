"""Saving and restoring the quantization state of a model, without pickle.

The state is what `quantize` (and any later changes) put on a model: which
layers were converted, every quantizer's attributes, its calibrated amax and
pre_quant_scale, the shared-input groups, and the config. It is kept apart
from the model's weights, so a freshly built float model of the same
architecture can be quantized again exactly:

    mtq.save(model, "out/quant")             # quant_state.json + quant_state.safetensors
    fresh = build_model()                     # same architecture and weights
    mtq.restore(fresh, "out/quant")           # same quantizers, same outputs

On disk the state is two files in one directory: ``quant_state.json`` (the
description: format tag, version, config, layers, quantizer attributes and
the shape and dtype of every tensor) and ``quant_state.safetensors`` (the
amax and pre_quant_scale tensors, keyed ``<quantizer name>._amax`` and
``<quantizer name>._pre_quant_scale``). Neither file holds pickled data.

A restore checks the whole state against the model before changing
anything: a layer that is missing, of another class or of another weight
shape, a quantizer the model does not have, or an amax that does not fit the
layer's weight raises QuantStateMismatch naming the first such layer in
module order, and leaves the model as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .conversion import name_quantizers, named_quantizers
from .formats import block_amax, compute_amax
from .nn import QUANT_MODULES, QuantModule, register_transformers_layers
from ..utils.fs import atomic_directory
from .state_format import (
    STATE_FORMAT,
    STATE_VERSION,
    JSON_FILE,
    TENSORS_FILE,
    TENSOR_ATTRS,
    MODEL_ATTRS,
    QuantStateError,
    QuantStateMismatch,
    dtype_name,
    join_name,
    attrs_to_json,
    json_copy,
    shape_str,
    check_header,
    validated_state,
)
from .tensor_quantizer import TensorQuantizer

__all__ = [
    "save",
    "restore",
    "quant_state_dict",
    "write_quant_state",
    "read_quant_state",
    "apply_quant_state",
    "QuantStateError",
    "QuantStateMismatch",
    "STATE_FORMAT",
    "STATE_VERSION",
    "JSON_FILE",
    "TENSORS_FILE",
]

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- helpers

def _original_class(module: nn.Module) -> type:
    return getattr(type(module), "_original_class", type(module))


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _weight_shape(module: nn.Module) -> Optional[List[int]]:
    w = getattr(module, "weight", None)
    return list(w.shape) if isinstance(w, torch.Tensor) else None


def _is_weight_quantizer(name: str) -> bool:
    return name.rsplit(".", 1)[-1].endswith("weight_quantizer")


# --------------------------------------------------------------------------- collect

def quant_state_dict(model: nn.Module, include_weight_amax: bool = True) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The quantization state of `model` as (meta, tensors).

    `meta` is JSON-serialisable; `tensors` maps ``<quantizer>._amax`` and
    ``<quantizer>._pre_quant_scale`` to CPU copies (amax as stored, float32;
    pre_quant_scale in its own dtype). Without `include_weight_amax` the
    amaxes of weight quantizers (quantizers named ``*weight_quantizer``) are
    left out, for checkpoints that store already-quantized weights.
    """
    register_transformers_layers()
    modules: Dict[str, Dict[str, Any]] = {}
    unquantized: List[str] = []
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            modules[name] = {"class": _class_path(_original_class(module)), "weight_shape": _weight_shape(module)}
        elif type(module) in QUANT_MODULES:
            unquantized.append(name)

    quantizers: Dict[str, Dict[str, Any]] = {}
    tensors: Dict[str, torch.Tensor] = {}
    for name, q in named_quantizers(model):
        described: Dict[str, Dict[str, Any]] = {}
        for attr in TENSOR_ATTRS:
            t = getattr(q, attr)
            if t is None or (attr == "_amax" and not include_weight_amax and _is_weight_quantizer(name)):
                continue
            tensors[join_name(name, attr)] = t.detach().cpu().clone(memory_format=torch.contiguous_format)
            described[attr] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
        quantizers[name] = {"attributes": attrs_to_json(q._attrs), "tensors": described}

    from .. import __version__

    meta: Dict[str, Any] = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "producer": f"modelopt_lite {__version__}",
        "weight_amax": bool(include_weight_amax),
    }
    for key, attr in MODEL_ATTRS.items():
        value = getattr(model, attr, None)
        meta[key] = None if value is None else json_copy(value, f"model.{attr}")
    meta["modules"] = modules
    meta["unquantized_layers"] = unquantized
    meta["quantizers"] = quantizers
    return meta, tensors


# --------------------------------------------------------------------------- check against the model

def _quantizers_added_by_conversion(module: nn.Module) -> Tuple[List[str], type]:
    """Names (relative to `module`) of the quantizers converting it would add, and the quantized class.

    Converts a stand-in that shares the layer's parameters and submodules but
    has its own registration dicts, so the layer itself is not changed.
    """
    stand_in = object.__new__(type(module))
    stand_in.__dict__.update(
        {k: (v.copy() if isinstance(v, (dict, set, list)) else v) for k, v in module.__dict__.items()}
    )
    QuantModule.convert(stand_in)
    before = {n for n, _ in module.named_modules()}
    added = [n for n, m in stand_in.named_modules() if isinstance(m, TensorQuantizer) and n not in before]
    return added, type(stand_in)


def _expected_weight_amax(module_cls: type, weight_shape: Optional[List[int]], fmt) -> Optional[Tuple[torch.Size, set]]:
    """The amax shape max calibration gives for the layer's weight, and every size calibration can give.

    Sizes: one value, the max-calibration shape, and for two-level formats
    one per block (searches). Computed on the meta device: no memory.
    """
    if weight_shape is None:
        return None
    shape = list(weight_shape)
    if getattr(module_cls, "weight_axis_last", False) and len(shape) == 2:
        shape = shape[::-1]
    try:
        w = torch.empty(shape, device="meta")
        expected = compute_amax(w, fmt).shape
        sizes = {1, expected.numel()}
        if fmt.amax_is_global:
            sizes.add(block_amax(w, fmt).numel())
        return expected, sizes
    except Exception:  # noqa: BLE001 - a format the weight cannot take is reported by the caller
        return None


class _Plan:
    def __init__(self):
        self.convert: List[str] = []
        self.problems: List[Tuple[str, str]] = []

    def add(self, layer: str, detail: str) -> None:
        self.problems.append((layer, detail))


def _owner(name: str, modules: Dict[str, Any]) -> Optional[str]:
    """The closest enclosing layer of the saved state, if any."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:i])
        if prefix in modules:
            return prefix
    return None


def _plan(model: nn.Module, meta: Dict[str, Any], checked: Dict[str, Any], strict: bool) -> _Plan:
    plan = _Plan()
    present = dict(model.named_modules())
    saved_modules: Dict[str, Dict[str, Any]] = meta["modules"]
    quant_classes: Dict[str, type] = {}
    added: Dict[str, str] = {}  # quantizer created by converting a layer -> that layer
    usable = set()
    for name, info in saved_modules.items():
        module = present.get(name)
        if module is None:
            plan.add(name, "the layer is missing from the model")
            continue
        saved_cls, cls = info.get("class"), _class_path(_original_class(module))
        if saved_cls != cls:
            plan.add(name, f"class {saved_cls} in the saved state vs {cls} in the model")
            continue
        saved_shape, shape = info.get("weight_shape"), _weight_shape(module)
        if saved_shape != shape:
            plan.add(name, f"weight shape {_describe_shape(saved_shape)} in the saved state vs {_describe_shape(shape)} in the model")
            continue
        if isinstance(module, QuantModule):
            quant_classes[name] = type(module)
        elif type(module) not in QUANT_MODULES:
            plan.add(name, f"{cls} is not registered for quantization here (see register_quant_module)")
            continue
        else:
            rel, quant_classes[name] = _quantizers_added_by_conversion(module)
            added.update({join_name(name, r): name for r in rel})
            plan.convert.append(name)
        usable.add(name)

    existing = {n for n, _ in named_quantizers(model)}
    available = existing | set(added)
    for qname, (attrs, fmt, loaded) in checked.items():
        owner = _owner(qname, saved_modules)
        if owner is not None and owner not in usable:
            continue  # its layer is already reported
        where = owner if owner is not None else qname
        if qname not in available:
            plan.add(where, f"unknown quantizer {qname!r}: the model has no such quantizer")
            continue
        amax = loaded.get("_amax")
        if amax is not None and owner is not None and _is_weight_quantizer(qname) and qname.rsplit(".", 1)[0] == owner:
            expected = _expected_weight_amax(quant_classes[owner], saved_modules[owner].get("weight_shape"), fmt)
            if expected is not None and amax.numel() not in expected[1]:
                plan.add(where, f"amax shape {shape_str(amax.shape)} of {qname!r} in the saved state vs "
                                f"{shape_str(expected[0])} for the model's weight")

    if strict:
        unquantized = set(meta["unquantized_layers"])
        for name, module in present.items():
            if name in saved_modules:
                continue
            if isinstance(module, QuantModule):
                plan.add(name, "the layer is quantized in the model but not in the saved state")
            elif type(module) in QUANT_MODULES and name not in unquantized:
                plan.add(name, f"the model has this {type(module).__name__} layer but the saved state does not")
        for name in meta["unquantized_layers"]:
            if name not in present:
                plan.add(name, "the layer is missing from the model")
        for qname in sorted(available - set(checked)):
            plan.add(added.get(qname, qname), f"quantizer {qname!r} of the model has no saved state")
    return plan


def _describe_shape(shape) -> str:
    return "none (no weight)" if shape is None else shape_str(shape)


def _first_problem(model: nn.Module, meta: Dict[str, Any], problems: List[Tuple[str, str]]) -> QuantStateMismatch:
    """The first problem in module order; layers the model lacks sort after the saved layer before them."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    saved = list(meta["modules"]) + [n for n in meta["unquantized_layers"] if n not in meta["modules"]]
    saved_index = {n: i for i, n in enumerate(saved)}

    def key(problem):
        name = problem[0]
        if name in order:
            return (order[name], 0, 0)
        i = saved_index.get(name, len(saved))
        before = next((order[p] for p in reversed(saved[:i]) if p in order), -1)
        return (before, 1, i)

    layer, detail = min(problems, key=key)
    return QuantStateMismatch(layer, detail, count=len(problems))


# --------------------------------------------------------------------------- apply

def _device_for(model: nn.Module, qname: str, q: TensorQuantizer) -> torch.device:
    for t in (q._amax, q._pre_quant_scale):
        if t is not None:
            return t.device
    parent = model.get_submodule(qname.rsplit(".", 1)[0]) if "." in qname else model
    ref = next(parent.parameters(recurse=False), None)
    if ref is None:
        ref = next(model.parameters(), None)
    return ref.device if ref is not None else torch.device("cpu")


def apply_quant_state(
    model: nn.Module, meta: Dict[str, Any], tensors: Dict[str, torch.Tensor], strict: bool = True
) -> nn.Module:
    """Quantize `model` in place to the state `quant_state_dict` gave (meta, tensors); returns the model.

    The layers named in the state are converted (a layer already converted
    is kept) and every quantizer gets the saved attributes, amax and
    pre_quant_scale, replacing what it had; the shared-input groups and the
    config are set on the model. Quantizers restored in quantizing mode
    (calibration off). A weight amax the state leaves out is cleared: the
    quantizer then takes it from the weight at run time.

    Everything is checked first: QuantStateError for a state inconsistent
    in itself, QuantStateMismatch (naming the first mismatching layer in
    module order) for one that does not fit the model. Either leaves the
    model unchanged. With `strict` (the default) the model must also have no
    quantizable layer or quantizer the state does not describe; without it
    those are left as they are.
    """
    check_header(meta)
    register_transformers_layers()
    checked = validated_state(meta, tensors)
    plan = _plan(model, meta, checked, strict)
    if plan.problems:
        raise _first_problem(model, meta, plan.problems)

    modules = dict(model.named_modules())
    for name in plan.convert:
        QuantModule.convert(modules[name])
    name_quantizers(model)
    quantizers = dict(named_quantizers(model))
    weight_amax_saved = bool(meta.get("weight_amax", True))
    with torch.no_grad():
        for qname, (attrs, _fmt, loaded) in checked.items():
            q = quantizers[qname]
            device = _device_for(model, qname, q)
            q.set_attributes(attrs)
            for attr, setter in TENSOR_ATTRS.items():
                if attr in loaded:
                    setattr(q, setter, loaded[attr].to(device))
                elif attr == "_amax" and not weight_amax_saved and _is_weight_quantizer(qname):
                    q.amax = None
                else:
                    setattr(q, setter, None)
            q.disable_calib()
            q.enable_quant()
            q._warned_uncalibrated = False
    for key, attr in MODEL_ATTRS.items():
        value = meta.get(key)
        if value is None:
            if attr in model.__dict__:
                delattr(model, attr)
        else:
            setattr(model, attr, json.loads(json.dumps(value)))
    return model


# --------------------------------------------------------------------------- files

def safetensors_torch():
    """`safetensors.torch`, or an ImportError that says how to install it."""
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("saving and restoring a model state needs safetensors: pip install safetensors") from None
    return safetensors.torch


def write_quant_state(directory: Path, model: nn.Module, include_weight_amax: bool = True) -> None:
    """Write ``quant_state.json`` and ``quant_state.safetensors`` of `model` into `directory` (which exists)."""
    st = safetensors_torch()
    meta, tensors = quant_state_dict(model, include_weight_amax=include_weight_amax)
    text = json.dumps(meta, indent=1, allow_nan=False)
    (directory / JSON_FILE).write_text(text + "\n", encoding="utf-8")
    st.save_file(tensors, str(directory / TENSORS_FILE), metadata={"format": "pt"})


def read_quant_state(path: PathLike) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(description, tensors) of the state `write_quant_state` wrote to the directory `path`, header checked."""
    st = safetensors_torch()
    root = Path(path)
    for name in (JSON_FILE, TENSORS_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(f"no quantization state at {str(root)!r}: {name} is missing")
    try:
        meta = json.loads((root / JSON_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantStateError(f"{str(root / JSON_FILE)!r} is not valid JSON: {e}") from None
    check_header(meta)
    try:
        tensors = st.load_file(str(root / TENSORS_FILE))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise QuantStateError(f"{str(root / TENSORS_FILE)!r} cannot be read: {type(e).__name__}: {e}") from None
    return meta, tensors


def save(model: nn.Module, path: PathLike, overwrite: bool = False, include_weight_amax: bool = True) -> Path:
    """Write the quantization state of `model` to the directory `path`; returns the path.

    Writes ``quant_state.json`` and ``quant_state.safetensors`` atomically
    (see `atomic_directory`): an error leaves no partial output. An existing
    non-empty directory is refused unless `overwrite`, which replaces it
    whole. The model's weights are not saved (`modelopt_lite.opt.save` saves
    them, with the whole history of modes).
    """
    target = Path(path)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        write_quant_state(tmp, model, include_weight_amax)
    return target


def restore(model: nn.Module, path: PathLike, strict: bool = True) -> nn.Module:
    """Quantize `model` in place from the state `save` wrote to `path`; returns the model.

    See `apply_quant_state` for what is checked and restored; a state that
    does not fit the model raises QuantStateMismatch and leaves it unchanged.
    """
    meta, tensors = read_quant_state(path)
    return apply_quant_state(model, meta, tensors, strict=strict)
