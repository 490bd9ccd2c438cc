"""TensorQuantizer: attributes, calibration, state, forward/backward and display (NUMERICS.md 3 and 5)."""

import pytest
import torch
from torch import nn

import modelopt_lite.quantization as mtq
from modelopt_lite.quantization import CalibrationError, TensorQuantizer
from modelopt_lite.quantization.formats import E2M1, E2M3, E3M2, E4M3, E5M2, IntFormat, fake_quant


def calibrate(q: TensorQuantizer, *batches: torch.Tensor) -> TensorQuantizer:
    """Max-calibrate a lone quantizer the way the `max` algorithm does."""
    q.disable_quant()
    q.enable_calib()
    for b in batches:
        q(b)
    q.disable_calib()
    q.enable_quant()
    q.load_calib_amax()
    return q


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- attributes

def test_default_is_int8_per_tensor_static_enabled():
    q = TensorQuantizer()
    # defaults of QuantizerAttributeConfig: 8-bit signed int, per tensor, static, enabled
    assert q.fmt.element == IntFormat(8)
    assert q.num_bits == 8 and q.axis is None and q.block_sizes is None
    assert q.is_enabled and not q.is_dynamic and q.needs_calibration
    assert q.fmt.granularity == "per-tensor"
    assert q.amax is None


@pytest.mark.parametrize("bits,qmax", [(2, 1), (4, 7), (8, 127)])
def test_num_bits_int(bits, qmax):
    q = TensorQuantizer({"num_bits": bits})
    # signed INTn: qmax = 2^(n-1) - 1 (NUMERICS.md 1)
    assert q.fmt.element == IntFormat(bits)
    assert q.fmt.element.max_value == qmax
    assert q.fmt.name == f"int{bits}"


@pytest.mark.parametrize(
    "num_bits,element,max_value",
    [
        ((4, 3), E4M3, 448.0),
        ([4, 3], E4M3, 448.0),  # YAML gives lists
        ("e4m3", E4M3, 448.0),
        ((5, 2), E5M2, 57344.0),
        ("e5m2", E5M2, 57344.0),
        ((3, 2), E3M2, 28.0),
        ("e3m2", E3M2, 28.0),
        ((2, 3), E2M3, 7.5),
        ("E2M3", E2M3, 7.5),
        ((2, 1), E2M1, 6.0),
        ("e2m1", E2M1, 6.0),
    ],
)
def test_num_bits_float_pairs_and_names(num_bits, element, max_value):
    q = TensorQuantizer({"num_bits": num_bits})
    # (E, M) pairs and names map to the same element format; max finite values from NUMERICS.md table 1
    assert q.fmt.element is element
    assert q.fmt.element.max_value == max_value


def test_axis_per_channel_amax_shape_and_values():
    x = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.25, -0.75]])
    q = calibrate(TensorQuantizer({"num_bits": 8, "axis": 0}), x)
    # axis=0 keeps one amax per row, reduced over the columns: [3, 0.75]
    assert q.fmt.granularity == "per-channel(axis=0)"
    assert torch.equal(q.amax, torch.tensor([[3.0], [0.75]]))
    q1 = calibrate(TensorQuantizer({"num_bits": 8, "axis": 1}), x)
    # axis=1 keeps one per column: [1, 3, 2]
    assert torch.equal(q1.amax, torch.tensor([[1.0, 3.0, 2.0]]))


def test_static_block_sizes_calibrate_one_amax_per_block():
    x = torch.arange(1.0, 17.0).reshape(2, 8)  # rows 1..8 and 9..16
    q = calibrate(TensorQuantizer({"num_bits": 4, "block_sizes": {-1: 4}}), x)
    # blocks of 4 along the last axis: maxima 4, 8 / 12, 16
    assert q.needs_calibration is True
    assert q.fmt.granularity == "block(-1:4)"
    assert torch.equal(q.amax, torch.tensor([[4.0, 8.0], [12.0, 16.0]]))
    # the forward uses those static block amaxes
    assert torch.equal(q(x), fake_quant(x, q.fmt, q.amax))


