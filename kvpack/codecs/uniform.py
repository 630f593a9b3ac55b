"""Uniform (integer) grouped quantization, asymmetric or symmetric.

Asymmetric (default): per group, zero-point ``z`` = the group minimum rounded *down* to
float16 and scale ``s`` = ``(max - z) / (2**B - 1)`` rounded *up* to float16, so the grid
``z + s * [0, 2**B - 1]`` always covers the group; codes ``q = clamp(round((x - z) / s))``
and ``x_hat = z + s * q``. Symmetric: no zero-point; ``s = 2 * max|x| / (2**B - 1)``
rounded up, ``x_hat = s * (q - (2**B - 1) / 2)`` (a mid-rise grid that uses all ``2**B``
codes, symmetric about 0). Either way ``|x - x_hat| <= s / 2`` for every non-outlier value
(up to float32 rounding). Round to nearest, ties to even (``torch.round``).

Source: the asymmetric min/max integer quantizer used per token by KIVI (Liu et al.,
arXiv 2402.02750) and per group by most KV-cache int4/int2 schemes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpack.codecs.base import (
    FUSED_UNIFORM_ASYMMETRIC,
    FUSED_UNIFORM_SYMMETRIC,
    RECOMMENDED_GROUPED,
    Codec,
    CodecParams,
    FusedEncoding,
    SectionSpec,
    fp16_round_down,
    fp16_round_up,
    masked_abs_max,
    masked_min_max,
    scaled_codes_specs,
    symmetric_option,
)
from kvpack.grouping import GroupLayout


@dataclass(frozen=True)
class UniformParams(CodecParams):
    symmetric: bool = symmetric_option()


class UniformCodec(Codec):
    name = "uniform"
    recommended_transforms: ClassVar[dict] = RECOMMENDED_GROUPED
    summary = "integer grid per group: scale + zero-point from min/max (or scale from max|x|)"
    source = "min/max integer quantization as in KIVI (arXiv 2402.02750)"
    Params = UniformParams

    def section_specs(self, layout: GroupLayout) -> dict[str, SectionSpec]:
        return scaled_codes_specs(layout, self.bits, self.params.symmetric)

    def encode(self, groups, layout, inlier_mask):
        top = self.levels - 1
        if self.params.symmetric:
            scale = fp16_round_up(masked_abs_max(groups, inlier_mask) * (2.0 / top))
            offset = torch.full_like(scale, top / 2.0)
            shifted = groups / _safe(scale)[:, None] + offset[:, None]
        else:
            lo, hi = masked_min_max(groups, inlier_mask)
            zero = fp16_round_down(lo)
            scale = fp16_round_up((hi - zero) / top)
            shifted = (groups - zero[:, None]) / _safe(scale)[:, None]
        codes = torch.round(shifted).clamp_(0, top).to(torch.uint8 if self.bits <= 8 else torch.int32)
        arrays = {"codes": codes, "scale": scale}
        if not self.params.symmetric:
            arrays["zero_point"] = zero
        return arrays

    def fuses(self) -> bool:
        return True

    def fused_encoding(self, lo, hi, x, layout):
        top = self.levels - 1
        if self.params.symmetric:
            scale = fp16_round_up(torch.maximum(lo.abs(), hi.abs()) * (2.0 / top))
            return FusedEncoding(FUSED_UNIFORM_SYMMETRIC, torch.zeros_like(scale), scale, {"scale": scale})
        zero = fp16_round_down(lo)
        scale = fp16_round_up((hi - zero) / top)
        return FusedEncoding(FUSED_UNIFORM_ASYMMETRIC, zero, scale, {"scale": scale, "zero_point": zero})

    def fused_levels(self, arrays):
        levels = torch.arange(self.levels, dtype=torch.float32)
        if self.params.symmetric:
            levels = levels - (self.levels - 1) / 2.0
        return levels[None, :], False

    def decode(self, arrays, layout):
        scale = arrays["scale"][:, None]
        codes = arrays["codes"].to(torch.float32)
        if self.params.symmetric:
            return (codes - (self.levels - 1) / 2.0) * scale
        return arrays["zero_point"][:, None] + codes * scale


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """Scale with zeros replaced by 1 (a zero-scale group is constant: every code is 0 or mid)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))
