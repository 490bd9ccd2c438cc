"""Which tensors and attributes of a layer one symbol sizes, and how they shrink.

`targets(module, key)` answers for the symbol `key` of `module` (a symbol
name ``"<module path>.<key>"`` from `modelopt_lite.trace`): the tensors it
sizes as ``(tensor name, dim)`` pairs, or None when the layer cannot be
pruned along that symbol. `new_attrs(module, key, size)` gives the
attributes the layer's forward reads that must follow the new size.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from ..trace.graph_utils import linear_types
from ..trace.symbols import HEAD_COUNT_ATTRS, KV_HEAD_COUNT_ATTRS, looks_like_attention, looks_like_norm, attention_dims

__all__ = ["targets", "new_attrs", "split_name", "HEAD_KEYS"]

Target = Tuple[str, int]
HEAD_KEYS = ("num_heads", "num_kv_heads")
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def split_name(name: str) -> Tuple[str, str]:
    """``"a.b.out_features"`` -> ``("a.b", "out_features")``."""
    path, _, key = name.rpartition(".")
    return path, key


def _is_hf_conv1d(m: nn.Module) -> bool:
    return isinstance(m, linear_types()[1:])


def _last_dim_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)) or looks_like_norm(m)


def targets(module: nn.Module, key: str) -> Optional[List[Target]]:
    """The ``(tensor name, dim)`` pairs symbol `key` of `module` sizes; [] for head counts; None: not prunable."""
    if isinstance(module, nn.Linear):
        return {"in_features": [("weight", 1)], "out_features": [("weight", 0), ("bias", 0)]}.get(key)
    if _is_hf_conv1d(module):
        return {"in_features": [("weight", 0)], "out_features": [("weight", 1), ("bias", 0)]}.get(key)
    if isinstance(module, _CONVS):
        if module.groups == 1:
            return {"in_channels": [("weight", 1)], "out_channels": [("weight", 0), ("bias", 0)]}.get(key)
        if key == "channels":  # depthwise: one filter per channel
            return [("weight", 0), ("bias", 0)]
        return None
    if isinstance(module, _NORMS) and key == "num_features":
        return [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]
    if _last_dim_norm(module) and key == "num_features":
        return [("weight", -1), ("bias", -1)]
    if isinstance(module, nn.Embedding) and key == "embedding_dim":
        return [("weight", 1)]
    if looks_like_attention(module) and key in HEAD_KEYS:
        return []
    return None


def new_attrs(module: nn.Module, key: str, size: int) -> Dict[str, Any]:
    """Attributes of `module` to set when symbol `key` becomes `size`."""
    if isinstance(module, nn.Linear):
        return {key: size}
    if _is_hf_conv1d(module):
        return {"nx" if key == "in_features" else "nf": size}
    if isinstance(module, _CONVS):
        if key == "channels":
            return {"in_channels": size, "out_channels": size, "groups": size}
        return {key: size}
    if isinstance(module, _NORMS):
        return {"num_features": size}
    if isinstance(module, nn.Embedding):
        return {"embedding_dim": size}
    if _last_dim_norm(module):
        out: Dict[str, Any] = {}
        shape = getattr(module, "normalized_shape", None)
        if isinstance(shape, (tuple, list)) and shape:
            out["normalized_shape"] = (*tuple(shape)[:-1], size)
        elif isinstance(shape, int):
            out["normalized_shape"] = size
        for name in ("hidden_size", "dim"):
            if isinstance(getattr(module, name, None), int):
                out[name] = size
        return out
    if key in HEAD_KEYS:
        return _attention_attrs(module, key, size)
    return {}


def _attention_attrs(module: nn.Module, key: str, size: int) -> Dict[str, Any]:
    """Head counts the attention forward reads from the module itself (its shared config is left alone).

    ``num_heads`` / ``num_key_value_heads`` are always set: the symbol analysis reads them before the
    config, so a pruned model analyzes (and prunes again) with its real head counts.
    """
    out: Dict[str, Any] = {"num_heads" if key == "num_heads" else "num_key_value_heads": size}
    names = HEAD_COUNT_ATTRS if key == "num_heads" else KV_HEAD_COUNT_ATTRS
    for name in names:
        v = getattr(module, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            out[name] = size
    if key == "num_heads":
        head_dim = attention_dims(module)[2]
        for name in ("all_head_size", "inner_dim"):
            v = getattr(module, name, None)
            if isinstance(v, int) and not isinstance(v, bool):
                out[name] = size * head_dim
    return out