def test_static_block_sizes_pad_non_multiple():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, -9.0]])
    q = calibrate(TensorQuantizer({"num_bits": 8, "block_sizes": {-1: 4}}), x)
    # 5 columns -> 2 blocks of 4 (second zero-padded): maxima 4 and 9
    assert torch.equal(q.amax, torch.tensor([[4.0, 9.0]]))


def test_dynamic_block_sizes_need_no_calibration():
    q = TensorQuantizer({"num_bits": 4, "block_sizes": {-1: 4, "type": "dynamic"}})
    x = randn(3, 8)
    # dynamic blocks derive their amax from each tensor: nothing to calibrate
    assert q.needs_calibration is False
    # the `max` algorithm skips it (a TensorQuantizer is itself a module it can calibrate)
    mtq.calibrate(q, "max", forward_loop=lambda m: m(x))
    assert q.amax is None
    assert torch.equal(q(x), fake_quant(x, q.fmt, None))
    # per-block amax of this x, computed on the fly, is what the forward uses
    y = 3 * x
    assert torch.equal(q(y), fake_quant(y, q.fmt, y.abs().reshape(3, 2, 4).amax(-1)))


def test_block_sizes_with_e4m3_scale_bits_is_nvfp4_with_global_amax():
    q = TensorQuantizer({"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}})
    # E2M1 elements with E4M3 block scales is NVFP4 (NUMERICS.md 4); its global amax is calibrated
    assert q.fmt.name == "nvfp4"
    assert q.needs_calibration is True
    x = torch.zeros(2, 32)
    x[1, 5] = -7.0
    x[0, 0] = 3.0
    calibrate(q, x)
    # one per-tensor amax: max |x| = 7
    assert torch.equal(q.amax, torch.tensor(7.0))
    assert torch.equal(q(x), fake_quant(x, q.fmt, torch.tensor(7.0)))


@pytest.mark.parametrize("scale_bits", ["e8m0", [8, 0]])
def test_block_sizes_with_e8m0_scale_bits_is_mx(scale_bits):
    q = TensorQuantizer({"num_bits": "e2m1", "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": scale_bits}})
    # E8M0 block scales make it MXFP4; MX derives everything from the data
    assert q.fmt.name == "mxfp4"
    assert q.needs_calibration is False
    assert "amax=dynamic" in repr(q)
    q8 = TensorQuantizer({"num_bits": 8, "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": scale_bits}})
    # 8-bit ints with E8M0 scales are MXINT8
    assert q8.fmt.name == "mxint8"


def test_unsigned():
    q = TensorQuantizer({"num_bits": 8, "unsigned": True})
    q.amax = torch.tensor(10.0)
    assert q.fmt.name == "uint8"
    # unsigned INT8 range is [0, 255]; s = 255/10 = 25.5; 25.5 -> 26 and 63.75 -> 64 (ties to even)
    x = torch.tensor([0.0, 1.0, 2.5, 10.0, 12.0])
    expected = torch.tensor([0.0, 26.0, 64.0, 255.0, 255.0]) / torch.tensor(25.5)
    assert torch.equal(q(x), expected)
    # negative input to an unsigned quantizer is an error (NUMERICS.md 3)
    with pytest.raises(ValueError, match="negative"):
        q(torch.tensor([-1.0]))


def test_narrow_range():
    wide = TensorQuantizer({"num_bits": 8})
    narrow = TensorQuantizer({"num_bits": 8, "narrow_range": True})
    wide.amax = narrow.amax = torch.tensor(127.0)  # s = 1: values are their own codes
    x = torch.tensor([-200.0, -127.6, 0.5, 126.6, 300.0])
    # signed int8 clamps to [-128, 127]; -127.6 rounds to -128; 0.5 -> 0 (ties to even)
    assert torch.equal(wide(x), torch.tensor([-128.0, -128.0, 0.0, 127.0, 127.0]))
    # narrow range clamps to [-127, 127]
    assert torch.equal(narrow(x), torch.tensor([-127.0, -127.0, 0.0, 127.0, 127.0]))
    assert narrow.fmt.name == "int8-narrow"


def test_enable_flag():
    q = TensorQuantizer({"num_bits": 4, "enable": False})
    x = randn(4, 4)
    # a disabled quantizer is the identity and returns its input object
    assert q(x) is x
    assert repr(q) == "TensorQuantizer(disabled)"
    q.enable()
    assert q.is_enabled
    q.disable()
    assert not q.is_enabled


