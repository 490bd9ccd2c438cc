"""Calibrators: collect statistics of the tensors a quantizer sees, then give an amax.

Each calibrator is registered by name in CALIBRATORS (``calibrator: max`` in a
config); a new one is a class in a new file of this package.
"""

from .base import CALIBRATORS, CalibrationError, Calibrator, batch_counter, current_batch
from .histogram import EntropyCalibrator, HistogramCalibrator, HistogramMseCalibrator, PercentileCalibrator
from .max import MaxCalibrator
from .mse import MseCalibrator

__all__ = [
    "CALIBRATORS", "CalibrationError", "Calibrator", "MaxCalibrator", "batch_counter", "current_batch",
    "HistogramCalibrator", "PercentileCalibrator", "EntropyCalibrator", "HistogramMseCalibrator", "MseCalibrator",
]
