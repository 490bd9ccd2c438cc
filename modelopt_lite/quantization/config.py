"""Quantization configs as pydantic models.

A config is `quant_cfg`, an ordered map from wildcard patterns on quantizer
names to quantizer attributes (later entries override earlier ones), and
`algorithm`, the calibration to run. A key that names a module class
(``nn.Linear``, ``Conv1D``) holds a nested map applied only to quantizers of
modules of that class. The key ``default`` applies to every quantizer first.
"""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .formats import QuantFormat, parse_format
from .formats.schemes import _parse_scale

__all__ = ["QuantizerAttributeConfig", "QuantizeConfig", "ConfigError", "validate_config"]

_BLOCK_META_KEYS = ("type", "scale_bits", "global_scale")


class ConfigError(ValueError):
    """An invalid quantization config; the message names the key and value."""


class QuantizerAttributeConfig(BaseModel):
    """Attributes of one TensorQuantizer. Only the keys given are applied."""

    model_config = ConfigDict(extra="forbid")

    enable: bool = True
    num_bits: Union[int, Tuple[int, int], str] = 8
    axis: Optional[Union[int, Tuple[int, ...]]] = None
    block_sizes: Optional[Dict[Union[int, str], Any]] = None
    unsigned: bool = False
    narrow_range: bool = False
    type: Literal["static", "dynamic"] = "static"
    calibrator: str = "max"

    @field_validator("num_bits")
    @classmethod
    def _num_bits(cls, v):
        parse_format(v)
        return v

    @field_validator("block_sizes", mode="before")
    @classmethod
    def _blocks(cls, v):
        if v is None:
            return None
        if not isinstance(v, dict):
            raise ValueError(f"block_sizes must be a mapping like {{-1: 16}}, got {v!r}")
        out: Dict[Union[int, str], Any] = {}
        for k, size in v.items():
            if k in _BLOCK_META_KEYS:
                out[k] = size
                continue
            try:
                axis = int(k)
            except (TypeError, ValueError):
                raise ValueError(f"block_sizes key {k!r} is neither an axis nor one of {_BLOCK_META_KEYS}") from None
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
                raise ValueError(f"block size for axis {axis} must be a positive int or null, got {size!r}")
            out[axis] = size
        if not any(isinstance(k, int) for k in out):
            raise ValueError("block_sizes needs at least one axis, e.g. {-1: 16}")
        if out.get("type", "static") not in ("static", "dynamic"):
            raise ValueError(f"block_sizes.type must be 'static' or 'dynamic', got {out['type']!r}")
        if "scale_bits" in out:
            sb = out["scale_bits"]
            _parse_scale(tuple(sb) if isinstance(sb, list) else sb)
        if out.get("global_scale", "nvfp4") not in ("nvfp4", "fp8"):
            raise ValueError(f"block_sizes.global_scale must be 'nvfp4' (amax / (qmax * 448)) or 'fp8' (amax / 448), "
                             f"got {out['global_scale']!r}")
        return out

    @field_validator("calibrator")
    @classmethod
    def _calibrator(cls, v):
        from .calib import CALIBRATORS

        return _registered(CALIBRATORS, v)

    @model_validator(mode="after")
    def _combination(self):
        given = self.model_fields_set
        if "num_bits" in given:  # a whole format: check it now
            to_format(self.model_dump())
        elif self.axis is not None and self.block_sizes and {"axis", "block_sizes"} <= given:
            raise ValueError("use either axis (per channel) or block_sizes, not both")
        return self