def test_type_dynamic_uses_amax_of_each_input():
    q = TensorQuantizer({"num_bits": 8, "type": "dynamic"})
    assert q.is_dynamic and not q.needs_calibration
    x = torch.tensor([0.5, -1.0, 0.26])
    # amax = 1 from this input: s = 127; 63.5 -> 64 (ties to even), -127, 33.02 -> 33
    assert torch.equal(q(x), torch.tensor([64.0, -127.0, 33.0]) / torch.tensor(127.0))
    y = 2 * x
    # a second input gets its own amax (2), giving the same codes scaled by 2
    assert torch.equal(q(y), fake_quant(y, q.fmt, torch.tensor(2.0)))
    assert "dynamic" in repr(q)


def test_partial_attributes_change_only_what_they_name():
    q = TensorQuantizer({"num_bits": "e4m3", "axis": 0})
    q.set_attributes({"axis": None})
    # an entry without num_bits keeps the element format
    assert q.fmt.element is E4M3 and q.fmt.axis is None
    q.set_attributes({"enable": False})
    q.set_attributes({"axis": 0})
    assert not q.is_enabled
    # an entry with num_bits describes the whole format: axis back to default, and enabled
    q.set_attributes({"num_bits": 4})
    assert q.fmt.element == IntFormat(4) and q.axis is None and q.is_enabled


def test_format_change_drops_stale_amax():
    q = calibrate(TensorQuantizer({"num_bits": 8}), randn(4, 4))
    assert q.amax is not None
    q.set_attributes({"enable": False})
    # enable is not a format attribute: the amax is kept
    assert q.amax is not None
    q.set_attributes({"num_bits": 8, "axis": 0})
    # a new granularity makes the old per-tensor amax meaningless
    assert q.amax is None


def test_invalid_attribute_combination_names_the_quantizer():
    q = TensorQuantizer({"num_bits": 8, "axis": 0}, name="blk.weight_quantizer")
    with pytest.raises(ValueError, match="blk.weight_quantizer.*axis.*block_sizes"):
        q.set_attributes({"block_sizes": {-1: 16}})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_amax_setter_rejects_nan_inf_negative(bad):
    q = TensorQuantizer(name="q")
    with pytest.raises(ValueError, match="finite and non-negative"):
        q.amax = torch.tensor(bad)


# --------------------------------------------------------------------------- state

def test_amax_in_state_dict_after_calibration_and_loads_into_fresh_quantizer():
    attrs = {"num_bits": 8, "axis": 0}
    q = calibrate(TensorQuantizer(attrs), randn(4, 6))
    sd = q.state_dict()
    # the calibrated amax is a float32 buffer saved in state_dict
    assert list(sd) == ["_amax"]
    assert sd["_amax"].dtype == torch.float32 and sd["_amax"].shape == (4, 1)

    fresh = TensorQuantizer(attrs)
    # uncalibrated: no _amax yet
    assert "_amax" not in fresh.state_dict() and fresh.amax is None
    result = fresh.load_state_dict(sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(fresh.amax, q.amax)
    x = randn(4, 6, seed=1)
    assert torch.equal(fresh(x), q(x))
    # loading copies: changing the source later does not change the loaded quantizer
    sd["_amax"].fill_(123.0)
    assert not torch.equal(fresh.amax, sd["_amax"])


def test_model_state_dict_round_trip_into_uncalibrated_model():
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(8, 4))
    mtq.quantize(src, "INT8_DEFAULT_CFG", forward_loop=lambda m: m(randn(5, 8)))
    sd = src.state_dict()
    # parameters plus the two calibrated amaxes (output quantizer is disabled, never calibrated)
    assert sorted(sd) == ["0.bias", "0.input_quantizer._amax", "0.weight", "0.weight_quantizer._amax"]
    dst = nn.Sequential(nn.Linear(8, 4))
    mtq.replace_quant_modules(dst)
    mtq.set_quantizer_by_cfg(dst, mtq.get_config("INT8_DEFAULT_CFG"))
    dst.load_state_dict(sd, strict=True)
    x = randn(3, 8, seed=2)
    # same weights and amaxes give bit-identical outputs
    assert torch.equal(dst(x), src(x))


