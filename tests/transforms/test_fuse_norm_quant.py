"""Fused norm / SwiGLU + activation quantization: ops, interpreter kernels, graph transforms."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelopt_lite.quantization.ops  # noqa: F401  (registers torch.ops.modelopt_lite.fake_quant)
from modelopt_lite.kernels import norm_quant as nq
from modelopt_lite.kernels import triton_available
from modelopt_lite.models import CausalLMLogits
from modelopt_lite.quantization.formats import QuantFormat, fake_quant
from modelopt_lite.quantization.ops import format_to_spec
from modelopt_lite.transforms import optimize
from modelopt_lite.transforms import fuse_norm_quant  # noqa: F401  (registers the transforms)

OPS = torch.ops.modelopt_lite
FP8 = QuantFormat.create(num_bits=(4, 3))
FP8_TOKEN = QuantFormat.create(num_bits=(4, 3), block_sizes={-1: None})
NVFP4 = QuantFormat.create(num_bits=(2, 1), block_sizes={-1: 16}, scale_bits="e4m3")
MXFP8 = QuantFormat.create(num_bits=(4, 3), block_sizes={-1: 32}, scale_bits="e8m0")
INT8_CH = QuantFormat.create(num_bits=8, axis=-1)
CASES = {"fp8": (FP8, lambda n: torch.tensor(3.0)), "fp8_token": (FP8_TOKEN, lambda n: None),
         "nvfp4": (NVFP4, lambda n: torch.tensor(5.0)), "mxfp8": (MXFP8, lambda n: None),
         "int8_channel": (INT8_CH, lambda n: torch.rand(n) + 1.0)}
CFG = {"transforms": [{"key": "norm_quant"}, {"key": "swiglu_quant"}]}


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, dtype=torch.float32, seed=0, scale=2.0):
    return (torch.randn(*shape, generator=_g(seed)) * scale).to(dtype)


# ------------------------------------------------------------------ ops (PyTorch path)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("xd,wd", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                   (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_ops_match_unfused_composition(name, xd, wd):
    fmt, amax_fn = CASES[name]
    spec, n = format_to_spec(fmt), 96
    x, w, b, up = _rand(3, 5, n, dtype=xd), _rand(n, dtype=wd, seed=1), _rand(n, dtype=wd, seed=2), _rand(3, 5, n, dtype=xd, seed=3)
    amax = amax_fn(n)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    rms = w * h.to(xd)
    y = OPS.rms_norm_quant(x, w, 1e-6, amax, spec)
    assert y.dtype == torch.promote_types(xd, wd) and torch.equal(y, fake_quant(rms, fmt, amax))
    if wd == xd:
        y = OPS.layer_norm_quant(x, w, b, 1e-5, amax, spec)
        assert torch.equal(y, fake_quant(F.layer_norm(x, (n,), w, b, 1e-5), fmt, amax))
    y = OPS.silu_mul_quant(x, up, amax, spec)
    assert torch.equal(y, fake_quant(F.silu(x) * up, fmt, amax))


def test_rms_reference_is_hf_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dt in (torch.float32, torch.bfloat16):
        m = LlamaRMSNorm(40, eps=1e-5).to(dt)
        with torch.no_grad():
            m.weight.copy_(_rand(40, seed=4))
        x = _rand(4, 40, dtype=dt, seed=5)
        assert torch.equal(nq.rms_norm_ref(x, m.weight, 1e-5), m(x))


def test_op_input_errors():
    spec = format_to_spec(FP8)
    with pytest.raises(ValueError, match="weight must have shape"):
        OPS.rms_norm_quant(torch.ones(2, 8), torch.ones(4), 1e-6, torch.tensor(1.0), spec)
    with pytest.raises(ValueError, match="same shape"):
        OPS.silu_mul_quant(torch.ones(2, 8), torch.ones(1, 8), torch.tensor(1.0), spec)


def test_fake_impls_under_export():
    spec = format_to_spec(NVFP4)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(32))
            self.register_buffer("amax", torch.tensor(4.0))

        def forward(self, x, up):
            a = OPS.rms_norm_quant(x, self.w, 1e-6, self.amax, spec)
            b = OPS.layer_norm_quant(x, None, None, 1e-5, self.amax, spec)
            return a, b, OPS.silu_mul_quant(x, up, None, format_to_spec(FP8_TOKEN))

    x = _rand(2, 3, 32, dtype=torch.bfloat16)
    ep = torch.export.export(M(), (x, x))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("rms_norm_quant" in t or "layer_norm_quant" in t or "silu_mul_quant" in t for t in targets) == 3
    outs = [n for n in ep.graph.nodes if n.op == "output"][0].args[0]
    assert [(tuple(o.meta["val"].shape), o.meta["val"].dtype) for o in outs] == [
        ((2, 3, 32), torch.float32), ((2, 3, 32), torch.bfloat16), ((2, 3, 32), torch.bfloat16)]
    got, want = ep.module()(x, x), M()(x, x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ------------------------------------------------------------------ Triton kernels (interpreter on CPU)
KDEV = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernel in Triton's interpreter


def _tnq(norm, *args, **kwargs):
    """`triton_norm_quant` on KDEV (inputs moved there), the result back on the CPU."""
    moved = [a.to(KDEV) if isinstance(a, torch.Tensor) else a for a in args]
    y = nq.triton_norm_quant(norm, *moved, **kwargs)
    return y.cpu() if y is not None else None


def _ulp(v: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each value in its dtype, as float32."""
    f = v.float().abs().clamp_min(torch.finfo(v.dtype).tiny)
    return torch.pow(2.0, torch.floor(torch.log2(f)) - {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[v.dtype])


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("norm", [nq.NORM_RMS, nq.NORM_LAYER, nq.NORM_SILU_MUL])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 50])
def test_kernel_vs_pytorch(norm, dt, n):
    """Quantization is bit-identical given the kernel's normalized values; those are within 4 ulp
    (float32) / 2 ulp (bf16) of PyTorch's (reduction order, rsqrt); so the fused result is within one
    quantization step of the unfused one (a changed amax or a value across a rounding boundary),
    and on at most 5% of the elements off by more than 1e-5 relative.
    """
    x, w, b, up = _rand(5, n, dtype=dt, seed=n), _rand(n, dtype=dt, seed=1), _rand(n, dtype=dt, seed=2), _rand(5, n, dtype=dt, seed=3)
    if norm == nq.NORM_RMS:
        ref, args = nq.rms_norm_ref(x, w, 1e-6), (x, w, None, 1e-6)
    elif norm == nq.NORM_LAYER:
        ref, args = F.layer_norm(x, (n,), w, b, 1e-5), (x, w, b, 1e-5)
    else:
        ref, args = F.silu(x) * up, (x, up, None, 0.0)
    h = _tnq(norm, *args, None, None, ref.dtype, quantize=False)
    assert h.dtype == ref.dtype
    mag = ref.float().abs()
    if norm == nq.NORM_LAYER:  # the bias may cancel the normalized term: count ulps of the larger one
        mag = torch.maximum(mag, F.layer_norm(x, (n,), w, None, 1e-5).float().abs() + b.float().abs())
    assert ((h.float() - ref.float()).abs() <= (4 if dt == torch.float32 else 2) * _ulp(mag.to(dt))).all()
    for fmt, amax in ((FP8, torch.tensor(3.0)), (FP8_TOKEN, None), (NVFP4, torch.tensor(5.0))):
        y = _tnq(norm, *args, amax, fmt, ref.dtype)
        assert torch.equal(y, fake_quant(h, fmt, amax))
        yu = fake_quant(ref, fmt, amax)
        step = 0.126 * yu.float().abs() + ref.float().abs().amax() / 448 * 2.0**-8 + 1e-30
        assert ((y.float() - yu.float()).abs() <= step).all()
        assert (y.float() - yu.float()).abs().gt(1e-5 * yu.float().abs()).float().mean() <= 0.05


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_kernel_rms_bf16_input_fp32_weight():
    x, w = _rand(4, 48, dtype=torch.bfloat16, seed=7), _rand(48, seed=8)
    ref = nq.rms_norm_ref(x, w, 1e-6)
    h = _tnq(nq.NORM_RMS, x, w, None, 1e-6, None, None, torch.float32, quantize=False)
    assert ref.dtype == torch.float32 and torch.equal(h, ref)  # the bf16 rounding of x * rstd hides the order
    y = _tnq(nq.NORM_RMS, x, w, None, 1e-6, torch.tensor(6.0), NVFP4, torch.float32)
    assert torch.equal(y, fake_quant(ref, NVFP4, torch.tensor(6.0)))


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_kernel_bf16_nvfp4_layernorm_without_affine_and_tiny_global():
    x = _rand(3, 40, dtype=torch.bfloat16, seed=9)
    h = _tnq(nq.NORM_LAYER, x, None, None, 1e-5, None, None, x.dtype, quantize=False)
    for g in (torch.tensor(6.0), torch.tensor(0.0)):
        y = _tnq(nq.NORM_LAYER, x, None, None, 1e-5, g, NVFP4, x.dtype)
        assert torch.equal(y, fake_quant(h, NVFP4, g))
    assert torch.equal(h, F.layer_norm(x, (40,)))


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_kernel_fresh_random_inputs():
    n = int(torch.randint(17, 90, ()))
    x, w, up = torch.randn(3, n) * 3, torch.randn(n), torch.randn(3, n)
    for norm, args, ref in ((nq.NORM_RMS, (x, w, None, 1e-6), nq.rms_norm_ref(x, w, 1e-6)),
                            (nq.NORM_SILU_MUL, (x, up, None, 0.0), F.silu(x) * up)):
        h = _tnq(norm, *args, None, None, torch.float32, quantize=False)
        assert ((h - ref).abs() <= 4 * _ulp(ref)).all(), n
        for fmt, amax in ((FP8, ref.abs().amax()), (FP8_TOKEN, None), (NVFP4, ref.abs().amax())):
            assert torch.equal(_tnq(norm, *args, amax, fmt, torch.float32), fake_quant(h, fmt, amax)), n


