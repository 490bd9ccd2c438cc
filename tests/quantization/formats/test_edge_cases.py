"""Edge cases against NUMERICS.md sections 2, 3 and 4.

Saturation beyond the calibrated amax and at +-inf, zero / tiny / huge amax,
NaN propagation, and the errors the format layer must raise.
"""

import math

import pytest
import torch

from modelopt_lite.quantization.formats import (
    TINY_AMAX,
    E2M1,
    IntFormat,
    QuantFormat,
    compute_amax,
    dequantize,
    fake_quant,
    quantize,
)



INF = math.inf
NAN = math.nan

NVFP4 = dict(num_bits=(2, 1), block_sizes={-1: 16}, scale_bits=(4, 3))


def _mx(num_bits):
    return dict(num_bits=num_bits, block_sizes={-1: 32}, scale_bits=(8, 0))


# --------------------------------------------------------------------------
# Saturation (section 2: saturate, never overflow)
# --------------------------------------------------------------------------

# Single-level formats with a power-of-two amax of 2: s = qmax / 2 is exact however it is computed.
# (id, create kwargs, qmax, qmin)
SINGLE_LEVEL = [
    ("int8", dict(num_bits=8), 127, -128),
    ("int8-narrow", dict(num_bits=8, narrow_range=True), 127, -127),
    ("int4", dict(num_bits=4), 7, -8),
    ("int2", dict(num_bits=2), 1, -2),
    ("uint8", dict(num_bits=8, unsigned=True), 255, 0),
    ("fp8-e4m3", dict(num_bits=(4, 3)), 448.0, -448.0),
    ("fp8-e5m2", dict(num_bits=(5, 2)), 57344.0, -57344.0),
    ("fp6-e3m2", dict(num_bits=(3, 2)), 28.0, -28.0),
    ("fp6-e2m3", dict(num_bits=(2, 3)), 7.5, -7.5),
    ("fp4-e2m1", dict(num_bits=(2, 1)), 6.0, -6.0),
]


def _saturated(qlim, amax, qmax):
    """Value of the grid end qlim after dequantization: q * scale with scale = amax / qmax."""
    return (torch.tensor(float(qlim)) * (torch.tensor(float(amax)) / torch.tensor(float(qmax)))).item()


@pytest.mark.parametrize("case", SINGLE_LEVEL, ids=[c[0] for c in SINGLE_LEVEL])
def test_per_tensor_saturation_beyond_amax_and_inf(case, device):
    _, kwargs, qmax, qmin = case
    fmt = QuantFormat.create(**kwargs)
    amax = torch.tensor(2.0, device=device)
    hi, lo = _saturated(qmax, 2.0, qmax), _saturated(qmin, 2.0, qmax)
    # +-10 is beyond the grid ends for every format here (INT2: 10 * s = 5 > 1, -5 < -2)
    x = torch.tensor([10.0, 1e30, INF, -10.0, -1e30, -INF], device=device)
    if fmt.element.kind == "int" and fmt.element.unsigned:
        x = x.abs()
        expected = [hi] * 6  # everything beyond amax goes to 255 * scale
    else:
        # above +amax -> qmax * scale; below -amax -> qmin * scale (qmin = -qmax - 1 for plain signed INT)
        expected = [hi] * 3 + [lo] * 3
    out = fake_quant(x, fmt, amax).cpu()
    assert out.tolist() == expected
    assert torch.isfinite(out).all()
    assert torch.equal(dequantize(quantize(x, fmt, amax)).cpu(), out)
    # qmax * scale is the calibrated amax itself (up to float32 rounding of 1 / s)
    assert hi == pytest.approx(2.0, rel=1e-6)


