"""`modelopt-lite trace`: trace a model, print its graph coverage, failures and linked dimensions."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    from ..models.tiny import TINY_MODELS

    p = sub.add_parser("trace", help="trace a model: graph coverage, failures, symbol groups",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local Hugging Face model directory, or a tiny model built from a config: "
                   + ", ".join(f"tiny:{n}" for n in TINY_MODELS) + " (default: all-MiniLM-L6-v2)")
    p.add_argument("--dump", metavar="DIR", help="write every graph as text and Graphviz dot into DIR")
    p.add_argument("--groups", type=int, default=40, help="symbol groups to print (default 40; 0 for all)")
    p.add_argument("--no-export", action="store_true", help="FX only: no torch.export route")


def load_model(spec):
    if spec and spec.startswith("tiny:"):
        from ..models.tiny import build_tiny_model

        return build_tiny_model(spec[len("tiny:"):])
    from ..models.hf import load_hf_model

    return load_hf_model(spec).model


def run(args) -> int:
    from ..trace import analyze_symbols, recursive_trace, residual_writers, shared_input_groups

    model = load_model(args.model)
    graphs = recursive_trace(model, use_export=not args.no_export)
    print(graphs.summary())
    symbols = analyze_symbols(model, graphs=graphs)
    print()
    print(symbols.summary(max_groups=args.groups or None))
    groups = shared_input_groups(graphs)
    print()
    print(f"layers that read the same activation ({len(groups)} groups):")
    for g in groups:
        print("  " + ", ".join(g))
    writers = residual_writers(graphs)
    print(f"layers that write into a residual stream ({len(writers)}):")
    for w in writers:
        print("  " + w)
    if args.dump:
        from ..trace.dump import dump_graphs

        paths = dump_graphs(graphs, args.dump)
        print(f"\nwrote {len(paths)} files to {Path(args.dump)}")
    return 0
