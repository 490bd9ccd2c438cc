"""Element formats: integers, small floats and power-of-two scales.

Every format knows its range, how to round a float32 tensor onto its grid
(round to nearest, ties to even, saturating), and how to turn grid values
into codes and back. Rounding is done in float32 with exact power-of-two
arithmetic, so the same code gives the same bits on CPU and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

__all__ = [
    "IntFormat",
    "FloatFormat",
    "ElementFormat",
    "parse_format",
    "E4M3",
    "E5M2",
    "E3M2",
    "E2M3",
    "E2M1",
    "E8M0",
    "FLOAT_FORMAT_NAMES",
]


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact 2**exponent (int32 tensor) as float32, normal and subnormal range."""
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent.to(torch.float32))


@dataclass(frozen=True)
class IntFormat:
    """Signed or unsigned integer with `bits` bits.

    `frac_bits` > 0 makes it fixed point (value = code / 2**frac_bits), as the
    MXINT8 elements are (1.6 fixed point).
    """

    def __deepcopy__(self, memo):
        return self  # immutable, and the shared instances (E4M3, E8M0, ...) are compared by identity

    def __copy__(self):
        return self

    bits: int
    unsigned: bool = False
    narrow_range: bool = False
    frac_bits: int = 0

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"integer formats have 2 to 8 bits, got {self.bits}")

    kind = "int"

    @property
    def name(self) -> str:
        base = f"{'u' if self.unsigned else ''}int{self.bits}"
        return base + ("-narrow" if self.narrow_range and not self.unsigned else "")

    @property
    def qmax_code(self) -> int:
        return 2**self.bits - 1 if self.unsigned else 2 ** (self.bits - 1) - 1

    @property
    def qmin_code(self) -> int:
        if self.unsigned:
            return 0
        return -self.qmax_code if self.narrow_range else -self.qmax_code - 1

    @property
    def max_value(self) -> float:
        return self.qmax_code / 2**self.frac_bits

    @property
    def emax(self) -> int:
        """Exponent of the largest power of two in range (for MX scaling)."""
        return (self.qmax_code >> self.frac_bits).bit_length() - 1 if self.qmax_code >> self.frac_bits else -1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8 if self.unsigned else torch.int8

    @property
    def has_nan(self) -> bool:
        return False

    def round(self, y: torch.Tensor) -> torch.Tensor:
        """Round float32 `y` (already scaled) to the grid, saturating. NaN stays NaN."""
        if self.frac_bits:
            y = y * 2.0**self.frac_bits
            return torch.clamp(torch.round(y), self.qmin_code, self.qmax_code) / 2.0**self.frac_bits
        return torch.clamp(torch.round(y), self.qmin_code, self.qmax_code)

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """Grid values -> integer codes."""
        if self.frac_bits:
            q = q * 2.0**self.frac_bits
        return q.to(self.code_dtype)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> grid values (float32)."""
        q = codes.to(torch.float32)
        return q / 2.0**self.frac_bits if self.frac_bits else q

    def all_codes(self) -> torch.Tensor:
        return torch.arange(self.qmin_code, self.qmax_code + 1).to(self.code_dtype)


@dataclass(frozen=True)
class FloatFormat:
    """A small float with `ebits` exponent and `mbits` mantissa bits.

    E4M3 follows the `fn` convention (no inf, NaN is S.1111.111); E5M2 is
    IEEE-like; FP6 and FP4 have neither inf nor NaN and use every exponent.
    E8M0 (unsigned, mbits 0) exists only as a block scale.
    """

    def __deepcopy__(self, memo):
        return self  # immutable, and the shared instances (E4M3, E8M0, ...) are compared by identity

    def __copy__(self):
        return self

    ebits: int
    mbits: int

    kind = "float"

    @property
    def name(self) -> str:
        return f"e{self.ebits}m{self.mbits}"

    @property
    def signed(self) -> bool:
        return self.mbits > 0 or self.ebits != 8

    @property
    def bias(self) -> int:
        return 2 ** (self.ebits - 1) - 1

    @property
    def min_exp(self) -> int:
        """Unbiased exponent of the smallest normal."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest power of two in range."""
        if (self.ebits, self.mbits) == (5, 2):
            return 2**self.ebits - 2 - self.bias
        if (self.ebits, self.mbits) == (8, 0):
            return 127
        return 2**self.ebits - 1 - self.bias

    @property
    def max_value(self) -> float:
        if (self.ebits, self.mbits) == (4, 3):
            return 448.0
        return 2.0**self.emax * (2 - 2.0**-self.mbits)

    @property
    def min_normal(self) -> float:
        return 2.0**self.min_exp

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.min_exp - self.mbits)

    @property
    def has_nan(self) -> bool:
        return (self.ebits, self.mbits) in ((4, 3), (5, 2), (8, 0))

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The native torch dtype of the codes, where torch has one."""
        return {(4, 3): torch.float8_e4m3fn, (5, 2): torch.float8_e5m2}.get((self.ebits, self.mbits))

    @property
    def code_bits(self) -> int:
        return self.ebits + self.mbits + int(self.signed)

    def round(self, y: torch.Tensor) -> torch.Tensor:
        """Round float32 `y` to the nearest representable value, ties to even.

        Saturates at +-max_value; NaN stays NaN.
        """
        y = torch.clamp(y, -self.max_value, self.max_value)
        _, exp = torch.frexp(y)
        exp = torch.clamp(exp - 1, min=self.min_exp)
        quantum = _pow2(exp - self.mbits)
        return torch.round(y / quantum) * quantum

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """Grid values -> codes: the torch float8 dtype for FP8, else uint8 bit patterns."""
        if self.torch_dtype is not None:
            return q.to(self.torch_dtype)
        if (self.ebits, self.mbits) == (8, 0):
            _, exp = torch.frexp(q)
            codes = torch.clamp(exp - 1 + self.bias, 0, 254)
            return torch.where(torch.isnan(q), 255, codes).to(torch.uint8)
        sign = torch.signbit(q).to(torch.int32)
        a = q.abs()
        _, exp = torch.frexp(a)
        e = torch.clamp(exp - 1, min=self.min_exp)
        mant = (a / _pow2(e - self.mbits)).to(torch.int32)  # exact: a is on the grid
        normal = mant >= 2**self.mbits
        efield = torch.where(normal, e + self.bias, torch.zeros_like(e))
        mfield = torch.where(normal, mant - 2**self.mbits, mant)
        code = (sign << (self.ebits + self.mbits)) | (efield << self.mbits) | mfield
        return code.to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> grid values (float32)."""
        if self.torch_dtype is not None:
            return codes.to(torch.float32)
        c = codes.to(torch.int32)
        if (self.ebits, self.mbits) == (8, 0):
            vals = _pow2(c - self.bias)
            return torch.where(c == 255, torch.full_like(vals, float("nan")), vals)
        mfield = c & (2**self.mbits - 1)
        efield = (c >> self.mbits) & (2**self.ebits - 1)
        sign = (c >> (self.ebits + self.mbits)) & 1
        normal = efield > 0
        mant = torch.where(normal, mfield + 2**self.mbits, mfield).to(torch.float32)
        e = torch.where(normal, efield - self.bias, torch.full_like(efield, self.min_exp))
        mag = mant * _pow2(e - self.mbits)
        return torch.where(sign.bool(), -mag, mag)

    def all_codes(self) -> torch.Tensor:
        """Every code of the format, NaN codes included."""
        if self.torch_dtype is not None:
            return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(self.torch_dtype)
        return torch.arange(2**self.code_bits, dtype=torch.int32).to(torch.uint8)


