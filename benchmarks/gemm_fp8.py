"""FP8 W8A8 GEMM benchmark (CUDA): our Triton GEMM vs torch._scaled_mm and bf16 cuBLAS.

Per (M, N, K), with per-tensor scales on both operands:

* `gemm`: our GEMM alone on pre-quantized E4M3 activations (comparable to
  `torch._scaled_mm`, which also takes FP8 inputs), float32 promotion of the
  tensor-core sums; `gemm_fast` (M >= 256): tensor-core accumulation;
* `static` / `dynamic`: the full `fp8_linear` (bf16 in, bf16 out, activation
  quantization included; static per-tensor amax / dynamic per token);
* `scaled_mm`: `torch._scaled_mm` (cuBLASLt FP8, default promotion, as ours);
  `scaled_mm_fast`: the same with `use_fast_accum=True`; M is padded to a
  multiple of 16 beforehand (outside the timing) only if it refuses the shape
  (`scaled_mm_padded`);
* `bf16`: `F.linear` in bf16 (cuBLAS).

Each result is checked against the PyTorch reference before timing. Times are
GPU times per call from CUDA-graph replays (host launch overhead excluded) over
enough distinct copies of the operands (>= 256 MB) that every call reads its
weights from HBM, not L2; `host_overhead` measures eager host time per call.
TFLOP/s = 2MNK / t; GB/s counts A + B + C bytes once (A, B in FP8 and C in bf16
for the FP8 GEMMs, bf16 A for `fp8_linear`, all bf16 for cuBLAS bf16).

    PYTHONPATH=.:.devdeps python benchmarks/gemm_fp8.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from cuda_timing import graph_time_ms

MS = (1, 4, 16, 64, 256, 1024, 4096, 8192)
NKS = ((4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192), (8192, 28672))
QUICK_MS = (1, 16, 256, 4096)
QUICK_NKS = ((4096, 4096), (8192, 28672))
ROTATE_BYTES = 256 << 20


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _quantize_weight(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    amax = w.abs().amax().float()
    codes = torch.clamp(w.float() * (448.0 / amax), -448.0, 448.0).to(torch.float8_e4m3fn)
    return codes, (amax / 448.0).reshape(())


def _pad_rows(a: torch.Tensor, to: int) -> torch.Tensor:
    if to <= 1 or a.shape[0] % to == 0:
        return a
    return F.pad(a.view(torch.uint8), (0, 0, 0, to - a.shape[0] % to)).view(a.dtype)


def _scaled_mm(a, sa, w, sw, fast: bool = False):
    return torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=fast)


def _scaled_mm_pad(a, sa, w, sw) -> int:
    """1 when torch._scaled_mm takes this M as is, else 16 (it wants M padded)."""
    try:
        _scaled_mm(a, sa, w, sw)
        return 1
    except RuntimeError:
        return 16


def run(ms: Sequence[int] = MS, nks: Sequence[Tuple[int, int]] = NKS, tol: float = 2e-2,
        deadline: float = math.inf, fast: bool = True, strict: bool = True) -> List[Dict]:
    """Benchmark every (M, N, K); returns one dict per shape (times in ms, TFLOP/s, GB/s, check errors).

    Shapes left when `time.time()` passes `deadline` are skipped (the list is then shorter). `fast`
    adds our tensor-core-accumulation GEMM for M >= 256. A failed check raises (`strict`) or leaves the
    shape out with a message.
    """
    from modelopt_lite.kernels.fp8_gemm import fp8_gemm, fp8_linear, fp8_linear_reference
    from modelopt_lite.kernels.fp8_quant import quantize_fp8_act

    dev = torch.device("cuda")
    rows = []
    for N, K in nks:
        copies = max(1, min(16, math.ceil(ROTATE_BYTES / (N * K))))
        g = torch.Generator(device=dev).manual_seed(N * 7 + K)
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(copies)]
        wq = [_quantize_weight(w) for w in ws]
        for M in ms:
            if time.time() > deadline:
                return rows
            xs = [torch.randn(M, K, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(copies)]
            amaxes = [x.abs().amax().float() for x in xs]
            aq = [quantize_fp8_act(x, am) for x, am in zip(xs, amaxes)]
            x, x_amax, (a, sa), (wc, sw) = xs[0], amaxes[0], aq[0], wq[0]
            row = {"M": M, "N": N, "K": K, "copies": copies}
            t0 = time.time()
            ref = fp8_linear_reference(x, wc, sw, x_amax)
            row["err_gemm"] = _rel_err(fp8_gemm(a, sa, wc, sw), ref)
            row["err_static"] = _rel_err(fp8_linear(x, wc, sw, x_amax), ref)
            row["err_dynamic"] = _rel_err(fp8_linear(x, wc, sw), fp8_linear_reference(x, wc, sw))
            pad = _scaled_mm_pad(a, sa, wc, sw)
            row["scaled_mm_padded"] = pad > 1
            apad = [_pad_rows(q[0], pad) for q in aq]
            row["err_scaled_mm"] = _rel_err(_scaled_mm(apad[0], sa, wc, sw)[:M], ref)
            if fast and M >= 256:
                row["err_gemm_fast"] = _rel_err(fp8_gemm(a, sa, wc, sw, fast_accum=True), ref)
            row["tune_s"] = time.time() - t0
            bad = {k: v for k, v in row.items() if k.startswith("err_") and not v <= tol}
            if bad:
                msg = f"M={M} N={N} K={K}: relative errors over {tol}: {bad}"
                if strict:
                    raise AssertionError(msg)
                print("CHECK FAILED", msg, flush=True)
                continue
            idx = range(copies)
            cases = {
                "gemm": [lambda i=i: fp8_gemm(aq[i][0], aq[i][1], wq[i][0], wq[i][1]) for i in idx],
                "static": [lambda i=i: fp8_linear(xs[i], wq[i][0], wq[i][1], amaxes[i]) for i in idx],
                "dynamic": [lambda i=i: fp8_linear(xs[i], wq[i][0], wq[i][1]) for i in idx],
                "scaled_mm": [lambda i=i: _scaled_mm(apad[i], aq[i][1], wq[i][0], wq[i][1]) for i in idx],
                "scaled_mm_fast": [lambda i=i: _scaled_mm(apad[i], aq[i][1], wq[i][0], wq[i][1], True) for i in idx],
                "bf16": [lambda i=i: F.linear(xs[i], ws[i]) for i in idx],
            }
            if fast and M >= 256:
                cases["gemm_fast"] = [lambda i=i: fp8_gemm(aq[i][0], aq[i][1], wq[i][0], wq[i][1], fast_accum=True)
                                      for i in idx]
            flops = 2.0 * M * N * K
            fp8_bytes = M * K + N * K + 2 * M * N
            lin_bytes = 2 * M * K + N * K + 2 * M * N
            bf16_bytes = 2 * (M * K + N * K + M * N)
            for name, fns in cases.items():
                t = graph_time_ms(fns)
                nbytes = bf16_bytes if name == "bf16" else lin_bytes if name in ("static", "dynamic") else fp8_bytes
                row[f"t_{name}"] = t
                row[f"tflops_{name}"] = flops / (t * 1e-3) / 1e12
                row[f"gbs_{name}"] = nbytes / (t * 1e-3) / 1e9
            rows.append(row)
    return rows


def host_overhead(N: int = 4096, K: int = 4096, ms: Sequence[int] = (1, 16), calls: int = 300) -> List[Dict]:
    """Eager host time per call (us): `calls` back-to-back calls, then one synchronize."""
    from modelopt_lite.kernels.fp8_gemm import fp8_gemm, fp8_linear
    from modelopt_lite.kernels.fp8_quant import quantize_fp8_act

    dev = torch.device("cuda")
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
    wc, sw = _quantize_weight(w)
    out = []
    for M in ms:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        amax = x.abs().amax().float()
        a, sa = quantize_fp8_act(x, amax)
        apad = _pad_rows(a, _scaled_mm_pad(a, sa, wc, sw))
        row = {"M": M, "N": N, "K": K}
        for name, fn in (("gemm", lambda: fp8_gemm(a, sa, wc, sw)), ("static", lambda: fp8_linear(x, wc, sw, amax)),
                         ("dynamic", lambda: fp8_linear(x, wc, sw)), ("scaled_mm", lambda: _scaled_mm(apad, sa, wc, sw)),
                         ("bf16", lambda: F.linear(x, w))):
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            row[name] = (time.perf_counter() - t0) / calls * 1e6
        out.append(row)
    return out


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summary(rows: List[Dict]) -> Dict[str, float]:
    """Geometric means of the throughput ratios (all shapes; bf16 ratios over M >= 256)."""
    big = [r for r in rows if r["M"] >= 256]
    return {
        "gemm/scaled_mm": geomean(r["t_scaled_mm"] / r["t_gemm"] for r in rows),
        "gemm/scaled_mm_fast": geomean(r["t_scaled_mm_fast"] / r["t_gemm"] for r in rows),
        "static/scaled_mm": geomean(r["t_scaled_mm"] / r["t_static"] for r in rows),
        "dynamic/scaled_mm": geomean(r["t_scaled_mm"] / r["t_dynamic"] for r in rows),
        "gemm/bf16 (M>=256)": geomean(r["t_bf16"] / r["t_gemm"] for r in big),
        "static/bf16 (M>=256)": geomean(r["t_bf16"] / r["t_static"] for r in big),
        "dynamic/bf16 (M>=256)": geomean(r["t_bf16"] / r["t_dynamic"] for r in big),
        "scaled_mm/bf16 (M>=256)": geomean(r["t_bf16"] / r["t_scaled_mm"] for r in big),
        "gemm_fast/scaled_mm_fast (M>=256)": geomean(r["t_scaled_mm_fast"] / r["t_gemm_fast"]
                                                     for r in big if "t_gemm_fast" in r),
        "gemm_fast/bf16 (M>=256)": geomean(r["t_bf16"] / r["t_gemm_fast"] for r in big if "t_gemm_fast" in r),
    }


def markdown(rows: List[Dict]) -> str:
    head = ("| M | N | K | gemm us | TFLOP/s | GB/s | lin static us | lin dyn us | _scaled_mm us | TFLOP/s | GB/s "
            "| bf16 us | TFLOP/s | gemm/smm | gemm/bf16 | gemm fast us | smm fast us |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        fast = f"{r['t_gemm_fast'] * 1e3:.1f}" if "t_gemm_fast" in r else "-"
        lines.append(
            f"| {r['M']} | {r['N']} | {r['K']} | {r['t_gemm'] * 1e3:.1f} | {r['tflops_gemm']:.0f} | {r['gbs_gemm']:.0f} "
            f"| {r['t_static'] * 1e3:.1f} | {r['t_dynamic'] * 1e3:.1f} "
            f"| {r['t_scaled_mm'] * 1e3:.1f}{'*' if r['scaled_mm_padded'] else ''} | {r['tflops_scaled_mm']:.0f} "
            f"| {r['gbs_scaled_mm']:.0f} | {r['t_bf16'] * 1e3:.1f} | {r['tflops_bf16']:.0f} "
            f"| {r['t_scaled_mm'] / r['t_gemm']:.2f} | {r['t_bf16'] / r['t_gemm']:.2f} "
            f"| {fast} | {r['t_scaled_mm_fast'] * 1e3:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 4 x 2 subset of the suite")
    parser.add_argument("--budget-s", type=float, default=math.inf, help="stop starting new shapes after this long")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gemm_fp8 benchmarks need a CUDA device")
    ms, nks = (QUICK_MS, QUICK_NKS) if args.quick else (MS, NKS)
    t0 = time.time()
    rows = run(ms, nks, deadline=t0 + args.budget_s)
    print(markdown(rows))
    print(f"\n{len(rows)} shapes in {time.time() - t0:.0f} s ('*': _scaled_mm needed M padded to 16)")
    for k, v in summary(rows).items():
        print(f"geomean {k}: {v:.3f}")
    print("\neager host time per call (us):")
    for r in host_overhead():
        print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
