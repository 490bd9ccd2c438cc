"""modelopt_lite: PyTorch model optimization (quantization, calibration, export).

The public surface: ``modelopt_lite.quantization`` (import as ``mtq``) and the
``modelopt-lite`` command.
"""

__version__ = "0.1.0"