def test_kernel_plan_coverage():
    assert nq.kernel_plan(FP8, 100, torch.tensor(1.0))["QMODE"] == 0
    assert nq.kernel_plan(FP8_TOKEN, 100, None)["QMODE"] == 1
    assert nq.kernel_plan(NVFP4, 100, torch.tensor(1.0))["QMODE"] == 2
    assert nq.kernel_plan(NVFP4, 100, None) is None  # no global amax: a second pass over the tensor
    assert nq.kernel_plan(MXFP8, 100, None) is None
    assert nq.kernel_plan(INT8_CH, 100, torch.ones(100)) is None
    assert nq.kernel_plan(FP8, nq.MAX_ROW + 1, torch.tensor(1.0)) is None
    x = torch.ones(2, 8)
    assert _tnq(nq.NORM_RMS, x, torch.ones(8), None, 1e-6, None, MXFP8, x.dtype) is None


# ------------------------------------------------------------------ transforms on FX graphs
class Quant(nn.Module):
    def __init__(self, fmt=FP8, amax=2.5):
        super().__init__()
        self.spec = format_to_spec(fmt)
        self.register_buffer("amax", None if amax is None else torch.as_tensor(amax, dtype=torch.float32))

    def forward(self, x):
        return OPS.fake_quant(x, self.amax, self.spec)


