"""Reference methods from the literature, for the quality evaluation only.

They are not ``.kvp`` codecs: each maps a cache's K/V tensors to their reconstruction
and counts its bits per element from the storage the method needs (codes plus every
float16 scale and zero-point), so they can be set beside kvpack's codecs with the same
protocol. fp16 itself is evaluated through a real lossless ``.kvp`` file instead.

- ``fp8-e4m3`` / ``fp8-e5m2``: a cast to torch's ``float8_e4m3fn`` / ``float8_e5m2`` after
  dividing by one scale per (layer, key/value, head), ``amax / fp8_max`` rounded up to
  float16; values saturate at ±fp8_max, rounding is torch's round-to-nearest-even.
  (OCP 8-bit floating point specification, OFP8, v1.0.)
- ``kivi-2-r0`` / ``kivi-4-r0``: KIVI (Liu et al. 2024, arXiv 2402.02750): asymmetric min/max
  integer quantization, keys per channel in groups of 32 consecutive tokens, values per
  token in groups of 32 consecutive channels of a head, float16 scale and zero-point per
  group. Keys' last ``seq_len mod 32`` tokens (which do not fill a group) stay float16 and
  are counted at 16 bits. KIVI also keeps a window of the most recent tokens of keys and
  values in full precision while generating; this baseline does not (it quantizes the
  whole prompt cache, as ../shared/BASELINES.md does at 3.0 / 5.0 bits), so it is KIVI's
  quantizer, not its streaming residual: ``r0``, no recent tokens in full precision. The
  presets ``kivi-2-r128`` / ``kivi-4-r128`` keep KIVI's 128 (:mod:`kvpack.presets`). The
  names ``kivi-2`` / ``kivi-4``, which both used, are refused with the new names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvpack.codecs.base import fp16_round_up
from kvpack.codecs.uniform import UniformCodec, UniformParams
from kvpack.errors import InvalidInputError, lookup
from kvpack.names import parse_kv_name
from kvpack.presets import RENAMED_KIVI, renamed_kivi

KIVI_GROUP = 32


@dataclass(frozen=True)
class Baseline:
    """A named reference method: ``reconstruct(name, x) -> (x_hat, stored_bits)``.

    ``x`` is one K/V tensor ``(batch, num_kv_heads, seq_len, head_dim)`` (any float dtype);
    ``x_hat`` is float32 of the same shape; ``stored_bits`` counts every stored bit.
    """

    name: str
    summary: str
    source: str
    reconstruct: Callable[[str, torch.Tensor], tuple[torch.Tensor, int]]


def fp8_per_head(x: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Cast to float8 with one float16 scale per head; returns ``(x_hat float32, stored bits)``."""
    values = x.detach().to(torch.float32)
    fp8_max = float(torch.finfo(fp8_dtype).max)
    amax = values.abs().amax(dim=(0, 2, 3), keepdim=True)
    scale = fp16_round_up(amax / fp8_max)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = (values / scale).clamp(-fp8_max, fp8_max)
    x_hat = scaled.to(fp8_dtype).to(torch.float32) * scale
    return x_hat, values.numel() * 8 + scale.numel() * 16


def kivi(x: torch.Tensor, bits: int, role: str) -> tuple[torch.Tensor, int]:
    """KIVI quantization of one tensor; ``role`` is ``key`` (per channel) or ``value`` (per token)."""
    values = x.detach().to(torch.float32)
    batch, heads, seq_len, head_dim = values.shape
    codec = UniformCodec(bits, UniformParams(symmetric=False))

    def quantize(groups: torch.Tensor) -> torch.Tensor:
        arrays = codec.encode(groups, None, None)
        return codec.decode(arrays, None)

    if role == "value":
        if head_dim % KIVI_GROUP:
            raise InvalidInputError(f"KIVI needs head_dim divisible by {KIVI_GROUP}, got {head_dim}")
        groups = values.reshape(-1, KIVI_GROUP)
        return quantize(groups).reshape(values.shape), values.numel() * bits + groups.shape[0] * 32
    full = seq_len - seq_len % KIVI_GROUP
    body = values[:, :, :full, :]
    # (B, H, S/32, 32, D) -> (B, H, S/32, D, 32): one group per channel and 32 tokens
    groups = body.reshape(batch, heads, full // KIVI_GROUP, KIVI_GROUP, head_dim).transpose(3, 4)
    restored = quantize(groups.reshape(-1, KIVI_GROUP)).reshape(groups.shape).transpose(3, 4)
    x_hat = values.clone()
    x_hat[:, :, :full, :] = restored.reshape(body.shape)
    residual = values.numel() - body.numel()
    x_hat[:, :, full:, :] = values[:, :, full:, :].to(torch.float16).float()
    n_groups = body.numel() // KIVI_GROUP
    return x_hat, body.numel() * bits + n_groups * 32 + residual * 16


def _kivi(bits: int) -> Callable[[str, torch.Tensor], tuple[torch.Tensor, int]]:
    def run(name: str, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        parsed = parse_kv_name(name)
        if parsed is None:
            raise InvalidInputError(f"{name!r} is not a K/V tensor name")
        return kivi(x, bits, parsed[1])

    return run


BASELINES: dict[str, Baseline] = {
    "fp8-e4m3": Baseline(
        "fp8-e4m3",
        "float8 e4m3 cast, one fp16 scale per (layer, key/value, head)",
        "OCP OFP8 v1.0; torch.float8_e4m3fn",
        lambda name, x: fp8_per_head(x, torch.float8_e4m3fn),
    ),
    "fp8-e5m2": Baseline(
        "fp8-e5m2",
        "float8 e5m2 cast, one fp16 scale per (layer, key/value, head)",
        "OCP OFP8 v1.0; torch.float8_e5m2",
        lambda name, x: fp8_per_head(x, torch.float8_e5m2),
    ),
    "kivi-2-r0": Baseline(
        "kivi-2-r0",
        "2-bit asym int, keys per channel / values per token, groups of 32, no full-precision recent tokens "
        "(the kivi-2-r128 preset keeps 128)",
        "KIVI, Liu et al. 2024, arXiv 2402.02750",
        _kivi(2),
    ),
    "kivi-4-r0": Baseline(
        "kivi-4-r0",
        "4-bit asym int, keys per channel / values per token, groups of 32, no full-precision recent tokens "
        "(the kivi-4-r128 preset keeps 128)",
        "KIVI, Liu et al. 2024, arXiv 2402.02750",
        _kivi(4),
    ),
}


#: Names the baseline and the preset both had (2.8 bits per element apart at 4 bits), refused.
def get_baseline(name: str) -> Baseline:
    """The baseline called ``name``.

    Raises:
        InvalidInputError: no such baseline, or an old KIVI name (naming the new ones).
    """
    if name in RENAMED_KIVI:
        raise renamed_kivi(name, "baseline")
    return lookup(BASELINES, name, "baseline", also=("fp16",))
