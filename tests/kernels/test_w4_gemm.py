"""4-bit weight GEMMs (NVFP4, INT4): packing, exact dequantization, the fallback, the Triton kernels
(interpreter on CPU, inline-asm decoding on CUDA) and the custom op under torch.compile / torch.export."""

import pytest
import torch
import torch.nn.functional as F

from modelopt_lite.kernels import triton_available
from modelopt_lite.kernels.w4_gemm import PackedW4, dequantize_w4, pack_int4, pack_nvfp4, w4_linear
from modelopt_lite.kernels.w4_layout import decode_nv_scales, encode_nv_scales, pack_words, unpack_words
from modelopt_lite.quantization.formats import E4M3, QuantFormat, dequant_scale, dequantize, quantize

NVFP4 = QuantFormat.create(num_bits=(2, 1), block_sizes={-1: 16}, scale_bits=(4, 3))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_triton = pytest.mark.skipif(not triton_available(), reason="needs Triton")


def _int4_fmt(block):
    return QuantFormat.create(num_bits=4, block_sizes={-1: block})


def _weights(n, k, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, : min(k, 40)] = 0.0  # an all-zero block (scale 1) and exact zeros
    if n > 2 and k > 20:
        w[2, 3] = 7.0  # a large outlier: tiny block scales elsewhere, subnormal E4M3 among them
    return w.to(dtype=dtype, device=device)


def _nv(n, k, dtype=torch.bfloat16, device="cpu", seed=0):
    qt = quantize(_weights(n, k, dtype, device, seed), NVFP4)
    return qt, pack_nvfp4(qt.codes, qt.block_scale, qt.global_scale.reshape(()))


def _i4(n, k, block, dtype=torch.bfloat16, device="cpu", seed=0):
    fmt = _int4_fmt(block)
    qt = quantize(_weights(n, k, dtype, device, seed), fmt)
    scale = dequant_scale(qt.amax.reshape(n, -1), fmt.element)
    return qt, pack_int4(qt.codes, scale, block)


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


# ------------------------------------------------------------------------------------------ CPU: packing


