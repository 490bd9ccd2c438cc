"""4-bit weight GEMM benchmark (CUDA): `w4_linear` (NVFP4, INT4 block 128) vs bf16 cuBLAS.

Per (kind, M, N, K): the weight is a random normal bf16 [N, K] quantized with
the project's formats (NVFP4, or INT4 with 128-element blocks) and packed;
`ours` is `w4_linear(x, p)` (bf16 activations, tuned per shape on the first
call), `bf16` is `F.linear(x, W)` with the dequantized bf16 weight (cuBLAS).
Each result is checked against the fallback (F.linear with the dequantized
weight) before timing. Times are GPU times per call from CUDA-graph replays
over enough copies of the weights (>= 256 MB together) that every call reads
its weight from HBM, not L2. TFLOP/s = 2MNK / t; GB/s = bytes of the stored
weight (packed codes and scales for ours, bf16 for cuBLAS) / t.

    PYTHONPATH=.:.devdeps python benchmarks/gemm_w4.py [--quick] [--kinds nvfp4,int4]
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
INT4_BLOCK = 128


def make_weight(kind: str, n: int, k: int, seed: int = 0):
    """A packed random weight (quantized normal values) on the GPU."""
    from modelopt_lite.kernels.w4_gemm import pack_int4, pack_nvfp4
    from modelopt_lite.quantization.formats import QuantFormat, dequant_scale, quantize

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    if kind == "nvfp4":
        fmt = QuantFormat.create(num_bits=(2, 1), block_sizes={-1: 16}, scale_bits=(4, 3))
        qt = quantize(w, fmt)
        return pack_nvfp4(qt.codes, qt.block_scale, qt.global_scale.reshape(()))
    fmt = QuantFormat.create(num_bits=4, block_sizes={-1: INT4_BLOCK})
    qt = quantize(w, fmt)
    return pack_int4(qt.codes, dequant_scale(qt.amax.reshape(n, -1), fmt.element), INT4_BLOCK)


def _copy_packed(p):
    from modelopt_lite.kernels.w4_gemm import PackedW4

    gs = None if p.global_scale is None else p.global_scale.clone()
    return PackedW4(p.kind, p.n, p.k, p.block, p.data.clone(), p.scales.clone(), gs)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def run(ms: Sequence[int] = MS, nks: Sequence[Tuple[int, int]] = NKS, kinds: Sequence[str] = ("nvfp4", "int4"),
        tol: float = 1e-2, deadline: float = math.inf, strict: bool = True) -> List[Dict]:
    """Benchmark every (kind, N, K, M); one dict per point (times in ms, TFLOP/s, GB/s, speedup, config).

    Points left when `time.time()` passes `deadline` are skipped. A failed check raises (`strict`) or
    leaves the point out with a message.
    """
    from modelopt_lite.kernels.w4_gemm import dequantize_w4, w4_linear
    from modelopt_lite.kernels.w4_tuning import TUNER, candidate_configs, m_bucket

    rows = []
    for N, K in nks:
        for kind in kinds:
            p0 = make_weight(kind, N, K, seed=N * 7 + K)
            wbf16 = dequantize_w4(p0, torch.bfloat16)  # the reference of the check and cuBLAS's weight
            copies = max(1, min(32, math.ceil(ROTATE_BYTES / p0.nbytes)))
            ps = [p0] + [_copy_packed(p0) for _ in range(copies - 1)]
            bf_copies = max(1, min(16, math.ceil(ROTATE_BYTES / (2 * N * K))))
            wbs = [wbf16] + [wbf16.clone() for _ in range(bf_copies - 1)]
            g = torch.Generator(device="cuda").manual_seed(K)
            for M in ms:
                if time.time() > deadline:
                    return rows
                xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(copies)]
                t0 = time.time()
                out = w4_linear(xs[0], ps[0])
                err = _rel_err(out, F.linear(xs[0], wbf16))
                row = {"kind": kind, "M": M, "N": N, "K": K, "err": err, "tune_s": time.time() - t0}
                if not err <= tol:
                    msg = f"{kind} M={M} N={N} K={K}: relative error {err} > {tol}"
                    if strict:
                        raise AssertionError(msg)
                    print("CHECK FAILED", msg, flush=True)
                    continue
                key = (xs[0].device.index, kind, p0.block, torch.bfloat16, m_bucket(M), N, K)
                cfg = TUNER.tuned.get(key, candidate_configs(p0, M)[0])
                t_ours = graph_time_ms([lambda i=i: w4_linear(xs[i], ps[i]) for i in range(copies)])
                t_bf16 = graph_time_ms([lambda i=i: F.linear(xs[i % len(xs)], wbs[i]) for i in range(bf_copies)])
                flops = 2.0 * M * N * K
                row.update({
                    "config": str(cfg), "t_ours": t_ours, "t_bf16": t_bf16, "speedup": t_bf16 / t_ours,
                    "tflops_ours": flops / (t_ours * 1e-3) / 1e12, "tflops_bf16": flops / (t_bf16 * 1e-3) / 1e12,
                    "gbs_ours": p0.nbytes / (t_ours * 1e-3) / 1e9, "gbs_bf16": 2 * N * K / (t_bf16 * 1e-3) / 1e9,
                    "weight_bytes": p0.nbytes,
                })
                rows.append(row)
        torch.cuda.empty_cache()
    return rows


def markdown(rows: List[Dict]) -> str:
    """One markdown table per kind."""
    out = []
    for kind in sorted({r["kind"] for r in rows}):
        out.append(f"\n### {kind} (bf16 activations{', block 128' if kind == 'int4' else ''})\n")
        out.append("| M | N | K | ours us | bf16 cuBLAS us | speedup | ours TFLOP/s | ours weight GB/s "
                   "| cuBLAS weight GB/s | config | rel err |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        for r in rows:
            if r["kind"] != kind:
                continue
            out.append(f"| {r['M']} | {r['N']} | {r['K']} | {r['t_ours'] * 1e3:.1f} | {r['t_bf16'] * 1e3:.1f} | "
                       f"{r['speedup']:.2f}x | {r['tflops_ours']:.1f} | {r['gbs_ours']:.0f} | {r['gbs_bf16']:.0f} | "
                       f"{r['config']} | {r['err']:.1e} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"M in {QUICK_MS}, (N, K) in {QUICK_NKS}")
    ap.add_argument("--kinds", default="nvfp4,int4")
    ap.add_argument("--budget-s", type=float, default=math.inf, help="stop starting new points after this long")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    ms, nks = (QUICK_MS, QUICK_NKS) if args.quick else (MS, NKS)
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows = run(ms, nks, tuple(args.kinds.split(",")), deadline=time.time() + args.budget_s, strict=False)
    print(markdown(rows))


if __name__ == "__main__":
    main()
