"""FP8 W8A8 GEMM: activation quantization, the linear op, the custom op, and the Triton kernels.

CPU: the PyTorch paths against the formats reference (bit-exact codes), the
custom op under torch.compile / torch.export, and the kernels' plumbing in the
Triton interpreter (FP8 inputs only: the interpreter's float8 casts are not
exact, so nothing here asserts a cast done inside a kernel). CUDA: the kernels
against the reference on fresh random inputs.
"""

import pytest
import torch
import torch.nn.functional as F

from modelopt_lite.kernels import interpret_mode, triton_available
from modelopt_lite.kernels.fp8_gemm import (GemmConfig, fp8_gemm, fp8_linear, fp8_linear_reference, launch_gemm)
from modelopt_lite.kernels.fp8_quant import _launch_quant, quantize_fp8_act, quantize_fp8_act_torch
from modelopt_lite.kernels.fp8_tuning import REGIMES, candidate_configs, m_bucket
from modelopt_lite.quantization.formats import QuantFormat, fake_quant, quantize
from modelopt_lite.quantization.formats.schemes import dequant_scale
from modelopt_lite.quantization.formats.elements import E4M3

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
interp_only = pytest.mark.skipif(not (triton_available() and interpret_mode() and not torch.cuda.is_available()),
                                 reason="needs the Triton CPU interpreter")
PER_TENSOR = QuantFormat.create(num_bits=(4, 3))
PER_TOKEN = QuantFormat.create(num_bits=(4, 3), block_sizes={-1: None})


def _bits(t):
    return t.view(torch.uint8)


def _hard_values(device="cpu"):
    """Values around E4M3's grid at scale 1: every grid value, the midpoints (ties) and one float32 ulp
    either side, the subnormal range, and values past 448."""
    grid = E4M3.all_codes().float()
    grid = torch.unique(grid[torch.isfinite(grid)])
    mids = (grid[1:] + grid[:-1]) / 2
    ulp_up = torch.nextafter(mids, torch.full_like(mids, float("inf")))
    ulp_dn = torch.nextafter(mids, torch.full_like(mids, -float("inf")))
    extra = torch.tensor([449.0, 464.0, 480.0, 1e6, -1e6, 2.0**-10, -(2.0**-10), 2.0**-11, 3 * 2.0**-11, -0.0, 0.0])
    return torch.cat([grid, mids, ulp_up, ulp_dn, extra]).to(device)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _weights(N, K, per_channel, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g).add(0.1)
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
    s = dequant_scale(amax, E4M3)
    codes = torch.clamp(w / (s.reshape(-1, 1) if per_channel else s), -448, 448).to(torch.float8_e4m3fn)
    return codes.to(device), s.float().to(device)


