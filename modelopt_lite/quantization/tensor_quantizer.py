"""TensorQuantizer: the module that fake-quantizes one tensor."""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .calib import CALIBRATORS
from .config import QuantizerAttributeConfig, to_format
from .formats import QuantFormat
from .ops import fake_quant_ste, format_to_spec

__all__ = ["TensorQuantizer"]

_ATTRS = tuple(QuantizerAttributeConfig.model_fields)
_FORMAT_ATTRS = ("num_bits", "axis", "block_sizes", "unsigned", "narrow_range", "type")


class TensorQuantizer(nn.Module):
    """Fake-quantizes a tensor to the format its attributes describe.

    States: disabled (identity); calibrating (collects statistics, output
    unchanged unless quantization is also on); quantizing. A static
    quantizer uses its calibrated `_amax` buffer (saved in `state_dict`); a
    dynamic one derives amax from each input. `pre_quant_scale`, when set,
    multiplies the input first (SmoothQuant/AWQ smoothing), even while the
    quantizer is disabled.
    """

    def __init__(self, attributes: Union[QuantizerAttributeConfig, Dict[str, Any], None] = None, name: str = ""):
        super().__init__()
        self.name = name
        self._attrs: Dict[str, Any] = QuantizerAttributeConfig().model_dump()
        self._calibrating = False
        self._quantizing = True
        self._warned_uncalibrated = False
        self._amax: Optional[torch.Tensor]
        self._pre_quant_scale: Optional[torch.Tensor]
        self._global_amax: Optional[torch.Tensor]
        self.register_buffer("_amax", None)
        self.register_buffer("_pre_quant_scale", None)
        self.register_buffer("_global_amax", None)
        self.fmt: QuantFormat = to_format(self._attrs)
        self._spec = format_to_spec(self.fmt)
        self.calibrator = CALIBRATORS.get(self._attrs["calibrator"])(self)
        if attributes is not None:
            self.set_attributes(attributes)

    # ----------------------------------------------------------- attributes
    def set_attributes(self, attributes: Union[QuantizerAttributeConfig, Dict[str, Any]]) -> None:
        """Apply attributes.

        An entry that gives `num_bits` describes the whole format: the format
        attributes it leaves out take their defaults, and the quantizer is
        enabled unless it says `enable: false`. An entry without `num_bits`
        changes only what it names.
        """
        if isinstance(attributes, dict):
            attributes = QuantizerAttributeConfig.model_validate(attributes)
        given = attributes.model_dump(exclude_unset=True)
        if "num_bits" in given:
            given = {**attributes.model_dump(include=set(_FORMAT_ATTRS)), "enable": True, **given}
        new = {**self._attrs, **given}
        try:
            fmt = to_format(new)
        except ValueError as e:
            raise ValueError(f"quantizer {self.name!r}: {e}") from None
        changed = any(new[k] != self._attrs[k] for k in _FORMAT_ATTRS)
        calib_changed = new["calibrator"] != self._attrs["calibrator"]
        self._attrs, self.fmt, self._spec = new, fmt, format_to_spec(fmt)
        if changed:
            self._amax = None
            self._global_amax = None
        if changed or calib_changed:
            self.calibrator = CALIBRATORS.get(new["calibrator"])(self)

    def __getattr__(self, key):
        if key in _ATTRS and "_attrs" in self.__dict__:
            return self.__dict__["_attrs"][key]
        return super().__getattr__(key)

    @property
    def is_enabled(self) -> bool:
        return bool(self._attrs["enable"])

    def enable(self) -> None:
        self._attrs["enable"] = True

    def disable(self) -> None:
        self._attrs["enable"] = False

    @property
    def is_dynamic(self) -> bool:
        return self._attrs["type"] == "dynamic"

    @property
    def uses_static_amax(self) -> bool:
        """True when forward uses a stored amax (static, and not MX, per-token or other dynamic blocks)."""
        blocks = self._attrs["block_sizes"] or {}
        dynamic_blocks = blocks.get("type") == "dynamic" and not self.fmt.amax_is_global
        return not self.is_dynamic and self.fmt.needs_amax and not dynamic_blocks

    @property
    def needs_calibration(self) -> bool:
        return self.is_enabled and self.uses_static_amax

    # ----------------------------------------------------------- state
    @property
    def amax(self) -> Optional[torch.Tensor]:
        return self._amax

    @amax.setter
    def amax(self, value: Optional[torch.Tensor]) -> None:
        if value is None:
            self._amax = None
            return
        value = torch.as_tensor(value, dtype=torch.float32).detach().clone()
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise ValueError(f"quantizer {self.name!r}: amax must be finite and non-negative, got {value}")
        self._amax = value

    @property
    def global_amax(self) -> Optional[torch.Tensor]:
        """Two-level formats with static per-block amaxes: the global amax, when it is not theirs.

        Set when a fused layer (q/k/v, gate/up) shares one global scale; None
        means the maximum of the per-block amaxes.
        """
        return self._global_amax

    @global_amax.setter
    def global_amax(self, value: Optional[torch.Tensor]) -> None:
        if value is None:
            self._global_amax = None
            return
        if not self.fmt.amax_is_global:
            raise ValueError(f"quantizer {self.name!r}: global_amax applies to two-level formats (NVFP4), not {self.fmt.name}")
        value = torch.as_tensor(value, dtype=torch.float32).detach().clone().reshape(())
        if not bool(torch.isfinite(value)) or float(value) < 0:
            raise ValueError(f"quantizer {self.name!r}: global_amax must be finite and non-negative, got {value}")
        self._global_amax = value

    def effective_global_amax(self) -> Optional[torch.Tensor]:
        """Two-level formats: the amax the global scale comes from (None before calibration or for other formats)."""
        if not self.fmt.amax_is_global or self._amax is None:
            return None
        if self._global_amax is not None and self._amax.numel() > 1:
            return self._global_amax
        return self._amax.float().amax()

    @property
    def pre_quant_scale(self) -> Optional[torch.Tensor]:
        return self._pre_quant_scale

    @pre_quant_scale.setter
    def pre_quant_scale(self, value: Optional[torch.Tensor]) -> None:
        self._pre_quant_scale = None if value is None else torch.as_tensor(value).detach().clone()

    def set_dynamic(self) -> None:
        """Derive amax from each input from now on (the fallback for unseen inputs)."""
        self._attrs["type"] = "dynamic"
        self._amax = None
        self._global_amax = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for name in ("_amax", "_pre_quant_scale", "_global_amax"):
            if prefix + name in state_dict:
                setattr(self, name, state_dict[prefix + name].detach().clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    # ----------------------------------------------------------- modes
    def enable_calib(self) -> None:
        self._calibrating = True

    def disable_calib(self) -> None:
        self._calibrating = False

    def enable_quant(self) -> None:
        self._quantizing = True

    def disable_quant(self) -> None:
        self._quantizing = False

    def load_calib_amax(self) -> bool:
        """Store the calibrator's result as `_amax`; False when it saw no data.

        A collective under torch.distributed (the calibrator reduces its
        statistics across ranks first): call it on every rank.
        """
        self.calibrator.sync()
        amax = self.calibrator.compute_amax()
        if amax is None:
            return False
        self.amax = amax
        self.calibrator.reset()
        return True

    # ----------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Smoothing is part of the layer's math (the weight was scaled by its inverse), so it
        # applies also when quantization is off (weight-only AWQ keeps its input unquantized).
        if self._pre_quant_scale is not None:
            x = x * self._pre_quant_scale.to(x.dtype)
        if not self._attrs["enable"]:
            return x
        if self._calibrating:
            self.calibrator.collect(x)
        if not self._quantizing:
            return x
        amax = self._amax_for(x)
        glob = self._global_amax if amax is not None and amax.numel() > 1 else None
        return fake_quant_ste(x, self.fmt, amax, self._spec, global_amax=glob)

    def _amax_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.uses_static_amax:
            return None
        if self._amax is None:
            if self.needs_calibration and not self._warned_uncalibrated:
                warnings.warn(f"quantizer {self.name!r} is not calibrated; using amax from each input")
                self._warned_uncalibrated = True
            return None
        return self._amax

    # ----------------------------------------------------------- display
    def describe_amax(self) -> str:
        if not self.uses_static_amax:
            return "dynamic"
        if self._amax is None:
            return "uncalibrated"
        a = self._amax.float()
        if a.numel() == 1:
            return f"{a.item():.4g}"
        return f"[{a.min().item():.4g}, {a.max().item():.4g}]"

    def extra_repr(self) -> str:
        if not self.is_enabled:
            return "disabled"
        parts = [self.fmt.name, self.fmt.granularity]
        if self.is_dynamic:
            parts.append("dynamic")
        parts.append(f"amax={self.describe_amax()}")
        if self._pre_quant_scale is not None:
            parts.append("pre_quant_scale")
        if self._calibrating:
            parts.append("calibrating")
        return " ".join(parts)