def test_int_saturation_codes():
    # codes saturate at the integer range ends: [-128, 127], [-127, 127] narrow, [0, 255] unsigned
    x = torch.tensor([INF, -INF, 10.0, -10.0])
    assert quantize(x, QuantFormat.create(num_bits=8), torch.tensor(1.0)).codes.tolist() == [127, -128, 127, -128]
    narrow = QuantFormat.create(num_bits=8, narrow_range=True)
    assert quantize(x, narrow, torch.tensor(1.0)).codes.tolist() == [127, -127, 127, -127]
    u = QuantFormat.create(num_bits=8, unsigned=True)
    assert quantize(x.abs(), u, torch.tensor(1.0)).codes.tolist() == [255, 255, 255, 255]
    # FP4: +inf -> code 0b0111 (6), -inf -> 0b1111 (-6)
    fp4 = QuantFormat.create(num_bits=(2, 1))
    assert quantize(x, fp4, torch.tensor(1.0)).codes.tolist() == [7, 15, 7, 15]


def test_fp8_saturates_where_a_plain_cast_would_not(device):
    # torch's e4m3fn cast turns 464 (the midpoint above 448) into NaN, and e5m2 rounds
    # 61440 to inf; the quantizer clamps first, so both saturate to the max finite value.
    x = torch.tensor([464.0, 1000.0, -464.0], device=device)
    out = fake_quant(x, QuantFormat.create(num_bits=(4, 3)), torch.tensor(448.0, device=device)).cpu()
    assert out.tolist() == [448.0, 448.0, -448.0]
    y = torch.tensor([61440.0, 1e6, -61440.0], device=device)
    out = fake_quant(y, QuantFormat.create(num_bits=(5, 2)), torch.tensor(57344.0, device=device)).cpu()
    assert out.tolist() == [57344.0, 57344.0, -57344.0]


def test_per_channel_saturation_uses_each_channel_amax(device):
    fmt = QuantFormat.create(num_bits=8, axis=0)
    amax = torch.tensor([2.0, 0.5], device=device)
    x = torch.tensor([[INF, -INF, 3.0, 0.0], [INF, -INF, 3.0, 0.0]], device=device)
    out = fake_quant(x, fmt, amax).cpu()
    # row 0: s = 63.5 -> 127 / 63.5 = 2, -128 / 63.5; row 1: s = 254 -> 127 / 254 = 0.5, -128 / 254
    neg = (torch.tensor(-128.0) / torch.tensor([63.5, 254.0])).tolist()  # float32 quotients
    assert out.tolist() == [[2.0, neg[0], 2.0, 0.0], [0.5, neg[1], 0.5, 0.0]]


def test_int_block_saturation_uses_each_block_amax(device):
    fmt = QuantFormat.create(num_bits=4, narrow_range=True, block_sizes={-1: 4})
    amax = torch.tensor([[1.75, 3.5]], device=device)  # s = 4 and 2 (both exact)
    x = torch.tensor([[INF, -INF, 1e30, 1.0, INF, -INF, -9.0, 1.0]], device=device)
    out = fake_quant(x, fmt, amax).cpu()
    # block 0: +-7 / 4 = +-1.75, 1.0 * 4 = 4 -> 1.0; block 1: +-7 / 2 = +-3.5, 1.0 * 2 = 2 -> 1.0
    assert out.tolist() == [[1.75, -1.75, 1.75, 1.0, 3.5, -3.5, -3.5, 1.0]]


def test_nvfp4_saturation_with_calibrated_global_amax(device):
    fmt = QuantFormat.create(**NVFP4)
    gamax = torch.tensor(168.0, device=device)  # s2 = 168 / (6 * 448) = 2^-4
    x = torch.zeros(2, 16, device=device)
    x[0, :4] = torch.tensor([INF, -INF, 1e30, 3.0])
    x[1, :3] = torch.tensor([200.0, -500.0, 10.0])
    out = fake_quant(x, fmt, gamax).cpu()
    # any block amax beyond 6 * 448 * s2 gets sb = min(., 448) = 448, and elements clamp to
    # +-6: the largest value is 6 * 448 * 2^-4 = 168 = the calibrated global amax.
    assert out[0, :3].tolist() == [168.0, -168.0, 168.0]
    # 3.0 / (448 * 2^-4) = 0.107 -> 0
    assert out[0, 3].item() == 0.0
    # 10 / 28 = 0.357 -> 0.5 -> 14
    assert out[1, :3].tolist() == [168.0, -168.0, 14.0]
    assert torch.equal(dequantize(quantize(x, fmt, gamax)).cpu(), out)


