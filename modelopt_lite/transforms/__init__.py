"""Graph transforms: a registry, an FX pattern matcher and the `optimize` pipeline.

    from modelopt_lite.transforms import optimize
    gm = optimize(model, example_inputs=(x,), config={"transforms": [{"key": "remove_identity", "enabled": False}]})
    gm.meta["transform_report"]   # [TransformResult(key, status, matches, reason), ...]
"""

from .pattern import Match, ModuleSlot, Pattern, canonical_target, find_matches, has_dtype, has_rank, node_meta, replace_match
from .launches import LaunchCount, count_launches
from .pipeline import DEFAULT_CONFIG, TransformResult, capture, format_graph, load_pipeline, optimize
from . import fuse_norm_quant  # noqa: F401  (registers norm_quant, swiglu_quant)
from .fuse_linear import HorizontalLinear, QuantizedLinear, capture_quantized, gemm_node_count
from .registry import (TRANSFORMS, Transform, TransformConfig, TransformConfigError, TransformContext, build_transform,
                       get_transform, known_transforms, register_transform, unregister_transform)

__all__ = [
    "DEFAULT_CONFIG", "LaunchCount", "count_launches", "HorizontalLinear", "QuantizedLinear", "capture_quantized", "gemm_node_count", "Match", "ModuleSlot", "Pattern", "TRANSFORMS", "Transform", "TransformConfig",
    "TransformConfigError", "TransformContext", "TransformResult", "build_transform", "canonical_target", "capture",
    "find_matches", "format_graph", "get_transform", "has_dtype", "has_rank", "known_transforms", "load_pipeline",
    "node_meta", "optimize", "register_transform", "replace_match", "unregister_transform",
]
