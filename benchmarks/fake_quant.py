"""Fused fake-quant kernels against copy bandwidth and the PyTorch reference (CUDA).

    PYTHONPATH=. python benchmarks/fake_quant.py [--out FILE] [--sizes 256,512] [--sweep] [--overhead]

Every row is first checked bit for bit against `formats.fake_quant` (PASS/FAIL), then timed with
`triton.testing.do_bench` (median, L2 flushed between runs). Bandwidth counts the tensor's bytes
read plus written; "% of copy" compares with `y.copy_(x)` on the same tensor in the same run.
"first-call s" is the first call of each row's kernels in a fresh process with an empty Triton
cache (compilation included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from modelopt_lite.kernels import fake_quant as kfq
from modelopt_lite.quantization.formats import QuantFormat, block_amax, compute_amax
from modelopt_lite.quantization.formats import fake_quant as ref_fake_quant

from report import emit

F = QuantFormat.create

# name, format, amax kind (static / global / block / None = dynamic), granularity label
ROWS = [
    ("fp8_e4m3", F((4, 3)), "static", "per-tensor"),
    ("fp8_e5m2", F((5, 2)), "static", "per-tensor"),
    ("fp8_e4m3", F((4, 3), axis=0), "static", "per-channel (axis 0)"),
    ("fp8_e4m3", F((4, 3), axis=-1), "static", "per-channel (axis -1)"),
    ("fp8_e4m3", F((4, 3), block_sizes={-1: None}), None, "per-token (dynamic)"),
    ("fp8_e4m3", F((4, 3), block_sizes={-1: 128, -2: 128}), "static", "2-D blocks 128x128"),
    ("fp8_e4m3", F((4, 3), block_sizes={-1: 128, -2: 128}), None, "2-D blocks 128x128 (dynamic)"),
    ("int8", F(8), "static", "per-tensor"),
    ("int8", F(8, axis=0), "static", "per-channel (axis 0)"),
    ("int4", F(4, block_sizes={-1: 128}), "static", "blocks 128"),
    ("int4", F(4, block_sizes={-1: 128}), None, "blocks 128 (dynamic)"),
    ("nvfp4", F((2, 1), block_sizes={-1: 16}, scale_bits=(4, 3)), "global", "blocks 16, global amax"),
    ("nvfp4", F((2, 1), block_sizes={-1: 16}, scale_bits=(4, 3)), "block", "blocks 16, static block amax"),
    ("mxfp8", F((4, 3), block_sizes={-1: 32}, scale_bits=(8, 0)), None, "blocks 32"),
    ("mxfp6", F((3, 2), block_sizes={-1: 32}, scale_bits=(8, 0)), None, "blocks 32"),
    ("mxfp4", F((2, 1), block_sizes={-1: 32}, scale_bits=(8, 0)), None, "blocks 32"),
    ("mxint8", F(8, block_sizes={-1: 32}, scale_bits=(8, 0)), None, "blocks 32"),
]
FP32_ROWS = [0, 11, 15]
DYNAMIC_TENSOR_ROWS = [
    ("fp8_e4m3", F((4, 3)), None, "per-tensor (dynamic: reduction first)"),
    ("int8", F(8), None, "per-tensor (dynamic: reduction first)"),
    ("nvfp4", F((2, 1), block_sizes={-1: 16}, scale_bits=(4, 3)), None, "blocks 16, no amax (reduction first)"),
]


def make_amax(x, fmt, kind):
    if kind is None:
        return None
    if kind == "block":
        return block_amax(x, fmt)
    if kind == "global":
        return x.float().abs().amax()
    return compute_amax(x, fmt)


def same_bits(y, r) -> bool:
    if y is None or y.shape != r.shape or y.dtype != r.dtype:
        return False
    ny, nr = torch.isnan(y), torch.isnan(r)
    if not torch.equal(ny, nr):
        return False
    bits = torch.int32 if y.dtype == torch.float32 else torch.int16
    return torch.equal(y[~ny].view(bits), r[~nr].view(bits))


def shape_for(mib: int, dtype) -> tuple:
    return (mib * 2**20 // (4096 * torch.finfo(dtype).bits // 8), 4096)


def bench(fn, rep=200):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def first_calls(cases) -> list:
    """Seconds of each case's first call in a fresh process with an empty Triton cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        spec = json.dumps([[i, mib, str(dtype).split(".")[-1]] for i, mib, dtype in cases])
        out = subprocess.run([sys.executable, __file__, "--first-call", spec], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-3000:])
        return [float("nan")] * len(cases)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _first_call_child(spec: str):
    torch.zeros(1, device="cuda").add_(1)
    torch.cuda.synchronize()
    times = []
    for i, mib, dtype in json.loads(spec):
        name, fmt, kind, _ = (ROWS + DYNAMIC_TENSOR_ROWS)[i]
        dtype = getattr(torch, dtype)
        x = torch.randn(shape_for(mib, dtype), device="cuda", dtype=dtype)
        a = make_amax(x, fmt, kind)
        torch.cuda.synchronize()
        t = time.perf_counter()
        kfq.triton_fake_quant(x, fmt, a)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        del x
    print(json.dumps(times))