@pytest.mark.parametrize(
    "num_bits,amax,expected",
    [
        ((2, 1), 7.9, 6.0),  # X = 2^(2 - 2) = 1; 7.9 > 6 saturates to 6 (OCP: saturating cast)
        ((4, 3), 480.0, 448.0),  # X = 2^(8 - 8) = 1; 480 > 448 saturates to 448 (a plain cast gives NaN)
        ((2, 3), 7.9, 7.5),  # X = 2^(2 - 2) = 1; E2M3 max 7.5
        ((3, 2), 31.0, 28.0),  # X = 2^(4 - 4) = 1; E3M2 max 28
        (8, 1.999, 127 / 64),  # X = 2^0 = 1; 1.999 * 64 = 127.9 -> 127
    ],
)
def test_mx_elements_saturate_inside_their_block(num_bits, amax, expected, device):
    fmt = QuantFormat.create(**_mx(num_bits))
    x = torch.zeros(1, 32, device=device)
    x[0, 0], x[0, 1] = amax, -amax
    out = fake_quant(x, fmt).cpu()
    assert out[0, :2].tolist() == [expected, -expected]
    assert quantize(x, fmt).block_scale.item() == 127  # X = 1


@pytest.mark.parametrize("num_bits", [(2, 1), (4, 3), 8], ids=["mxfp4", "mxfp8", "mxint8"])
def test_mx_block_with_inf(num_bits, device):
    fmt = QuantFormat.create(**_mx(num_bits))
    x = torch.ones(1, 32, device=device)
    x[0, 0], x[0, 1] = INF, -INF
    out = fake_quant(x, fmt).cpu()
    # floor(log2(inf)) is beyond every E8M0 exponent: as in the OCP reference code the
    # block scale is NaN, so the whole block is NaN and its E8M0 code is 0xFF
    assert torch.isnan(out).all()
    if fmt.element.has_nan:  # MXFP8 can hold the NaN block: scale code 0xFF
        assert quantize(x, fmt).block_scale.item() == 255
    else:  # FP4 and INT8 elements have no NaN code
        with pytest.raises(ValueError, match="NaN"):
            quantize(x, fmt)


# --------------------------------------------------------------------------
# Zero, tiny and huge amax (section 3)
# --------------------------------------------------------------------------

AMAX_FORMATS = [
    ("int8", dict(num_bits=8)),
    ("uint8", dict(num_bits=8, unsigned=True)),
    ("int4-axis0", dict(num_bits=4, axis=0)),
    ("int4-block8", dict(num_bits=4, block_sizes={-1: 8})),
    ("fp8-e4m3", dict(num_bits=(4, 3))),
    ("fp8-e5m2", dict(num_bits=(5, 2))),
    ("fp6-e3m2", dict(num_bits=(3, 2))),
    ("fp6-e2m3", dict(num_bits=(2, 3))),
    ("fp4-e2m1", dict(num_bits=(2, 1))),
    ("nvfp4", NVFP4),
]

TINY_BELOW = float(torch.nextafter(torch.tensor(TINY_AMAX), torch.tensor(0.0)))
TINY_ABOVE = float(torch.nextafter(torch.tensor(TINY_AMAX), torch.tensor(1.0)))


def _input_16(values, unsigned):
    x = torch.zeros(2, 16)
    x.view(-1)[: len(values)] = torch.tensor(values)
    return x.abs() if unsigned else x