class RMSBlock(nn.Module):
    """LlamaRMSNorm followed by q/k/v input quantizers (and optionally a residual reader)."""

    def __init__(self, n=48, quants=None, residual=False, wdtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(_rand(n, seed=11).to(wdtype))
        self.quants = nn.ModuleList(quants if quants is not None else [Quant() for _ in range(3)])
        self.residual = residual

    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + 1e-6)
        h = self.weight * h.to(dt)
        outs = [q(h) for q in self.quants]
        if self.residual:
            outs.append(h + x)
        return sum(o.float() for o in outs)


def _run(model, *inputs, cfg=CFG):
    ref = model(*inputs)
    gm = optimize(model, example_inputs=inputs, config=cfg, log=False)
    rep = {r.key: r for r in gm.meta["transform_report"]}
    assert torch.equal(gm(*inputs), ref)
    return gm, rep


def _count(gm, name):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target))


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_rmsnorm_qkv_merged(dt):
    gm, rep = _run(RMSBlock(wdtype=dt), _rand(2, 3, 48, dtype=dt))
    assert rep["norm_quant"].matches == 1 and _count(gm, "rms_norm_quant") == 1 and _count(gm, "fake_quant") == 0
    assert not any(n.op == "call_function" and "rsqrt" in str(n.target) for n in gm.graph.nodes)


@pytest.mark.parametrize("kwargs,inputs_dt", [
    (dict(residual=True), torch.float32),                                       # the residual reads the norm
    (dict(quants=[Quant(), Quant(amax=3.0), Quant()]), torch.float32),          # different amax
    (dict(quants=[Quant(), Quant(FP8_TOKEN, None)]), torch.float32),            # different spec
    (dict(quants=[Quant(MXFP8, None)]), torch.float32),                         # format without a fused kernel
    (dict(wdtype=torch.float16), torch.bfloat16),                               # dtype mismatch
])
def test_rmsnorm_must_not_match(kwargs, inputs_dt):
    gm, rep = _run(RMSBlock(**kwargs), _rand(2, 3, 48, dtype=inputs_dt))
    assert rep["norm_quant"].matches == 0 and _count(gm, "rms_norm_quant") == 0


