"""The `modelopt-lite` command."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = {"ptq": ".ptq", "trace": ".trace", "aot": ".aot", "onnx-ptq": ".onnx_ptq"}
"""Command name -> module (imported only when needed: `onnx-ptq` runs without PyTorch)."""


def _module(name: str):
    return importlib.import_module(COMMANDS[name], __package__)


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser with every command's subparser, or only `only`'s."""
    parser = argparse.ArgumentParser(prog="modelopt-lite", description="PyTorch model optimization toolkit.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS if only is None else [only]:
        _module(name).add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _module(args.command).run(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, KeyError) as e:
        print(f"modelopt-lite {args.command}: error: {e}", file=sys.stderr)
        return 2
