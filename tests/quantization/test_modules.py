"""Quantized modules: in-place conversion, numerics, autograd, torch.compile, user layers, folding, fallback."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import modelopt_lite.quantization as mtq
from modelopt_lite.quantization import QUANT_MODULES, QuantInputModule, QuantWeightModule
from modelopt_lite.quantization.formats import fake_quant


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


# (name, factory, input shape)
LAYERS = [
    ("Linear", lambda: nn.Linear(16, 12), (4, 16)),
    ("Conv1d", lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 10)),
    ("Conv2d", lambda: nn.Conv2d(4, 6, 3, stride=2), (2, 4, 9, 9)),
    ("Conv3d", lambda: nn.Conv3d(3, 5, 2), (2, 3, 4, 4, 4)),
    ("ConvTranspose1d", lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), (2, 4, 7)),
    ("ConvTranspose2d", lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1), (2, 4, 5, 5)),
    ("ConvTranspose3d", lambda: nn.ConvTranspose3d(3, 4, 2, groups=1), (2, 3, 3, 3, 3)),
    ("Conv1D", lambda: Conv1D(12, 16), (2, 5, 16)),  # transformers' GPT-2 layer: weight is [in, out]
]
LAYER_IDS = [name for name, _, _ in LAYERS]


def make(factory, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(factory())


def quantize_int8(model, x):
    return mtq.quantize(model, "INT8_DEFAULT_CFG", forward_loop=lambda m: m(x))


# --------------------------------------------------------------------------- conversion keeps the module

@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=LAYER_IDS)
def test_conversion_keeps_names_params_hooks(name, factory, shape):
    model = make(factory)
    layer = model[0]
    keys_before = list(model.state_dict())
    params_before = {n: id(p) for n, p in model.named_parameters()}
    calls = []
    layer.register_forward_hook(lambda mod, args, out: calls.append(("post", out.shape)))
    layer.register_forward_pre_hook(lambda mod, args: calls.append(("pre", args[0].shape)))

    # one registered layer converted, in place
    assert mtq.replace_quant_modules(model) == 1
    assert model[0] is layer
    assert isinstance(layer, QuantWeightModule) and type(layer).__name__ == "Quant" + name
    # still an instance of the original class
    assert isinstance(layer, type(factory()))
    # parameter names and objects are unchanged; uncalibrated quantizers add no state
    assert list(model.state_dict()) == keys_before
    assert {n: id(p) for n, p in model.named_parameters()} == params_before
    # the three quantizers, named by their path in the model
    assert {n for n, _ in mtq.named_quantizers(model)} == {
        "0.input_quantizer", "0.weight_quantizer", "0.output_quantizer"}
    # hooks registered before conversion still run, once each (uncalibrated quantizers warn and go dynamic)
    with pytest.warns(UserWarning, match="is not calibrated; using amax from each input"):
        out = model(randn(*shape))
    assert calls == [("pre", torch.Size(shape)), ("post", out.shape)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_conversion_keeps_dtype_and_device(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8).to(dtype))
    devices = {p.device for p in model.parameters()}
    x = randn(4, 16).to(dtype)
    quantize_int8(model, x)
    # parameters keep their dtype and device
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert {p.device for p in model.parameters()} == devices
    # quantizer state lives on the same device, amax in float32
    assert model[0].weight_quantizer.amax.device in devices
    assert model[0].weight_quantizer.amax.dtype == torch.float32
    # fake quantization returns the input dtype (NUMERICS.md 3)
    assert model(x).dtype == dtype


def test_converting_twice_is_a_no_op():
    model = make(LAYERS[0][1])
    assert mtq.replace_quant_modules(model) == 1
    # already converted layers are skipped
    assert mtq.replace_quant_modules(model) == 0


def test_unregistered_model_warns():
    # a model without any registered layer: nothing to quantize, and the user is told
    with pytest.warns(UserWarning, match="nothing was quantized"):
        mtq.quantize(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), "INT8_DEFAULT_CFG")


# --------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=LAYER_IDS)
def test_all_quantizers_disabled_is_identical(name, factory, shape):
    model = make(factory)
    x = randn(*shape)
    ref = model(x)
    quantize_int8(model, x)
    assert mtq.disable_quantizer(model, "*") == 3
    # with every quantizer off the quantized layer computes exactly what the original did
    assert torch.equal(model(x), ref)


@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=LAYER_IDS)
def test_int8_preset_output_differs_but_close(name, factory, shape):
    model = make(factory)
    x = randn(*shape)
    ref = model(x).detach()
    quantize_int8(model, x)
    out = model(x)
    # quantization changed the output ...
    assert not torch.equal(out, ref)
    # ... by little: W8A8 (per-channel weights, per-tensor inputs) stays within 3% relative L2 error
    assert rel_err(out, ref) < 0.03


@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=LAYER_IDS)
def test_quantized_forward_equals_reference_composition(name, factory, shape):
    model = make(factory)
    float_copy = copy.deepcopy(model)
    x = randn(*shape)
    quantize_int8(model, x)
    layer = model[0]
    iq, wq = layer.input_quantizer, layer.weight_quantizer
    qx = fake_quant(x, iq.fmt, iq.amax)
    w = layer.weight.detach()
    # the weight quantizer sees the weight as [out, in, ...] (Conv1D stores [in, out])
    qw = fake_quant(w.t(), wq.fmt, wq.amax).t() if name == "Conv1D" else fake_quant(w, wq.fmt, wq.amax)
    with torch.no_grad():
        float_copy[0].weight.copy_(qw)
        # the quantized layer is the float layer run on fake-quantized input and weight, bit for bit
        assert torch.equal(model(x), float_copy(qx))


def test_conv1d_gpt2_weight_quantizer_is_per_output_feature():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 8))  # weight [8 in, 6 out]
    quantize_int8(model, randn(3, 8))
    # the weight quantizer sees [out, in]: one amax per output feature = max over the input dim
    expected = model[0].weight.detach().abs().amax(dim=0).reshape(6, 1)
    assert torch.equal(model[0].weight_quantizer.amax, expected)


# --------------------------------------------------------------------------- autograd

@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=LAYER_IDS)
def test_backward_reaches_weights(name, factory, shape):
    model = make(factory)
    x = randn(*shape)
    quantize_int8(model, x)
    xr = x.clone().requires_grad_(True)
    model(xr).square().sum().backward()
    # gradients flow through the weight and input quantizers (straight-through)
    assert model[0].weight.grad is not None and model[0].bias.grad is not None
    assert torch.isfinite(model[0].weight.grad).all() and model[0].weight.grad.abs().sum() > 0
    assert xr.grad is not None and xr.grad.abs().sum() > 0


def test_linear_weight_grad_is_straight_through():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 3))
    x = randn(5, 8)
    quantize_int8(model, x)
    model(x).sum().backward()
    iq = model[0].input_quantizer
    # d sum(qx @ qW^T) / dW passes through the weight quantizer: every row is sum_n qx[n]
    expected = fake_quant(x, iq.fmt, iq.amax).sum(0).expand(3, 8)
    assert torch.allclose(model[0].weight.grad, expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=LAYER_IDS)
def test_torch_compile_aot_eager_matches_eager(name, factory, shape):
    torch._dynamo.reset()
    model = make(factory)
    x = randn(*shape)
    mtq.quantize(model, "FP8_DEFAULT_CFG", forward_loop=lambda m: m(x))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        eager = model(x)
        out = compiled(x)
    # compiling changes nothing numerically (same ops, same order)
    assert torch.allclose(out, eager, rtol=0, atol=1e-5)
    # and the compiled model trains: backward through the compiled graph reaches the weights
    compiled(x).sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_torch_compile_inductor_tiny_linear():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = randn(4, 16)
    mtq.quantize(model, "INT8_DEFAULT_CFG", forward_loop=lambda m: m(x))
    compiled = torch.compile(model)  # default backend: inductor
    with torch.no_grad():
        out = compiled(x)
        eager = model(x)
    # inductor may fuse ops but fake quantization must give the same values
    assert torch.allclose(out, eager, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- user layers

class MyLayer(nn.Module):
    """A layer the package does not know: weight used inside a custom forward."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 8))
        self.bias = nn.Parameter(torch.zeros(6))
        self.scale = 0.5

    def forward(self, x):
        return self.scale * F.linear(x, self.weight, self.bias)