def test_unsupported_format_fuses_with_fallback():
    cfg = {"transforms": [{"key": "norm_quant", "allow_fallback": True}]}
    gm, rep = _run(RMSBlock(quants=[Quant(MXFP8, None)] * 2), _rand(2, 48), cfg=cfg)
    assert rep["norm_quant"].matches == 1 and _count(gm, "rms_norm_quant") == 1


def test_distinct_amax_not_merged_when_disabled():
    cfg = {"transforms": [{"key": "norm_quant", "merge_equal_amax": False}]}
    gm, rep = _run(RMSBlock(), _rand(2, 48), cfg=cfg)
    assert rep["norm_quant"].matches == 0
    gm, rep = _run(RMSBlock(quants=[Quant()] * 3), _rand(2, 48), cfg=cfg)  # one shared quantizer module
    assert rep["norm_quant"].matches == 1


class FuncNorms(nn.Module):
    def __init__(self, fmt=NVFP4, amax=4.0, residual=False):
        super().__init__()
        self.w, self.b = nn.Parameter(_rand(64, seed=1)), nn.Parameter(_rand(64, seed=2))
        self.q1, self.q2, self.residual = Quant(fmt, amax), Quant(fmt, amax), residual

    def forward(self, x):
        a = self.q1(F.layer_norm(x, (64,), self.w, self.b, 1e-5))
        r = F.rms_norm(x, (64,), self.w, 1e-6)
        out = a + self.q2(r)
        return out + r if self.residual else out


def test_functional_layer_norm_and_rms_norm():
    gm, rep = _run(FuncNorms(), _rand(3, 64))
    assert rep["norm_quant"].matches == 2 and _count(gm, "layer_norm_quant") == 1 and _count(gm, "rms_norm_quant") == 1
    gm, rep = _run(FuncNorms(residual=True), _rand(3, 64))
    assert rep["norm_quant"].matches == 1 and _count(gm, "layer_norm_quant") == 1
    gm, rep = _run(FuncNorms().to(torch.bfloat16), _rand(3, 64, dtype=torch.bfloat16))  # rms_norm only in float32
    assert rep["norm_quant"].matches == 1 and _count(gm, "rms_norm_quant") == 0


class Swiglu(nn.Module):
    def __init__(self, quants=2, extra=None, fmt=FP8_TOKEN, amax=None):
        super().__init__()
        self.quants = nn.ModuleList([Quant(fmt, amax) for _ in range(quants)])
        self.extra = extra

    def forward(self, gate, up):
        s = F.silu(gate)
        p = s * up
        out = sum(q(p) for q in self.quants)
        if self.extra == "residual":
            out = out + p
        elif self.extra == "silu":
            out = out + s
        return out


@pytest.mark.parametrize("kwargs,matches", [
    (dict(), 1), (dict(quants=1, fmt=NVFP4, amax=3.0), 1), (dict(extra="residual"), 0), (dict(extra="silu"), 0),
    (dict(quants=1, fmt=MXFP8), 0)])
def test_swiglu(kwargs, matches):
    gate, up = _rand(4, 40, seed=1), _rand(4, 40, seed=2)
    gm, rep = _run(Swiglu(**kwargs), gate, up)
    assert rep["swiglu_quant"].matches == matches and _count(gm, "silu_mul_quant") == matches


def test_swiglu_broadcast_up_not_matched():
    gm, rep = _run(Swiglu(quants=1), _rand(4, 40, seed=1), _rand(1, 40, seed=2))
    assert rep["swiglu_quant"].matches == 0


def test_skipped_without_quantizers():
    gm = optimize(nn.Sequential(nn.Linear(4, 4), nn.SiLU()), example_inputs=(torch.ones(2, 4),), config=CFG, log=False)
    rep = {r.key: r for r in gm.meta["transform_report"]}
    assert rep["norm_quant"].status == "skipped" and "no modelopt_lite.fake_quant" in rep["norm_quant"].reason


# ------------------------------------------------------------------ quantized tiny Llama (torch.export graph)