# --------------------------------------------------------------------------- calibration mode

def test_calibration_mode_collects_without_quantizing():
    q = TensorQuantizer({"num_bits": 4})
    q.enable_calib()
    q.disable_quant()
    batches = [torch.tensor([0.3, -1.7]), torch.tensor([2.9, 0.1]), torch.tensor([-0.2, 0.4])]
    for b in batches:
        out = q(b)
        # while calibrating with quantization off, the input passes through unchanged
        assert torch.equal(out, b)
    assert "calibrating" in repr(q)
    q.disable_calib()
    q.enable_quant()
    assert q.load_calib_amax() is True
    # running max over all batches: 2.9
    assert torch.equal(q.amax, torch.tensor(2.9))


def test_calibration_with_quant_on_also_quantizes():
    q = TensorQuantizer({"num_bits": 8, "type": "dynamic"})
    q.enable_calib()
    x = torch.tensor([0.5, -1.0, 0.26])
    # calibrating does not stop a quantizer whose quantization is on
    assert torch.equal(q(x), fake_quant(x, q.fmt, None))


def test_load_calib_amax_without_data_returns_false():
    q = TensorQuantizer()
    # the calibrator saw nothing: no amax to load
    assert q.load_calib_amax() is False
    assert q.amax is None


# --------------------------------------------------------------------------- forward / backward

FORWARD_ATTRS = [
    {"num_bits": 8},
    {"num_bits": 8, "axis": 0},
    {"num_bits": 4, "axis": 0, "narrow_range": True},
    {"num_bits": "e4m3"},
    {"num_bits": "e5m2", "axis": 1},
    {"num_bits": 4, "block_sizes": {-1: 8}},
    {"num_bits": "e4m3", "block_sizes": {-1: 8, -2: 2}},
    {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}},
    {"num_bits": "e3m2", "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": "e8m0"}},
    {"num_bits": 8, "block_sizes": {-1: None, "type": "dynamic"}},
]


@pytest.mark.parametrize("attrs", FORWARD_ATTRS, ids=lambda a: str(a))
def test_forward_equals_fake_quant_exactly(attrs):
    x = randn(6, 32)
    q = calibrate(TensorQuantizer(attrs), x)
    y = 1.5 * randn(6, 32, seed=3)  # includes values beyond the calibrated amax (saturate)
    # the module is exactly formats.fake_quant with its format and amax (none for dynamic blocks)
    assert torch.equal(q(y), fake_quant(y, q.fmt, q.amax if q.uses_static_amax else None))
    # and actually changes the tensor (not an identity)
    assert not torch.equal(q(y), y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_keeps_input_dtype(dtype):
    q = calibrate(TensorQuantizer({"num_bits": "e4m3"}), randn(4, 4))
    x = randn(4, 4, seed=1).to(dtype)
    out = q(x)
    # fake quantization runs in float32 and casts back to the input dtype (NUMERICS.md 3)
    assert out.dtype == dtype
    assert torch.equal(out, fake_quant(x, q.fmt, q.amax))


def test_nan_in_nan_out_at_inference():
    q = TensorQuantizer({"num_bits": 8})
    q.amax = torch.tensor(1.0)
    out = q(torch.tensor([float("nan"), 0.5]))
    # NaN in, NaN out (NUMERICS.md 2); the other value is quantized normally (63.5 -> 64)
    assert torch.isnan(out[0]) and out[1] == 64.0 / 127.0


@pytest.mark.parametrize("attrs", [{"num_bits": 8}, {"num_bits": 4, "axis": 0}, {"num_bits": "e4m3"},
                                   {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}}],
                         ids=str)
def test_straight_through_backward(attrs):
    x0 = randn(4, 16)
    q = calibrate(TensorQuantizer(attrs), x0)
    x = x0.clone().requires_grad_(True)
    q(x).sum().backward()
    # straight-through estimator: d sum(q(x)) / dx = 1 everywhere
    assert torch.equal(x.grad, torch.ones_like(x))


