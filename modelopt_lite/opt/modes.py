"""Modes: every optimization applied to a model is recorded, in order, with its config.

Each optimization (``quantize``, ``calibrate``, ``auto_quantize``, ``prune``, ...) calls
`record_mode(model, name, config, state)` when it has changed the model. The history lives on
the model (``model._modelopt_lite_modes``, a list of JSON-ready dicts) and is what
`modelopt_lite.opt.save` writes and `modelopt_lite.opt.restore` replays onto a freshly built
model: for each entry, the replay function registered for its mode (`register_mode`) is called
with the entry's config and state, in the order the modes were applied.

``state`` must hold only JSON values (dicts, lists, strings, numbers, booleans, None); tensors
that a mode needs to restore the model exactly are restored from the saved model state instead
(weights, quantizer amaxes).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from torch import nn

__all__ = ["ModeError", "ModeEntry", "record_mode", "get_modes", "register_mode", "registered_modes", "replay_mode",
           "MODES_ATTR"]

MODES_ATTR = "_modelopt_lite_modes"

ReplayFn = Callable[[nn.Module, Dict[str, Any], Dict[str, Any]], None]


class ModeError(ValueError):
    """A mode that is not registered, or a config/state that cannot be recorded or replayed."""


@dataclass(frozen=True)
class ModeEntry:
    """One applied optimization: its mode name, config and replay state (JSON values only)."""

    mode: str
    config: Dict[str, Any]
    state: Dict[str, Any]

    def to_json(self) -> Dict[str, Any]:
        return {"mode": self.mode, "config": self.config, "state": self.state}


_REPLAY: Dict[str, ReplayFn] = {}


def register_mode(name: str, replay: ReplayFn, overwrite: bool = False) -> None:
    """Declare mode `name`; `replay(model, config, state)` re-applies it to a fresh model."""
    if not isinstance(name, str) or not name:
        raise ModeError(f"a mode name must be a non-empty string, got {name!r}")
    if name in _REPLAY and not overwrite and _REPLAY[name] is not replay:
        raise ModeError(f"mode {name!r} is already registered")
    _REPLAY[name] = replay


def registered_modes() -> List[str]:
    return sorted(_REPLAY)


def _json_ready(value: Any, where: str) -> Any:
    """A deep copy of `value` that json can write (tuples become lists); errors name the bad key."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ModeError(f"{where}: {value!r} is not a finite number")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_ready(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ModeError(f"{where}: key {k!r} is not a string")
            out[k] = _json_ready(v, f"{where}.{k}")
        return out
    raise ModeError(f"{where}: {type(value).__name__} is not a JSON value; record plain numbers, strings, lists "
                    "and dicts (tensors are saved with the model's state)")


def record_mode(model: nn.Module, name: str, config: Optional[Dict[str, Any]] = None,
                state: Optional[Dict[str, Any]] = None) -> ModeEntry:
    """Append mode `name` to the model's history; returns the entry."""
    if name not in _REPLAY:
        raise ModeError(f"mode {name!r} is not registered; known modes: {', '.join(registered_modes())}")
    entry = ModeEntry(name, _json_ready(config or {}, f"{name} config"), _json_ready(state or {}, f"{name} state"))
    _append(model, entry)
    return entry


def _append(model: nn.Module, entry: ModeEntry) -> None:
    setattr(model, MODES_ATTR, list(getattr(model, MODES_ATTR, [])) + [entry.to_json()])


def get_modes(model: nn.Module) -> List[ModeEntry]:
    """The modes applied to `model`, oldest first."""
    return [ModeEntry(e["mode"], copy.deepcopy(e["config"]), copy.deepcopy(e["state"]))
            for e in getattr(model, MODES_ATTR, [])]


def replay_mode(model: nn.Module, entry: ModeEntry) -> None:
    """Re-apply one recorded mode to `model` and append it to the model's history."""
    if entry.mode not in _REPLAY:
        raise ModeError(f"saved mode {entry.mode!r} is not registered here (known: {', '.join(registered_modes())}); "
                        "import the package that defines it before restoring")
    _REPLAY[entry.mode](model, copy.deepcopy(entry.config), copy.deepcopy(entry.state))
    _append(model, entry)
