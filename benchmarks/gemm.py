"""All GEMM benchmarks in one device call: FP8 W8A8 and 4-bit weight (NVFP4, INT4) against cuBLAS.

Runs `gemm_fp8` (our FP8 GEMM and `fp8_linear` vs `torch._scaled_mm` and bf16
cuBLAS) and `gemm_w4` (our NVFP4 and INT4 W4A16 GEMMs vs bf16 cuBLAS) over
M in {1, 4, 16, 64, 256, 1024, 4096, 8192} x (N, K) in {(4096, 4096),
(14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192), (8192, 28672)},
prints the tables with TFLOP/s and GB/s and the headline ratios, and with
`--out FILE` writes them as markdown with the date and the hardware.

    PYTHONPATH=. python benchmarks/gemm.py [--quick] [--only fp8|w4] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gemm_fp8  # noqa: E402
import gemm_w4  # noqa: E402


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def w4_summary(rows):
    """Speedup over bf16 cuBLAS per kind: geomean and minimum for M in {1, 4, 16}, and for M >= 1024."""
    out = {}
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind]
        for label, sel in (("M<=16", lambda m: m <= 16), ("M>=1024", lambda m: m >= 1024)):
            sp = [r["t_bf16"] / r["t_ours"] for r in mine if sel(r["M"])]
            if sp:
                out[f"{kind} {label} speedup vs bf16 (geomean / min)"] = f"{geomean(sp):.2f} / {min(sp):.2f}"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 4 x 2 subset of the suite")
    ap.add_argument("--only", choices=("fp8", "w4"), default=None)
    ap.add_argument("--out", default=None, help="write the tables as markdown here")
    ap.add_argument("--budget-s", type=float, default=math.inf, help="per suite: stop starting new shapes after this long")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the GEMM benchmarks need a CUDA device")
    ms, nks = (gemm_fp8.QUICK_MS, gemm_fp8.QUICK_NKS) if args.quick else (gemm_fp8.MS, gemm_fp8.NKS)
    head = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}; GPU time per call from CUDA-graph replays, weights read from HBM")
    parts = [head, ""]
    if args.only in (None, "fp8"):
        t0 = time.time()
        rows = gemm_fp8.run(ms, nks, deadline=t0 + args.budget_s)
        parts += ["### FP8 W8A8 (per-tensor scales)", "", gemm_fp8.markdown(rows), ""]
        parts += [f"- geomean {k}: {v:.3f}" for k, v in gemm_fp8.summary(rows).items()]
        parts += [f"- {len(rows)} shapes in {time.time() - t0:.0f} s", ""]
        write(args.out, parts)
    if args.only in (None, "w4"):
        t0 = time.time()
        rows = gemm_w4.run(ms, nks, deadline=t0 + args.budget_s)
        parts += ["### 4-bit weights (W4A16: NVFP4, INT4 block 128), bf16 activations", "", gemm_w4.markdown(rows), ""]
        parts += [f"- {k}: {v}" for k, v in w4_summary(rows).items()]
        parts += [f"- {len(rows)} shapes in {time.time() - t0:.0f} s", ""]
    print("\n".join(parts))
    write(args.out, parts)


def write(path, parts):
    """Write what is measured so far (atomically), so a run cut short still leaves its tables."""
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(parts) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
