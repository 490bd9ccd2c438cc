"""auto_quantize on a randomly initialised Llama: the decision table, and the output error against uniform formats.

The model is a Llama built from a config (no download; `--hidden`, `--layers`), fed random token
batches. For each budget `auto_quantize` chooses NVFP4, FP8 or none per layer; the error of a
quantized model is the KL divergence of its next-token distribution from the float model's
(summed over the vocabulary, averaged over positions) on held-out batches. Uniform NVFP4 (4 bits)
and uniform FP8 (8 bits) quantized with `mtq.quantize` on the same calibration batches are the
reference points. Prints the decision table of the first budget and one row per model.

    PYTHONPATH=. python benchmarks/auto_quantize_demo.py [--hidden 64] [--layers 2] [--budgets 5,6]
        [--method gradient|kl_div] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from report import emit


def build(hidden: int, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def batches(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (4, 32), generator=g)} for _ in range(n)]


def lm_loss(out, batch):
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))


@torch.no_grad()
def kl_to(model, ref, data) -> float:
    total = 0.0
    for b in data:
        p = F.log_softmax(ref(**b).logits.float(), -1)
        q = F.log_softmax(model(**b).logits.float(), -1)
        total += float(F.kl_div(q, p, log_target=True, reduction="sum")) / (p.numel() // p.shape[-1])
    return total / len(data)


def main():
    import modelopt_lite.quantization as mtq
    from modelopt_lite.quantization.auto_quantize import auto_quantize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--budgets", default="5,6")
    ap.add_argument("--method", default="gradient", choices=["gradient", "kl_div"])
    ap.add_argument("--out")
    args = ap.parse_args()

    ref = build(args.hidden, args.layers)
    calib, held_out = batches(4, seed=1), batches(4, seed=2)
    loop = mtq.create_forward_loop(calib, progress=False)
    rows = []
    for name in ("NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"):
        uniform = mtq.quantize(copy.deepcopy(ref), name, loop)
        rows.append((f"uniform {name}", 4.0 if "NVFP4" in name else 8.0, kl_to(uniform, ref, held_out), "-"))
    table = None
    for budget in [float(b) for b in args.budgets.split(",")]:
        t0 = time.perf_counter()
        model, report = auto_quantize(copy.deepcopy(ref), {"effective_bits": budget},
                                      [mtq.NVFP4_DEFAULT_CFG, mtq.FP8_DEFAULT_CFG], calib, loss_func=lm_loss,
                                      method=args.method, num_calib_steps=4, num_score_steps=4)
        seconds = time.perf_counter() - t0
        table = table or str(report)
        rows.append((f"auto_quantize {budget:g}", report.effective_bits, kl_to(model, ref, held_out),
                     f"{seconds:.1f}"))
    lines = [f"# auto_quantize demo: Llama hidden {args.hidden}, {args.layers} layers, method {args.method}", "",
             "```", table, "```", "",
             "| model | effective bits | KL to float (held out) | auto_quantize s |", "|---|---|---|---|"]
    lines += [f"| {n} | {b:.4f} | {kl:.4e} | {s} |" for n, b, kl, s in rows]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
