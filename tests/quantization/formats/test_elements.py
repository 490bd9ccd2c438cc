"""Element formats against NUMERICS.md sections 1 and 2.

Tables of representable values, code round trips, ties to even, and the
emulated FP8 rounding against torch's own float8 casts.
"""

import math

import pytest
import torch

from modelopt_lite.quantization.formats import (
    E2M1,
    E2M3,
    E3M2,
    E4M3,
    E5M2,
    E8M0,
    FloatFormat,
    IntFormat,
    QuantFormat,
    fake_quant,
    parse_format,
)



FLOATS = [E4M3, E5M2, E3M2, E2M3, E2M1]
INTS = [
    IntFormat(bits, unsigned=unsigned, narrow_range=narrow)
    for bits in range(2, 9)
    for unsigned, narrow in ((False, False), (True, False), (False, True))
]


def _fid(f):
    return f.name if isinstance(f, FloatFormat) else f.name


def _finite_codes(fmt, device):
    """Every code of `fmt` whose value is finite (NaN codes and E5M2 +-inf dropped)."""
    codes = fmt.all_codes().to(device)
    vals = fmt.decode(codes)
    keep = torch.isfinite(vals)
    return codes[keep], vals[keep]


def _bits(codes):
    """Bit pattern of codes as int32 (float8 codes are viewed as bytes)."""
    if codes.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        codes = codes.view(torch.uint8)
    return codes.to(torch.int32)


# --------------------------------------------------------------------------
# Section 1: table values
# --------------------------------------------------------------------------

# (format, max finite, smallest normal, smallest subnormal), copied from NUMERICS.md section 1.
FLOAT_TABLE = [
    (E4M3, 448.0, 2.0**-6, 2.0**-9),
    (E5M2, 57344.0, 2.0**-14, 2.0**-16),
    (E3M2, 28.0, 2.0**-2, 2.0**-4),
    (E2M3, 7.5, 1.0, 2.0**-3),
    (E2M1, 6.0, 1.0, 0.5),
]


@pytest.mark.parametrize("fmt,max_finite,min_normal,min_sub", FLOAT_TABLE, ids=[t[0].name for t in FLOAT_TABLE])
def test_float_table_values(fmt, max_finite, min_normal, min_sub, device):
    # The attributes must equal the table, and the decoded code table must agree:
    # its largest finite value is `max finite`, its smallest positive value is the
    # smallest subnormal, and the smallest normal is representable.
    assert fmt.max_value == max_finite
    assert fmt.min_normal == min_normal
    assert fmt.min_subnormal == min_sub
    _, vals = _finite_codes(fmt, device)
    assert vals.max().item() == max_finite
    assert vals.min().item() == -max_finite
    assert vals[vals > 0].min().item() == min_sub
    assert bool((vals == min_normal).any())
    # The largest subnormal is min_normal - min_sub: nothing lies strictly between it and min_normal.
    between = vals[(vals > min_normal - min_sub) & (vals < min_normal)]
    assert between.numel() == 0


@pytest.mark.parametrize(
    "fmt,n_codes,n_finite",
    [
        (E4M3, 256, 254),  # e4m3fn: only S.1111.111 is NaN -> 2 NaN codes, no inf
        (E5M2, 256, 248),  # IEEE-like: exponent 11111 is inf (2 codes) or NaN (6 codes)
        (E3M2, 64, 64),  # FP6: no inf / NaN, every code finite
        (E2M3, 64, 64),
        (E2M1, 16, 16),  # FP4: 16 codes, all finite
    ],
    ids=lambda v: v.name if isinstance(v, FloatFormat) else str(v),
)
def test_float_code_counts(fmt, n_codes, n_finite):
    codes = fmt.all_codes()
    assert codes.numel() == n_codes
    assert int(torch.isfinite(fmt.decode(codes)).sum()) == n_finite


def test_e4m3_nan_codes_and_no_inf():
    vals = E4M3.decode(E4M3.all_codes())
    bits = E4M3.all_codes().view(torch.uint8).to(torch.int32)
    # e4m3fn: the only NaNs are 0x7F and 0xFF, there is no infinity.
    assert sorted(bits[torch.isnan(vals)].tolist()) == [0x7F, 0xFF]
    assert not bool(torch.isinf(vals).any())


