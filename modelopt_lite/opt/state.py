"""Saving a model with its whole optimization history, and replaying it onto a fresh model.

    import modelopt_lite.opt as mto
    mto.save(model, "out/ckpt")          # modes, quantization state, weights; no pickle
    fresh = build_model()                 # the original architecture (weights need not match)
    mto.restore(fresh, "out/ckpt")        # prune / quantize / ... replayed in order, then the saved values

On disk, one directory: ``modelopt_state.json`` (format tag, version, the list of modes with their
configs and replay states), ``quant_state.json`` + ``quant_state.safetensors`` when the model is
quantized (every quantizer's attributes and calibrated values) and ``model.safetensors`` (the model's
parameters and buffers). `restore` replays each mode's registered replay function in order (structural
changes: pruning, layer conversion, per-layer formats), then applies the quantization state and loads
the tensors strictly, so the restored model equals the saved one.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Union

from torch import nn

from ..quantization.state import safetensors_torch
from ..utils.fs import atomic_directory
from .modes import MODES_ATTR, ModeEntry, ModeError, registered_modes, replay_mode

__all__ = ["save", "restore", "STATE_FILE", "WEIGHTS_FILE", "FORMAT", "VERSION"]

STATE_FILE = "modelopt_state.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "modelopt_lite.modelopt_state"
VERSION = 1
PathLike = Union[str, "os.PathLike[str]"]

_PROVIDERS = {
    "quantize": "modelopt_lite.quantization",
    "calibrate": "modelopt_lite.quantization",
    "auto_quantize": "modelopt_lite.quantization.auto_quantize",
    "prune": "modelopt_lite.prune",
}
"""Where each built-in mode's replay is registered (imported on demand by `restore`)."""


def _is_quantized(model: nn.Module) -> bool:
    from ..quantization.conversion import named_quantizers

    return next(iter(named_quantizers(model)), None) is not None


def save(model: nn.Module, path: PathLike, overwrite: bool = False) -> Path:
    """Write `model`'s modes, quantization state and tensors to the directory `path` (atomically)."""
    from ..quantization.compress import is_compressed
    from ..quantization.state import write_quant_state

    if is_compressed(model):
        raise ValueError("save: the model holds compressed layers (mtq.compress); save it before compressing, "
                         "and compress again after restore")
    doc = {"format": FORMAT, "version": VERSION, "modes": list(getattr(model, MODES_ATTR, [])),
           "quantized": _is_quantized(model)}
    text = json.dumps(doc, indent=1, allow_nan=False)
    target = Path(path)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        (tmp / STATE_FILE).write_text(text + "\n", encoding="utf-8")
        if doc["quantized"]:
            write_quant_state(tmp, model)
        safetensors_torch().save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return target


def _read(root: Path) -> Dict[str, Any]:
    f = root / STATE_FILE
    if not f.is_file():
        raise FileNotFoundError(f"no saved model at {str(root)!r}: {STATE_FILE} is missing")
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModeError(f"{str(f)!r} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModeError(f"{str(f)!r} is not a {FORMAT} file")
    if doc.get("version") != VERSION:
        raise ModeError(f"{str(f)!r} has version {doc.get('version')!r}; this release reads version {VERSION}")
    if not isinstance(doc.get("modes"), list) or not all(isinstance(e, dict) and {"mode", "config", "state"} <= set(e)
                                                          for e in doc["modes"]):
        raise ModeError(f"{str(f)!r}: 'modes' must be a list of {{mode, config, state}} entries")
    return doc


def restore(model: nn.Module, path: PathLike, strict: bool = True) -> nn.Module:
    """Replay the modes saved at `path` onto `model` (freshly built, no modes applied), then load the
    saved quantization state and tensors; returns the model."""
    from ..quantization.state import apply_quant_state, read_quant_state

    root = Path(path)
    doc = _read(root)
    if getattr(model, MODES_ATTR, None):
        raise ModeError("restore: the model already has modes applied "
                        f"({', '.join(e['mode'] for e in getattr(model, MODES_ATTR))}); restore into a freshly built model")
    if not (root / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no saved model at {str(root)!r}: {WEIGHTS_FILE} is missing")
    for entry in doc["modes"]:
        if entry["mode"] not in registered_modes() and entry["mode"] in _PROVIDERS:
            importlib.import_module(_PROVIDERS[entry["mode"]])
        replay_mode(model, ModeEntry(entry["mode"], entry["config"], entry["state"]))
    if doc.get("quantized"):
        meta, tensors = read_quant_state(root)
        apply_quant_state(model, meta, tensors, strict=strict)
    missing, unexpected = safetensors_torch().load_model(model, str(root / WEIGHTS_FILE), strict=False)
    if strict and (missing or unexpected):
        raise ModeError(f"restore: the replayed model does not match the saved tensors (missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}); was the model built from the same architecture?")
    return model
