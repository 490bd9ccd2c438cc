"""Post-training quantization: ``import modelopt_lite.quantization as mtq``.

    model = mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop=loop)
    mtq.print_quant_summary(model)
"""

from . import formats
from .algorithms import ALGORITHMS, register_algorithm
from .modes import calibrate
from .api import create_forward_loop, fold_weight, quantize
from .calib import CALIBRATORS, CalibrationError
from .config import ConfigError, QuantizeConfig, QuantizerAttributeConfig
from .conversion import (
    disable_quantizer,
    enable_quantizer,
    named_quantizers,
    replace_quant_modules,
    set_quantizer_attribute,
    set_quantizer_by_cfg,
)
from .nn import QUANT_MODULES, QuantAttention, QuantInputModule, QuantModule, QuantWeightModule, register_quant_module
from .presets import (
    KV_CACHE_QFORMATS,
    PRESET_INFO,
    PRESETS,
    QFORMATS,
    compose_configs,
    get_config,
    is_kv_cache_preset,
    load_config_file,
    with_kv_cache,
)
from .state import save, restore, quant_state_dict, apply_quant_state
from .summary import print_quant_summary, quant_summary, weight_bytes
from .compress import CompressedLinear, compress, is_compressed
from .tensor_quantizer import TensorQuantizer
from .auto_quantize import AutoQuantizeReport, BudgetError, auto_quantize

globals().update(PRESETS)  # INT8_DEFAULT_CFG, FP8_DEFAULT_CFG, NVFP4_DEFAULT_CFG, ...

__all__ = [
    "auto_quantize", "AutoQuantizeReport", "BudgetError",
    "formats", "ALGORITHMS", "calibrate", "register_algorithm", "create_forward_loop", "fold_weight", "quantize",
    "CALIBRATORS", "CalibrationError", "ConfigError", "QuantizeConfig", "QuantizerAttributeConfig",
    "disable_quantizer", "enable_quantizer", "named_quantizers", "replace_quant_modules",
    "set_quantizer_attribute", "set_quantizer_by_cfg", "QUANT_MODULES", "QuantInputModule", "QuantModule",
    "QuantWeightModule", "register_quant_module", "PRESET_INFO", "PRESETS", "QFORMATS", "get_config",
    "load_config_file", "print_quant_summary", "quant_summary", "TensorQuantizer",
    "save", "restore", "quant_state_dict", "apply_quant_state", *PRESETS,
    "QuantAttention", "compress", "CompressedLinear", "is_compressed", "weight_bytes", "compose_configs", "with_kv_cache", "is_kv_cache_preset", "KV_CACHE_QFORMATS",
]
