"""quantized_linear and horizontal_linear: match counts, exact outputs on CPU, must-not-match cases."""

import copy

import pytest
import torch
from torch import nn

import modelopt_lite.quantization as mtq
from modelopt_lite.kernels import registry
from modelopt_lite.quantization.compress import CompressedLinear
from modelopt_lite.transforms import TransformConfigError, build_transform, format_graph, optimize
from modelopt_lite.transforms.fuse_linear import (HorizontalLinear, QuantizedLinear, capture_quantized,
                                                  gemm_node_count)

BOTH = {"defaults": False, "transforms": [{"key": "horizontal_linear"}, {"key": "quantized_linear"}]}
FMTS = ["fp8", "int4_awq", "nvfp4", "int8"]


class Block(nn.Module):
    """q/k/v on one input (mixed biases, ragged N), o, then gate/up on another input and down."""

    def __init__(self, d=64):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, 40), nn.Linear(d, 24, bias=False), nn.Linear(d, 24)
        self.o = nn.Linear(88, d)
        self.gate, self.up, self.down = nn.Linear(d, 72, bias=False), nn.Linear(d, 72, bias=False), nn.Linear(72, d)

    def forward(self, x):
        h = x + self.o(torch.cat([self.q(x), self.k(x), self.v(x)], -1))
        return self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def _model(fmt, compress=True, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    m = Block().to(dtype)
    x = torch.randn(5, 64, dtype=dtype)
    if fmt is not None:
        mtq.quantize(m, fmt, lambda mm: mm(x))
        if compress:
            mtq.compress(m)
    return m, torch.randn(3, 5, 64, dtype=dtype)


def _run(m, x, config=BOTH, inputs=True):
    gm = capture_quantized(m)
    before = gemm_node_count(gm)
    gm = optimize(gm, (x,) if inputs else None, config=config, log=False)
    report = {r.key: r for r in gm.meta["transform_report"]}
    return gm, before, report


def _ops(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def _matches(report, key):
    return report[key].matches if report[key].status == "applied" else 0


@pytest.mark.parametrize("fmt", FMTS)
def test_compressed_fused_and_lowered_exact(fmt):
    m, x = _model(fmt)
    ref = m(x)
    gm, before, report = _run(m, x)
    assert _matches(report, "horizontal_linear") == 2  # q/k/v and gate/up
    assert _matches(report, "quantized_linear") == 4  # fused qkv, o, fused gate/up, down
    assert (before, gemm_node_count(gm)) == (7, 4)  # fewer kernel launches
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    assert _ops(gm, torch.split) == 2
    y = gm(x)
    assert torch.equal(y, ref)
    x2 = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    assert torch.equal(gm(x2), m(x2))


@pytest.mark.parametrize("fmt", ["fp8", "int4_awq", "nvfp4"])
def test_quantlinear_explicit_fake_quant_exact(fmt):
    m, x = _model(fmt, compress=False)
    ref = m(x)
    gm, before, report = _run(m, x)
    assert report["horizontal_linear"].status == "skipped"  # enabled weight quantizers: not concatenated
    assert _matches(report, "quantized_linear") == 7
    n_in = sum(1 for mod in m.modules() if hasattr(mod, "input_quantizer") and mod.input_quantizer.is_enabled)
    n_fq = _ops(gm, torch.ops.modelopt_lite.fake_quant.default) + _ops(gm, torch.ops.modelopt_lite.fake_quant_blocks.default)
    assert n_fq == 7 + n_in  # every weight, plus the enabled input quantizers
    assert _ops(gm, torch.nn.functional.linear) == 7 and gemm_node_count(gm) == before
    assert torch.equal(gm(x), ref)


def test_float_linears_fused_exact():
    m, x = _model(None)
    ref = m(x)
    gm, before, report = _run(m, x)
    assert _matches(report, "horizontal_linear") == 2
    assert report["quantized_linear"].status == "skipped"
    assert (before, gemm_node_count(gm)) == (7, 4)
    assert torch.equal(gm(x), ref)
    m, x = _model("fp8", compress=False)  # QuantLinear with every quantizer off computes F.linear
    for mod in m.modules():
        if hasattr(mod, "weight_quantizer"):
            for q in (mod.input_quantizer, mod.weight_quantizer, mod.output_quantizer):
                q.disable()
    m.down.input_quantizer.pre_quant_scale = torch.ones(72, dtype=torch.bfloat16)  # not fusable, but alone anyway
    gm, before, report = _run(m, x, config={"transforms": [{"key": "horizontal_linear"}]})
    assert _matches(report, "horizontal_linear") == 2 and (before, gemm_node_count(gm)) == (7, 4)
    assert torch.equal(gm(x), m(x))


def _fake_select(names):
    """A GEMM registry that picks the named Triton kernels on any device for bf16/fp16 (their ops fall back
    to the PyTorch reference on CPU, for the module and the graph alike)."""
    kernels = [k for k in registry.registered_gemms() if k.name in names]

    def select(call):
        for k in kernels:
            if call.weight in k.weights and call.activation in k.activations and call.dtype in (torch.bfloat16, torch.float16):
                return k
        return registry.FALLBACK
    return select


def _clear_cache(m):
    for mod in m.modules():
        if isinstance(mod, CompressedLinear):
            mod._kernel_cache.clear()


@pytest.mark.parametrize("fmt,op", [("fp8", "fp8_linear"), ("nvfp4", "w4_linear"), ("int4_awq", "w4_linear")])
def test_kernel_ops_emitted(monkeypatch, fmt, op):
    m, x = _model(fmt)
    monkeypatch.setattr(registry, "select_gemm", _fake_select({"fp8_w8a8_triton", "w4_triton"}))
    _clear_cache(m)
    ref = m(x)
    gm, _, report = _run(m, x)
    assert _matches(report, "quantized_linear") == 4
    assert _ops(gm, getattr(torch.ops.modelopt_lite, op).default) == 4
    assert _ops(gm, torch.nn.functional.linear) == 0
    assert torch.equal(gm(x), ref)
    # Without dtype metadata the kernel variant is not chosen: the module calls stay.
    _clear_cache(m)
    gm2, _, report2 = _run(m, x, inputs=False)
    assert _matches(report2, "quantized_linear") == 0 and _matches(report2, "horizontal_linear") == 2
    assert sum(1 for n in gm2.graph.nodes if n.op == "call_module") == 4
    assert torch.equal(gm2(x), ref)


def test_no_metadata_on_cpu_gives_dequant_form():
    m, x = _model("nvfp4")
    ref = m(x)
    gm, _, report = _run(m, x, inputs=False)
    assert _matches(report, "quantized_linear") == 4 and gemm_node_count(gm) == 4
    assert torch.equal(gm(x), ref)


def test_float32_input_gets_no_kernel_op(monkeypatch):
    m, x = _model("fp8", dtype=torch.float32)
    monkeypatch.setattr(registry, "select_gemm", _fake_select({"fp8_w8a8_triton"}))
    _clear_cache(m)
    ref = m(x)
    gm, _, report = _run(m, x)
    assert _matches(report, "quantized_linear") == 4
    assert _ops(gm, torch.ops.modelopt_lite.fp8_linear.default) == 0  # float32: dequantize-then-linear
    assert torch.equal(gm(x), ref)


class Two(nn.Module):
    def __init__(self, relu_second=False):
        super().__init__()
        self.a, self.b, self.relu_second = nn.Linear(32, 16), nn.Linear(32, 16), relu_second

    def forward(self, x):
        return self.a(x), self.b(torch.relu(x) if self.relu_second else x)


def _two(fmt, relu_second=False, seed=0, b_scale=1.0):
    torch.manual_seed(seed)
    m = Two(relu_second).to(torch.bfloat16)
    m.b.weight.data *= b_scale
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    mtq.quantize(m, fmt, lambda mm: mm(x))
    mtq.compress(m)
    return m, x


def _horizontal_count(m, x, **opts):
    gm = capture_quantized(m)
    t = HorizontalLinear(HorizontalLinear.Config(**opts))
    if t.applicable(gm, None) is not None:
        return 0, gm
    n = t.apply(gm, None)
    gm.graph.lint()
    gm.recompile()
    return n, gm


def test_must_not_match_different_inputs():
    m, x = _two("fp8", relu_second=True)
    gm = capture_quantized(m)
    assert "no 2+" in HorizontalLinear().applicable(gm, None)


def test_must_not_match_mismatched_formats_and_dtypes():
    m, x = _two("fp8")
    other, _ = _two("nvfp4")
    m.b = other.b  # same shapes, other storage
    assert _horizontal_count(m, x)[0] == 0
    m, x = _two("nvfp4")
    other, _ = _two("nvfp4", b_scale=3.0)
    assert not torch.equal(m.b.w4_global_scale, other.b.w4_global_scale)
    m.b = other.b  # NVFP4 with another global scale: no exact concatenation
    assert _horizontal_count(m, x)[0] == 0
    m, x = _two("int4_awq")
    m.b.input_quantizer.pre_quant_scale = m.b.input_quantizer.pre_quant_scale * 2  # input used with another scale
    assert _horizontal_count(m, x)[0] == 0
    m, x = _two("fp8")
    m.b.input_quantizer.amax = m.b.input_quantizer.amax * 2
    assert _horizontal_count(m, x)[0] == 0
    torch.manual_seed(0)
    m = Two().to(torch.bfloat16)
    m.b = m.b.to(torch.float16)
    assert _horizontal_count(m, x)[0] == 0


def test_extra_consumer_and_min_group():
    m, x = _two("fp8")
    ref = m(x)
    n, gm = _horizontal_count(m, x)
    assert n == 1 and gemm_node_count(gm) == 1  # both outputs are graph outputs: rewired through the split
    out = gm(x)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert _horizontal_count(m, x, min_group=3)[0] == 0
    assert _horizontal_count(m, x, kinds=["nvfp4"])[0] == 0
    m, x = _model("fp8")
    gm, _, report = _run(m, x, config={"transforms": [{"key": "horizontal_linear", "min_group": 3}]})
    assert _matches(report, "horizontal_linear") == 1  # q/k/v only


def test_bias_mixing_can_be_refused():
    m, x = _model("fp8")
    gm, _, report = _run(m, x, config={"transforms": [{"key": "horizontal_linear", "zero_bias": False}]})
    assert _matches(report, "horizontal_linear") == 2  # q+v (bias) and gate/up (no bias); k stays alone
    assert gemm_node_count(gm) == 5
    assert torch.equal(gm(x), m(x))


def test_output_quantizer_emitted_after_and_calibrating_left():
    m, x = _model("fp8", compress=False)
    oq = m.o.output_quantizer
    oq.enable()
    oq.amax = torch.tensor(2.0)
    ref = m(x)
    gm, _, report = _run(m, x, config={"transforms": [{"key": "quantized_linear"}]})
    assert _matches(report, "quantized_linear") == 7
    assert torch.equal(gm(x), ref)
    m.q.input_quantizer.enable_calib()
    gm = capture_quantized(m)
    assert QuantizedLinear().apply(gm, None) == 6  # the calibrating layer keeps its module call


def test_config_errors():
    with pytest.raises(TransformConfigError, match="unknown kinds"):
        build_transform("quantized_linear", {"kinds": ["fp4"]})
    with pytest.raises(TransformConfigError, match="min_group"):
        build_transform("horizontal_linear", {"min_group": 1})


class QKV(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_tiny_llama(fmt):
    pytest.importorskip("transformers")
    from modelopt_lite.models.tiny import build_tiny_model

    model = build_tiny_model("llama").to(torch.bfloat16)
    ids = torch.randint(0, 100, (2, 9))
    mtq.quantize(model, fmt, lambda mm: mm(ids))
    mtq.compress(model)
    ref = model(ids).logits
    layers = model.model.layers
    h = torch.randn(2, 9, layers[0].mlp.gate_proj.in_features, dtype=torch.bfloat16)
    qkv = QKV(layers[0].self_attn)
    gm, before, report = _run(qkv, h)
    assert _matches(report, "horizontal_linear") == 1 and (before, gemm_node_count(gm)) == (3, 1)
    assert all(torch.equal(a, b) for a, b in zip(gm(h), qkv(h)))
    for layer in layers:  # the whole model with every MLP replaced by its fused graph
        gm, before, report = _run(copy.deepcopy(layer.mlp), h)
        assert _matches(report, "horizontal_linear") == 1 and (before, gemm_node_count(gm)) == (3, 2)
        assert _matches(report, "quantized_linear") == 2, format_graph(gm)
        layer.mlp = gm
    assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_dead_code_after_lowering_keeps_the_users_model_intact(fmt):
    """Deleting the submodules the lowered graph no longer calls must not reach into the user's layers."""
    from modelopt_lite.transforms import TransformContext
    from modelopt_lite.transforms.pipeline import _delete_unused_submodules

    m, x = _model(fmt)
    ref = m(x)
    gm = capture_quantized(m)
    ctx = TransformContext(example_inputs=(x,))
    for key in ("horizontal_linear", "quantized_linear"):
        build_transform(key, {}).apply(gm, ctx)
        gm.graph.lint()
        gm.recompile()
    gm.graph.eliminate_dead_code()
    _delete_unused_submodules(gm)
    gm.recompile()
    assert torch.equal(gm(x), ref)
    assert torch.equal(m(x), ref)  # every layer still has its quantizers and storage
    assert all(hasattr(layer, "output_quantizer") for layer in (m.q, m.k, m.v, m.o, m.gate, m.up, m.down))
    # the GraphModule's own path containers drop what the graph no longer uses
    assert not any(isinstance(mod, CompressedLinear) for name, mod in gm.named_modules()
                   if name and not any(n.op == "get_attr" and str(n.target).startswith(name + ".")
                                       for n in gm.graph.nodes))