# ------------------------------------------------------------------------------- activation quantization


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_static_bit_exact(dtype):
    x = torch.cat([_hard_values(), torch.randn(300) * 50]).reshape(-1, 8).to(dtype)
    for amax in [448.0, x.float().abs().max().item(), 100.0, 3.0, 2.0**-23, 2.0**-24, 1e-30]:
        amax = torch.tensor(amax)
        codes, scale = quantize_fp8_act(x, amax)
        ref = quantize(x, PER_TENSOR, amax)
        assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape
        assert torch.equal(_bits(codes), _bits(ref.codes)), f"amax={amax}"
        assert scale.shape == () and scale.dtype == torch.float32
        assert torch.equal(scale, dequant_scale(amax, E4M3))
    assert quantize_fp8_act(x, torch.tensor(2.0**-24))[1].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_dynamic_bit_exact(dtype):
    x = torch.randn(37, 200) * torch.logspace(-6, 3, 37).reshape(-1, 1)
    x[3] = 0.0
    x[5] = 1e-9
    x[7, :16] = _hard_values()[:16]
    x = x.to(dtype)
    codes, scale = quantize_fp8_act(x)
    ref = quantize(x, PER_TOKEN)
    assert torch.equal(_bits(codes), _bits(ref.codes))
    assert scale.shape == (37, 1) and scale.dtype == torch.float32
    assert torch.equal(scale, dequant_scale(ref.amax, E4M3).reshape(37, 1))
    assert scale[3].item() == 0.0 and scale[5].item() == 0.0
    assert torch.equal(quantize_fp8_act_torch(x)[0].view(torch.uint8), _bits(codes))


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="2-d"):
        quantize_fp8_act(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize_fp8_act(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="0-d"):
        quantize_fp8_act(torch.randn(2, 4), torch.ones(2))


# ---------------------------------------------------------------------------------- fp8_linear on CPU


@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_cpu_matches_fake_quant(static, per_channel, with_bias):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 48) * 3
    w_codes, w_scale = _weights(24, 48, per_channel)
    bias = torch.randn(24) if with_bias else None
    amax = torch.tensor(7.5) if static else None
    out = fp8_linear(x, w_codes, w_scale, amax, bias)
    fmt = PER_TENSOR if static else PER_TOKEN
    xq = fake_quant(x.reshape(-1, 48), fmt, amax).reshape(x.shape)
    wq = w_codes.float() * (w_scale.reshape(-1, 1) if per_channel else w_scale)
    ref = F.linear(xq, wq, bias)
    assert out.shape == (2, 5, 24) and out.dtype == torch.float32
    assert _rel(out, ref) < 1e-6
    assert torch.equal(out, fp8_linear_reference(x, w_codes, w_scale, amax, bias))
    assert torch.equal(fp8_linear(x, w_codes, w_scale, amax, bias, fast_accum=True), out)  # CPU ignores it


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                                (torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_linear_cpu_dtypes(x_dtype, out_dtype):
    x = torch.randn(6, 32).to(x_dtype)
    w_codes, w_scale = _weights(16, 32, per_channel=True)
    bias = torch.randn(16).to(x_dtype)
    out = fp8_linear(x, w_codes, w_scale, None, bias, out_dtype)
    assert out.dtype == (out_dtype or x_dtype) and out.shape == (6, 16)
    ref = F.linear(fake_quant(x, PER_TOKEN).float(), w_codes.float() * w_scale.reshape(-1, 1), bias.float())
    assert _rel(out, ref) < 1e-2


def test_linear_rejects_bad_input():
    w_codes, w_scale = _weights(8, 16, per_channel=False)
    x = torch.randn(3, 16)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8_linear(x, w_codes.float(), w_scale)
    with pytest.raises(ValueError, match="features"):
        fp8_linear(torch.randn(3, 12), w_codes, w_scale)
    with pytest.raises(ValueError, match="per channel"):
        fp8_linear(x, w_codes, torch.ones(3))
    with pytest.raises(ValueError, match="x_amax"):
        fp8_linear(x, w_codes, w_scale, torch.ones(2))
    with pytest.raises(ValueError, match="bias"):
        fp8_linear(x, w_codes, w_scale, None, torch.ones(7))
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_linear(x, w_codes, w_scale, out_dtype=torch.int8)


def test_custom_op_compile_and_export():
    w_codes, w_scale = _weights(16, 32, per_channel=True)
    bias = torch.randn(16)

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", w_codes)
            self.register_buffer("s", w_scale)
            self.register_buffer("b", bias)
            self.register_buffer("amax", torch.tensor(4.0))

        def forward(self, x):
            return fp8_linear(x, self.w, self.s, self.amax, self.b, torch.float32)

    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    mod = Lin()
    eager = mod(x)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled, eager) and compiled.shape == (2, 3, 16)
    ep = torch.export.export(mod, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.modelopt_lite.fp8_linear.default in targets
    assert torch.equal(ep.module()(x), eager)


def test_tuning_buckets_and_candidates():
    assert [m_bucket(m) for m in (1, 16, 17, 64, 65, 1000, 8192, 10**6)] == [16, 16, 32, 64, 128, 1024, 8192, 16384]
    assert candidate_configs(1, 4096, 4096, quant_a=False, tma=True) == REGIMES["m16"]
    large = candidate_configs(4096, 4096, 4096, quant_a=False, tma=False)
    assert large and not any(c.persistent for c in large)
    assert all(c.split_k == 1 for c in candidate_configs(8, 64, 256, quant_a=True, tma=True))


# ------------------------------------------------------------------ kernels in the interpreter (plumbing)

_PLUMB = [GemmConfig(16, 32, 64, 4, 2), GemmConfig(16, 32, 32, 4, 2, split_k=3),
          GemmConfig(32, 16, 32, 4, 2, persistent=True)]


@interp_only
@pytest.mark.parametrize("cfg", _PLUMB, ids=str)
@pytest.mark.parametrize("tma", [True, False])
def test_interpreter_gemm_plumbing(cfg, tma):
    """Ragged M, N, K (K % 16 != 0 goes to pointer loads), per-row/per-channel scales, bias, TMA or not."""
    torch.manual_seed(2)
    for M, N, K in [(5, 40, 96), (33, 36, 200)]:
        if cfg.persistent and (not tma or K % 16):
            continue
        x = torch.randn(M, K)
        a, sa = quantize_fp8_act_torch(x)
        w, sw = _weights(N, K, per_channel=True, seed=M)
        bias = torch.randn(N)
        out = torch.full((M, N), float("nan"))
        launch_gemm(cfg, a, sa.reshape(-1), w, sw, bias, out, "row", tma)
        ref = fp8_linear_reference(x, w, sw, None, bias)
        assert not out.isnan().any() and _rel(out, ref) < 1e-5


@interp_only
def test_interpreter_quant_prologue_consistent():
    """The A-prologue quantization equals the quantization kernel followed by the GEMM (same cast code)."""
    M, N, K = 7, 24, 64
    x = torch.randn(M, K, dtype=torch.bfloat16)
    amax = x.float().abs().max()
    w, sw = _weights(N, K, per_channel=False)
    codes = torch.empty(M, K, dtype=torch.float8_e4m3fn)
    sa = torch.empty(())
    _launch_quant(x, amax, codes, sa)
    assert sa.item() == (amax / 448).item()
    cfg = GemmConfig(16, 16, 32, 4, 2)
    fused = launch_gemm(cfg, x, amax, w, sw, None, torch.empty(M, N), "quant", True)
    split = launch_gemm(cfg, codes, sa, w, sw, None, torch.empty(M, N), "tensor", True)
    assert _rel(fused, split) < 1e-6
    rows = torch.empty(M)
    _launch_quant(x, None, codes, rows)
    assert torch.equal(rows, quantize_fp8_act_torch(x)[1].reshape(-1))


# ------------------------------------------------------------------------------------------------ CUDA


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [1000, 4096, 9000])
def test_cuda_quantize_bit_exact(dtype, K):
    x = torch.randn(67, K, device="cuda") * torch.logspace(-5, 4, 67, device="cuda").reshape(-1, 1)
    hv = _hard_values("cuda")[:K]
    x[1, : hv.numel()] = hv
    x[2] = 0
    x = x.to(dtype)
    for amax in [None, torch.tensor(448.0, device="cuda"), x.float().abs().max(), torch.tensor(0.5, device="cuda"),
                 torch.tensor(1e-30, device="cuda")]:
        codes, scale = quantize_fp8_act(x, amax)
        ref = quantize(x, PER_TENSOR if amax is not None else PER_TOKEN, amax)
        assert torch.equal(_bits(codes), _bits(ref.codes)), f"amax={amax}"
        assert torch.equal(scale, dequant_scale(ref.amax, E4M3).reshape(scale.shape))