@pytest.mark.parametrize("kind,q", [("nvfp4", 16), ("int4", 16), ("int4", 32), ("int4", 64)])
def test_pack_words_roundtrip(kind, q):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (37, 300), generator=g, dtype=torch.uint8)
    kpad = -(-300 // (8 * q)) * 8 * q
    packed = pack_words(codes, kind, q, 128, kpad)
    assert packed.shape == (128, kpad // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_words(packed, kind, q, 37, 300), codes.long())
    assert int(unpack_words(packed, kind, q, 128, kpad)[37:].abs().sum()) == 0  # padding is code 0


def test_nv_layout_bit_positions():
    """Output 0 of a word holds the bf16 bit pattern of value * 2**-126 for its two codes (the kernels' decode)."""
    codes = torch.zeros(1, 64, dtype=torch.uint8)
    codes[0, 0], codes[0, 1] = 0b1011, 0b0111  # -1.5 and 6.0 at k = 0, 1 (output 0, word 0)
    word = pack_words(codes, "nvfp4", 16, 1, 64).view(torch.int32)[0, 0].item() & 0xFFFFFFFF
    lo = torch.tensor([word & 0x81C081C0 & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    hi = torch.tensor([(word & 0x81C081C0) >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    assert lo.float().item() == -1.5 * 2.0**-126 and hi.float().item() == 6.0 * 2.0**-126


def test_nv_scale_codes_exact_for_every_e4m3():
    vals = E4M3.all_codes().to(torch.float32)
    vals = vals[torch.isfinite(vals) & (vals > 0)]
    codes = encode_nv_scales(vals.to(torch.float8_e4m3fn))
    assert torch.equal(decode_nv_scales(codes), vals)
    assert int(codes.min()) >= 12 << 3 and int(codes.max()) <= (30 << 3)
    with pytest.raises(ValueError, match="positive finite"):
        encode_nv_scales(torch.zeros(3).to(torch.float8_e4m3fn))


@pytest.mark.parametrize("n,k", [(1, 16), (37, 200), (130, 77)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nvfp4_dequantize_bit_identical(n, k, dtype):
    qt, p = _nv(n, k, dtype, seed=n + k)
    assert torch.equal(_bits(dequantize_w4(p, dtype)), _bits(dequantize(qt)))
    assert p.nbytes == p.data.numel() + p.scales.numel() + 4


@pytest.mark.parametrize("n,k,block", [(37, 200, 128), (130, 77, 32), (5, 300, 64), (9, 100, 48), (3, 40, 7)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_dequantize_bit_identical(n, k, block, dtype):
    qt, p = _i4(n, k, block, dtype, seed=n * k)
    assert torch.equal(_bits(dequantize_w4(p, dtype)), _bits(dequantize(qt)))


def test_buffers_roundtrip_and_validation():
    _, p = _nv(40, 72)
    q = PackedW4.from_buffers("nvfp4", 40, 72, 16, p.buffers())
    assert torch.equal(dequantize_w4(q), dequantize_w4(p)) and q.to("cpu").nbytes == p.nbytes
    with pytest.raises(ValueError, match="uint8"):
        PackedW4("nvfp4", 40, 300, 16, p.data, p.scales, p.global_scale)
    with pytest.raises(KeyError):
        PackedW4.from_buffers("nvfp4", 40, 72, 16, {"w4_data": p.data})
    _, p4 = _i4(40, 72, 64)
    assert p4.buffers()["w4_global_scale"] is None
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((2, 16), 9, dtype=torch.int8), torch.ones(2, 1), 16)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        pack_nvfp4(torch.zeros(2, 16, dtype=torch.uint8), torch.ones(2, 1), torch.tensor(1.0))


@pytest.mark.parametrize("kind", ["nvfp4", "int4"])
def test_fallback_matches_dequantized_linear(kind):
    qt, p = _nv(24, 80) if kind == "nvfp4" else _i4(24, 80, 32)
    x = torch.randn(2, 3, 80).to(torch.bfloat16)
    bias = torch.randn(24).to(torch.bfloat16)
    out = w4_linear(x, p, bias)
    assert out.shape == (2, 3, 24) and out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x, dequantize(qt), bias))
    with pytest.raises(ValueError, match="K=80"):
        w4_linear(torch.randn(3, 81).to(torch.bfloat16), p)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        w4_linear(torch.randn(3, 80), p)


def test_custom_op_fake_under_compile_and_export():
    _, p = _nv(24, 80)

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, t in p.buffers().items():
                self.register_buffer(name, t)

        def forward(self, x):
            q = PackedW4.from_buffers("nvfp4", 24, 80, 16, {n: getattr(self, n) for n in p.buffers()})
            return w4_linear(x, q)

    m = Lin()
    x = torch.randn(5, 80).to(torch.bfloat16)
    ref = m(x)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), ref)
    ep = torch.export.export(m, (x,))
    targets = [str(node.target) for node in ep.graph.nodes if node.op == "call_function"]
    assert any("modelopt_lite.w4_linear" in t for t in targets), targets
    assert torch.equal(ep.module()(x), ref)


# ---------------------------------------------------------------------------- CPU: kernels (interpreter)


def _ref32(x, p, bias):
    out = x.float() @ dequantize_w4(p, torch.float32).t()
    return out if bias is None else out + bias.float()


def _close(out, ref, dtype):
    tol = (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10) * ref.abs().max().item() + 1e-3
    err = (out.float() - ref).abs().max().item()
    assert err <= tol, f"max error {err} > {tol}"


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU only)")
@pytest.mark.parametrize("kind,cfg", [
    ("nvfp4", (64, 16, 4, 4, 2, 1)), ("nvfp4", (64, 16, 2, 4, 2, 2)), ("nvfp4", (128, 32, 1, 4, 2, 3)),
    ("int4", (64, 16, 1, 4, 2, 1)), ("int4", (128, 32, 2, 4, 2, 2)), ("int4-b128", (64, 16, 1, 4, 2, 2)),
    ("int4-b48", (64, 16, 1, 4, 2, 1)),
])
def test_kernel_interpreter(kind, cfg):
    from modelopt_lite.kernels.w4_tuning import W4Config, launch

    n, k, m = 70, 200, 19
    block = {"int4": 64, "int4-b128": 128, "int4-b48": 48}.get(kind, 16)
    _, p = _nv(n, k, seed=3) if kind == "nvfp4" else _i4(n, k, block, seed=3)
    for dtype, bias in ((torch.bfloat16, torch.randn(n)), (torch.float16, None)):
        x = torch.randn(m, k).to(dtype)
        b = None if bias is None else bias.to(dtype)
        out = launch(W4Config("mma", *cfg), x, p, b, torch.empty(m, n, dtype=dtype))
        _close(out, _ref32(x, p, b), dtype)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU only)")
@pytest.mark.parametrize("kind", ["nvfp4", "int4"])
def test_dequant_kernel_interpreter_exact(kind):
    from modelopt_lite.kernels.w4_tuning import dequantize_into

    _, p = _nv(40, 136, seed=5) if kind == "nvfp4" else _i4(40, 136, 32, seed=5)
    for dtype in (torch.float16, torch.float32):  # the interpreter truncates bf16 stores, so bf16 runs on CUDA
        out = dequantize_into(p, torch.empty(40, 136, dtype=dtype))
        assert torch.equal(_bits(out), _bits(dequantize_w4(p, dtype)))


# ------------------------------------------------------------------------------------------ CUDA


@needs_cuda
@needs_triton
@pytest.mark.parametrize("kind", ["nvfp4", "int4"])
def test_every_config_cuda(kind):
    """Every registered config (small-M and large-M tiles, split-K, dequant+cuBLAS) on
    ragged shapes, bf16 and fp16, with and without bias."""
    from modelopt_lite.kernels.w4_tuning import REGIMES, W4Config, config_fits, launch

    dev = "cuda"
    # a ragged shape in bf16 and fp16 (K tail masked), an even one in bf16 (whole K steps)
    cases = [((1000, 1040, 128), (1, 16, 33, 300), (torch.bfloat16, torch.float16))]
    cases.append(((256, 4096, 128) if kind == "nvfp4" else (384, 512, 32), (5, 300), (torch.bfloat16,)))
    configs = {c for (kd, _), lst in REGIMES.items() if kd == kind for c in lst}
    configs.add(W4Config("mma", 64, 16, 1, 4, 3, 3))  # an explicit split that does not divide the K steps
    for (n, k, block), ms, dtypes in cases:
        _, p = _nv(n, k, device=dev, seed=n) if kind == "nvfp4" else _i4(n, k, block, device=dev, seed=n)
        for m in ms:
            for dtype in dtypes:
                x = torch.randn(m, k, device=dev).to(dtype)
                bias = torch.randn(n, device=dev).to(dtype) if m % 2 else None
                ref = _ref32(x, p, bias)
                for cfg in sorted(configs, key=str):
                    if not config_fits(cfg, p) or (m > 64 and cfg.bm < 64 and cfg.path == "mma"):
                        continue
                    out = launch(cfg, x, p, bias, torch.empty(m, n, dtype=dtype, device=dev))
                    try:
                        _close(out, ref, dtype)
                    except AssertionError as exc:
                        raise AssertionError(f"{kind} n={n} k={k} m={m} {dtype} {cfg}: {exc}") from None


@needs_cuda
@needs_triton
@pytest.mark.parametrize("kind", ["nvfp4", "int4"])
def test_op_cuda_and_dequant_kernel(kind, monkeypatch):
    from modelopt_lite.kernels.w4_tuning import dequantize_into

    monkeypatch.setenv("MODELOPT_LITE_W4_TUNE", "0")  # each regime's first config (every config: test above)
    dev = "cuda"
    n, k = 300, 520
    qt, p = _nv(n, k, device=dev, seed=9) if kind == "nvfp4" else _i4(n, k, 128, device=dev, seed=9)
    for dtype in (torch.bfloat16, torch.float16):
        w = dequantize_into(p, torch.empty(n, k, dtype=dtype, device=dev))
        assert torch.equal(_bits(w), _bits(dequantize_w4(p, dtype)))
        for shape in ((1, k), (3, 7, k), (70, k)):
            x = torch.randn(*shape, device=dev).to(dtype)
            bias = torch.randn(n, device=dev).to(dtype)
            out = w4_linear(x, p, bias)
            assert out.shape == (*shape[:-1], n) and out.dtype == dtype
            _close(out.reshape(-1, n), _ref32(x.reshape(-1, k), p, bias), dtype)
            fb = F.linear(x, dequantize_w4(p, dtype), bias).float()
            assert (out.float() - fb).abs().max().item() <= 0.02 * fb.abs().max().item() + 1e-2


@needs_cuda
@needs_triton
def test_every_code_and_scale_cuda():
    """All 16 E2M1 codes times every positive E4M3 block scale (subnormals included) through the kernels;
    x = I reads the weight back, exactly (a power-of-two global scale keeps every product exact)."""
    from modelopt_lite.kernels.w4_tuning import REGIMES, launch

    scales = E4M3.all_codes().to(torch.float32)
    scales = scales[torch.isfinite(scales) & (scales > 0)]  # 126 values
    n, nb = 128, 16
    k = nb * 16
    codes = torch.arange(16, dtype=torch.uint8).repeat(n, nb)  # every code in every block
    bs = scales[torch.arange(n * nb) % scales.numel()].reshape(n, nb)
    p = pack_nvfp4(codes.cuda(), bs.to(torch.float8_e4m3fn).cuda(), torch.tensor(0.5, device="cuda"))
    for dtype in (torch.bfloat16, torch.float16):
        exact = dequantize_w4(p, torch.float32).t().to(dtype)
        eye = torch.eye(k, device="cuda").to(dtype)
        for cfg in REGIMES[("nvfp4", "m16")] + REGIMES[("nvfp4", "large")]:
            out = launch(cfg, eye, p, None, torch.empty(k, n, dtype=dtype, device="cuda"))
            assert torch.equal(out.float(), exact.float()), f"{dtype} {cfg}"  # -0.0 == 0.0: a dot adds signed zeros