class MyActivation(nn.Module):
    def forward(self, x):
        return torch.tanh(x) * 3


@pytest.fixture
def registered_user_layers():
    mtq.register_quant_module(MyLayer)
    mtq.register_quant_module(MyActivation)
    yield
    QUANT_MODULES.unregister(MyLayer)
    QUANT_MODULES.unregister(MyActivation)


def test_register_user_layer_generic_forward(registered_user_layers):
    torch.manual_seed(0)
    model = nn.Sequential(MyLayer(), MyActivation())
    x = randn(4, 8)
    ref = model(x).detach()
    weight_id = id(model[0].weight)
    mtq.quantize(model, "INT8_DEFAULT_CFG", forward_loop=lambda m: m(x))

    layer, act = model
    # a layer with a weight parameter gets weight + input + output quantizers; one without, input + output
    assert isinstance(layer, QuantWeightModule) and isinstance(layer, MyLayer)
    assert isinstance(act, QuantInputModule) and not isinstance(act, QuantWeightModule)
    assert {n for n, _ in mtq.named_quantizers(model)} == {
        "0.input_quantizer", "0.weight_quantizer", "0.output_quantizer", "1.input_quantizer", "1.output_quantizer"}
    # output quantizers are off by default
    assert not layer.output_quantizer.is_enabled and not act.output_quantizer.is_enabled
    # the weight was seen through the generic forward: per-row amax of the weight
    assert torch.equal(layer.weight_quantizer.amax, layer.weight.detach().abs().amax(1, keepdim=True))
    # the swap is temporary: the parameter object is restored after every forward
    out = model(x)
    assert id(layer.weight) == weight_id and isinstance(layer._parameters["weight"], nn.Parameter)
    # quantized (differs) but close: W8A8 within 3%
    assert not torch.equal(out, ref) and rel_err(out, ref) < 0.03
    # the generic forward equals the original forward on fake-quantized input and weight
    qx = fake_quant(x, layer.input_quantizer.fmt, layer.input_quantizer.amax)
    qw = fake_quant(layer.weight, layer.weight_quantizer.fmt, layer.weight_quantizer.amax)
    assert torch.equal(layer(x), 0.5 * F.linear(qx, qw, layer.bias))
    # and it trains
    model(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_register_user_layer_compiles(registered_user_layers):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(MyLayer(), MyActivation())
    x = randn(4, 8)
    mtq.quantize(model, "INT8_DEFAULT_CFG", forward_loop=lambda m: m(x))
    with torch.no_grad():
        out = torch.compile(model, backend="aot_eager")(x)
        # the weight swap inside forward compiles to the same numbers
        assert torch.allclose(out, model(x), rtol=0, atol=1e-5)


def test_register_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        mtq.register_quant_module(int)


def test_builtin_output_quantizer_off_by_default():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(1, 1, 1))
    mtq.replace_quant_modules(model)
    for m in model:
        # input and weight quantizers start on (INT8), the output quantizer starts off
        assert m.input_quantizer.is_enabled and m.weight_quantizer.is_enabled
        assert not m.output_quantizer.is_enabled
    # and no preset turns it on
    for name in mtq.PRESETS:
        mtq.set_quantizer_by_cfg(model, mtq.get_config(name))
        assert not any(m.output_quantizer.is_enabled for m in model), name