@needs_cuda
@pytest.mark.parametrize("M", [1, 7, 16, 33, 100, 300])
@pytest.mark.parametrize("static", [True, False])
def test_cuda_linear_matches_reference(M, static, monkeypatch):
    monkeypatch.setenv("MODELOPT_LITE_FP8_TUNE", "0")
    torch.manual_seed(M)
    for N, K, per_channel, with_bias, out_dtype in [(200, 512, True, True, None), (72, 200, False, False, torch.float16),
                                                    (256, 1024, False, True, torch.float32)]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * 2
        w, sw = _weights(N, K, per_channel, "cuda", seed=N + M)
        bias = torch.randn(N, device="cuda") if with_bias else None
        amax = x.float().abs().max() * 0.9 if static else None  # 0.9: some values saturate
        out = fp8_linear(x, w, sw, amax, bias, out_dtype)
        ref = fp8_linear_reference(x, w, sw, amax, bias, torch.float32)
        assert out.dtype == (out_dtype or x.dtype) and out.shape == (M, N)
        # float32 out: wgmma tiles (M > 16) sum 128 products in the tensor cores' ~13-bit accumulator before
        # each float32 promotion (as cuBLAS does), ~1.3e-4 relative; mma.sync tiles stay near 1e-6
        tol = {torch.bfloat16: 6e-3, torch.float16: 1e-3, torch.float32: 1e-5 if M <= 16 else 3e-4}[out.dtype]
        assert _rel(out, ref) < tol, (N, K, per_channel, with_bias, out_dtype)