def test_e5m2_inf_and_nan_codes():
    vals = E5M2.decode(E5M2.all_codes())
    bits = E5M2.all_codes().view(torch.uint8).to(torch.int32)
    # IEEE-like: 0x7C = +inf, 0xFC = -inf, 0x7D..0x7F and 0xFD..0xFF are NaN.
    assert bits[torch.isposinf(vals)].tolist() == [0x7C]
    assert bits[torch.isneginf(vals)].tolist() == [0xFC]
    assert sorted(bits[torch.isnan(vals)].tolist()) == [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]


@pytest.mark.parametrize("fmt", INTS, ids=_fid)
def test_int_ranges(fmt):
    n = fmt.bits
    if fmt.unsigned:
        # INTn unsigned: [0, 2^n - 1]
        assert (fmt.qmin_code, fmt.qmax_code) == (0, 2**n - 1)
    elif fmt.narrow_range:
        # narrow_range: [-qmax, qmax] with qmax = 2^(n-1) - 1
        assert (fmt.qmin_code, fmt.qmax_code) == (-(2 ** (n - 1)) + 1, 2 ** (n - 1) - 1)
    else:
        # signed: [-qmax - 1, qmax]
        assert (fmt.qmin_code, fmt.qmax_code) == (-(2 ** (n - 1)), 2 ** (n - 1) - 1)
    assert fmt.max_value == fmt.qmax_code
    codes = fmt.all_codes()
    assert codes.numel() == fmt.qmax_code - fmt.qmin_code + 1


def test_qmax_examples_from_section3():
    # NUMERICS section 3: qmax is 127 for INT8, 7 for INT4, 448 for E4M3, 6 for E2M1.
    assert parse_format(8).max_value == 127
    assert parse_format(4).max_value == 7
    assert parse_format((4, 3)).max_value == 448
    assert parse_format((2, 1)).max_value == 6


def test_e2m1_magnitudes_and_codes(device):
    codes = torch.arange(16, dtype=torch.uint8, device=device)
    vals = E2M1.decode(codes).cpu()
    mags = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    # code = sign << 3 | index, index 0..7 in the order of the magnitude list.
    assert vals[:8].tolist() == mags
    assert vals[8:].tolist() == [-m for m in mags]
    assert bool(torch.signbit(vals[8]))  # code 0b1000 is -0
    assert set(vals.abs().tolist()) == set(mags)
    # Encoding the values gives the codes back.
    for sign in (0, 1):
        for index, m in enumerate(mags):
            v = torch.tensor([-float(m) if sign else float(m)], device=device)  # -0.0 for sign 1, index 0
            assert E2M1.encode(v).item() == (sign << 3 | index)


def test_e8m0_codes(device):
    # E8M0 value = 2^(code - 127); code 0xFF is NaN; powers of two only.
    codes = torch.arange(256, dtype=torch.int32, device=device).to(torch.uint8)
    vals = E8M0.decode(codes)
    expected = torch.tensor([2.0 ** (c - 127) for c in range(255)], dtype=torch.float32)
    assert torch.equal(vals[:255].cpu(), expected)
    assert math.isnan(vals[255].item())
    assert vals[254].item() == 2.0**127  # max
    assert vals[0].item() == 2.0**-127  # smallest (a float32 subnormal)
    assert vals[127].item() == 1.0
    assert torch.equal(E8M0.encode(vals), codes)


# --------------------------------------------------------------------------
# Round trips over every code
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FLOATS, ids=_fid)
def test_float_decode_round_identity(fmt, device):
    # Every finite representable value is already on the grid: rounding it changes nothing.
    _, vals = _finite_codes(fmt, device)
    out = fmt.round(vals)
    assert torch.equal(out, vals)
    assert torch.equal(torch.signbit(out), torch.signbit(vals))  # -0 stays -0


@pytest.mark.parametrize("fmt", FLOATS, ids=_fid)
def test_float_encode_decode_codes(fmt, device):
    # encode(decode(code)) gives the very same bit pattern (sign of zero included).
    codes, vals = _finite_codes(fmt, device)
    back = fmt.encode(vals)
    assert back.dtype == codes.dtype
    assert torch.equal(_bits(back), _bits(codes))


