"""Export time and peak memory for a ~1B-parameter random Llama (bf16), per checkpoint format.

    PYTHONPATH=. python benchmarks/export_memory.py [--formats fp8 nvfp4] [--layers 22]

Peak memory is the process's peak resident set size during the export
(VmHWM, reset just before it) minus the resident size before it, so it is
what the export itself adds on top of the loaded, quantized model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import torch

from memory import reset_peak, rss_mb  # benchmarks/ is on sys.path when a script here runs




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="+", default=["fp8", "nvfp4", "w4a8_awq"])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--json")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    import modelopt_lite.quantization as mtq
    from modelopt_lite.export import export_hf_checkpoint

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
    results = []
    for qformat in args.formats:
        torch.manual_seed(0)
        t = time.time()
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        n = sum(p.numel() for p in model.parameters())
        ids = torch.randint(0, 32000, (1, 16))
        mtq.quantize(model, qformat, lambda m: m(ids, use_cache=False))
        build_s = time.time() - t
        out = tempfile.mkdtemp(prefix="export-bench-")
        shutil.rmtree(out)
        before = rss_mb("VmRSS")
        reset_peak()
        t = time.time()
        export_hf_checkpoint(model, out)
        export_s = time.time() - t
        peak = rss_mb("VmHWM")
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
        row = {"qformat": qformat, "params_b": round(n / 1e9, 3), "model_mb": round(n * 2 / 1e6),
               "checkpoint_mb": round(size / 1e6), "export_s": round(export_s, 1), "rss_before_mb": round(before),
               "peak_extra_mb": round(peak - before), "quantize_s": round(build_s, 1)}
        print(json.dumps(row), flush=True)
        results.append(row)
        shutil.rmtree(out)
        del model
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
