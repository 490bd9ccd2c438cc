"""Text shipped with the package: calibration and held-out sentences, and readers for user files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

_HERE = Path(__file__).resolve().parent


def calibration_sentences() -> List[str]:
    """The 400 calibration sentences shipped with the package."""
    return _read_lines(_HERE / "calib_sentences.txt")


def heldout_sentences() -> List[str]:
    """The 120 held-out sentences used for fidelity reports (disjoint from calibration)."""
    return _read_lines(_HERE / "heldout_sentences.txt")


def _read_lines(path: Path) -> List[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_text_file(path: str | Path) -> List[str]:
    """Sentences from a user file: .txt (one per line), .jsonl ({"text": ...} per line) or .json (a list)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(_text_of(json.loads(line)))
            except (ValueError, KeyError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON string or an object with a 'text' field ({e})") from None
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of strings or of objects with a 'text' field")
        texts = [_text_of(item) for item in data]
    else:
        texts = _read_lines(path)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"calibration file {str(path)!r} holds no text")
    return texts


def _text_of(item) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    raise KeyError("no 'text' field")