@pytest.mark.parametrize("fmt", INTS, ids=_fid)
def test_int_round_trip(fmt, device):
    codes = fmt.all_codes().to(device)
    vals = fmt.decode(codes)
    # decoded values are the integers qmin..qmax
    assert vals.cpu().tolist() == list(range(fmt.qmin_code, fmt.qmax_code + 1))
    assert torch.equal(fmt.round(vals), vals)
    back = fmt.encode(vals)
    assert back.dtype == codes.dtype
    assert torch.equal(back, codes)


# --------------------------------------------------------------------------
# Section 2: ties to even
# --------------------------------------------------------------------------


def _positive_grid(fmt, device):
    """Non-negative finite values with their codes, sorted; consecutive codes are consecutive values."""
    codes, vals = _finite_codes(fmt, device)
    pos = ~torch.signbit(vals)
    vals, codes = vals[pos], _bits(codes[pos])
    order = torch.argsort(vals)
    return vals[order], codes[order]


@pytest.mark.parametrize("fmt", FLOATS, ids=_fid)
def test_float_midpoints_round_to_even_code(fmt, device):
    vals, codes = _positive_grid(fmt, device)
    # Consecutive non-negative values have consecutive codes (+0 is code 0), so of two
    # neighbours exactly one code is even; the midpoint must round to that one.
    assert torch.equal(codes, torch.arange(codes.numel(), device=device, dtype=torch.int32))
    lo, hi = vals[:-1], vals[1:]
    mid = (lo + hi) / 2  # exact in float32: both neighbours have few mantissa bits
    even_is_lo = (codes[:-1] % 2) == 0
    expected = torch.where(even_is_lo, lo, hi)
    assert torch.equal(fmt.round(mid), expected)
    # Negative side is the mirror image (the sign bit does not change the parity).
    assert torch.equal(fmt.round(-mid), -expected)
    # Off the midpoint, nearest wins: a nudge of one float32 ulp decides.
    above = torch.nextafter(mid, torch.full_like(mid, math.inf))
    below = torch.nextafter(mid, torch.full_like(mid, -math.inf))
    assert torch.equal(fmt.round(above), hi)
    assert torch.equal(fmt.round(below), lo)


@pytest.mark.parametrize(
    "x,expected",
    [
        (0.25, 0.0),  # between 0 (code 0) and 0.5 (code 1): even code 0
        (0.75, 1.0),  # between 0.5 (code 1) and 1 (code 2)
        (1.25, 1.0),  # between 1 (code 2) and 1.5 (code 3)
        (1.75, 2.0),  # between 1.5 (code 3) and 2 (code 4)
        (2.5, 2.0),  # between 2 (code 4) and 3 (code 5)
        (3.5, 4.0),  # between 3 (code 5) and 4 (code 6)
        (5.0, 4.0),  # between 4 (code 6) and 6 (code 7)
        (6.0, 6.0),  # max finite
        (6.5, 6.0),  # anything above 6 saturates to 6
        (7.0, 6.0),
        (1e9, 6.0),
        (math.inf, 6.0),
    ],
)
def test_e2m1_examples_of_section2(x, expected, device):
    t = torch.tensor([x, -x], device=device)
    assert E2M1.round(t).cpu().tolist() == [expected, -expected]


def test_e2m1_ties_through_fake_quant():
    # Per-tensor FP4 with amax = 6 has s = qmax / amax = 1, so fake_quant is plain E2M1 rounding.
    fmt = QuantFormat.create(num_bits=(2, 1))
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0])
    out = fake_quant(x, fmt, torch.tensor(6.0))
    assert out.tolist() == [0, 1, 1, 2, 2, 4, 4, 6, 0, -1, -1, -2, -2, -4, -4]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_ties_to_even_after_scaling(bits, device):
    fmt = QuantFormat.create(num_bits=bits)
    qmax = 2 ** (bits - 1) - 1
    # amax = qmax gives s = qmax / amax = 1: the scaled value is the input itself.
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, 0.51], device=device)
    out = fake_quant(x, fmt, torch.tensor(float(qmax), device=device)).cpu()
    # torch.round: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (ties to even); then clamp to [-qmax-1, qmax].
    expected = [0, 2, 2, 0, -2, -2, 0, 1]
    expected = [min(max(v, -qmax - 1), qmax) for v in expected]
    assert out.tolist() == expected
    # Same with a non-unit scale: amax = 2 * qmax gives s = 1/2, so x = 1, 3, 5 are the ties.
    y = torch.tensor([1.0, 3.0, 5.0, -1.0, -3.0], device=device)
    out = fake_quant(y, fmt, torch.tensor(2.0 * qmax, device=device)).cpu()
    # q = round(0.5, 1.5, 2.5, ...) = 0, 2, 2; out = q * (amax / qmax) = 2q
    expected = [2 * min(max(v, -qmax - 1), qmax) for v in [0, 2, 2, 0, -2]]
    assert out.tolist() == expected


