"""The one-call API: quantize, and the helpers around it."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms import calibrate
from .config import QuantizeConfig
from .conversion import named_quantizers, replace_quant_modules, set_quantizer_by_cfg
from .nn import QuantWeightModule
from .presets import get_config

__all__ = ["quantize", "fold_weight", "create_forward_loop"]

ConfigLike = Union[str, Dict[str, Any], QuantizeConfig]


def quantize(model: nn.Module, config: ConfigLike, forward_loop: Optional[Callable[[nn.Module], Any]] = None) -> nn.Module:
    """Quantize `model` in place and return it.

    Registered layers get input, weight and output quantizers, set from
    `config` (a preset name or qformat, a YAML path, a dict or a
    QuantizeConfig), then calibrated by running `forward_loop(model)`.
    Without a loop, weights are calibrated from themselves and static
    activation quantizers become dynamic (with a warning).
    """
    cfg = get_config(config)
    converted = replace_quant_modules(model)
    if converted == 0 and not any(True for _ in named_quantizers(model)):
        warnings.warn("quantize: the model has no layer of a registered class; nothing was quantized")
    set_quantizer_by_cfg(model, cfg)
    calibrate(model, cfg.algorithm, forward_loop)
    model._modelopt_lite_quant_config = cfg.model_dump(mode="json", exclude_unset=True)
    return model


def fold_weight(model: nn.Module) -> nn.Module:
    """Bake fake-quantized weights into the parameters and turn weight quantizers off."""
    for module in model.modules():
        if isinstance(module, QuantWeightModule):
            module.fold_weight()
    return model


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def create_forward_loop(
    data: Iterable, num_batches: Optional[int] = None, desc: str = "Calibrating", progress: bool = True
) -> Callable[[nn.Module], None]:
    """A forward loop over a DataLoader or a list of batches, with a progress bar.

    A dict batch is called as ``model(**batch)``, a tuple or list as
    ``model(*batch)``, anything else as ``model(batch)``; tensors move to the
    model's device.
    """

    def loop(model: nn.Module) -> None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        total = num_batches
        if total is None and hasattr(data, "__len__"):
            total = len(data)
        for i, batch in enumerate(tqdm(data, total=total, desc=desc, disable=not progress, leave=False)):
            if num_batches is not None and i >= num_batches:
                break
            batch = _to_device(batch, device)
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (list, tuple)):
                model(*batch)
            else:
                model(batch)

    return loop