def test_tiny_amax_threshold_is_2_pow_minus_24():
    assert TINY_AMAX == 2.0**-24
    assert TINY_BELOW < TINY_AMAX < TINY_ABOVE


@pytest.mark.parametrize("amax_value", [0.0, TINY_BELOW, TINY_AMAX], ids=["zero", "below", "at"])
@pytest.mark.parametrize("case", AMAX_FORMATS, ids=[c[0] for c in AMAX_FORMATS])
def test_tiny_amax_quantizes_everything_to_zero(case, amax_value, device):
    _, kwargs = case
    fmt = QuantFormat.create(**kwargs)
    unsigned = kwargs.get("unsigned", False)
    # values both below and far above the tiny amax: "every value" becomes 0
    x = _input_16([1e-8, -3e-8, TINY_AMAX, 1.0, -5.0, 300.0], unsigned).to(device)
    amax = torch.full_like(_static_amax_like(x, fmt), amax_value)
    out = fake_quant(x, fmt, amax)
    assert bool((out == 0).all()), out
    qt = quantize(x, fmt, amax)
    assert bool((dequantize(qt) == 0).all())
    assert bool((fmt.element.decode(qt.codes) == 0).all())


@pytest.mark.parametrize("case", AMAX_FORMATS, ids=[c[0] for c in AMAX_FORMATS])
def test_amax_just_above_tiny_is_not_all_zero(case, device):
    _, kwargs = case
    fmt = QuantFormat.create(**kwargs)
    unsigned = kwargs.get("unsigned", False)
    x = _input_16([TINY_ABOVE, -TINY_ABOVE, TINY_ABOVE] * 6, unsigned).to(device)
    amax = torch.full_like(_static_amax_like(x, fmt), TINY_ABOVE)
    out = fake_quant(x, fmt, amax).cpu()
    # the value equal to amax maps to qmax and back to ~amax
    assert out[0, 0].item() == pytest.approx(TINY_ABOVE, rel=1e-5)
    assert torch.isfinite(out).all()


def _static_amax_like(x, fmt):
    """An amax tensor of the shape a calibrator would store for x."""
    return compute_amax(x, fmt)


def test_zero_block_among_others_is_zero_and_others_are_not():
    fmt = QuantFormat.create(num_bits=4, block_sizes={-1: 8})
    x = torch.zeros(1, 24)
    x[0, :3] = torch.tensor([1e-9, -5e-8, 3e-8])  # block amax 5e-8 < 2^-24 (5.96e-8)
    x[0, 8:10] = torch.tensor([3.5, -1.0])  # block amax 3.5: s = 2 -> [7, -2] -> [3.5, -1.0]
    out = fake_quant(x, fmt)
    assert bool((out[0, :8] == 0).all())
    assert out[0, 8:10].tolist() == [3.5, -1.0]
    assert bool((out[0, 16:] == 0).all())  # all-zero block


ALL_DYNAMIC = AMAX_FORMATS + [
    ("mxfp8", _mx((4, 3))),
    ("mxfp6", _mx((3, 2))),
    ("mxfp4", _mx((2, 1))),
    ("mxint8", _mx(8)),
    ("int8-per-token", dict(num_bits=8, block_sizes={-1: None})),
]


@pytest.mark.parametrize("case", ALL_DYNAMIC, ids=[c[0] for c in ALL_DYNAMIC])
def test_all_zero_input_dynamic_gives_zeros_not_nan(case, device):
    fmt = QuantFormat.create(**case[1])
    x = torch.zeros(4, 64, device=device)
    out = fake_quant(x, fmt)
    assert bool((out == 0).all())
    assert torch.equal(dequantize(quantize(x, fmt)), out)


