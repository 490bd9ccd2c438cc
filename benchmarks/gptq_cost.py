"""Time and peak memory of GPTQ on a ~1B-parameter random Llama (float32, CPU).

    PYTHONPATH=. python benchmarks/gptq_cost.py [--modes layerwise whole-nonseq] [--layers 22]
        [--batches 4] [--seq 128] [--threads 2] [--preset int4_gptq] [--json out.json]

Modes:

* ``layerwise``: `quantization.layerwise.layerwise_calibrate` with the
  preset's algorithm: GPTQ runs on one decoder layer at a time on its cached
  inputs (sequential inside the layer: one replay per group of layers that
  read the same input, four per Llama layer);
* ``whole-nonseq``: GPTQ on the whole model with ``sequential: false`` (one
  full forward pass collects every Hessian; all of them are held at once);
* ``whole-seq``: GPTQ on the whole model with ``sequential: true`` (one full
  forward pass per group: four per decoder layer; slow, use ``--layers``).

Each row reports the wall time, the part of it spent solving (damping,
factorisation and the column loop: `_quantize_group`) and the part in the
Hessian runs (`_collect`: forward passes plus x^T x), and the peak resident
memory added on top of the loaded float model (VmHWM, reset just before).
The model is Llama-shaped like TinyLlama-1.1B: hidden 2048, intermediate
5632, 32 heads, 4 KV heads, vocabulary 32000.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from memory import reset_peak, rss_mb  # benchmarks/ is on sys.path when a script here runs




class Timers:
    """Wraps two functions of the gptq module to add up the time spent in them."""

    def __init__(self, module, names):
        self.module, self.names, self.total = module, names, {n: 0.0 for n in names}
        self.saved = {}

    def __enter__(self):
        for name in self.names:
            fn = getattr(self.module, name)
            self.saved[name] = fn

            def timed(*args, _fn=fn, _name=name, **kwargs):
                t = time.perf_counter()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    self.total[_name] += time.perf_counter() - t

            setattr(self.module, name, timed)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.module, name, fn)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["layerwise"], choices=["layerwise", "whole-nonseq", "whole-seq"])
    ap.add_argument("--preset", default="int4_gptq")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    import modelopt_lite.quantization as mtq
    from modelopt_lite.quantization.algorithms import gptq as gptq_module
    from modelopt_lite.quantization.conversion import replace_quant_modules, set_quantizer_by_cfg
    from modelopt_lite.quantization.layerwise import layerwise_calibrate

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (1, args.seq), generator=gen) for _ in range(args.batches)]

    def loop(m):
        for ids in batches:
            m(ids, use_cache=False)

    results = []
    for mode in args.modes:
        torch.manual_seed(0)  # the same random model for every mode, built anew to hold one copy at a time
        model = LlamaForCausalLM(cfg).eval()
        n_params = sum(p.numel() for p in model.parameters())
        qcfg = mtq.get_config(args.preset)
        algorithm = dict(qcfg.algorithm) if isinstance(qcfg.algorithm, dict) else {"method": qcfg.algorithm}
        if mode != "layerwise":
            algorithm["sequential"] = mode == "whole-seq"
        replace_quant_modules(model)
        set_quantizer_by_cfg(model, qcfg)
        before = rss_mb("VmRSS")
        reset_peak()
        t = time.perf_counter()
        with Timers(gptq_module, ["_quantize_group", "_collect"]) as timers:
            if mode == "layerwise":
                layerwise_calibrate(model, algorithm, loop)
            else:
                mtq.calibrate(model, algorithm, loop)
        total = time.perf_counter() - t
        peak = rss_mb("VmHWM")
        row = {"mode": mode, "preset": args.preset, "params_b": round(n_params / 1e9, 3), "layers": args.layers,
               "tokens": args.batches * args.seq, "total_s": round(total, 1),
               "solve_s": round(timers.total["_quantize_group"], 1),
               "hessian_runs_s": round(timers.total["_collect"], 1),
               "model_mb": round(n_params * 4 / 1e6), "peak_extra_mb": round(peak - before)}
        results.append(row)
        print(json.dumps(row), flush=True)
        del model

    header = ["mode", "layers", "tokens", "total_s", "solve_s", "hessian_runs_s", "peak_extra_mb"]
    print()
    print(" | ".join(f"{h:>14}" for h in header))
    for row in results:
        print(" | ".join(f"{row[h]!s:>14}" for h in header))
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "load_average": os.getloadavg()}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