def run_table(cases, with_ref=True):
    lines = ["| format | granularity | dtype | size MiB | ours GB/s | % of copy | reference GB/s | speedup | first-call s | check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    firsts = first_calls(cases)
    copy_cache = {}
    results = []
    for (i, mib, dtype), first in zip(cases, firsts):
        name, fmt, kind, gran = (ROWS + DYNAMIC_TENSOR_ROWS)[i]
        shape = shape_for(mib, dtype)
        torch.manual_seed(0)
        x = torch.randn(shape, device="cuda", dtype=dtype) * 3
        a = make_amax(x, fmt, kind)
        nbytes = 2 * x.numel() * x.element_size()
        if (mib, dtype) not in copy_cache:
            y = torch.empty_like(x)
            copy_cache[(mib, dtype)] = nbytes / bench(lambda: y.copy_(x)) / 1e6
            y = None
        copy_gbs = copy_cache[(mib, dtype)]
        kfq.triton_fake_quant(x, fmt, a)  # first launch (compiles); the check uses the steady-state path
        ok = same_bits(kfq.triton_fake_quant(x, fmt, a), ref_fake_quant(x, fmt, a))
        ours = nbytes / bench(lambda: kfq.triton_fake_quant(x, fmt, a)) / 1e6
        ref = nbytes / bench(lambda: ref_fake_quant(x, fmt, a), rep=100) / 1e6 if with_ref else float("nan")
        dt = str(dtype).split(".")[-1]
        lines.append(f"| {name} | {gran} | {dt} | {mib} | {ours:.0f} | {100 * ours / copy_gbs:.1f} | {ref:.0f} | "
                     f"{ours / ref:.1f}x | {first:.2f} | {'PASS' if ok else 'FAIL'} |")
        results.append((name, gran, dt, mib, ours, copy_gbs, ok))
        print(lines[-1], flush=True)
        x = a = None
        torch.cuda.empty_cache()
    copies = ", ".join(f"{mib} MiB {str(dt).split('.')[-1]}: {v:.0f} GB/s" for (mib, dt), v in copy_cache.items())
    return lines, copies, results


def overhead(n: int = 2000):
    """Host time per call at 4096 elements (GPU work is ~2 us): plan launch, dispatcher, op, TensorQuantizer."""
    from modelopt_lite.quantization.ops import fake_quant_ste, format_to_spec
    from modelopt_lite.quantization.tensor_quantizer import TensorQuantizer

    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    out = []
    for label, attrs in [("fp8 per-tensor", {"num_bits": "e4m3", "axis": None}),
                         ("nvfp4", {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}})]:
        tq = TensorQuantizer(attrs).cuda()
        tq.amax = x.float().abs().amax()
        tq.cuda()
        fmt, spec, a = tq.fmt, format_to_spec(tq.fmt), tq._amax
        kfq.triton_fake_quant(x, fmt, a, cache_key=spec)
        plan = kfq._PLANS[(spec, x.shape, x.dtype, a.numel(), None)]
        fns = {
            "plan (bare launch)": lambda: plan(x, a, None),
            "triton_fake_quant": lambda: kfq.triton_fake_quant(x, fmt, a, cache_key=spec),
            "fake_quant dispatcher": lambda: kfq.fake_quant(x, fmt, a, cache_key=spec),
            "custom op (fake_quant_ste)": lambda: fake_quant_ste(x, fmt, a, spec),
            "TensorQuantizer.forward": lambda: tq(x),
            "reference (PyTorch)": lambda: ref_fake_quant(x, fmt, a),
        }
        for name, fn in fns.items():
            for _ in range(min(50, n)):
                fn()
            torch.cuda.synchronize()

            t = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            out.append(f"| {label} | {name} | {1e6 * (time.perf_counter() - t) / n:.1f} |")
        gpu = bench(lambda: plan(x, a, None)) * 1e3
        out.append(f"| {label} | kernel time on the GPU (do_bench) | {gpu:.1f} |")
    return ["| format | path | us per call |", "|---|---|---|"] + out