@pytest.mark.parametrize("qformat", ["fp8", "nvfp4"])
def test_quantized_tiny_llama(qformat):
    pytest.importorskip("transformers")
    import modelopt_lite.quantization as mtq
    from modelopt_lite.models.tiny import build_tiny_model

    model = build_tiny_model("llama")
    ids = torch.randint(0, 100, (2, 7), generator=_g(1))
    mtq.quantize(model, qformat, lambda m: m(ids))
    wrapped = CausalLMLogits(model).eval()
    ref = wrapped(ids)
    calls = lambda g: sum(1 for n in g.graph.nodes if n.op == "call_function")  # noqa: E731
    # the default pipeline without the norm and SwiGLU fusions (the layers lowered to fake-quant ops), then them
    gm = optimize(wrapped, (ids,), config={"transforms": [{"key": "norm_quant", "enabled": False},
                                                         {"key": "swiglu_quant", "enabled": False}]}, log=False)
    before = calls(gm)
    assert torch.equal(gm(ids), ref)
    quant_only = {"transforms": [{"key": k, "fuse_unquantized": False} for k in ("norm_quant", "swiglu_quant")]}
    gm = optimize(gm, (ids,), config=quant_only, log=False)
    rep = {r.key: r for r in gm.meta["transform_report"]}
    layers = model.config.num_hidden_layers
    assert rep["norm_quant"].matches == 2 * layers and rep["swiglu_quant"].matches == layers
    assert _count(gm, "rms_norm_quant") == 2 * layers and _count(gm, "silu_mul_quant") == layers
    # per layer: q/k/v/gate/up/down input quantizers (6) -> 3 fused ops; o_proj's and the weights' stay
    assert _count(gm, "modelopt_lite.fake_quant") == layers * (7 + 1)
    assert torch.equal(gm(ids), ref)
    # per layer: 2 norms of 8 nodes (pow, mean, add, rsqrt, mul, its assert, to, mul; the float32 cast of
    # the input stays: the residual reads it) with 3 + 2 quantizers -> 2 ops; silu, mul, quantizer -> 1 op
    assert before - calls(gm) == layers * ((8 + 3 - 1) + (8 + 2 - 1) + (3 - 1))


# ------------------------------------------------------------------ fusion without quantizers (fuse_unquantized)
def test_unquantized_rmsnorm_and_swiglu_fused():
    x = _rand(2, 3, 48, dtype=torch.bfloat16)
    block = RMSBlock(quants=[], residual=True, wdtype=torch.bfloat16)
    gm, rep = _run(block, x)  # no quantizer reads the norm: the op with an empty spec, exact on CPU
    assert rep["norm_quant"].matches == 1 and _count(gm, "rms_norm_quant") == 1
    op = next(n for n in gm.graph.nodes if "rms_norm_quant" in str(n.target))
    assert op.args[3:] == (None, "")
    gm, rep = _run(block, x, cfg={"transforms": [{"key": "norm_quant", "fuse_unquantized": False}]})
    assert rep["norm_quant"].status == "skipped" and _count(gm, "rms_norm_quant") == 0
    gate, up = _rand(4, 40, seed=1), _rand(4, 40, seed=2)
    gm, rep = _run(Swiglu(quants=0, extra="residual"), gate, up)
    assert rep["swiglu_quant"].matches == 1 and _count(gm, "silu_mul_quant") == 1
    gm, rep = _run(Swiglu(quants=0, extra="silu"), gate, up)  # silu's output has another reader
    assert rep["swiglu_quant"].matches == 0
    # a single aten norm op is one kernel already: left alone without quantizers
    gm, rep = _run(nn.LayerNorm(48), x.float())
    assert rep["norm_quant"].matches == 0 and _count(gm, "layer_norm_quant") == 0


def test_empty_spec_ops_are_the_plain_compositions():
    x, w, up = _rand(3, 40, dtype=torch.bfloat16), _rand(40, dtype=torch.bfloat16, seed=4), _rand(3, 40, seed=5)
    assert torch.equal(torch.ops.modelopt_lite.rms_norm_quant(x, w, 1e-6, None, ""), nq.rms_norm_ref(x, w, 1e-6))
    assert torch.equal(torch.ops.modelopt_lite.silu_mul_quant(x.float(), up, None, ""), F.silu(x.float()) * up)


class ShapeReadBlock(RMSBlock):
    """The normalized value's shape is read before its quantizer (``b, s, _ = h.shape`` in attention code)."""

    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = self.weight * h.to(dt)
        b, s, _ = h.shape
        return self.quants[0](h).view(b, s, 4, -1).transpose(1, 2)


def test_shape_read_before_the_quantizer_does_not_block_the_match():
    gm, rep = _run(ShapeReadBlock(quants=[Quant()]), _rand(2, 3, 48))
    assert rep["norm_quant"].matches == 1 and _count(gm, "rms_norm_quant") == 1 and _count(gm, "fake_quant") == 0