def test_pre_quant_scale_multiplies_input_first():
    q = TensorQuantizer({"num_bits": 8})
    pqs = torch.tensor([2.0, 0.5, 1.0, 4.0])
    q.pre_quant_scale = pqs
    x = torch.tensor([[0.25, 1.0, -0.5, 0.125], [1.0, -2.0, 0.1, 0.2]])
    calibrate(q, x)
    # calibration sees x * pqs: max |x * pqs| = |1.0 * 2| = 2.0
    assert torch.equal(q.amax, torch.tensor(2.0))
    # forward: fake_quant(x * pqs)
    assert torch.equal(q(x), fake_quant(x * pqs, q.fmt, q.amax))
    # and the scale is saved with the amax
    assert sorted(q.state_dict()) == ["_amax", "_pre_quant_scale"]
    assert "pre_quant_scale" in repr(q)
    # the gradient through the smoothing is the scale itself (STE after the multiply)
    xr = x.clone().requires_grad_(True)
    q(xr).sum().backward()
    assert torch.equal(xr.grad, pqs.expand_as(x))


# --------------------------------------------------------------------------- display

def test_repr_one_line_with_format_granularity_amax():
    q = calibrate(TensorQuantizer({"num_bits": "e4m3"}), torch.tensor([1.0, -3.5, 2.0]))
    # format, granularity and the calibrated amax on one line
    assert repr(q) == "TensorQuantizer(fp8_e4m3 per-tensor amax=3.5)"
    qc = calibrate(TensorQuantizer({"num_bits": 8, "axis": 0}), torch.tensor([[0.5, -0.25], [1.0, -2.0]]))
    # per-channel shows the range of the amaxes
    assert repr(qc) == "TensorQuantizer(int8 per-channel(axis=0) amax=[0.5, 2])"
    qb = TensorQuantizer({"num_bits": 4, "block_sizes": {-1: 128}})
    assert repr(qb) == "TensorQuantizer(int4 block(-1:128) amax=uncalibrated)"
    for r in (repr(q), repr(qc), repr(qb)):
        assert "\n" not in r


def test_repr_of_per_token_dynamic_quantizer_says_dynamic():
    # FP8_PER_CHANNEL_PER_TOKEN_CFG's input quantizer: amax comes from each token at run time
    q = TensorQuantizer({"num_bits": "e4m3", "block_sizes": {-1: None, "type": "dynamic"}})
    assert q.needs_calibration is False
    assert repr(q) == "TensorQuantizer(fp8_e4m3 per-token amax=dynamic)"


# --------------------------------------------------------------------------- NaN / Inf in calibration

def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_in_calibration_names_quantizer_and_batch(bad):
    batches = [randn(3, 4, seed=i) for i in range(5)]
    batches[2][1, 3] = bad  # the third batch (index 2)
    model = _small_model()
    loop = mtq.create_forward_loop(batches, progress=False)
    with pytest.raises(CalibrationError) as info:
        mtq.quantize(model, "INT8_DEFAULT_CFG", forward_loop=loop)
    msg = str(info.value)
    # the first quantizer to see the bad value is the first layer's input quantizer, in batch 2
    assert "'0.input_quantizer'" in msg
    assert "batch 2" in msg


def test_nan_produced_inside_model_names_later_quantizer():
    class Overflow(nn.Module):
        def forward(self, x):
            return x * float("inf")

    model = _small_model()
    model.insert(1, Overflow())
    batches = [randn(3, 4, seed=i) for i in range(2)]
    with pytest.raises(CalibrationError) as info:
        mtq.quantize(model, "FP8_DEFAULT_CFG", forward_loop=mtq.create_forward_loop(batches, progress=False))
    # the first layer sees finite data; the layer after the overflow is the one named, in batch 0
    assert "'3.input_quantizer'" in str(info.value) and "batch 0" in str(info.value)


def test_deepcopy_keeps_two_level_formats_static():
    # formats are compared by identity (E4M3 block scales); a deep copy must keep the shared instances
    import copy

    q = TensorQuantizer({"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}})
    q.amax = torch.tensor(3.0)
    c = copy.deepcopy(q)
    assert c.uses_static_amax and c.fmt == q.fmt and c.fmt.scale is q.fmt.scale
    x = torch.randn(4, 32)
    assert torch.equal(c(x), q(x))
