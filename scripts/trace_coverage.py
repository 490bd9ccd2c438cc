"""Print the tracing coverage table of docs/TRACING.md: every tiny Hugging Face model, traced end to end.

    python scripts/trace_coverage.py
"""

from __future__ import annotations

import time
import warnings

import torch

from modelopt_lite.models.tiny import TINY_MODELS, build_tiny_model
from modelopt_lite.trace import analyze_symbols, recursive_trace, shared_input_groups
from modelopt_lite.trace.graph_utils import linear_types


def main() -> None:
    warnings.filterwarnings("ignore")
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}\n")
    print("| model | FX on the root | captured by | graphs | modules covered | linear layers covered | "
          "shared-input groups | searchable symbol groups | trace + analysis (s) | FX alone: graphs, failed modules |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    models = [(name, lambda n=name: build_tiny_model(n)) for name in TINY_MODELS]
    try:
        from modelopt_lite.models.hf import load_hf_model

        load_hf_model()  # all-MiniLM-L6-v2, when its package is installed
        models.append(("minilm", lambda: load_hf_model().model))
    except (FileNotFoundError, ImportError):
        pass
    for name, build in models:
        model = build()
        t0 = time.perf_counter()
        graphs = recursive_trace(model)
        symbols = analyze_symbols(model, graphs=graphs)
        seconds = time.perf_counter() - t0
        entry = graphs.entries()[0]
        fx_root = "fails" if entry.method == "export" else "ok"
        cov, total = graphs.coverage()
        lin = graphs.coverage(linear_types())
        groups = shared_input_groups(graphs)
        kinds = sorted({"q/k/v" if len(g) == 3 else "gate/up" if len(g) == 2 else f"{len(g)} layers" for g in groups})
        searchable = sum(1 for g in symbols.groups if g[0].is_searchable or (g[0].is_dynamic and g[0].parent.is_searchable))
        fx_only = recursive_trace(model, use_export=False)
        label = type(model).__name__ + (" (all-MiniLM-L6-v2, pretrained)" if name == "minilm" else "")
        print(f"| {label} | {fx_root} | {entry.method} | {len(graphs)} | {cov}/{total} | "
              f"{lin[0]}/{lin[1]} | {len(groups)} ({', '.join(kinds) or 'none'}) | {searchable} | {seconds:.1f} | "
              f"{len(fx_only)}, {len(fx_only.failures())} |")


if __name__ == "__main__":
    main()
