"""Write graphs as readable text and as Graphviz dot."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List

from torch import fx

from .collection import GraphCollection
from ..utils.fs import write_text_atomic

__all__ = ["graph_to_dot", "dump_graphs"]


def _label(node: fx.Node) -> str:
    val = node.meta.get("val")
    shape = f"\\n{tuple(val.shape)}" if hasattr(val, "shape") else ""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    text = f"{node.name}\\n{node.op}: {target}{shape}"
    return text.replace('"', "'")


_COLORS = {"placeholder": "lightblue", "output": "lightblue", "call_module": "gold", "get_attr": "gray90"}


def graph_to_dot(graph: fx.Graph, name: str = "graph") -> str:
    """A Graphviz digraph: one box per node (layers in gold), edges for data flow."""
    lines = [f'digraph "{name}" {{', "  rankdir=TB;", '  node [shape=box, style=filled, fontname="monospace", fontsize=10];']
    for node in graph.nodes:
        color = _COLORS.get(node.op, "white")
        lines.append(f'  "{node.name}" [label="{_label(node)}", fillcolor="{color}"];')
        for inp in node.all_input_nodes:
            lines.append(f'  "{inp.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"




def dump_graphs(graphs: GraphCollection, out_dir: str | os.PathLike) -> List[Path]:
    """Write `<name>.txt` (the graph's nodes, then its Python code) and `<name>.dot` for every graph."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    for entry in graphs.entries():
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", entry.name or "root")
        header = f"# graph of {entry.name or '<root>'} ({type(entry.module).__name__}), captured by {entry.method}\n"
        if entry.note:
            header += f"# {entry.note}\n"
        try:
            code = entry.graph.python_code("self").src
        except Exception as e:  # noqa: BLE001 - the node listing is still useful
            code = f"# no Python code: {type(e).__name__}: {e}\n"
        text = header + "\n" + str(entry.graph) + "\n\n# Python code\n" + code
        for path, content in ((out / f"{stem}.txt", text), (out / f"{stem}.dot", graph_to_dot(entry.graph, stem))):
            write_text_atomic(path, content)
            written.append(path)
    (out / "summary.txt").write_text(graphs.summary() + "\n")
    written.append(out / "summary.txt")
    return written
