"""Putting quantizers into a model and setting them from a config."""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Dict, Iterator, Tuple, Union

from torch import nn

from .config import QuantizeConfig, QuantizerAttributeConfig
from .nn import QUANT_MODULES, QuantModule, register_transformers_layers
from .tensor_quantizer import TensorQuantizer

__all__ = [
    "replace_quant_modules",
    "named_quantizers",
    "set_quantizer_by_cfg",
    "set_quantizer_attribute",
    "enable_quantizer",
    "disable_quantizer",
]

NameFilter = Union[str, Callable[[str], bool]]


def replace_quant_modules(model: nn.Module) -> int:
    """Convert every registered layer of `model` in place; returns how many were converted."""
    register_transformers_layers()
    count = 0
    for module in list(model.modules()):
        if isinstance(module, QuantModule) or type(module) not in QUANT_MODULES:
            continue
        QuantModule.convert(module)
        count += 1
    name_quantizers(model)
    return count


def name_quantizers(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            module.name = name


def named_quantizers(model: nn.Module) -> Iterator[Tuple[str, TensorQuantizer]]:
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            yield name, module


def _matcher(name_filter: NameFilter) -> Callable[[str], bool]:
    if callable(name_filter):
        return name_filter
    if not isinstance(name_filter, str):
        raise TypeError(f"expected a wildcard string or a callable on quantizer names, got {name_filter!r}")
    return lambda name: fnmatch.fnmatchcase(name, name_filter)


def _class_names(cls: type) -> set:
    original = getattr(cls, "_original_class", cls)
    names = set()
    for c in original.__mro__:
        names.add(c.__name__)
        if c.__module__.startswith("torch.nn"):
            names.add(f"nn.{c.__name__}")
    return names


def set_quantizer_attribute(
    model: nn.Module,
    name_filter: NameFilter,
    attributes: Union[QuantizerAttributeConfig, Dict[str, Any]],
    parent_class: str | None = None,
) -> int:
    """Apply `attributes` to the quantizers whose names match; returns the count."""
    match = _matcher(name_filter)
    if isinstance(attributes, dict):
        attributes = QuantizerAttributeConfig.model_validate(attributes)
    count = 0
    for name, module in model.named_modules():
        if parent_class is not None and parent_class not in _class_names(type(module)):
            continue
        for child_name, child in module.named_children():
            if not isinstance(child, TensorQuantizer):
                continue
            full = f"{name}.{child_name}" if name else child_name
            if match(full):
                child.set_attributes(attributes)
                count += 1
    return count


def set_quantizer_by_cfg(model: nn.Module, config: QuantizeConfig) -> Dict[str, int]:
    """Apply each `quant_cfg` entry in order (``default`` first); returns matches per key."""
    entries = dict(config.quant_cfg)
    matches = {}
    if "default" in entries:
        matches["default"] = set_quantizer_attribute(model, "*", entries.pop("default"))
    for key, value in entries.items():
        if isinstance(value, dict):  # a class filter: {pattern: attributes}
            matches[key] = sum(set_quantizer_attribute(model, p, a, parent_class=key) for p, a in value.items())
        else:
            matches[key] = set_quantizer_attribute(model, key, value)
    return matches


def enable_quantizer(model: nn.Module, name_filter: NameFilter) -> int:
    """Turn on the quantizers whose names match (wildcard or callable)."""
    return set_quantizer_attribute(model, name_filter, {"enable": True})


def disable_quantizer(model: nn.Module, name_filter: NameFilter) -> int:
    """Turn off the quantizers whose names match (wildcard or callable)."""
    return set_quantizer_attribute(model, name_filter, {"enable": False})
