"""Hugging Face unified checkpoint ("modelopt" quant_method) writer.

    export_hf_checkpoint(model, export_dir="out/llama-nvfp4")

The caller's model is only read: each quantized layer is converted from its
float weight and quantizers into packed codes and scales, one layer at a
time, and streamed to safetensors shards, so extra memory is about one
layer. Everything is written into a temporary directory beside the target
and renamed at the end. Layout and formulas: ../shared/specs/CHECKPOINTS.md
part A.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .. import __version__
from ..quantization.state import save as save_quant_state
from ..utils.fs import atomic_directory
from .layers import ExportError, export_linear, kv_scale
from .plan import ExportPlan, plan_export
from .safetensors_io import ShardedSafetensorsWriter

__all__ = ["export_hf_checkpoint", "hf_quant_config", "STATE_DIR", "PRODUCER"]

PRODUCER = {"name": "modelopt_lite", "version": __version__}
STATE_DIR = "modelopt_lite"
"""Subdirectory holding the exact quantizer state (activation amaxes, attributes) for `load_hf_checkpoint`."""

_GROUP_SIZE = {"NVFP4": 16, "W4A16_NVFP4": 16, "W4A8_NVFP4_FP8": 32}
_AWQ = ("W4A16_AWQ", "W4A8_AWQ")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                    "chat_template.json", "spiece.model", "generation_config.json")


def _layer_group_size(model: nn.Module, name: str, algo: str) -> Optional[int]:
    if algo in _AWQ:
        return int(model.get_submodule(name).weight_quantizer.fmt.blocks[-1])
    return _GROUP_SIZE.get(algo)


def hf_quant_config(model: nn.Module, plan: ExportPlan) -> Dict[str, Any]:
    """The nested `hf_quant_config.json` content (CHECKPOINTS.md 2.2)."""
    algo = plan.quant_algo
    q: Dict[str, Any] = {"quant_algo": algo, "kv_cache_quant_algo": plan.kv_algo}
    sizes = {n: _layer_group_size(model, n, a) for n, a in plan.algos.items()}
    uniform = {s for s in sizes.values() if s is not None}
    if len(uniform) == 1:
        q["group_size"] = uniform.pop()
    if algo in _AWQ:
        q["has_zero_point"] = False
        q["pre_quant_scale"] = True
    q["exclude_modules"] = list(plan.excluded)
    if algo == "MIXED_PRECISION":
        q["quantized_layers"] = {
            n: {"quant_algo": a, **({"group_size": sizes[n]} if sizes[n] else {})} for n, a in plan.algos.items()}
    return {"producer": dict(PRODUCER), "quantization": q}


def _config_groups(algo: Optional[str]) -> Optional[Dict[str, Any]]:
    fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    if algo == "FP8":
        group = {"weights": fp8, "input_activations": fp8}
    elif algo == "NVFP4":
        group = {"weights": fp4, "input_activations": fp4}
    elif algo == "W4A16_NVFP4":
        group = {"weights": fp4}
    else:
        return None
    return {"group_0": {"targets": ["Linear"], **group}}


def quantization_config(hf_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The flat `config.json["quantization_config"]` block (CHECKPOINTS.md 2.3)."""
    q = hf_cfg["quantization"]
    out: Dict[str, Any] = {"quant_method": "modelopt", "quant_algo": q["quant_algo"], "ignore": q["exclude_modules"]}
    if q["kv_cache_quant_algo"] == "FP8":
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    elif q["kv_cache_quant_algo"] == "NVFP4":
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    groups = _config_groups(q["quant_algo"])
    if groups:
        out["config_groups"] = groups
    if "group_size" in q:
        out["group_size"] = q["group_size"]
    if "quantized_layers" in q:
        out["quantized_layers"] = q["quantized_layers"]
    out["producer"] = hf_cfg["producer"]
    return out


def _model_config(model: nn.Module) -> Dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ExportError("export_hf_checkpoint needs a Hugging Face transformers model (with .config); "
                          "use export_onnx or mtq.save for other models")
    d = config.to_dict()
    if not d.get("architectures"):
        d["architectures"] = [type(model).__name__]
    return d


def _tensor_out(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    t = t.detach()
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _write_tensors(model: nn.Module, plan: ExportPlan, writer: ShardedSafetensorsWriter,
                   dtype: Optional[torch.dtype]) -> None:
    written = set()
    for key, t in model.state_dict(keep_vars=True).items():
        mod, _, leaf = key.rpartition(".")
        if "_quantizer." in key:
            continue  # quantizer state (amax, pre_quant_scale) never goes into the checkpoint
        if mod in plan.algos and leaf == "weight":
            module = model.get_submodule(mod)
            with torch.no_grad():
                tensors = export_linear(module, plan.algos[mod], plan.shared.get(mod), dtype)
            for suffix, value in tensors.items():
                writer.add(f"{mod}.{suffix}", value)
            continue
        if id(t) in written:
            continue  # tied weights are stored once, as transformers does
        written.add(id(t))
        writer.add(key, _tensor_out(t, dtype))
    for attn, quantizers in plan.kv.items():
        for role, q in sorted(quantizers.items()):
            owner = f"{attn}.{role}_proj" if isinstance(getattr(model.get_submodule(attn), f"{role}_proj", None),
                                                        nn.Module) else attn
            writer.add(f"{owner}.{role}_scale" if owner else f"{role}_scale", kv_scale(q))


def _source_dir(model: nn.Module, source_dir) -> Optional[Path]:
    if source_dir is not None:
        return Path(source_dir)
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return Path(path) if path and Path(path).is_dir() else None


def export_hf_checkpoint(
    model: nn.Module,
    export_dir: Union[str, Path],
    *,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    source_dir: Union[str, Path, None] = None,
) -> Path:
    """Write `model` (quantized with `quantize`) as a Hugging Face unified checkpoint.

    `dtype` casts the unquantized tensors (default: as they are in the
    model); shards above `max_shard_size` get an index file; tokenizer and
    generation files are copied from `source_dir` (default: the directory
    the model was loaded from). An existing non-empty `export_dir` is
    refused unless `overwrite`. Returns the directory.
    """
    plan = plan_export(model)
    config = _model_config(model)
    hf_cfg = hf_quant_config(model, plan)
    config["quantization_config"] = quantization_config(hf_cfg)
    src = _source_dir(model, source_dir)
    with atomic_directory(export_dir, overwrite=overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_size)
        _write_tensors(model, plan, writer, dtype)
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / "hf_quant_config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "to_json_string"):
            (tmp / "generation_config.json").write_text(gen.to_json_string())
        if src is not None:
            for name in _TOKENIZER_FILES:
                if (src / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(src / name, tmp / name)
        save_quant_state(model, tmp / STATE_DIR, include_weight_amax=False)  # exact activation amaxes
    return Path(export_dir)