@pytest.mark.parametrize("huge", [1e30, 3e38])
@pytest.mark.parametrize("case", ALL_DYNAMIC, ids=[c[0] for c in ALL_DYNAMIC])
def test_huge_amax_gives_finite_outputs(case, huge, device):
    _, kwargs = case
    fmt = QuantFormat.create(**kwargs)
    unsigned = kwargs.get("unsigned", False)
    x = _input_16([huge, -huge, huge / 3, -huge / 7, 1.0], unsigned).to(device)
    for amax in (None, _static_amax_like(x, fmt)):
        out = fake_quant(x, fmt, amax)
        assert torch.isfinite(out).all(), (amax, out)
        # the element equal to amax comes back as ~amax (MX: its block scale is a power of two,
        # so only within the element format's precision)
        rel = 0.25 if fmt.scale is not None and fmt.scale.name == "e8m0" else 1e-6
        assert out[0, 0].item() == pytest.approx(huge, rel=rel)
        assert torch.equal(dequantize(quantize(x, fmt, amax)), out)


# --------------------------------------------------------------------------
# NaN (section 2: NaN in, NaN out)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_bits=8), dict(num_bits=(4, 3)), dict(num_bits=(5, 2)), dict(num_bits=8, axis=0)],
    ids=["int8", "fp8-e4m3", "fp8-e5m2", "int8-axis0"],
)
def test_nan_propagates_at_its_position_with_static_amax(kwargs, device):
    fmt = QuantFormat.create(**kwargs)
    x = torch.tensor([[1.0, NAN, -2.0, 0.5, 3.0], [0.25, -1.0, NAN, 2.0, -0.1]], device=device)
    amax = torch.tensor(2.0, device=device) if fmt.axis is None else torch.tensor([2.0, 2.0], device=device)
    out = fake_quant(x, fmt, amax).cpu()
    nan_mask = torch.isnan(x).cpu()
    # NaN exactly where the input had NaN, every other element as if the NaN were not there
    assert torch.equal(torch.isnan(out), nan_mask)
    clean = fake_quant(torch.nan_to_num(x, nan=0.0), fmt, amax).cpu()
    assert torch.equal(out[~nan_mask], clean[~nan_mask])


def test_nan_fp8_codes_are_nan():
    # FP8 has NaN codes: quantize() keeps the NaN instead of raising
    x = torch.tensor([1.0, NAN, -1.0])
    qt = quantize(x, QuantFormat.create(num_bits=(4, 3)), torch.tensor(2.0))
    assert qt.codes.dtype == torch.float8_e4m3fn
    assert (qt.codes.view(torch.uint8)[1].item() & 0x7F) == 0x7F  # S.1111.111
    assert torch.isnan(dequantize(qt))[1]


BLOCK_NAN_FORMATS = [
    ("int4-block16", dict(num_bits=4, block_sizes={-1: 16}), torch.full((4, 2), 2.0)),
    ("int8-2d", dict(num_bits=8, block_sizes={-1: 16, -2: 2}), None),
    ("nvfp4", NVFP4, torch.tensor(4.0)),
    ("mxfp8", _mx((4, 3)), None),
    ("mxfp4", _mx((2, 1)), None),
    ("mxint8", _mx(8), None),
]


@pytest.mark.parametrize("case", BLOCK_NAN_FORMATS, ids=[c[0] for c in BLOCK_NAN_FORMATS])
def test_nan_in_block_formats(case, device):
    _, kwargs, amax = case
    fmt = QuantFormat.create(**kwargs)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 32, generator=g)
    x[0, 5] = NAN
    x = x.to(device)
    amax = amax.to(device) if amax is not None else None
    out = fake_quant(x, fmt, amax).cpu()
    assert math.isnan(out[0, 5].item())
    # rows 2 and 3 lie in blocks that never saw the NaN (2D blocks span rows 0-1) and are
    # exactly as without it
    clean = fake_quant(torch.nan_to_num(x, nan=0.0), fmt, amax).cpu()
    assert torch.equal(out[2:], clean[2:])


