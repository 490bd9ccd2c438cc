"""Fused fake-quant kernels: bit-identical to `formats.fake_quant` for every format and granularity.

On CPU the kernels run in Triton's interpreter (small shapes); the CUDA tests use larger random
shapes, the compiled paths (libdevice rint, div.rn) and check that quantized models use the kernels.
"""

import math

import pytest
import torch

from modelopt_lite.kernels import fake_quant as kfq
from modelopt_lite.quantization.formats import QuantFormat, block_amax, compute_amax
from modelopt_lite.quantization.formats import fake_quant as ref_fake_quant

F = QuantFormat.create
CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

pytestmark = [pytest.mark.skipif(not kfq.triton_available(), reason="needs triton"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # inf/NaN arithmetic in the interpreter
cpu_only = pytest.mark.skipif(CUDA, reason="interpreter tests (the CUDA tests cover the same on the device)")
DEV = "cuda" if CUDA else "cpu"  # the tests below without @cpu_only run on the device when there is one

FORMATS = {
    "int8": F(8), "int4": F(4), "uint8": F(8, unsigned=True), "int8n": F(8, narrow_range=True),
    "int8_ax0": F(8, axis=0), "int8_ax-1": F(8, axis=-1), "int4_ax1": F(4, axis=1), "int8_ax01": F(8, axis=(0, 1)),
    "int4_b16": F(4, block_sizes={-1: 16}), "int4_b128": F(4, block_sizes={-1: 128}),
    "int4_b24": F(4, block_sizes={-1: 24}), "int8_tok": F(8, block_sizes={-1: None}),
    "fp8": F((4, 3)), "e5m2": F((5, 2)), "fp8_ax0": F((4, 3), axis=0), "fp8_ax-1": F((4, 3), axis=-1),
    "fp8_tok": F((4, 3), block_sizes={-1: None}), "e5m2_tok": F((5, 2), block_sizes={-1: None}),
    "fp8_b32": F((4, 3), block_sizes={-1: 32}), "fp8_2d": F((4, 3), block_sizes={-1: 8, -2: 8}),
    "fp8_2d_128": F((4, 3), block_sizes={-1: 128, -2: 128}), "fp4_pt": F((2, 1)), "fp6_e3m2": F((3, 2), axis=0),
    "nvfp4": F((2, 1), block_sizes={-1: 16}, scale_bits=(4, 3)),
    "nvfp4_fp8g": F((2, 1), block_sizes={-1: 16}, scale_bits=(4, 3), global_fp8=True),
    "int4_e4m3": F(4, block_sizes={-1: 16}, scale_bits=(4, 3)),
    "mxfp8": F((4, 3), block_sizes={-1: 32}, scale_bits=(8, 0)),
    "mxfp8_e5m2": F((5, 2), block_sizes={-1: 32}, scale_bits=(8, 0)),
    "mxfp6": F((3, 2), block_sizes={-1: 32}, scale_bits=(8, 0)),
    "mxfp6_e2m3": F((2, 3), block_sizes={-1: 32}, scale_bits=(8, 0)),
    "mxfp4": F((2, 1), block_sizes={-1: 32}, scale_bits=(8, 0)),
    "mxint8": F(8, block_sizes={-1: 32}, scale_bits=(8, 0)),
}


def assert_same(y, r):
    """Bit-identical (NaN where the reference has NaN, any payload)."""
    assert y is not None, "the layout was expected to be covered by the kernels"
    assert y.shape == r.shape and y.dtype == r.dtype
    ny, nr = torch.isnan(y), torch.isnan(r)
    assert torch.equal(ny, nr), f"NaN positions differ ({int((ny != nr).sum())})"
    bits = torch.int32 if y.dtype == torch.float32 else torch.int16
    yb, rb = y[~ny].contiguous().view(bits), r[~nr].contiguous().view(bits)
    if not torch.equal(yb, rb):
        i = int((yb != rb).nonzero()[0])
        raise AssertionError(f"{int((yb != rb).sum())} values differ, e.g. {y[~ny][i].item()!r} vs {r[~nr][i].item()!r}")


def make_input(shape, dtype, gen, specials=True, unsigned=False):
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))
    x = x.to(dtype)
    if specials and x.numel() >= 16:
        flat = x.view(-1)
        n = flat.numel()
        tiny = torch.finfo(dtype).tiny
        vals = [0.0, -0.0, float("inf"), -float("inf"), tiny / 4, -tiny / 2, tiny, 1e4, -3e3, 0.5, -1.5, 2.5]
        idx = torch.randperm(n, generator=gen)[: len(vals)]
        for i, v in zip(idx.tolist(), vals):
            flat[i] = v
        if n >= 64:
            flat[int(torch.randint(n, (1,), generator=gen))] = float("nan")
    if unsigned:
        x = x.abs()
    return x


