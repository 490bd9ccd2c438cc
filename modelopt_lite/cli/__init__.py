"""The `modelopt-lite` command."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import aot, ptq, trace

COMMANDS = {"ptq": ptq, "trace": trace, "aot": aot}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelopt-lite", description="PyTorch model optimization toolkit.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command].run(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, KeyError) as e:
        print(f"modelopt-lite {args.command}: error: {e}", file=sys.stderr)
        return 2