def sweep():
    """Launch-shape and variant sweep at 256 MiB bf16 (GB/s)."""
    cases = [0, 4, 6, 9, 11, 15]
    saved = {k: getattr(kfq, k) for k in ("TILE", "FLAT_TILE", "FAST_DIV", "WARPS_BIG", "TILE_2D_DYN", "TILE_TWO_LEVEL")}
    configs = [dict(), dict(TILE=4096, FLAT_TILE=4096, WARPS_BIG=4), dict(TILE=4096, FLAT_TILE=4096),
               dict(TILE=16384, FLAT_TILE=16384), dict(TILE_TWO_LEVEL=8192), dict(FAST_DIV=False),
               dict(TILE_2D_DYN=4096)]
    lines = ["| case | " + " | ".join(",".join(f"{k}={v}" for k, v in c.items()) or "defaults" for c in configs) + " |",
             "|---" * (len(configs) + 1) + "|"]
    for i in cases:
        name, fmt, kind, gran = ROWS[i]
        x = torch.randn(shape_for(256, torch.bfloat16), device="cuda", dtype=torch.bfloat16) * 3
        a = make_amax(x, fmt, kind)
        r = ref_fake_quant(x, fmt, a)
        cells = []
        for cfg in configs:
            for k, v in saved.items():
                setattr(kfq, k, v)
            for k, v in cfg.items():
                setattr(kfq, k, v)
            kfq.clear_cache()
            ok = same_bits(kfq.triton_fake_quant(x, fmt, a), r)
            gbs = 2 * x.numel() * 2 / bench(lambda: kfq.triton_fake_quant(x, fmt, a), rep=100) / 1e6
            cells.append(f"{gbs:.0f}{'' if ok else ' FAIL'}")
        lines.append(f"| {name} {gran} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        x = a = r = None
    for k, v in saved.items():
        setattr(kfq, k, v)
    kfq.clear_cache()
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="also write the markdown tables to this file")
    p.add_argument("--sizes", default="256,512", help="bf16 tensor sizes in MiB")
    p.add_argument("--sweep", action="store_true", help="also sweep launch shapes and variants")
    p.add_argument("--overhead", action="store_true", help="also measure host overhead per call")
    p.add_argument("--no-ref", action="store_true", help="skip timing the PyTorch reference")
    p.add_argument("--first-call", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.first_call:
        return _first_call_child(args.first_call)
    if not torch.cuda.is_available() or not kfq.triton_available():
        sys.exit("needs a CUDA device and Triton")
    sizes = [int(s) for s in args.sizes.split(",")]
    cases = [(i, mib, torch.bfloat16) for i in range(len(ROWS)) for mib in sizes]
    cases += [(i, 256, torch.float32) for i in FP32_ROWS]
    cases += [(len(ROWS) + j, mib, torch.bfloat16) for j in range(len(DYNAMIC_TENSOR_ROWS)) for mib in sizes[:1]]
    doc = [f"# Fused fake quant on {torch.cuda.get_device_name()}", ""]
    lines, copies, results = run_table(cases, with_ref=not args.no_ref)
    doc += lines + ["", f"Copy bandwidth (y.copy_(x), bytes read + written): {copies}.", ""]
    main_rows = [r for r, c in zip(results, cases) if c[0] < len(ROWS) and c[2] == torch.bfloat16]
    worst = min(r[4] / r[5] for r in main_rows)
    fails = sum(not r[6] for r in results)
    doc.append(f"Lowest bf16 % of copy (static/in-block scales): {100 * worst:.1f}%; checks failed: {fails}.")
    if args.overhead:
        doc += ["", "## Host overhead per call (4096 bf16 elements)", ""] + overhead()
    if args.sweep:
        doc += ["", "## Launch-shape sweep (256 MiB bf16, GB/s)", ""] + sweep()
    emit(doc, args.out)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
