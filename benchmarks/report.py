"""Printing a benchmark's markdown result and writing it to --out (atomically)."""

from __future__ import annotations

from typing import Optional, Sequence


def emit(lines: Sequence[str], out: Optional[str]) -> str:
    """Print the lines as one text; write it to `out` when given. Returns the text."""
    from modelopt_lite.utils.fs import write_text_atomic

    text = "\n".join(lines)
    print(text)
    if out:
        write_text_atomic(out, text + "\n")
    return text
