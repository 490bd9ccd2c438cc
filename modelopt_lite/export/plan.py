"""What an export writes for each layer: formats, fused groups, shared values, exclusions.

Computed once from the quantized model (read only); both checkpoint writers
use it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from ..quantization.nn import QuantModule
from ..quantization.tensor_quantizer import TensorQuantizer
from .layers import ExportError, GroupValues, quantize_weight, kv_cache_algo, layer_algo, w4a8_weight_scale_2

__all__ = ["ExportPlan", "plan_export", "FUSED_SIBLINGS"]

FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("w1", "w3"))
"""Sibling layers runtimes fuse into one GEMM, used when the model carries no traced groups."""

KV_SOURCES = (("k_proj", "output_quantizer", "k"), ("v_proj", "output_quantizer", "v"))


@dataclass
class ExportPlan:
    algos: Dict[str, str]  # quantized layer -> quant_algo
    excluded: List[str]  # linear-like layers left in high precision
    groups: List[List[str]]  # fused groups (members share scales)
    shared: Dict[str, GroupValues] = field(default_factory=dict)  # layer -> values shared with its group
    kv: Dict[str, Dict[str, TensorQuantizer]] = field(default_factory=dict)  # attention module -> {"k": q, "v": q}
    kv_algo: Optional[str] = None

    @property
    def quant_algo(self) -> Optional[str]:
        kinds = set(self.algos.values())
        if not kinds:
            return None
        return kinds.pop() if len(kinds) == 1 else "MIXED_PRECISION"


def _is_linear_like(m: nn.Module) -> bool:
    if isinstance(m, QuantModule):
        return isinstance(getattr(m, "weight", None), torch.Tensor)
    return isinstance(m, (nn.Linear, nn.Embedding)) or type(m).__name__ == "Conv1D"


def _groups(model: nn.Module, algos: Dict[str, str]) -> List[List[str]]:
    traced = getattr(model, "_modelopt_lite_shared_inputs", None) or []
    groups = [[n for n in g if n in algos] for g in traced]
    groups = [g for g in groups if len(g) > 1]
    seen = {n for g in groups for n in g}
    parents: Dict[str, Dict[str, str]] = {}
    for name in algos:
        parent, _, leaf = name.rpartition(".")
        parents.setdefault(parent, {})[leaf] = name
    for parent, children in parents.items():
        for siblings in FUSED_SIBLINGS:
            members = [children[s] for s in siblings if s in children and children[s] not in seen]
            if len(members) > 1:
                groups.append(members)
                seen.update(members)
    return groups


def _max_of(values: List[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.detach().float() for v in values]).amax(dim=0)


def _group_values(model: nn.Module, names: List[str], algos: Dict[str, str]) -> GroupValues:
    mods = [model.get_submodule(n) for n in names]
    kinds = {algos[n] for n in names}
    if len(kinds) > 1:
        raise ExportError(f"layers {names} read the same input and are fused by runtimes, but are quantized in "
                          f"different formats ({sorted(kinds)}); give them one format")
    algo = kinds.pop()
    gv = GroupValues()
    inputs = [m.input_quantizer.amax for m in mods if m.input_quantizer.is_enabled and m.input_quantizer.amax is not None]
    if len(inputs) == len(mods) and inputs and inputs[0].numel() == 1:
        gv.input_amax = _max_of(inputs)
        if any(not torch.equal(a.float(), gv.input_amax) for a in inputs):
            warnings.warn(f"export: {names} have different input amaxes; using the largest for all "
                          "(quantize() shares them; this checkpoint differs slightly from the fake-quant model)")
    if algo in ("NVFP4", "W4A16_NVFP4", "W4A8_NVFP4_FP8"):
        weights = [m.weight_quantizer.effective_global_amax() for m in mods]
        if all(w is not None for w in weights):
            gv.weight_amax = _max_of(weights)
            if any(not torch.equal(w.float(), gv.weight_amax) for w in weights):
                warnings.warn(f"export: {names} have different weight global amaxes; runtimes need one "
                              "weight_scale_2 per fused GEMM, so the largest is used")
    pqs = [m.input_quantizer.pre_quant_scale for m in mods]
    if any(p is not None for p in pqs):
        if any(p is None for p in pqs):
            raise ExportError(f"layers {names} are fused by runtimes but only some have a pre_quant_scale")
        if any(not torch.equal(p, pqs[0]) for p in pqs):
            gv.pre_quant_scale = torch.stack([p.float() for p in pqs]).mean(dim=0).to(pqs[0].dtype)
            warnings.warn(f"export: {names} have different pre_quant_scale; a fused GEMM applies one, so their "
                          "mean is used and the weights are re-smoothed to it")
    if algo == "W4A8_AWQ":
        with torch.no_grad():
            gv.weight_scale_2 = _max_of([w4a8_weight_scale_2(quantize_weight(m, gv)) for m in mods])
    return gv


def _kv_quantizers(model: nn.Module) -> Dict[str, Dict[str, TensorQuantizer]]:
    found: Dict[str, Dict[str, TensorQuantizer]] = {}
    for name, m in model.named_modules():
        for role in ("k", "v"):
            q = getattr(m, f"{role}_bmm_quantizer", None)
            if isinstance(q, TensorQuantizer) and q.is_enabled:
                found.setdefault(name, {})[role] = q
        for child, attr, role in KV_SOURCES:
            sub = getattr(m, child, None)
            q = getattr(sub, attr, None) if sub is not None else None
            if isinstance(q, TensorQuantizer) and q.is_enabled:
                found.setdefault(name, {}).setdefault(role, q)
    return found


def plan_export(model: nn.Module) -> ExportPlan:
    """Formats, exclusions, fused groups and KV-cache quantizers of a quantized model."""
    algos: Dict[str, str] = {}
    excluded: List[str] = []
    for name, m in model.named_modules():
        if not name or not _is_linear_like(m):
            continue
        algo = layer_algo(name, m) if isinstance(m, QuantModule) else None
        if algo is None:
            excluded.append(name)
        else:
            algos[name] = algo
    if not algos:
        raise ExportError("the model has no quantized layer to export; run quantize() first")
    plan = ExportPlan(algos=algos, excluded=excluded, groups=_groups(model, algos))
    for g in plan.groups:
        gv = _group_values(model, g, algos)
        for n in g:
            plan.shared[n] = gv
    plan.kv = _kv_quantizers(model)
    kinds = {kv_cache_algo(q) for d in plan.kv.values() for q in d.values()}
    if len(kinds) > 1:
        raise ExportError(f"KV-cache quantizers use several formats ({sorted(kinds)}); use one")
    plan.kv_algo = kinds.pop() if kinds else None
    for attn, d in plan.kv.items():
        if set(d) != {"k", "v"}:
            raise ExportError(f"attention {attn!r}: only the {''.join(d)} cache is quantized; quantize both k and v")
    return plan
