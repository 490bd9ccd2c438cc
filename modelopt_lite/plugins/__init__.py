"""Plugins: custom ops written in Python (Triton or PyTorch) that trace, compile, save and export to ONNX.

See ``docs/PLUGINS.md``. ``modelopt_lite.plugins.examples`` holds a worked example (``TritonLookUp``).
"""

from .base import (DEFAULT_DOMAIN, NAMESPACE, PluginBase, PluginError, SymTensor, get_plugin, plugin, plugin_op,
                   register_plugin, registered_plugins)

__all__ = ["PluginBase", "SymTensor", "PluginError", "plugin", "register_plugin", "registered_plugins",
           "get_plugin", "plugin_op", "NAMESPACE", "DEFAULT_DOMAIN"]