NO_NAN_CODES = [
    ("int8", dict(num_bits=8)),
    ("uint8", dict(num_bits=8, unsigned=True)),
    ("int4-block16", dict(num_bits=4, block_sizes={-1: 16})),
    ("fp6-e3m2", dict(num_bits=(3, 2))),
    ("fp6-e2m3", dict(num_bits=(2, 3))),
    ("fp4-e2m1", dict(num_bits=(2, 1))),
    ("nvfp4", NVFP4),
    ("mxfp6", _mx((3, 2))),
    ("mxfp4", _mx((2, 1))),
    ("mxint8", _mx(8)),
]


@pytest.mark.parametrize("case", NO_NAN_CODES, ids=[c[0] for c in NO_NAN_CODES])
def test_quantize_nan_to_format_without_nan_raises(case):
    fmt = QuantFormat.create(**case[1])
    x = torch.ones(2, 32)
    x[1, 3] = NAN
    amax = None if fmt.scale is not None else _static_amax_like(torch.ones(2, 32), fmt)
    with pytest.raises(ValueError, match="NaN"):
        quantize(x, fmt, amax)


# --------------------------------------------------------------------------
# Errors (sections 1 and 3)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("static", [False, True])
def test_unsigned_quantizer_rejects_negative_input(bits, static):
    fmt = QuantFormat.create(num_bits=bits, unsigned=True)
    x = torch.tensor([0.5, -0.001, 2.0])
    amax = torch.tensor(2.0) if static else None
    with pytest.raises(ValueError, match=f"uint{bits}"):
        fake_quant(x, fmt, amax)
    with pytest.raises(ValueError, match="negative"):
        quantize(x, fmt, amax)
    # -0.0 is not negative: accepted, and quantized to 0
    assert fake_quant(torch.tensor([-0.0, 2.0]), fmt, amax)[0].item() == 0.0


def test_unsigned_per_channel_rejects_negative_input():
    fmt = QuantFormat.create(num_bits=8, unsigned=True, axis=0)
    with pytest.raises(ValueError):
        fake_quant(torch.tensor([[1.0, 2.0], [3.0, -4.0]]), fmt)


def test_axis_and_block_sizes_are_exclusive():
    with pytest.raises(ValueError, match="axis"):
        QuantFormat.create(num_bits=8, axis=0, block_sizes={-1: 16})
    with pytest.raises(ValueError, match="block_sizes"):
        QuantFormat(IntFormat(8), axis=(0,), block_sizes=((-1, 16),))


@pytest.mark.parametrize("bad,shown", [((3, 3), "(3, 3)"), ((1, 6), "(1, 6)"), ("e6m1", "e6m1"), ("nvfp4", "nvfp4")])
def test_quant_format_rejects_unknown_float_format_by_name(bad, shown):
    with pytest.raises(ValueError) as err:
        QuantFormat.create(num_bits=bad)
    assert shown in str(err.value)


@pytest.mark.parametrize("bad,shown", [((5, 2), "(5, 2)"), ("e3m4", "e3m4")])
def test_unknown_block_scale_format_is_named(bad, shown):
    with pytest.raises(ValueError) as err:
        QuantFormat.create(num_bits=(2, 1), block_sizes={-1: 16}, scale_bits=bad)
    assert shown in str(err.value)


def test_block_scales_need_block_sizes_and_mx_int_is_8_bit():
    with pytest.raises(ValueError, match="block_sizes"):
        QuantFormat.create(num_bits=(2, 1), scale_bits=(4, 3))
    with pytest.raises(ValueError, match="8-bit"):
        QuantFormat.create(num_bits=4, block_sizes={-1: 32}, scale_bits=(8, 0))


def test_integer_tensors_are_rejected():
    with pytest.raises(TypeError):
        fake_quant(torch.arange(4), QuantFormat.create(num_bits=8))


def test_e2m1_round_of_nan_is_nan():
    # NaN in, NaN out at the element level too (even though FP4 has no NaN code)
    out = E2M1.round(torch.tensor([NAN, 1.0]))
    assert math.isnan(out[0].item()) and out[1].item() == 1.0