def test_output_quantizer_when_enabled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    x = randn(3, 8)
    cfg = {"quant_cfg": {"default": {"enable": False}, "*output_quantizer": {"num_bits": 8}}}
    mtq.quantize(model, cfg, forward_loop=lambda m: m(x))
    oq = model[0].output_quantizer
    ref = F.linear(x, model[0].weight, model[0].bias)
    # output amax is calibrated on the float output; the output is fake-quantized with it
    assert torch.equal(oq.amax, ref.detach().abs().amax())
    assert torch.equal(model(x), fake_quant(ref, oq.fmt, oq.amax))


# --------------------------------------------------------------------------- fold_weight

@pytest.mark.parametrize("config", ["INT8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"])
@pytest.mark.parametrize("name,factory,shape", [LAYERS[0], LAYERS[2], LAYERS[7]], ids=["Linear", "Conv2d", "Conv1D"])
def test_fold_weight(config, name, factory, shape):
    model = make(factory)
    x = randn(*shape)
    mtq.quantize(model, config, forward_loop=lambda m: m(x))
    layer = model[0]
    weight_id = id(layer.weight)
    with torch.no_grad():
        before = model(x)
        qw = layer.quantized_weight()
    mtq.fold_weight(model)
    # the weight now holds its fake-quantized value, in the same parameter object
    assert id(layer.weight) == weight_id
    assert torch.equal(layer.weight, qw)
    # the weight quantizer is off, so nothing is quantized twice ...
    assert not layer.weight_quantizer.is_enabled
    # ... and the outputs are unchanged, bit for bit
    with torch.no_grad():
        assert torch.equal(model(x), before)
    # folding again is a no-op
    mtq.fold_weight(model)
    assert torch.equal(layer.weight, qw)


