"""Element-format codecs: OCP FP8 / FP6 / FP4 minifloats with a float16 or a shared E8M0 scale.

Every element is a sign / exponent / mantissa minifloat ``(-1)^S * 2^(E - bias) * 1.M``
(``E > 0``) or ``(-1)^S * 2^(1 - bias) * 0.M`` (subnormal, ``E == 0``); the code is the
bit pattern ``S E M`` (sign in the top bit), stored densely packed at the element width.

======== ===== ======== ======= ============================================= =========
format   bits  exp/man  bias    special values                                max
======== ===== ======== ======= ============================================= =========
E4M3     8     4 / 3    7       no Inf; NaN = S.1111.111 (the "fn" variant)   448
E5M2     8     5 / 2    15      IEEE-like: S.11111.00 Inf, S.11111.01-11 NaN   57344
E2M3     6     2 / 3    1       none (every code is finite)                   7.5
E3M2     6     3 / 2    3       none                                          28
E2M1     4     2 / 1    1       none: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}           6
======== ===== ======== ======= ============================================= =========

E4M3 and E5M2 follow the OCP 8-bit Floating Point Specification (OFP8) v1.0; E2M3 and
E3M2 the OCP Microscaling Formats (MX) v1.0 §5.3.2 (FP6), E2M1 §5.3.3 (FP4).

Two ways to scale a group ``x`` (float32 ``(n_groups, group_size)``, outliers excluded
from the statistics through the inlier mask):

* ``fp8-e4m3``, ``fp8-e5m2``, ``fp4-e2m1``: one float16 scale per group,
  ``s = amax / max_elem`` rounded *up* to float16 (``amax`` = largest ``|x|`` of the
  non-outlier values), so ``|x / s| <= max_elem`` and nothing saturates. A group with
  ``amax == 0`` stores ``s = 0`` and decodes to zeros. Bits per element:
  ``bits + 16 / group_size`` (e.g. fp8 with groups of 64: 8.25).
* ``mxfp8`` (E4M3), ``mxfp6-e2m3``, ``mxfp6-e3m2``, ``mxfp4`` (E2M1): OCP MX v1.0 blocks
  of 32 elements sharing a power-of-two scale ``X = 2^(e - 127)`` whose exponent byte
  ``e`` (E8M0, 0..254; 255 is NaN) is stored as a uint8. Following the spec's conversion
  (§6.3): ``shared_exp = floor(log2(amax)) - emax_elem``, with ``emax_elem`` the exponent
  of the element format's largest normal (E4M3 8, E5M2 15, E2M3 2, E3M2 4, E2M1 2),
  clamped to ``[-127, 127]``; an all-zero block stores ``e = 0``. ``floor(log2)`` is taken
  exactly from the float32 exponent (``torch.frexp``). Since ``amax / X`` lies in
  ``[2^emax_elem, 2^(emax_elem + 1))``, the block's largest values can exceed the element
  maximum (e.g. 7.9 > 6 for E2M1); they saturate to ``±max``. Bits per element:
  ``bits + 8 / 32`` (mxfp8 8.25, mxfp6 6.25, mxfp4 4.25).

Element rounding: round to nearest, ties to the code with even mantissa LSB (IEEE
roundTiesToEven), saturating: magnitudes beyond the element maximum (also ±Inf) become
``±max`` (the spec's saturating conversion, never Inf or NaN). The sign bit is copied from
the input (``torch.signbit``), so a negative value that rounds to zero is encoded as -0
(code ``1000...``), as IEEE and torch's float8 casts do; it decodes to -0.0, which equals 0.
NaN input becomes the canonical NaN code ``S.111...1`` for the FP8 formats and raises
:class:`~kvpack.errors.InvalidInputError` for FP6 / FP4, which have no NaN (the codecs never
see NaN: the container refuses NaN tensors before encoding). FP8 elements are rounded by
torch's ``float8_e4m3fn`` / ``float8_e5m2`` casts; FP6 / FP4 by the table of all code
values (:func:`round_to_codes`), which the tests check against torch's casts for FP8.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

from kvpack.codecs.base import (
    KIND_SCALES,
    RECOMMENDED_ELEMENTS,
    SCOPE_GROUP,
    Codec,
    SectionSpec,
    codes_spec,
    fp16_round_up,
    masked_abs_max,
    per_group_spec,
)
from kvpack.errors import InvalidInputError
from kvpack.grouping import GroupLayout

#: The OCP MX block size: 32 elements share one E8M0 scale.
MX_BLOCK_SIZE = 32
#: E8M0 scale exponent bias and its NaN byte.
E8M0_BIAS = 127
E8M0_NAN = 255

_SPECIALS = ("none", "nan", "ieee")


@dataclass(frozen=True)
class ElementFormat:
    """A sign / exponent / mantissa minifloat element format.

    ``specials`` says which codes are not finite numbers: ``"none"`` (all codes are
    numbers: FP6, FP4), ``"nan"`` (only ``S.1...1.1...1`` is NaN: E4M3), ``"ieee"`` (the
    all-ones exponent is Inf with a zero mantissa, else NaN: E5M2). ``torch_dtype`` is the
    torch dtype with the same bit layout, if any.
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    specials: str = "none"
    torch_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.specials not in _SPECIALS:
            raise InvalidInputError(f"specials must be one of {', '.join(_SPECIALS)}, got {self.specials!r}")

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def n_finite(self) -> int:
        """Number of non-negative finite codes; they are ``0 .. n_finite - 1``, in increasing value."""
        half = 1 << (self.bits - 1)
        return {"none": half, "nan": half - 1, "ieee": half - (1 << self.man_bits)}[self.specials]

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest normal value (the ``emax_elem`` of the MX spec)."""
        top = (1 << self.exp_bits) - 1
        return (top - 1 if self.specials == "ieee" else top) - self.bias

    @property
    def max_value(self) -> float:
        return float(code_values(self)[self.n_finite - 1])

    @property
    def nan_code(self) -> int | None:
        """The canonical positive NaN code (all bits but the sign set), ``None`` without NaN."""
        return None if self.specials == "none" else (1 << (self.bits - 1)) - 1


E4M3 = ElementFormat("e4m3", 4, 3, 7, "nan", torch.float8_e4m3fn)
E5M2 = ElementFormat("e5m2", 5, 2, 15, "ieee", torch.float8_e5m2)
E2M3 = ElementFormat("e2m3", 2, 3, 1)
E3M2 = ElementFormat("e3m2", 3, 2, 3)
E2M1 = ElementFormat("e2m1", 2, 1, 1)


@lru_cache(maxsize=None)
def code_values(fmt: ElementFormat) -> torch.Tensor:
    """The value of every code of ``fmt``: float32 ``(2**bits,)``, indexed by code (±Inf, NaN included).

    Do not modify the returned tensor: it is cached.
    """
    codes = torch.arange(1 << fmt.bits)
    sign = codes >> (fmt.bits - 1)
    exponent = (codes >> fmt.man_bits) & ((1 << fmt.exp_bits) - 1)
    mantissa = codes & ((1 << fmt.man_bits) - 1)
    fraction = mantissa.double() / (1 << fmt.man_bits)
    magnitude = torch.where(
        exponent == 0,
        fraction * 2.0 ** (1 - fmt.bias),
        (1 + fraction) * torch.exp2((exponent - fmt.bias).double()),
    )
    top = exponent == (1 << fmt.exp_bits) - 1
    if fmt.specials == "ieee":
        magnitude = torch.where(top, torch.where(mantissa == 0, torch.inf, torch.nan), magnitude)
    elif fmt.specials == "nan":
        magnitude = torch.where(top & (mantissa == (1 << fmt.man_bits) - 1), torch.nan, magnitude)
    return torch.where(sign == 1, -magnitude, magnitude).float()


@lru_cache(maxsize=None)
def _midpoints(fmt: ElementFormat) -> torch.Tensor:
    """Midpoints between consecutive non-negative finite values (exact in float32)."""
    grid = code_values(fmt)[: fmt.n_finite]
    return ((grid[1:] + grid[:-1]) / 2).contiguous()


def round_to_codes(x: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """Nearest ``fmt`` code of every value, by the table of code values.

    Round to nearest, ties to the code with even mantissa LSB; magnitudes beyond the
    maximum (±Inf too) saturate to ``±max``; the sign bit is ``signbit(x)`` (so -0 for a
    negative value that rounds to zero); NaN gives the canonical NaN code ``S.111...1``.

    Args:
        x: float32 tensor of any shape (values already divided by their scale).
        fmt: the element format.

    Returns:
        uint8 tensor of ``x``'s shape with codes in ``[0, 2**fmt.bits - 1]``.

    Raises:
        InvalidInputError: ``x`` holds NaN and ``fmt`` has no NaN encoding (FP6, FP4).
    """
    x = x.float()
    magnitude = x.abs().contiguous()
    midpoints = _midpoints(fmt)
    below = torch.searchsorted(midpoints, magnitude, right=False)  # at a tie: the smaller neighbour
    above = torch.searchsorted(midpoints, magnitude, right=True)  # at a tie: the larger one
    codes = torch.where(below % 2 == 0, below, above)  # equal unless tied; the even code wins a tie
    codes = codes | (torch.signbit(x).long() << (fmt.bits - 1))
    nan = torch.isnan(x)
    if bool(nan.any()):
        if fmt.nan_code is None:
            raise InvalidInputError(f"{fmt.name} has no NaN encoding; got {int(nan.sum())} NaN value(s)")
        codes = torch.where(nan, (codes & (1 << (fmt.bits - 1))) | fmt.nan_code, codes)
    return codes.to(torch.uint8)


def encode_elements(x: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """The codecs' element rounding: saturate to ``±max``, then round to nearest even.

    FP8 formats go through torch's float8 cast, the others through :func:`round_to_codes`
    (both give the same codes; the tests check it). Same contract as :func:`round_to_codes`.
    """
    if fmt.torch_dtype is None:
        return round_to_codes(x, fmt)
    top = fmt.max_value
    return x.float().clamp(-top, top).to(fmt.torch_dtype).view(torch.uint8)


def decode_elements(codes: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """Values of ``fmt`` codes: integer tensor of any shape -> float32 of the same shape.

    Raises:
        InvalidInputError: a code is an Inf or NaN pattern (no encoder writes one) or
            beyond ``2**fmt.bits - 1``.
    """
    index = codes.long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= 1 << fmt.bits):
        raise InvalidInputError(f"{fmt.name} codes must lie in [0, {(1 << fmt.bits) - 1}]")
    values = code_values(fmt)[index]
    if fmt.specials != "none" and not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise InvalidInputError(f"{bad} {fmt.name} code(s) are Inf or NaN patterns, which the encoder never writes")
    return values


def mx_shared_exponent(amax: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """OCP MX shared exponent per block: ``floor(log2(amax)) - emax_elem`` clamped to [-127, 127].

    Args:
        amax: float32 ``(n_blocks,)`` largest ``|x|`` of each block (non-negative, finite).
        fmt: the element format.

    Returns:
        int64 ``(n_blocks,)``; ``-127`` (E8M0 byte 0) for an all-zero block.
    """
    mantissa, exponent = torch.frexp(amax.float())  # amax = mantissa * 2^exponent, mantissa in [0.5, 1)
    shared = (exponent.long() - 1 - fmt.emax).clamp(-E8M0_BIAS, E8M0_BIAS)
    return torch.where(amax > 0, shared, torch.full_like(shared, -E8M0_BIAS))


class _Fp16ScaledCodec(Codec):
    """Elements of ``element`` times one float16 scale per group (``amax / max`` rounded up)."""

    recommended_transforms: ClassVar[dict] = RECOMMENDED_ELEMENTS

    element: ClassVar[ElementFormat]

    def section_specs(self, layout: GroupLayout) -> dict[str, SectionSpec]:
        return {"codes": codes_spec(layout, self.element.bits), "scale": per_group_spec(layout)}

    def encode(self, groups, layout, inlier_mask):
        """float32 ``(n_groups, group_size)`` -> ``codes`` uint8 (same shape), ``scale`` float32 ``(n_groups,)``."""
        top = self.element.max_value
        scale = fp16_round_up(masked_abs_max(groups, inlier_mask) / top)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        return {"codes": encode_elements(groups / safe[:, None], self.element), "scale": scale}

    def decode(self, arrays, layout):
        """``codes`` uint8 ``(n_groups, group_size)``, ``scale`` float32 ``(n_groups,)`` -> float32 groups.

        Raises:
            InvalidInputError: a code is an Inf / NaN pattern.
        """
        return decode_elements(arrays["codes"], self.element) * arrays["scale"][:, None]


class _MxCodec(Codec):
    """OCP MX: elements of ``element`` times a shared power-of-two (E8M0) scale per block of 32."""

    recommended_transforms: ClassVar[dict] = RECOMMENDED_ELEMENTS

    element: ClassVar[ElementFormat]
    block_size = MX_BLOCK_SIZE

    def section_specs(self, layout: GroupLayout) -> dict[str, SectionSpec]:
        return {
            "codes": codes_spec(layout, self.element.bits),
            "scale": SectionSpec(KIND_SCALES, "uint8", layout.n_groups, scope=SCOPE_GROUP),
        }

    def encode(self, groups, layout, inlier_mask):
        """float32 ``(n_groups, group_size)`` -> ``codes`` uint8 (same shape), ``scale``: E8M0 bytes
        ``e`` (float32 ``(n_groups,)``, integers 0..254) with ``X = 2^(e - 127)``."""
        shared = mx_shared_exponent(masked_abs_max(groups, inlier_mask), self.element)
        top = self.element.max_value
        # x / X is exact in float64; saturate before going back to float32 (outliers may be huge)
        scaled = (groups.double() * torch.exp2(-shared.double())[:, None]).clamp(-top, top).float()
        return {"codes": encode_elements(scaled, self.element), "scale": (shared + E8M0_BIAS).float()}

    def decode(self, arrays, layout):
        """``codes`` uint8 ``(n_groups, group_size)``, ``scale`` float32 E8M0 bytes ``(n_groups,)`` -> float32.

        Raises:
            InvalidInputError: a scale byte is 255 (E8M0 NaN) or not an integer in 0..254, or a
                code is an Inf / NaN pattern.
        """
        exponent = arrays["scale"]
        if exponent.numel():
            bad = (exponent != exponent.round()) | (exponent < 0) | (exponent >= E8M0_NAN) | exponent.isnan()
            if bool(bad.any()):
                raise InvalidInputError(
                    f"{int(bad.sum())} E8M0 scale byte(s) are 255 (NaN) or out of range; the encoder writes 0..254"
                )
        scale = torch.exp2(exponent.double() - E8M0_BIAS)
        return (decode_elements(arrays["codes"], self.element).double() * scale[:, None]).float()


_OFP8 = "OCP 8-bit Floating Point Specification (OFP8) v1.0"
_MX = "OCP Microscaling Formats (MX) v1.0"


class Fp8E4M3Codec(_Fp16ScaledCodec):
    name = "fp8-e4m3"
    summary = "FP8 E4M3 elements (max 448) with a float16 scale per group (amax / 448, rounded up)"
    source = f"{_OFP8}, E4M3"
    element = E4M3
    fixed_bits = 8
    family = {4: "fp4-e2m1", 8: "fp8-e4m3"}


class Fp8E5M2Codec(_Fp16ScaledCodec):
    name = "fp8-e5m2"
    summary = "FP8 E5M2 elements (max 57344) with a float16 scale per group (amax / 57344, rounded up)"
    source = f"{_OFP8}, E5M2"
    element = E5M2
    fixed_bits = 8
    family = {4: "fp4-e2m1", 8: "fp8-e5m2"}


class Fp4E2M1Codec(_Fp16ScaledCodec):
    name = "fp4-e2m1"
    summary = "FP4 E2M1 elements (max 6) with a float16 scale per group (amax / 6, rounded up)"
    source = f"{_MX} §5.3.3 (FP4 E2M1 element format)"
    element = E2M1
    fixed_bits = 4
    family = {4: "fp4-e2m1", 8: "fp8-e4m3"}


class MxFp8Codec(_MxCodec):
    name = "mxfp8"
    summary = "OCP MXFP8: blocks of 32 FP8 E4M3 elements sharing a power-of-two (E8M0) scale"
    source = f"{_MX} (MXFP8, E4M3 elements per {_OFP8})"
    element = E4M3
    fixed_bits = 8
    family = {4: "mxfp4", 6: "mxfp6-e2m3", 8: "mxfp8"}


class MxFp6E2M3Codec(_MxCodec):
    name = "mxfp6-e2m3"
    summary = "OCP MXFP6: blocks of 32 FP6 E2M3 elements sharing a power-of-two (E8M0) scale"
    source = f"{_MX} §5.3.2 (MXFP6, E2M3 elements)"
    element = E2M3
    fixed_bits = 6
    family = {4: "mxfp4", 6: "mxfp6-e2m3", 8: "mxfp8"}


class MxFp6E3M2Codec(_MxCodec):
    name = "mxfp6-e3m2"
    summary = "OCP MXFP6: blocks of 32 FP6 E3M2 elements sharing a power-of-two (E8M0) scale"
    source = f"{_MX} §5.3.2 (MXFP6, E3M2 elements)"
    element = E3M2
    fixed_bits = 6
    family = {4: "mxfp4", 6: "mxfp6-e3m2", 8: "mxfp8"}


class MxFp4Codec(_MxCodec):
    name = "mxfp4"
    summary = "OCP MXFP4: blocks of 32 FP4 E2M1 elements sharing a power-of-two (E8M0) scale"
    source = f"{_MX} §5.3.3 (MXFP4, E2M1 elements)"
    element = E2M1
    fixed_bits = 4
    family = {4: "mxfp4", 6: "mxfp6-e2m3", 8: "mxfp8"}