def amax_for(x, fmt, kind):
    """'static' (a calibrated amax, shrunk so values exceed it), 'tiny', or None (dynamic)."""
    if kind is None:
        return None
    xf = torch.nan_to_num(x.float(), nan=0.0, posinf=7.0, neginf=-7.0)
    if fmt.scale is not None and kind == "block":
        a = block_amax(xf, fmt)
    elif fmt.scale is not None:
        a = xf.abs().amax()
    else:
        a = compute_amax(xf, fmt)
    a = a * 0.75
    if kind == "tiny":
        a = torch.full_like(a, 2.0**-24)
        if a.numel() > 1:
            a.view(-1)[::2] = 2.0**-25
    return a


def check(fmt, shape, dtype, kind, seed=0, specials=True, global_amax=None, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(shape, dtype, gen, specials, unsigned=getattr(fmt.element, "unsigned", False)).to(device)
    a = amax_for(x, fmt, kind)
    y = kfq.triton_fake_quant(x, fmt, a, global_amax)
    r = ref_fake_quant(x, fmt, a, global_amax)
    assert_same(y, r)


CPU_CASES = [
    ("int8", (6, 40), "static"), ("int8", (5, 33), None), ("int4", (5, 33), "tiny"), ("uint8", (4, 20), "static"),
    ("int8n", (4, 20), "static"), ("int8_ax0", (6, 40), "static"), ("int8_ax0", (6, 40), None),
    ("int8_ax-1", (3, 5, 24), "static"), ("int8_ax-1", (3, 5, 24), None), ("int4_ax1", (3, 7, 10), "static"),
    ("int4_ax1", (3, 7, 10), None), ("int8_ax01", (3, 4, 8), "static"), ("int4_b16", (5, 48), "static"),
    ("int4_b16", (5, 48), None), ("int4_b16", (5, 37), "static"), ("int4_b16", (5, 37), None),
    ("int4_b128", (3, 256), "static"), ("int4_b128", (3, 200), None), ("int4_b24", (4, 48), None),
    ("int8_tok", (5, 37), None), ("fp8", (6, 40), "static"), ("fp8", (6, 40), None), ("fp8", (6, 40), "tiny"),
    ("e5m2", (6, 40), "static"), ("fp8_ax0", (6, 40), "static"), ("fp8_ax-1", (4, 24), "static"),
    ("fp8_tok", (5, 37), None), ("e5m2_tok", (2, 3, 40), None), ("fp8_b32", (4, 64), "static"),
    ("fp8_2d", (2, 19, 21), "static"), ("fp8_2d", (2, 19, 21), None), ("fp8_2d", (16, 16), "tiny"),
    ("fp4_pt", (6, 40), "static"), ("fp6_e3m2", (6, 40), "static"), ("nvfp4", (4, 64), "static"),
    ("nvfp4", (4, 64), "block"), ("nvfp4", (4, 64), None), ("nvfp4", (5, 40), "static"), ("nvfp4", (5, 40), None),
    ("nvfp4", (4, 64), "tiny"), ("nvfp4_fp8g", (4, 64), "static"), ("int4_e4m3", (4, 64), "static"),
    ("mxfp8", (4, 64), None), ("mxfp8", (3, 70), None), ("mxfp8_e5m2", (4, 64), None), ("mxfp6", (4, 64), None),
    ("mxfp6_e2m3", (4, 64), None), ("mxfp4", (4, 64), None), ("mxfp4", (3, 45), None), ("mxint8", (4, 64), None),
]


@cpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name,shape,kind", CPU_CASES, ids=[f"{n}-{'x'.join(map(str, s))}-{k}" for n, s, k in CPU_CASES])
def test_cpu_interpreter_matches_reference(name, shape, kind, dtype):
    check(FORMATS[name], shape, dtype, kind)


@pytest.mark.parametrize("fmt_name", ["nvfp4", "nvfp4_fp8g"])
def test_two_level_global_amax(fmt_name):
    fmt = FORMATS[fmt_name]
    for dtype in DTYPES:
        g = [torch.tensor(v, device=DEV) for v in (3.0, 2.0**-25, float("inf"))]
        check(fmt, (4, 48), dtype, "block", global_amax=g[0], device=DEV)  # static blocks, shared global
        check(fmt, (4, 48), dtype, None, global_amax=g[1], device=DEV)  # tiny global: zeros
        check(fmt, (4, 48), dtype, "static", global_amax=g[2], device=DEV)


def test_special_inputs_and_ties():
    """Exact ties of every grid, NaN/inf in blocks, all-zero blocks, subnormal inputs."""
    fp8, nv, mx = FORMATS["fp8"], FORMATS["nvfp4"], FORMATS["mxfp4"]
    ties = torch.tensor([0.5, 1.5, 2.5, -2.5, 1.0625, 1.1875, 0.001953125, 0.0029296875, 3.5, 5.0, 0.25, 0.75,
                         1.25, 1.75, -0.25, 464.0, 480.0, 0.0, -0.0, 1e-40] * 4).reshape(4, 20).to(DEV)
    for dtype in DTYPES:
        x = ties.to(dtype)
        for fmt, a in [(fp8, torch.tensor(448.0, device=DEV)), (FORMATS["int8"], torch.tensor(127.0, device=DEV)),
                       (FORMATS["fp4_pt"], torch.tensor(6.0, device=DEV))]:
            assert_same(kfq.triton_fake_quant(x, fmt, a), ref_fake_quant(x, fmt, a))
        xb = torch.cat([x, torch.zeros(4, 12, dtype=dtype, device=DEV)], 1)  # 4 x 32
        xb[1, 3] = float("nan")
        xb[2, 17] = float("inf")
        xb[3] = 0.0
        for fmt, a in [(nv, torch.tensor(6.0 * 448, device=DEV)), (nv, None), (mx, None), (FORMATS["mxint8"], None)]:
            assert_same(kfq.triton_fake_quant(xb, fmt, a), ref_fake_quant(xb, fmt, a))
    sub = torch.tensor([1e-40, -3e-42, 2e-39, 1e-45] * 8, device=DEV).reshape(1, 32)  # float32 subnormals only
    for fmt in (mx, FORMATS["mxfp8"], FORMATS["mxint8"], nv):
        assert_same(kfq.triton_fake_quant(sub, fmt), ref_fake_quant(sub, fmt))


def test_loop_tiles_and_variants(monkeypatch):
    """Long rows (two passes), small tiles (many programs, masked tails), div.rn and non-piece paths."""
    monkeypatch.setattr(kfq, "MAX_ROW", 32)
    monkeypatch.setattr(kfq, "LOOP_CHUNK", 16)
    monkeypatch.setattr(kfq, "FLAT_TILE", 64)
    monkeypatch.setattr(kfq, "TILE", 64)
    monkeypatch.setattr(kfq, "TILE_2D", 16)
    kfq.clear_cache()
    try:
        for name, shape, kind in [("fp8_tok", (3, 70), None), ("int8", (5, 33), "static"), ("fp8_2d", (2, 19, 21), None),
                                  ("fp8_2d", (2, 19, 21), "static"), ("int8_ax-1", (9, 24), "static"),
                                  ("nvfp4", (5, 40), None), ("int4_b128", (3, 256), None)]:
            check(FORMATS[name], shape, torch.bfloat16, kind, device=DEV)
        monkeypatch.setattr(kfq, "FAST_DIV", False)
        monkeypatch.setattr(kfq, "TILE_TWO_LEVEL", 64)
        kfq.clear_cache()
        for name, kind in [("nvfp4", "static"), ("nvfp4", "block"), ("nvfp4", "tiny"), ("nvfp4", None),
                           ("int4_e4m3", None), ("mxfp4", None), ("int4_b16", None)]:
            check(FORMATS[name], (4, 64), torch.float32, kind, device=DEV)
    finally:
        kfq.clear_cache()


def test_non_contiguous_and_ranks():
    gen = torch.Generator().manual_seed(1)
    x = make_input((40, 6), torch.bfloat16, gen).to(DEV).t()  # non-contiguous
    for name in ("int8_ax0", "fp8_tok", "nvfp4"):
        fmt = FORMATS[name]
        a = amax_for(x, fmt, None if name == "fp8_tok" else "static")
        assert_same(kfq.triton_fake_quant(x, fmt, a), ref_fake_quant(x, fmt, a))
    for shape in [(50,), (2, 3, 4, 16), (1, 1, 32)]:
        check(FORMATS["mxfp8"], shape, torch.float32, None, device=DEV)
        check(FORMATS["fp8"], shape, torch.float16, "static", device=DEV)
    x0, a0 = torch.tensor(3.0, device=DEV), torch.tensor(2.0, device=DEV)
    assert_same(kfq.triton_fake_quant(x0, FORMATS["fp8"], a0), ref_fake_quant(x0, FORMATS["fp8"], a0))


def test_uncovered_layouts_fall_back():
    x = torch.randn(8, 32, device=DEV)
    one, a2 = torch.tensor(1.0, device=DEV), torch.tensor(2.0, device=DEV)
    assert kfq.triton_fake_quant(x, F(8, block_sizes={0: 4}), None) is None  # blocks along another axis
    assert kfq.triton_fake_quant(x.double(), FORMATS["fp8"], one) is None
    assert kfq.triton_fake_quant(torch.randn(2, 3, 4, device=DEV), F(8, axis=(0, 2)), torch.ones(8, device=DEV)) is None
    assert kfq.triton_fake_quant(x, FORMATS["int8_ax0"], torch.ones(5, device=DEV)) is None  # reference raises
    assert kfq.triton_fake_quant(x, FORMATS["int4_b16"], one) is None  # one amax for several blocks: it raises too
    with pytest.raises(ValueError):
        kfq.fake_quant(x, FORMATS["int8_ax0"], torch.ones(5, device=DEV))
    with pytest.raises(ValueError):
        kfq.fake_quant(-x.abs() - 1, FORMATS["uint8"], one)
    assert_same(kfq.fake_quant(x, FORMATS["fp8"], a2), ref_fake_quant(x, FORMATS["fp8"], a2))
    assert_same(kfq.fake_quant(x, F(8, block_sizes={0: 4})), ref_fake_quant(x, F(8, block_sizes={0: 4})))


# ------------------------------------------------------------------------------------------ CUDA
GPU_CASES = [
    ("int8", (257, 1000), "static"), ("int8", (257, 1000), None), ("uint8", (64, 512), "static"),
    ("int8_ax0", (1024, 1000), "static"), ("int8_ax0", (300, 1000), None), ("int8_ax-1", (4, 300, 520), "static"),
    ("int8_ax-1", (600, 520), None), ("int4_ax1", (3, 70, 130), "static"), ("int4_b16", (333, 512), None),
    ("int4_b128", (512, 4096), "static"), ("int4_b128", (512, 4100), "static"), ("int4_b128", (512, 4096), None),
    ("int4_b24", (100, 480), "static"), ("int8_tok", (333, 4100), None), ("fp8", (1000, 1024), "static"),
    ("fp8", (1000, 1024), None), ("fp8", (64, 64), "tiny"), ("e5m2", (1000, 1024), "static"),
    ("fp8_ax0", (1024, 1000), "static"), ("fp8_ax-1", (3000, 256), "static"), ("fp8_tok", (300, 4096), None),
    ("fp8_tok", (8, 40000), None), ("e5m2_tok", (300, 777), None), ("fp8_b32", (128, 1024), "static"),
    ("fp8_2d_128", (1024, 1024), "static"), ("fp8_2d_128", (1000, 1100), "static"), ("fp8_2d_128", (2, 384, 640), None),
    ("fp8_2d", (2, 190, 210), None), ("fp4_pt", (512, 512), "static"), ("fp6_e3m2", (512, 512), "static"),
    ("nvfp4", (1024, 4096), "static"), ("nvfp4", (1024, 4096), "block"), ("nvfp4", (1024, 4096), None),
    ("nvfp4", (333, 1000), "static"), ("nvfp4", (64, 256), "tiny"), ("nvfp4_fp8g", (512, 1024), "static"),
    ("int4_e4m3", (512, 1024), "static"), ("mxfp8", (1024, 4096), None), ("mxfp8", (100, 1000), None),
    ("mxfp8_e5m2", (512, 1024), None), ("mxfp6", (512, 1024), None), ("mxfp6_e2m3", (512, 1024), None),
    ("mxfp4", (1024, 4096), None), ("mxint8", (512, 1024), None),
]


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name,shape,kind", GPU_CASES, ids=[f"{n}-{'x'.join(map(str, s))}-{k}" for n, s, k in GPU_CASES])
def test_cuda_matches_reference(name, shape, kind, dtype):
    for seed in (0, 1):
        check(FORMATS[name], shape, dtype, kind, seed=seed, device="cuda")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_special_values_and_variants(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        for name in ("nvfp4", "nvfp4_fp8g", "mxfp4", "mxint8", "fp8_tok", "int4_b128"):
            fmt = FORMATS[name]
            x = make_input((256, 256), dtype, gen).cuda()
            x[5, :16] = 0.0
            x[6, 3] = float("nan")
            x[7, 40] = float("inf")
            two_level = fmt.scale is not None and fmt.scale.name == "e4m3"
            amaxes = [None] + ([torch.tensor(1e30), torch.tensor(0.0), torch.tensor(3.0)] if two_level else [])
            for a in amaxes:
                a = None if a is None else a.cuda()
                assert_same(kfq.triton_fake_quant(x, fmt, a), ref_fake_quant(x, fmt, a))
    monkeypatch.setattr(kfq, "FAST_DIV", False)
    monkeypatch.setattr(kfq, "TILE_2D_DYN", 4096)
    kfq.clear_cache()
    try:
        for name, kind in [("nvfp4", "static"), ("nvfp4", None), ("nvfp4", "block"), ("int4_e4m3", "static"),
                           ("fp8_2d_128", None)]:
            check(FORMATS[name], (512, 1024), torch.bfloat16, kind, device="cuda")
    finally:
        kfq.clear_cache()


def test_repeated_calls_and_unaligned_inputs():
    """Later calls of a cached plan, and inputs that are not 16-byte aligned."""
    gen = torch.Generator().manual_seed(5)
    for name, kind in [("fp8", "static"), ("nvfp4", "static"), ("mxfp8", None), ("int8_ax0", None)]:
        fmt = FORMATS[name]
        base = make_input((8 * 64 + 1,), torch.bfloat16, gen).to(DEV)
        for x in (base[:-1].view(8, 64), base[1:].view(8, 64), base[:-1].view(8, 64) * 2):
            a = amax_for(x, fmt, kind)
            for _ in range(2):
                assert_same(kfq.triton_fake_quant(x, fmt, a), ref_fake_quant(x, fmt, a))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_quantized_model_uses_kernels(monkeypatch):
    import modelopt_lite.quantization as mtq

    calls = []
    real = kfq.triton_fake_quant

    def counting(*args, **kwargs):
        y = real(*args, **kwargs)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(kfq, "triton_fake_quant", counting)
    for cfg in ("FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG", "INT8_DEFAULT_CFG", "MXFP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG",
                "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "W4A8_NVFP4_FP8_CFG"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).cuda()
        x = torch.randn(16, 64, device="cuda")
        model = mtq.quantize(model, cfg, forward_loop=lambda m: m(x))
        calls.clear()
        with torch.no_grad():
            y = model(x)
        assert calls and all(calls), f"{cfg}: {calls}"
        monkeypatch.setenv("MODELOPT_LITE_KERNELS", "0")
        with torch.no_grad():
            y_ref = model(x)
        monkeypatch.delenv("MODELOPT_LITE_KERNELS")
        assert_same(y, y_ref)
    assert math.isfinite(float(y.float().abs().sum()))