# --------------------------------------------------------------------------- modules the loop never reached

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)  # only used when use_b=True, which calibration never does

    def forward(self, x, use_b=False):
        return self.b(x) if use_b else self.a(x)


@pytest.mark.parametrize("config", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"])
def test_unreached_module_falls_back(config):
    torch.manual_seed(0)
    model = Branchy()
    x = randn(4, 8)
    with pytest.warns(UserWarning, match=r"1 activation quantizer\(s\) saw no calibration data.*b\.input_quantizer"):
        mtq.quantize(model, config, forward_loop=lambda m: m(x))
    wq, iq = model.b.weight_quantizer, model.b.input_quantizer
    w = model.b.weight.detach()
    # weights fall back to the weight's own amax (per channel for INT8, per tensor otherwise)
    expected = w.abs().amax(1, keepdim=True) if config == "INT8_DEFAULT_CFG" else w.abs().amax()
    assert torch.equal(wq.amax, expected)
    assert torch.isfinite(wq.amax).all() and (wq.amax > 0).all()
    # the input quantizer becomes dynamic (no NaN or 0 amax stored)
    assert iq.is_dynamic and iq.amax is None and iq.is_enabled
    # the reached branch is calibrated normally from the data
    assert torch.equal(model.a.input_quantizer.amax, x.abs().amax())
    # the unreached branch runs without NaN and is really quantized with the per-input amax
    y = 2 * randn(4, 8, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not calibrated" warning at run time
        out = model(y, use_b=True)
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    expected_out = F.linear(fake_quant(y, iq.fmt, None), fake_quant(w, wq.fmt, wq.amax), model.b.bias)
    assert torch.equal(out, expected_out)


def test_without_forward_loop_weights_from_themselves_activations_dynamic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="2 activation quantizer.*without a forward_loop"):
        mtq.quantize(model, "INT8_DEFAULT_CFG")
    for i in (0, 2):
        # weight amax from the weight itself; inputs dynamic
        assert torch.equal(model[i].weight_quantizer.amax, model[i].weight.detach().abs().amax(1, keepdim=True))
        assert model[i].input_quantizer.is_dynamic
    assert torch.isfinite(model(randn(3, 8))).all()
