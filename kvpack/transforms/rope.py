"""Exact rotary position embedding (RoPE) of keys, to undo it before quantizing and redo it after.

Keys in a transformers cache are stored after RoPE (Su et al., arXiv 2104.09864): channel
pairs of each head are rotated by the angle ``p * inv_freq[i]`` of the token's position ``p``
and scaled by ``attention_scaling`` (1 except for YaRN / LongRoPE). Two layouts pair the
channels (:data:`LAYOUTS`): ``rotate_half`` mixes channel ``i < rope_dim / 2`` with ``i +
rope_dim / 2`` (transformers' Llama, Mistral, Qwen, Gemma, Phi, StableLM, GPT-NeoX, ...
attention), ``interleaved`` mixes ``2i`` with ``2i + 1`` (GPT-J style: GLM, Cohere, ...).
Channels from ``rope_dim`` on (partial rotary models) are not rotated. Given ``inv_freq``
(``rope_dim / 2`` float32 values, as the model's rotary module holds them) the rotation is
exact and orthogonal, so keys can be quantized before RoPE, where their per-channel structure
is intact (KVQuant, Hooper et al., arXiv 2401.18079, "pre-RoPE key quantization"), and
re-rotated after decoding.

Layers may differ (Gemma 2 / 3 local and global layers, NoPE layers): ``kvpack dump`` records
the distinct specs once and, per cache layer, which one it uses (:func:`rope_metadata`,
:func:`rope_for_layer`; docs/format.md §10). Angles are computed in float64 from the float32
frequencies; the rotation is applied in float64 and rounded to float32 once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from kvpack.errors import InvalidInputError, brief, brief_text

MAX_ROPE_FREQUENCIES = 1 << 15
#: Cache layers a dump's rotary metadata may list (bounds what a hostile file makes us parse).
MAX_ROPE_LAYERS = 1 << 16
ROTATE_HALF, INTERLEAVED = "rotate_half", "interleaved"
LAYOUTS = (ROTATE_HALF, INTERLEAVED)
#: Metadata keys: the distinct specs (JSON list) and each layer's index into it (JSON list).
SPECS_KEY, LAYERS_KEY = "rope_specs", "rope_layers"
_NOT_RECORDED = (
    "un-RoPE (`unrope`) needs the model's rotary frequencies, which this dump does not record "
    "(dump it again with this kvpack, or pass them with CodecConfig.with_rope)"
)


@dataclass(frozen=True)
class RopeSpec:
    """One layer's rotary parameters: ``inv_freq`` (``rope_dim / 2`` floats), the cos/sin scaling and
    the channel ``layout`` (``rotate_half`` or ``interleaved``).

    Raises:
        InvalidInputError: no, too many or negative / non-finite frequencies, a scaling that is
            not positive, or an unknown layout.
    """

    inv_freq: tuple[float, ...]
    attention_scaling: float = 1.0
    layout: str = ROTATE_HALF

    def __post_init__(self) -> None:
        values = tuple(_number(f) for f in self.inv_freq) if isinstance(self.inv_freq, (tuple, list)) else ()
        if not 0 < len(values) <= MAX_ROPE_FREQUENCIES or not all(math.isfinite(f) and f >= 0 for f in values):
            raise InvalidInputError("rotary frequencies must be 1 to 32768 finite non-negative numbers")
        object.__setattr__(self, "inv_freq", values)
        scaling = _number(self.attention_scaling)
        if not math.isfinite(scaling) or scaling <= 0:
            raise InvalidInputError(
                f"rotary attention scaling must be a positive number, got {brief(self.attention_scaling)}"
            )
        object.__setattr__(self, "attention_scaling", scaling)
        if self.layout not in LAYOUTS:
            raise InvalidInputError(f"rotary layout must be one of {', '.join(LAYOUTS)}, got {brief(self.layout)}")

    @property
    def rope_dim(self) -> int:
        return 2 * len(self.inv_freq)

    def to_dict(self) -> dict:
        """``{"inv_freq": [...], "attention_scaling": s, "layout": ...}`` (an element of ``rope_specs``)."""
        return {"inv_freq": list(self.inv_freq), "attention_scaling": self.attention_scaling, "layout": self.layout}


def _number(value: object) -> float:
    """``value`` as a float (a Python or numpy number, a 0-d tensor); NaN for anything else."""
    if isinstance(value, (str, bytes, bool)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return math.nan


def rope_metadata(layers: list[RopeSpec | str]) -> dict[str, str]:
    """What ``kvpack dump`` records for un-RoPE, from each cache layer's spec.

    Args:
        layers: per cache layer, its :class:`RopeSpec`, or a one-line reason why it has none
            (kept so that :func:`rope_for_layer` can say it).

    Returns:
        ``rope_specs``: JSON list of the distinct entries, each ``RopeSpec.to_dict()`` or
        ``{"unsupported": reason}``; ``rope_layers``: JSON list, per layer the index of its entry.
        (Earlier dumps held one spec for every layer under ``rope_inv_freq`` /
        ``rope_attention_scaling``; :func:`rope_for_layer` still reads them.)
    """
    entries: list[dict] = []
    indices = []
    for spec in layers:
        entry = spec.to_dict() if isinstance(spec, RopeSpec) else {"unsupported": str(spec)}
        if entry not in entries:
            entries.append(entry)
        indices.append(entries.index(entry))
    return {SPECS_KEY: json.dumps(entries), LAYERS_KEY: json.dumps(indices)}


def rope_for_layer(metadata: dict[str, str], layer: int) -> RopeSpec:
    """The rotary parameters cache layer ``layer`` of a dump was rotated with.

    Reads ``rope_specs`` / ``rope_layers`` (per layer), or else the single ``rope_inv_freq`` /
    ``rope_attention_scaling`` of earlier dumps, which hold for every layer.

    Args:
        metadata: the dump's string metadata (``kvpack dump``, ``save_cache``).
        layer: the cache layer index ``i`` of ``layers.{i}.key``.

    Raises:
        InvalidInputError: the dump records no rotary parameters, they are malformed, ``layer`` is
            not one of its layers, or that layer's rotary embedding is one kvpack could not follow.
    """
    if type(layer) is not int or layer < 0:
        raise InvalidInputError(f"a layer index must be a non-negative integer, got {brief(layer)}")
    specs, indices = _parse(metadata)
    count = len(indices) if indices is not None else _recorded_layers(metadata)
    if count is not None and layer >= count:
        raise InvalidInputError(f"layer {layer} is out of range: the dump records rotary parameters for {count} layers")
    spec = specs[indices[layer]] if indices is not None else specs[0]
    if isinstance(spec, str):
        raise InvalidInputError(f"layer {layer} has no rotary parameters kvpack can undo: {brief_text(spec, 300)}")
    return spec


def rope_from_metadata(metadata: dict[str, str]) -> RopeSpec:
    """The one set of rotary parameters every layer of a dump shares (for callers without a layer).

    Raises:
        InvalidInputError: see :func:`rope_for_layer`; also when the layers differ.
    """
    specs, indices = _parse(metadata)
    used = sorted(set(indices)) if indices is not None else [0]
    if len(used) > 1 and indices is not None:
        first, other = indices.index(used[0]), indices.index(used[1])
        raise InvalidInputError(
            f"layers {first} and {other} of this dump use different rotary parameters; take each layer's "
            "with rope_for_layer"
        )
    return rope_for_layer(metadata, 0 if indices is None else indices.index(used[0]))


def cached_first_position(metadata: dict[str, str], tokens: int) -> int:
    """Position of the first of a layer's ``tokens`` cached tokens (the offset un-RoPE starts at).

    Token ``t`` of a dump is at position ``t``; a layer that holds fewer than the dump's
    ``seq_len`` tokens (a sliding-window layer) holds the last ones, so it starts at
    ``seq_len - tokens``. 0 when the metadata records no valid ``seq_len``.
    """
    seq_len = metadata.get("seq_len", "")
    if not (isinstance(seq_len, str) and seq_len.isdigit() and len(seq_len) < 16):
        return 0
    return max(int(seq_len) - int(tokens), 0)


def _parse(metadata: dict[str, str]) -> tuple[list[RopeSpec | str], list[int] | None]:
    """``(specs, per-layer indices)``; indices ``None`` for the single spec of an earlier dump."""
    per_layer = LAYERS_KEY in metadata or SPECS_KEY in metadata
    if not per_layer and "rope_inv_freq" not in metadata:
        raise InvalidInputError(_NOT_RECORDED)
    try:
        if per_layer:
            entries, indices = json.loads(metadata[SPECS_KEY]), json.loads(metadata[LAYERS_KEY])
            if not isinstance(entries, list) or not isinstance(indices, list) or len(indices) > MAX_ROPE_LAYERS:
                raise ValueError(f"{SPECS_KEY} and {LAYERS_KEY} must be lists of at most {MAX_ROPE_LAYERS}")
            if not indices or not all(type(i) is int and 0 <= i < len(entries) for i in indices):
                raise ValueError(f"{LAYERS_KEY} must index {SPECS_KEY} for at least one layer")
            return [_entry(e) for e in entries], indices
        inv_freq = json.loads(metadata["rope_inv_freq"])
        if not isinstance(inv_freq, list) or not all(type(f) in (int, float) for f in inv_freq):
            raise ValueError("rope_inv_freq is not a list of numbers")
        return [RopeSpec(tuple(inv_freq), float(metadata.get("rope_attention_scaling", "1.0")))], None
    except (ValueError, TypeError, KeyError, RecursionError) as exc:  # InvalidInputError is a ValueError
        raise InvalidInputError(f"the dump's rotary parameters are malformed ({brief_text(str(exc))})") from None


def _entry(entry: object) -> RopeSpec | str:
    if isinstance(entry, dict) and set(entry) == {"unsupported"} and isinstance(entry["unsupported"], str):
        return entry["unsupported"]
    if not isinstance(entry, dict) or not set(entry) <= {"inv_freq", "attention_scaling", "layout"}:
        raise ValueError(f"unknown rotary spec {brief(entry)}")
    inv_freq = entry.get("inv_freq")
    if not isinstance(inv_freq, list) or not all(type(f) in (int, float) for f in inv_freq):
        raise ValueError("a rotary spec needs an inv_freq list of numbers")
    if type(entry.get("attention_scaling", 1.0)) not in (int, float):
        raise ValueError("a rotary spec's attention_scaling must be a number")
    return RopeSpec(tuple(entry["inv_freq"]), entry.get("attention_scaling", 1.0), entry.get("layout", ROTATE_HALF))


def _recorded_layers(metadata: dict[str, str]) -> int | None:
    layers = metadata.get("num_layers", "")
    return int(layers) if isinstance(layers, str) and layers.isdigit() and len(layers) < 8 else None


def rotate_keys(
    keys: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float,
    first_position: int,
    inverse: bool,
    layout: str = ROTATE_HALF,
) -> torch.Tensor:
    """Apply RoPE to keys (``inverse=False``) or undo it (``inverse=True``).

    Args:
        keys: float ``(batch, num_kv_heads, seq_len, head_dim)``; token ``t`` is at position
            ``first_position + t``.
        inv_freq: float32 ``(rope_dim / 2,)`` with ``rope_dim <= head_dim``.
        scaling: the factor on cos / sin (``attention_scaling``).
        first_position: position of the first token.
        inverse: undo the rotation (and divide by ``scaling``) instead of applying it.
        layout: ``rotate_half`` (channel ``i`` with ``i + rope_dim / 2``) or ``interleaved``
            (``2i`` with ``2i + 1``); both rotate pair ``i`` by ``p * inv_freq[i]``.

    Returns:
        float32 tensor of the same shape.

    Raises:
        InvalidInputError: ``rope_dim`` larger than ``head_dim``, or an unknown layout.
    """
    half = inv_freq.numel()
    head_dim = keys.shape[-1]
    if 2 * half > head_dim:
        raise InvalidInputError(f"rotary dimension {2 * half} exceeds head_dim {head_dim}")
    if layout not in LAYOUTS:
        raise InvalidInputError(f"rotary layout must be one of {', '.join(LAYOUTS)}, got {brief(layout)}")
    positions = torch.arange(keys.shape[2], dtype=torch.float64) + first_position
    angles = positions[:, None] * inv_freq.to(torch.float64)[None, :]
    cos, sin = torch.cos(angles), torch.sin(angles)
    x = keys.to(torch.float64)
    rotated, rest = x[..., : 2 * half], x[..., 2 * half :]
    if layout == ROTATE_HALF:
        x1, x2 = rotated[..., :half], rotated[..., half:]
    else:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
    if inverse:
        y1 = (x1 * cos + x2 * sin) / scaling
        y2 = (x2 * cos - x1 * sin) / scaling
    else:
        y1 = (x1 * cos - x2 * sin) * scaling
        y2 = (x2 * cos + x1 * sin) * scaling
    pairs = torch.cat([y1, y2], dim=-1) if layout == ROTATE_HALF else torch.stack([y1, y2], dim=-1).flatten(-2)
    return torch.cat([pairs, rest], dim=-1).to(torch.float32)
