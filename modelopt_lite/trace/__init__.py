"""Graphs of models and the dimensions that depend on each other across layers.

    from modelopt_lite.trace import recursive_trace, analyze_symbols
    graphs = recursive_trace(model)     # GraphCollection
    symbols = analyze_symbols(model)    # SymMap
"""

from .analyzer import analyze_symbols
from .collection import GraphCollection, GraphEntry, example_inputs_for, recursive_trace
from .export_graph import capture_with_export
from .fanout import residual_writers, shared_input_groups
from .symbols import CLType, ConcatSymbol, Symbol, SymInfo, SymMap, register_sym_info
from .tracer import RobustTracer, TraceFailure, is_leaf, register_leaf, register_leaf_predicate, unregister_leaf

__all__ = [
    "CLType",
    "ConcatSymbol",
    "Symbol",
    "SymInfo",
    "SymMap",
    "analyze_symbols",
    "residual_writers",
    "shared_input_groups",
    "register_sym_info",
    "register_leaf_predicate",
    "GraphCollection",
    "GraphEntry",
    "RobustTracer",
    "TraceFailure",
    "capture_with_export",
    "example_inputs_for",
    "is_leaf",
    "recursive_trace",
    "register_leaf",
    "unregister_leaf",
]
