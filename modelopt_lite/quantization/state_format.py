"""The quantization-state file format: names, version, errors, and checks of a state on its own.

`state.py` collects a model's state and applies one to a model; this module
holds what both sides of the file agree on.
"""

from __future__ import annotations

import json
from typing import Any, Dict

import torch
from pydantic import ValidationError

from .config import QuantizerAttributeConfig, to_format

STATE_FORMAT = "modelopt_lite.quant_state"
STATE_VERSION = 1
JSON_FILE = "quant_state.json"
TENSORS_FILE = "quant_state.safetensors"

TENSOR_ATTRS = {"_amax": "amax", "_pre_quant_scale": "pre_quant_scale", "_global_amax": "global_amax"}  # buffer -> TensorQuantizer setter
MODEL_ATTRS = {  # meta key -> attribute `quantize` leaves on the model
    "quant_config": "_modelopt_lite_quant_config",
    "shared_inputs": "_modelopt_lite_shared_inputs",
    "residual_writers": "_modelopt_lite_residual_writers",
}


class QuantStateError(ValueError):
    """A quantization state that cannot be read or is inconsistent in itself."""


class QuantStateMismatch(QuantStateError):
    """A quantization state that does not fit the model it is applied to.

    `layer` is the first mismatching layer (or quantizer) in module order,
    `detail` what differs there, `count` how many mismatches were found.
    """

    def __init__(self, layer: str, detail: str, count: int = 1):
        self.layer, self.detail, self.count = layer, detail, count
        more = f" (and {count - 1} more mismatch{'es' if count > 2 else ''})" if count > 1 else ""
        super().__init__(f"quantization state does not match the model at {layer or '<root>'!r}: {detail}{more}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def join_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def plain_json(value: Any) -> Any:
    """Tuples to lists, recursively, so the value is what JSON gives back."""
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    return value


def attrs_to_json(attrs: Dict[str, Any]) -> Dict[str, Any]:
    """Quantizer attributes as JSON; block_sizes axis keys become strings (validation turns them back into ints)."""
    out = plain_json(dict(attrs))
    if isinstance(out.get("block_sizes"), dict):
        out["block_sizes"] = {str(k): v for k, v in out["block_sizes"].items()}
    return out


def json_copy(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise QuantStateError(f"{what} cannot be stored as JSON: {e}") from None


def shape_str(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def check_header(meta: Any) -> None:
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        tag = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise QuantStateError(f"not a modelopt_lite quantization state (format tag {tag!r}, expected {STATE_FORMAT!r})")
    version = meta.get("version")
    if version != STATE_VERSION:
        raise QuantStateError(
            f"unsupported quantization state version {version!r}; this modelopt_lite reads version {STATE_VERSION}"
        )
    for key, kind in (("modules", dict), ("quantizers", dict), ("unquantized_layers", list)):
        if not isinstance(meta.get(key), kind):
            raise QuantStateError(f"quantization state: {key!r} must be a {kind.__name__}, got {type(meta.get(key)).__name__}")
    for key in ("shared_inputs", "residual_writers"):
        value = meta.get(key)
        if value is not None and not isinstance(value, list):
            raise QuantStateError(f"quantization state: {key!r} must be a list or null")


def validated_state(meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]):
    """Per quantizer: (validated attributes, format, {buffer: tensor}); raises QuantStateError."""
    defaults = QuantizerAttributeConfig().model_dump()
    out = {}
    claimed = set()
    for name, entry in meta["quantizers"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("attributes"), dict):
            raise QuantStateError(f"quantization state: quantizer {name!r} has no attributes")
        try:
            attrs = QuantizerAttributeConfig.model_validate({**defaults, **entry["attributes"]})
            fmt = to_format(attrs.model_dump())
        except (ValidationError, ValueError) as e:
            raise QuantStateError(f"quantization state: quantizer {name!r} has invalid attributes: {e}") from None
        loaded = {}
        for attr, spec in (entry.get("tensors") or {}).items():
            key = join_name(name, attr)
            if attr not in TENSOR_ATTRS or not isinstance(spec, dict):
                raise QuantStateError(f"quantization state: quantizer {name!r} has an unknown tensor entry {attr!r}")
            if key not in tensors:
                raise QuantStateError(f"quantization state: tensor {key!r} is described but not in the tensor file")
            t = tensors[key]
            if list(t.shape) != list(spec.get("shape", [])) or dtype_name(t.dtype) != spec.get("dtype"):
                raise QuantStateError(
                    f"quantization state: tensor {key!r} is {dtype_name(t.dtype)} {shape_str(t.shape)} in the tensor "
                    f"file but {spec.get('dtype')} {shape_str(spec.get('shape', []))} in the description"
                )
            if attr == "_amax":
                tf = t.float()
                if not bool(torch.isfinite(tf).all()) or bool((tf < 0).any()):
                    raise QuantStateError(f"quantization state: {key!r} holds negative or non-finite values")
            claimed.add(key)
            loaded[attr] = t
        out[name] = (attrs, fmt, loaded)
    extra = sorted(set(tensors) - claimed)
    if extra:
        raise QuantStateError(f"quantization state: the tensor file holds tensors the description does not name: {extra[:5]}")
    return out