_REGIME_M = {"m16": 9, "m64": 40, "m256": 130, "large": 300, "large_fast": 300}


@needs_cuda
@pytest.mark.parametrize("regime", list(REGIMES))
def test_cuda_every_config(regime):
    """Every candidate config (split-K, persistent, TMA and pointer loads) is correct and writes every element."""
    M, N, K = _REGIME_M[regime], 384, 1024
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    a, sa = quantize_fp8_act(x)
    w, sw = _weights(N, K, True, "cuda", seed=M)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    ref = fp8_linear_reference(x, w, sw, None, bias, torch.float32)
    for cfg in REGIMES[regime]:
        for tma in ([True, False] if not cfg.persistent else [True]):
            out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
            launch_gemm(cfg, a, sa.reshape(-1), w, sw, bias, out, "row", tma)
            assert not out.isnan().any() and _rel(out, ref) < 6e-3, (str(cfg), tma)
            if cfg.split_k > 1:
                again = launch_gemm(cfg, a, sa.reshape(-1), w, sw, bias, torch.empty_like(out), "row", tma)
                assert torch.equal(again, out), "split-K must be deterministic"


@needs_cuda
@pytest.mark.parametrize("M", [5, 300])
def test_cuda_fast_accum(M):
    """fast_accum keeps the K sum in the tensor cores: within ~1e-2 of the reference, faster for large M."""
    x = torch.randn(M, 2048, device="cuda", dtype=torch.bfloat16)
    w, sw = _weights(512, 2048, True, "cuda")
    out = fp8_linear(x, w, sw, None, None, torch.float32, fast_accum=True)
    ref = fp8_linear_reference(x, w, sw, None, None, torch.float32)
    assert 0 < _rel(out, ref) < 1e-2


@needs_cuda
def test_cuda_warp_specialized_configs():
    """The warp-specialized variants compile and agree with the reference where Triton supports them."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    M, N, K = 300, 384, 1024
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    a, sa = quantize_fp8_act(x)
    w, sw = _weights(N, K, True, "cuda")
    ref = fp8_linear_reference(x, w, sw, None, None, torch.float32)
    ran = 0
    for cfg in [GemmConfig(128, 128, 128, 8, 3, ws=True), GemmConfig(128, 128, 128, 8, 3, persistent=True, ws=True)]:
        try:
            out = launch_gemm(cfg, a, sa.reshape(-1), w, sw, None, torch.empty(M, N, device="cuda"), "row")
        except (CompilationError, OutOfResources, RuntimeError):
            continue
        ran += 1
        assert _rel(out, ref) < 3e-4, str(cfg)
    if not ran:
        pytest.skip("this Triton build cannot warp-specialize these loops")


@needs_cuda
def test_cuda_quant_prologue_and_tuned_gemm():
    """Static activations through the A prologue equal quantize-then-GEMM; tuning picks a working config."""
    M, N, K = 12, 4096, 4096
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    amax = x.float().abs().max()
    w, sw = _weights(N, K, False, "cuda")
    fused = fp8_gemm(x, amax, w, sw, None, torch.float32, a_mode="quant")
    a, sa = quantize_fp8_act(x, amax)
    plain = fp8_gemm(a, sa, w, sw, None, torch.float32)
    assert _rel(fused, plain) < 1e-6
    assert _rel(plain, fp8_linear_reference(x, w, sw, amax, None, torch.float32)) < 1e-5
    lin = fp8_linear(x, w, sw, amax, None, torch.float32)  # times fused vs quantize-then-GEMM on first use
    assert _rel(lin, plain) < 1e-6