# --------------------------------------------------------------------------
# FP8 emulation equals torch's float8 casts
# --------------------------------------------------------------------------


def _wide_random(n, device, seed):
    g = torch.Generator().manual_seed(seed)
    mant = torch.rand(n, generator=g) * 2 - 1
    exps = torch.randint(-30, 20, (n,), generator=g).float()
    x = mant * torch.pow(2.0, exps)
    # a few special points: subnormal float32 inputs, exact powers of two, zeros
    x[:8] = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 2.0**-10, 2.0**-17, 1.0, -1.0])
    return x.to(device)


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=_fid)
def test_fp8_round_equals_torch_cast(fmt, device):
    # NUMERICS section 2: torch's float8 casts round to nearest even; the emulation
    # must agree bit for bit on values clamped to the format's range.
    x = torch.clamp(_wide_random(400_000, device, seed=1234), -fmt.max_value, fmt.max_value)
    expected = x.to(fmt.torch_dtype).float()
    assert torch.equal(fmt.round(x), expected)
    assert torch.equal(_bits(fmt.encode(fmt.round(x))), _bits(x.to(fmt.torch_dtype)))


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=_fid)
def test_fp8_midpoints_equal_torch_cast(fmt, device):
    vals, _ = _positive_grid(fmt, device)
    mid = (vals[:-1] + vals[1:]) / 2
    mid = torch.cat([mid, -mid])
    assert torch.equal(fmt.round(mid), mid.to(fmt.torch_dtype).float())


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=_fid)
def test_fp8_fake_quant_unit_scale_equals_cast(fmt, device):
    # Per tensor with amax = qmax: s = 1 and 1/s = 1, so fake_quant(x) is the FP8 cast of clamp(x).
    x = _wide_random(100_000, device, seed=99) * 100
    qf = QuantFormat.create(num_bits=(fmt.ebits, fmt.mbits))
    out = fake_quant(x, qf, torch.tensor(fmt.max_value, device=device))
    expected = torch.clamp(x, -fmt.max_value, fmt.max_value).to(fmt.torch_dtype).float()
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------
# Format names (NUMERICS section 1, configs)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,expected",
    [
        ((4, 3), E4M3),
        ([5, 2], E5M2),
        ((3, 2), E3M2),
        ((2, 3), E2M3),
        ((2, 1), E2M1),
        ("e4m3", E4M3),
        ("E5M2", E5M2),
        ("e3m2", E3M2),
        ("e2m3", E2M3),
        ("e2m1", E2M1),
        (8, IntFormat(8)),
        (4, IntFormat(4)),
        ("int4", IntFormat(4)),
        ("uint8", IntFormat(8, unsigned=True)),
    ],
    ids=str,
)
def test_parse_format_names(spec, expected):
    assert parse_format(spec) == expected


@pytest.mark.parametrize("bad,shown", [((3, 4), "(3, 4)"), ((6, 1), "(6, 1)"), ("e9m9", "e9m9"), ("fp8", "fp8")])
def test_unknown_float_format_is_named_in_error(bad, shown):
    with pytest.raises(ValueError) as err:
        parse_format(bad)
    assert shown in str(err.value)
    with pytest.raises(ValueError) as err:
        QuantFormat.create(num_bits=bad)
    assert shown in str(err.value)


def test_e8m0_is_not_an_element_format():
    with pytest.raises(ValueError, match="e8m0"):
        parse_format("e8m0")


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_int_bit_count_out_of_range(bits):
    with pytest.raises(ValueError, match=str(bits)):
        parse_format(bits)