ElementFormat = Union[IntFormat, FloatFormat]

E4M3 = FloatFormat(4, 3)
E5M2 = FloatFormat(5, 2)
E3M2 = FloatFormat(3, 2)
E2M3 = FloatFormat(2, 3)
E2M1 = FloatFormat(2, 1)
E8M0 = FloatFormat(8, 0)

FLOAT_FORMAT_NAMES = {f.name: f for f in (E4M3, E5M2, E3M2, E2M3, E2M1, E8M0)}
_ELEMENT_FLOATS = {(f.ebits, f.mbits): f for f in (E4M3, E5M2, E3M2, E2M3, E2M1)}


def parse_format(num_bits, unsigned: bool = False, narrow_range: bool = False) -> ElementFormat:
    """Turn a config's `num_bits` (int, (E, M) or a name such as 'e4m3') into a format."""
    if isinstance(num_bits, str):
        key = num_bits.strip().lower()
        if key in ("e8m0",):
            raise ValueError("e8m0 is a scale format; use it as block_sizes.scale_bits")
        if key in FLOAT_FORMAT_NAMES:
            num_bits = (FLOAT_FORMAT_NAMES[key].ebits, FLOAT_FORMAT_NAMES[key].mbits)
        elif key.startswith(("int", "uint")) and key.lstrip("uint").isdigit():
            return IntFormat(int(key.lstrip("uint")), unsigned=key.startswith("u") or unsigned, narrow_range=narrow_range)
        else:
            raise ValueError(
                f"unknown number format {num_bits!r}; use an integer bit count (2-8), "
                f"[E, M] or one of {sorted(n for n in FLOAT_FORMAT_NAMES if n != 'e8m0')}"
            )
    if isinstance(num_bits, bool):
        raise ValueError(f"num_bits must be an int or (E, M), got {num_bits!r}")
    if isinstance(num_bits, int):
        return IntFormat(num_bits, unsigned=unsigned, narrow_range=narrow_range)
    pair = tuple(num_bits)
    if pair not in _ELEMENT_FLOATS:
        raise ValueError(
            f"unsupported float format {pair}; use one of {sorted(_ELEMENT_FLOATS)} "
            "((4,3) E4M3, (5,2) E5M2, (3,2), (2,3), (2,1))"
        )
    if unsigned:
        raise ValueError("unsigned applies to integer formats only")
    return _ELEMENT_FLOATS[pair]
