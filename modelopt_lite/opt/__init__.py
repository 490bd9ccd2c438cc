"""Optimization modes: the recorded history of what was applied to a model, and its save/restore."""

from .modes import (MODES_ATTR, ModeEntry, ModeError, get_modes, record_mode, register_mode, registered_modes,
                    replay_mode)
from .state import restore, save

__all__ = ["MODES_ATTR", "ModeEntry", "ModeError", "get_modes", "record_mode", "register_mode", "registered_modes",
           "replay_mode", "restore", "save"]
