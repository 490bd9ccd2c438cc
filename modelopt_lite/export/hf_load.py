"""Load a Hugging Face unified checkpoint back into a fake-quant PyTorch model.

    model = load_hf_checkpoint("out/llama-nvfp4")

The architecture is rebuilt from ``config.json``; each quantized layer gets
its weight by dequantizing the stored codes and scales (the exact tensor
the fake-quant layer computed with, so its weight quantizer is off) and its
activation quantizers back. With the ``modelopt_lite/`` state written by
`export_hf_checkpoint` the activation amaxes are the exact calibrated
values and outputs equal the exported model's bit for bit; for other
checkpoints they are derived from the stored scales (amax = scale * qmax).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
from torch import nn

from ..quantization.conversion import replace_quant_modules
from ..quantization.nn import QuantModule, QuantWeightModule
from ..quantization.state import restore as restore_quant_state
from ..quantization.tensor_quantizer import TensorQuantizer
from .hf import STATE_DIR
from .layers import NVFP4_GLOBAL, FP8_MAX, ExportError, algo_quantizers, dequantize_weight

__all__ = ["load_hf_checkpoint", "CheckpointReader"]

_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")


class CheckpointReader:
    """Tensors of a (possibly sharded) safetensors checkpoint, read lazily by name."""

    def __init__(self, directory: Union[str, Path], prefix: str = "model"):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / f"{prefix}.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.directory / f"{prefix}.safetensors").is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.directory}: no {prefix}.safetensors or {prefix}.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else [f"{prefix}.safetensors"]
        self._handles = {f: safe_open(str(self.directory / f), "pt") for f in files}
        self.weight_map: Dict[str, str] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                self.weight_map[k] = f
        if weight_map is not None and set(weight_map) != set(self.weight_map):
            missing = sorted(set(weight_map) ^ set(self.weight_map))[:3]
            raise ValueError(f"{index}: the index and the shards disagree (e.g. {missing})")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self):
        return self.weight_map.keys()

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.weight_map[name]].get_tensor(name)

    def items(self) -> Iterator[Tuple[str, torch.Tensor]]:
        for name in self.weight_map:
            yield name, self.get(name)


def _build_model(config_json: dict, dtype: Optional[torch.dtype]) -> nn.Module:
    import transformers

    cfg = dict(config_json)
    cfg.pop("quantization_config", None)
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ExportError(f"config.json names the architecture {arch!r}, which this transformers does not have")
    config = transformers.AutoConfig.for_model(**cfg)
    model = cls(config)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    return model.eval()


def _layer_algos(quant: dict, quantized: Dict[str, nn.Module]) -> Dict[str, Tuple[str, Optional[int]]]:
    algo = quant.get("quant_algo")
    if algo == "MIXED_PRECISION":
        return {n: (d["quant_algo"], d.get("group_size")) for n, d in quant.get("quantized_layers", {}).items()}
    return {n: (algo, quant.get("group_size")) for n in quantized}


def _excluded(name: str, patterns) -> bool:
    from fnmatch import fnmatch

    return any(name == p or fnmatch(name, p) or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns)


def _quantize_from_config(model: nn.Module, quant: dict, reader: CheckpointReader) -> None:
    """Set up quantizers from hf_quant_config.json alone (checkpoints written by other tools)."""
    replace_quant_modules(model)
    exclude = quant.get("exclude_modules") or []
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantModule) and f"{n}.weight_scale" in reader}
    algos = _layer_algos(quant, layers)
    for name, m in model.named_modules():
        if not isinstance(m, QuantModule):
            continue
        for q in m.modules():
            if isinstance(q, TensorQuantizer):
                q.disable()
        if name not in algos or _excluded(name, exclude):
            continue
        algo, group = algos[name]
        w_attrs, i_attrs = algo_quantizers(algo, group)
        m.weight_quantizer.set_attributes(w_attrs)
        if i_attrs is not None:
            m.input_quantizer.set_attributes(i_attrs)
            if f"{name}.input_scale" in reader:
                scale = reader.get(f"{name}.input_scale").float()
                qmax = NVFP4_GLOBAL if m.input_quantizer.fmt.scale is not None else m.input_quantizer.fmt.element.max_value
                m.input_quantizer.amax = scale * qmax
        if f"{name}.pre_quant_scale" in reader:
            m.input_quantizer.pre_quant_scale = reader.get(f"{name}.pre_quant_scale")
    kv = quant.get("kv_cache_quant_algo")
    if kv:
        for name, m in model.named_modules():
            for role in ("k", "v"):
                key = f"{name}.{role}_proj.{role}_scale"
                proj = getattr(m, f"{role}_proj", None)
                if key in reader and isinstance(proj, QuantModule):
                    # The attention's own k/v quantizer (post-RoPE, what the cache holds) when there is one.
                    q = getattr(m, f"{role}_bmm_quantizer", None)
                    if not isinstance(q, TensorQuantizer):
                        q = proj.output_quantizer
                    q.set_attributes({"num_bits": "e4m3", "axis": None} if kv == "FP8" else
                                     {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}})
                    q.amax = reader.get(key).float() * (FP8_MAX if kv == "FP8" else NVFP4_GLOBAL)
    warnings.warn("load_hf_checkpoint: no modelopt_lite state in the checkpoint; activation amaxes are derived "
                  "from the stored scales, so outputs may differ from the exported model in the last bit")


def load_hf_checkpoint(path: Union[str, Path], *, dtype: Optional[torch.dtype] = None,
                       device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Rebuild the fake-quant model of an exported Hugging Face unified checkpoint."""
    path = Path(path)
    for required in ("config.json", "hf_quant_config.json"):
        if not (path / required).is_file():
            raise FileNotFoundError(f"{path} is not a quantized Hugging Face checkpoint: {required} is missing")
    config_json = json.loads((path / "config.json").read_text())
    quant = json.loads((path / "hf_quant_config.json").read_text()).get("quantization", {})
    reader = CheckpointReader(path)
    model = _build_model(config_json, dtype)
    if (path / STATE_DIR / "quant_state.json").is_file():
        restore_quant_state(model, path / STATE_DIR)
    else:
        _quantize_from_config(model, quant, reader)
    quantized = {n: m for n, m in model.named_modules()
                 if isinstance(m, QuantWeightModule) and m.weight_quantizer.is_enabled}
    algos = _layer_algos(quant, quantized)
    state: Dict[str, torch.Tensor] = {}
    used = set()
    for name, m in quantized.items():
        if name not in algos:
            raise ExportError(f"{path}: layer {name!r} is quantized in the state but not in hf_quant_config.json")
        tensors = {s: reader.get(f"{name}.{s}") for s in _SUFFIXES if f"{name}.{s}" in reader}
        used.update(f"{name}.{s}" for s in tensors)
        w = dequantize_weight(tensors, algos[name][0], m.weight_quantizer.fmt, m.weight.dtype)
        state[f"{name}.weight"] = w.t() if getattr(m, "weight_axis_last", False) else w
        m.weight_quantizer.disable()  # the weight now holds the fake-quantized values
    for key in reader.keys():
        if key in used or key.endswith((".k_scale", ".v_scale")):
            continue
        state[key] = reader.get(key)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tied_keys(model)
    missing = [k for k in missing if "_quantizer." not in k and k not in tied]
    if missing or unexpected:
        raise ExportError(f"{path}: checkpoint does not match {type(model).__name__}: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()


def _tied_keys(model: nn.Module) -> set:
    """State-dict keys whose tensor is also stored under another key (tied embeddings): written once."""
    names: Dict[int, list] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(key)
    return {k for keys in names.values() if len(keys) > 1 for k in keys}
