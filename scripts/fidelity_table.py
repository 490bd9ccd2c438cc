"""Run `modelopt-lite ptq` for every preset and print a Markdown fidelity table.

    .venv/bin/python scripts/fidelity_table.py [--model DIR] [extra ptq args...]
"""

import contextlib
import json
import sys
import tempfile
from pathlib import Path

from modelopt_lite.cli import main
from modelopt_lite.quantization import PRESET_INFO


def run() -> int:
    extra = sys.argv[1:]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, info in sorted(PRESET_INFO.items(), key=lambda kv: kv[1]["qformat"]):
            out = Path(tmp) / f"{info['qformat']}.json"
            with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the table
                rc = main(["ptq", "--qformat", info["qformat"], "--no-summary", "--report-json", str(out), *extra])
            if rc != 0:
                print(f"{info['qformat']} failed with exit code {rc}", file=sys.stderr)
                return rc
            r = json.loads(out.read_text())
            rows.append((info["qformat"], name, r["mean_cosine"], r["min_cosine"], r["spearman_pairwise"]))
    print("| qformat | preset | mean cosine | min cosine | Spearman (pairwise) |")
    print("|---|---|---|---|---|")
    for q, n, mc, mn, sp in rows:
        print(f"| {q} | {n} | {mc:.4f} | {mn:.4f} | {sp:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(run())
