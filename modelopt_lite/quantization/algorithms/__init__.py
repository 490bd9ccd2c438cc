"""Calibration algorithms, selected by `algorithm` in a config.

Each algorithm is a function `(model, forward_loop, **options)` registered
in ALGORITHMS from its own file in this package; every module here is
imported on load, so adding an algorithm is adding a file.
"""

import importlib
import pkgutil

from .registry import ALGORITHMS, calibrate, register_algorithm

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["ALGORITHMS", "calibrate", "register_algorithm"]