def to_format(attrs: Dict[str, Any]) -> QuantFormat:
    """The QuantFormat that a full set of quantizer attributes describes."""
    blocks = attrs.get("block_sizes") or None
    scale_bits = None
    axes = None
    if blocks:
        scale_bits = blocks.get("scale_bits")
        if isinstance(scale_bits, list):
            scale_bits = tuple(scale_bits)
        axes = {k: v for k, v in blocks.items() if k not in _BLOCK_META_KEYS}
    num_bits = attrs.get("num_bits", 8)
    if isinstance(num_bits, list):
        num_bits = tuple(num_bits)
    return QuantFormat.create(
        num_bits=num_bits,
        axis=attrs.get("axis"),
        block_sizes=axes,
        scale_bits=scale_bits,
        unsigned=attrs.get("unsigned", False),
        narrow_range=attrs.get("narrow_range", False),
        global_fp8=bool(blocks) and blocks.get("global_scale") == "fp8",
    )


AttrOrClassFilter = Union[QuantizerAttributeConfig, Dict[str, QuantizerAttributeConfig]]


class QuantizeConfig(BaseModel):
    """A whole quantization recipe."""

    model_config = ConfigDict(extra="forbid")

    quant_cfg: Dict[str, AttrOrClassFilter] = {}
    algorithm: Optional[Union[str, Dict[str, Any]]] = "max"

    @field_validator("quant_cfg", mode="before")
    @classmethod
    def _entries(cls, v):
        if not isinstance(v, dict):
            raise ValueError(f"quant_cfg must be a mapping of pattern -> attributes, got {type(v).__name__}")
        out = {}
        for key, val in v.items():
            if _is_class_filter(val):
                out[key] = {p: _attrs(f"{key}.{p}", a) for p, a in val.items()}
            else:
                out[key] = _attrs(key, val)
        return out

    @field_validator("algorithm")
    @classmethod
    def _algorithm(cls, v):
        from .algorithms import ALGORITHMS

        name = v.get("method") if isinstance(v, dict) else v
        if name is not None:
            _registered(ALGORITHMS, name)
        return v


def _registered(registry, name):
    """Registry lookup that fails as a ValueError (so the error names the config key)."""
    try:
        registry.get(name)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    return name


def _is_class_filter(val) -> bool:
    """`{pattern: attributes, ...}` under a class name, as opposed to attributes themselves."""
    if not isinstance(val, dict) or not val:
        return False
    if any(k in QuantizerAttributeConfig.model_fields for k in val):
        return False
    return all(isinstance(x, (dict, QuantizerAttributeConfig)) for x in val.values())


def _attrs(key: str, val) -> QuantizerAttributeConfig:
    if isinstance(val, QuantizerAttributeConfig):
        return val
    if not isinstance(val, dict):
        raise ConfigError(f"quant_cfg[{key!r}]: expected a mapping of quantizer attributes, got {val!r}")
    try:
        return QuantizerAttributeConfig(**val)
    except ValidationError as e:
        raise ConfigError(_describe(e, prefix=f"quant_cfg[{key!r}]")) from None


def _describe(e: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        where = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = err["msg"].removeprefix("Value error, ")
        shown = err.get("input")
        if isinstance(shown, dict) and len(str(shown)) > 120:
            shown = "{...}"
        parts.append(f"{where} = {shown!r}: {msg}" if "input" in err else f"{where}: {msg}")
    return "invalid quantization config: " + "; ".join(parts)


def validate_config(config: Union[QuantizeConfig, Dict[str, Any]]) -> QuantizeConfig:
    """Validate a dict (or pass a QuantizeConfig through), raising ConfigError."""
    if isinstance(config, QuantizeConfig):
        return config
    if not isinstance(config, dict):
        raise ConfigError(f"a quantization config is a mapping with quant_cfg and algorithm, got {type(config).__name__}")
    unknown = set(config) - {"quant_cfg", "algorithm"}
    if unknown:
        raise ConfigError(f"invalid quantization config: unknown key(s) {sorted(unknown)}; expected quant_cfg, algorithm")
    entries = config.get("quant_cfg", {})
    if isinstance(entries, dict):
        config = dict(config, quant_cfg=QuantizeConfig._entries(entries))
    try:
        return QuantizeConfig(**config)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None
