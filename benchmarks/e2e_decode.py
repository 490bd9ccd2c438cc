"""End-to-end decode speed of an 8B-parameter Llama-shaped model: bf16 against compressed FP8, NVFP4 and INT4.

The model (hidden 4096, 32 layers, 32 query / 8 KV heads, MLP 14336, vocabulary
128256: 8.03B parameters) is built on the GPU with random weights; each
quantized variant is calibrated with `quantize` (max, one prompt), then
`compress`ed, and generates 128 tokens greedily at batch 1 and 16 after a
16-token prompt. Each decode step (the whole model, sampling and the cache
update) is captured once in a CUDA graph and replayed, so the numbers measure
the kernels, not Python. Reported: decode tokens/s, ms per step, weight
memory and peak memory, and how close the compressed model's logits are to
the fake-quant model's on the prompt.

    PYTHONPATH=. python benchmarks/e2e_decode.py [--variants bf16,fp8,nvfp4] [--layers 32] [--optimize] [--out FILE]

With --optimize each variant is measured again after `modelopt_lite.transforms.optimize` has
rewritten every decoder layer (horizontal q/k/v and gate/up GEMMs, quantized-GEMM ops, fused
RMSNorm and SwiGLU with their activation quantization): speed, kernel launches per step
(torch profiler, one eager step) and agreement with the unoptimized model.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from report import emit

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 14336, 32, 8, 128, 128256
PROMPT, NEW_TOKENS, MAX_LEN = 16, 128, 160
DEVICE = "cuda"


def smoke_settings():
    """--smoke: a tiny model on the CPU, decode steps run eagerly (checks the script, measures nothing)."""
    global HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, NEW_TOKENS, DEVICE
    HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, NEW_TOKENS, DEVICE = 128, 256, 4, 2, 32, 512, 8, "cpu"

VARIANTS = {
    "bf16": None,
    "fp8": "fp8",  # W8A8, per-tensor static scales
    "nvfp4": "nvfp4",  # NVFP4 weights and activations (activations fake-quantized, weight-only kernel on Hopper)
    "w4a16_nvfp4": "w4a16_nvfp4",  # NVFP4 weights, bf16 activations
    "int4": "int4_wo",  # INT4 blocks of 128 (the W4A16 AWQ layout), bf16 activations
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, x, cos, sin, positions, mask, cache):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(x).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(x).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k_cache, v_cache = cache
        k_cache.index_copy_(2, positions, k)
        v_cache.index_copy_(2, positions, v)
        out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(HIDDEN), RMSNorm(HIDDEN)
        self.self_attn, self.mlp = Attention(), MLP()

    def forward(self, x, cos, sin, positions, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Llama(nn.Module):
    """A Llama-shaped decoder with a static KV cache; forward returns the last position's logits."""

    def __init__(self, layers=32):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Layer() for _ in range(layers))
        self.norm = RMSNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        inv = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        ang = torch.outer(torch.arange(MAX_LEN).float(), inv)
        self.register_buffer("cos", torch.cat((ang, ang), -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((ang, ang), -1).sin(), persistent=False)
        self.caches = []

    def new_cache(self, batch):
        p = self.embed_tokens.weight
        self.caches = [tuple(torch.zeros(batch, KV_HEADS, MAX_LEN, HEAD_DIM, dtype=p.dtype, device=p.device)
                             for _ in range(2)) for _ in self.layers]

    def forward(self, ids, start):
        s = ids.shape[1]
        positions = start + torch.arange(s, device=ids.device)
        cos = self.cos.index_select(0, positions).to(self.embed_tokens.weight.dtype)
        sin = self.sin.index_select(0, positions).to(self.embed_tokens.weight.dtype)
        mask = torch.arange(MAX_LEN, device=ids.device)[None, :] <= positions[:, None]
        x = self.embed_tokens(ids)
        for layer, cache in zip(self.layers, self.caches):
            x = layer(x, cos, sin, positions, mask, cache)
        return self.lm_head(self.norm(x[:, -1:])).float()


def build(layers):
    with torch.device(DEVICE):
        model = Llama(layers)
    model.to(torch.bfloat16)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def prompt(batch, seed=1):
    return torch.randint(0, VOCAB, (batch, PROMPT), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(seed))


def logits(model):
    with torch.no_grad():
        model.new_cache(1)
        return model(prompt(1), torch.zeros((), dtype=torch.long, device=DEVICE))


def cosine(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def quantized(model, qformat):
    """Quantize, compress; returns closeness of the logits (see the table) and the kernels the layers chose."""
    import os

    import modelopt_lite.quantization as mtq

    float_logits = logits(model)
    calib = prompt(4, seed=2)

    def loop(m):
        m.new_cache(calib.shape[0])
        m(calib, torch.zeros((), dtype=torch.long, device=DEVICE))

    mtq.quantize(model, qformat, forward_loop=loop)  # q/k/v and gate/up share scales, as fused checkpoints do
    ref = logits(model)
    mtq.compress(model)
    out = logits(model)
    os.environ["MODELOPT_LITE_KERNELS"] = "0"  # the fallback: dequantize-then-matmul, exactly the fake-quant math
    clear_kernel_choice(model)
    fallback = logits(model)
    os.environ.pop("MODELOPT_LITE_KERNELS")
    clear_kernel_choice(model)
    probe = torch.empty(1, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    kernels = sorted({m.kernel_for(probe).name for m in model.modules() if isinstance(m, mtq.CompressedLinear)})
    return {"cos_kernels": cosine(out, ref), "fallback_equal": bool(torch.equal(fallback, ref)),
            "cos_fake_quant_vs_bf16": cosine(ref, float_logits)}, kernels


def optimize_layers(model):
    """Replace every decoder layer by its `optimize`d graph (FX capture; default pipeline); returns the
    first layer's report and the relative L2 difference of its output from the plain layer's on a real
    layer-0 input (token embeddings). One capture serves every batch size."""
    from modelopt_lite.transforms import optimize

    p = model.embed_tokens.weight
    pos = torch.full((1,), PROMPT, dtype=torch.long, device=p.device)
    x = torch.zeros(1, 1, HIDDEN, dtype=p.dtype, device=p.device)
    mask = torch.arange(MAX_LEN, device=p.device)[None, :] <= pos[:, None]
    scratch = tuple(torch.zeros(1, KV_HEADS, MAX_LEN, HEAD_DIM, dtype=p.dtype, device=p.device) for _ in range(2))
    example = (x, model.cos[pos].to(p.dtype), model.sin[pos].to(p.dtype), pos, mask, scratch)
    report, rel = None, None
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            gm = optimize(layer, example, log=False)
            if i == 0:
                report = gm.meta["transform_report"]
                h = model.embed_tokens(prompt(1)[:, :1])
                caches = [tuple(torch.zeros_like(c) for c in scratch) for _ in range(2)]
                ref = layer(h, *example[1:5], caches[0]).float()
                rel = ((gm(h, *example[1:5], caches[1]).float() - ref).norm() / ref.norm()).item()
            model.layers[i] = gm
    gc.collect()
    return report, rel


def launches_per_step(model, batch):
    """CUDA kernels (or, on the CPU, computing operator calls) of one eager decode step."""
    from modelopt_lite.transforms import count_launches

    model.new_cache(batch)
    tok = torch.zeros(batch, 1, dtype=torch.long, device=DEVICE)
    return count_launches(model, tok, torch.full((), PROMPT, dtype=torch.long, device=DEVICE)).kernels


def clear_kernel_choice(model):
    for m in model.modules():
        if hasattr(m, "_kernel_cache"):
            m._kernel_cache.clear()


def decode(model, batch):
    """Prefill, then NEW_TOKENS greedy steps replayed from one CUDA graph; returns (ms per step, tokens, prefill ms)."""
    model.new_cache(batch)
    ids = prompt(batch)
    zero = torch.zeros((), dtype=torch.long, device=DEVICE)
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        first = model(ids, zero).argmax(-1)
        sync()
        prefill_ms = (time.perf_counter() - t0) * 1e3
        tok = first.clone()
        pos = torch.full((), PROMPT, dtype=torch.long, device=DEVICE)

        def step():
            nxt = model(tok, pos).argmax(-1)
            tok.copy_(nxt)
            pos.add_(1)

        if DEVICE == "cpu":
            t0 = time.perf_counter()
            outs = []
            for _ in range(NEW_TOKENS):
                step()
                outs.append(tok.clone())
            return (time.perf_counter() - t0) * 1e3 / NEW_TOKENS, torch.cat(outs, dim=1), prefill_ms
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: Triton compiles and autotunes outside the capture
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        tok.copy_(first)
        pos.fill_(PROMPT)
        outs = []
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(NEW_TOKENS):
            graph.replay()
            outs.append(tok.clone())
        end.record()
        torch.cuda.synchronize()
    ms = start.elapsed_time(end) / NEW_TOKENS
    return ms, torch.cat(outs, dim=1), prefill_ms


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def model_bytes(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="bf16,fp8,nvfp4,w4a16_nvfp4,int4")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script only")
    ap.add_argument("--optimize", action="store_true",
                    help="also run each variant with every decoder layer optimize()d (rows 'variant+opt')")
    args = ap.parse_args()
    if args.smoke:
        smoke_settings()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        model = build(args.layers)
        if VARIANTS[variant] is None:
            close, kernels = {"cos_kernels": 1.0, "fallback_equal": True, "cos_fake_quant_vs_bf16": 1.0}, ["cuBLAS bf16"]
        else:
            close, kernels = quantized(model, VARIANTS[variant])
        weights = model_bytes(model)
        plain = {}
        for name in [variant] + ([variant + "+opt"] if args.optimize else []):
            if name.endswith("+opt"):
                base_logits = logits(model)
                report, rel = optimize_layers(model)
                close = dict(close, cos_opt_vs_plain=cosine(logits(model), base_logits), layer0_rel=rel,
                             opt_matches=" ".join(f"{r.key}={r.matches}" for r in report
                                                  if r.status == "applied" and r.matches))
            for batch in batches:
                if DEVICE == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ms, tokens, prefill_ms = decode(model, batch)
                plain.setdefault(batch, tokens)
                row = dict(variant=name, batch=batch, ms_per_step=ms, tokens_per_s=batch * 1000.0 / ms,
                           prefill_ms=prefill_ms, weights_gb=weights / 1e9,
                           peak_gb=torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else math.nan,
                           kernels=",".join(kernels), launches=launches_per_step(model, batch),
                           same_tokens=(tokens == plain[batch]).float().mean().item(), **close,
                           tokens_ok=bool(tokens.shape == (batch, NEW_TOKENS)))
                rows.append(row)
                print(row, flush=True)
        del model
        gc.collect()
    base = {r["batch"]: r["ms_per_step"] for r in rows if r["variant"] == "bf16"}
    params = args.layers * (4 * HIDDEN * HIDDEN // 2 + HIDDEN * HIDDEN // 2 + 3 * HIDDEN * INTER) + 2 * VOCAB * HIDDEN
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (smoke run)"
    lines = [f"e2e decode, {device_name}, torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}; Llama-shaped, {args.layers} layers, "
             f"{params / 1e9:.2f}B parameters, prompt {PROMPT}, {NEW_TOKENS} new tokens, CUDA-graph decode steps",
             "",
             "| variant | batch | tokens/s | ms/step | vs bf16 | weights GB | peak GB | prefill ms "
             "| logits cos: kernels vs fake quant | fallback == fake quant | cos: fake quant vs bf16 | kernels |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = base.get(r["batch"], math.nan) / r["ms_per_step"]
        lines.append(f"| {r['variant']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | "
                     f"{speed:.2f}x | {r['weights_gb']:.2f} | {r['peak_gb']:.2f} | {r['prefill_ms']:.1f} | "
                     f"{r['cos_kernels']:.5f} | {'yes' if r['fallback_equal'] else 'NO'} | "
                     f"{r['cos_fake_quant_vs_bf16']:.5f} | {r['kernels']} |")
    if args.optimize:
        lines += ["", "optimize() of every decoder layer (default pipeline) against the same model unoptimized:", "",
                  "| variant | batch | ms/step plain | ms/step optimized | speed-up | launches/step plain | optimized "
                  "| layer 0 rel. diff | logits cos opt vs plain | same greedy tokens | matches (layer 0) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        by = {(r["variant"], r["batch"]): r for r in rows}
        for r in rows:
            if not r["variant"].endswith("+opt"):
                continue
            p = by[(r["variant"][:-4], r["batch"])]
            lines.append(f"| {p['variant']} | {r['batch']} | {p['ms_per_step']:.2f} | {r['ms_per_step']:.2f} | "
                         f"{p['ms_per_step'] / r['ms_per_step']:.3f}x | {p['launches']} | {r['launches']} | "
                         f"{r['layer0_rel']:.2e} | {r['cos_opt_vs_plain']:.5f} | {r['same_tokens'] * 100:.1f}% | "
                         f"{r['opt_matches']} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
