"""Kernel launches and eager latency of a compressed tiny Hugging Face Llama before and after `optimize`.

For each format the model (`build_tiny_model("llama")`, bf16) is quantized (max calibration on one
batch), compressed, and wrapped to return logits; `optimize` captures it with torch.export and runs
the default pipeline. Reported: kernels per forward (torch profiler on CUDA, computing operator
calls on the CPU), eager ms per forward (median of 50 after warm-up), the cosine of the logits and
the transforms' match counts.

    PYTHONPATH=. python benchmarks/optimize_launches.py [--formats fp8,nvfp4] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from modelopt_lite.models import CausalLMLogits
from report import emit

FORMATS = ["bf16", "fp8", "nvfp4", "w4a16_nvfp4", "int4_awq"]


def eager_ms(fn, x, reps=50):
    cuda = x.is_cuda
    times = []
    with torch.no_grad():
        for i in range(reps + 5):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(x)
            if cuda:
                torch.cuda.synchronize()
            if i >= 5:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(fmt, device):
    import modelopt_lite.quantization as mtq
    from modelopt_lite.models.tiny import build_tiny_model
    from modelopt_lite.transforms import count_launches, optimize

    model = build_tiny_model("llama").to(device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    if fmt != "bf16":
        mtq.quantize(model, fmt, lambda m: m(ids))
        mtq.compress(model)
    wrapped = CausalLMLogits(model).eval()
    with torch.no_grad():
        ref = wrapped(ids)
        gm = optimize(wrapped, (ids,), log=False)
        out = gm(ids)
    before, after = count_launches(wrapped, ids), count_launches(gm, ids)
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.float().flatten(), dim=0).item()
    matches = " ".join(f"{r.key}={r.matches}" for r in gm.meta["transform_report"] if r.status == "applied" and r.matches)
    return dict(fmt=fmt, before=before.kernels, after=after.kernels, how=before.how, ms_before=eager_ms(wrapped, ids),
                ms_after=eager_ms(gm, ids), cos=cos, equal=bool(torch.equal(out, ref)), matches=matches)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for fmt in args.formats.split(","):
        if fmt not in FORMATS:
            raise SystemExit(f"unknown format {fmt!r}; choose from {FORMATS}")
        rows.append(run(fmt, args.device))
        print(rows[-1], flush=True)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [f"optimize() on a compressed tiny HF Llama (2 layers, hidden 64, batch 2 x 16 tokens), {dev}, "
             f"torch {torch.__version__}, {datetime.date.today().isoformat()}; launches counted by {rows[0]['how']}", "",
             "| format | launches before | after | eager ms before | after | logits cos | equal | matches |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fmt']} | {r['before']} | {r['after']} | {r['ms_before']:.2f} | {r['ms_after']:.2f} | "
                     f"{r['cos']:.6f} | {'yes' if r['equal'] else 'no'} | {r['matches']} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
