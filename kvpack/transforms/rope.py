"""Exact rotary position embedding (RoPE) of keys, to undo it before quantizing and redo it after.

Keys in a transformers cache are stored after RoPE (Su et al., arXiv 2104.09864), which
mixes each channel ``i < rope_dim / 2`` with channel ``i + rope_dim / 2`` (the "rotate
half" convention of transformers' Llama, Mistral, Qwen, Gemma, ... attention) by the angle
``p * inv_freq[i]`` of the token's position ``p``, and scales the result by
``attention_scaling`` (1 except for YaRN / LongRoPE). Channels from ``rope_dim`` on (partial
rotary models) are not rotated. Given ``inv_freq`` (``rope_dim / 2`` float32 values, as the
model's rotary module holds them) the rotation is exact and orthogonal, so keys can be
quantized before RoPE, where their per-channel structure is intact (KVQuant, Hooper et al.,
arXiv 2401.18079, "pre-RoPE key quantization"), and re-rotated after decoding.

Angles are computed in float64 from the float32 frequencies; the rotation is applied in
float64 and rounded to float32 once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from kvpack.errors import InvalidInputError

MAX_ROPE_FREQUENCIES = 1 << 15


@dataclass(frozen=True)
class RopeSpec:
    """A model's rotary parameters: ``inv_freq`` (``rope_dim / 2`` floats) and the cos/sin scaling."""

    inv_freq: tuple[float, ...]
    attention_scaling: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < len(self.inv_freq) <= MAX_ROPE_FREQUENCIES or not all(
            math.isfinite(f) and f >= 0 for f in self.inv_freq
        ):
            raise InvalidInputError("rotary frequencies must be 1 to 32768 finite non-negative numbers")
        if not math.isfinite(self.attention_scaling) or self.attention_scaling <= 0:
            raise InvalidInputError(f"rotary attention scaling must be positive, got {self.attention_scaling}")

    @property
    def rope_dim(self) -> int:
        return 2 * len(self.inv_freq)

    def metadata(self) -> dict[str, str]:
        """What ``kvpack dump`` records: ``rope_inv_freq`` (JSON list) and ``rope_attention_scaling``."""
        return {
            "rope_inv_freq": json.dumps(list(self.inv_freq)),
            "rope_attention_scaling": repr(float(self.attention_scaling)),
        }


def rope_from_model(model) -> RopeSpec | None:
    """The rotary parameters of a transformers model, or ``None`` when it has none or several.

    Reads the single module whose class name ends in ``RotaryEmbedding`` (its ``inv_freq``
    buffer and ``attention_scaling``). Models with more than one (Gemma 3's local and
    global RoPE) give ``None``: un-RoPE would need a per-layer choice it cannot make.
    """
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq")]
    if len(rotaries) != 1:
        return None
    rotary = rotaries[0]
    inv_freq = rotary.inv_freq.detach().to("cpu", torch.float32)
    return RopeSpec(tuple(float(f) for f in inv_freq), float(getattr(rotary, "attention_scaling", 1.0) or 1.0))


def rope_from_metadata(metadata: dict[str, str]) -> RopeSpec:
    """The rotary parameters a dump recorded.

    Raises:
        InvalidInputError: the dump has none (older kvpack, or a model with several rotary
            embeddings) or they are malformed.
    """
    raw = metadata.get("rope_inv_freq")
    if raw is None:
        raise InvalidInputError(
            "un-RoPE (`unrope`) needs the model's rotary frequencies, which this dump does not record "
            "(dump it again with this kvpack, or pass them with CodecConfig.with_rope; models with several "
            "rotary embeddings are not supported)"
        )
    try:
        inv_freq = json.loads(raw)
        scaling = float(metadata.get("rope_attention_scaling", "1.0"))
        if not isinstance(inv_freq, list) or not all(type(f) in (int, float) for f in inv_freq):
            raise ValueError("not a list of numbers")
        return RopeSpec(tuple(float(f) for f in inv_freq), scaling)
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"the dump's rotary parameters are malformed ({exc})") from None


def rotate_keys(
    keys: torch.Tensor, inv_freq: torch.Tensor, scaling: float, first_position: int, inverse: bool
) -> torch.Tensor:
    """Apply RoPE to keys (``inverse=False``) or undo it (``inverse=True``).

    Args:
        keys: float ``(batch, num_kv_heads, seq_len, head_dim)``; token ``t`` is at position
            ``first_position + t``.
        inv_freq: float32 ``(rope_dim / 2,)`` with ``rope_dim <= head_dim``.
        scaling: the factor on cos / sin (``attention_scaling``).
        first_position: position of the first token.
        inverse: undo the rotation (and divide by ``scaling``) instead of applying it.

    Returns:
        float32 tensor of the same shape.

    Raises:
        InvalidInputError: ``rope_dim`` larger than ``head_dim``.
    """
    half = inv_freq.numel()
    head_dim = keys.shape[-1]
    if 2 * half > head_dim:
        raise InvalidInputError(f"rotary dimension {2 * half} exceeds head_dim {head_dim}")
    positions = torch.arange(keys.shape[2], dtype=torch.float64) + first_position
    angles = positions[:, None] * inv_freq.to(torch.float64)[None, :]
    cos, sin = torch.cos(angles), torch.sin(angles)
    x = keys.to(torch.float64)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    if inverse:
        y1 = (x1 * cos + x2 * sin) / scaling
        y2 = (x2 * cos - x1 * sin) / scaling
    else:
        y1 = (x1 * cos - x2 * sin) * scaling
        y2 = (x2 * cos + x1 * sin) * scaling
    return torch.cat([y1, y2, rest], dim=-1).to(torch.float32)
