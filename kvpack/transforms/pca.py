"""Whole-tensor transform coding: a K/V tensor <-> its sections, through the layer's PCA basis.

For ``layers.{i}.key|value`` of shape ``(batch, num_kv_heads, seq_len, head_dim)`` and a config
of the transform codec (:mod:`kvpack.codecs.transform`) carrying its profile (:mod:`kvpack.profile`):

1. The first ``keep_first`` and last ``keep_last`` tokens are stored exactly (section ``kept``).
2. Keys are un-RoPE'd (:mod:`kvpack.transforms.rope`) when ``unrope``: profiles hold pre-RoPE keys.
3. Each coded token's vector over all kv heads (``F = num_kv_heads * head_dim`` features, head-major)
   minus the profile's mean is projected on the profile's basis: coefficients ``(n, F)``.
4. The tensor's own mean of each coefficient is stored (section ``shift``, float16) and taken off;
   the coefficients are quantized and range-coded (:mod:`kvpack.codecs.transform`): sections
   ``components`` (1 bit per component: kept), ``support`` (int32 per chunk), ``scales`` (8-bit
   code per chunk and component) and ``stream`` (the range coder's bytes).

Decoding reverses 4 to 1 (docs/format.md §6.5 is normative). The sections are decoded whole.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kvpack.codecs.base import FP16_MAX, KIND_CODES, KIND_EXACT, KIND_SCALES, KIND_TRANSFORM, SCOPE_ENTRY, SectionSpec
from kvpack.codecs.transform import (
    CodedComponents,
    chunk_bounds,
    component_steps,
    decode_components,
    encode_components,
    kept_components,
    quantize,
    reconstruction_levels,
)
from kvpack.config import CodecConfig
from kvpack.dtypes import as_uint8, from_bytes, tensor_bytes
from kvpack.errors import FormatError, InvalidInputError
from kvpack.names import parse_kv_name
from kvpack.packing import pack, unpack
from kvpack.transforms.rope import rotate_keys

FP16_LIMIT = FP16_MAX / 2


def token_split(shape: tuple[int, ...], config: CodecConfig) -> tuple[int, int, int]:
    """``(first, coded, last)`` token counts of a tensor: exact first, coded, exact last."""
    tokens = shape[2]
    first = min(config.keep_first, tokens)
    last = min(config.keep_last, tokens - first)
    return first, tokens - first - last, last


def transform_specs(shape: tuple[int, ...], dtype: str, config: CodecConfig, name: str) -> dict[str, SectionSpec]:
    """The sections of a transform-coded tensor ``name``, in file order (see the module docstring;
    keys un-RoPE'd also store the rotary frequencies, section ``rope_inv_freq``).

    Raises:
        InvalidInputError: not a 4-D ``(batch, num_kv_heads, seq_len, head_dim)`` shape.
    """
    if len(shape) != 4:
        raise InvalidInputError(
            f"a KV tensor must have shape (batch, num_kv_heads, seq_len, head_dim), got {tuple(shape)}"
        )
    batch, heads, _, head_dim = shape
    first, coded, last = token_split(shape, config)
    features = heads * head_dim
    chunks = math.ceil(batch * coded / config.params.chunk_tokens)
    specs = {
        "kept": SectionSpec(KIND_EXACT, dtype, batch * heads * (first + last) * head_dim, scope=SCOPE_ENTRY),
        "components": SectionSpec(KIND_SCALES, "code", features, 1, SCOPE_ENTRY),
        "shift": SectionSpec(KIND_SCALES, "float16", features, scope=SCOPE_ENTRY),
        "support": SectionSpec(KIND_SCALES, "int32", chunks, scope=SCOPE_ENTRY),
        "scales": SectionSpec(KIND_SCALES, "code", chunks * features, 8, SCOPE_ENTRY),
        "stream": SectionSpec(KIND_CODES, "uint8", config.params.stream_bytes, scope=SCOPE_ENTRY),
    }
    if _unropes(name, config):
        specs["rope_inv_freq"] = SectionSpec(KIND_TRANSFORM, "float32", config.rope_dim // 2, scope=SCOPE_ENTRY)
    return specs


def _unropes(name: str, config: CodecConfig) -> bool:
    parsed = parse_kv_name(name)
    return config.unrope and parsed is not None and parsed[1] == "key"


def layer_basis(name: str, shape: tuple[int, ...], config: CodecConfig):
    """``(role, the profile's LayerBasis)`` of tensor ``name`` of this shape.

    Raises:
        InvalidInputError: not a K/V tensor, no profile or not the config's, or one of another model.
    """
    parsed = parse_kv_name(name)
    if parsed is None:
        raise InvalidInputError(f"the transform codec codes layers.<i>.key|value tensors, not {name!r}")
    profile = config.profile
    if profile is None or profile.fingerprint != config.params.profile:
        raise InvalidInputError(
            f"decoding needs calibration profile {config.params.profile or '?'} (pass --profile / `profile=`)"
        )
    layer, role = parsed
    basis = profile.layer(layer, role)
    features = shape[1] * shape[3]
    if basis.features != features:
        raise InvalidInputError(
            f"{profile.label} has {basis.features} features per token in layer {layer}, but {name!r} has "
            f"{shape[1]} kv heads x {shape[3]} head_dim = {features}: the profile belongs to another model"
        )
    return role, basis


def coefficients(name: str, x: torch.Tensor, config: CodecConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens (``(batch, heads, first + last, head_dim)`` in ``x``'s dtype) and the coded
    tokens' coefficients (float32 ``(batch * coded, F)``) of ``x``."""
    role, basis = layer_basis(name, tuple(x.shape), config)
    first, coded, last = token_split(tuple(x.shape), config)
    kept = torch.cat([x[:, :, :first], x[:, :, first + coded :]], dim=2)
    rows = x[:, :, first : first + coded].float()
    if role == "key" and config.unrope:
        if config.rope_inv_freq is None or len(config.rope_inv_freq) != config.rope_dim // 2:
            raise InvalidInputError("un-RoPE needs the model's rotary frequencies (see CodecConfig.with_rope)")
        inv_freq = torch.tensor(config.rope_inv_freq, dtype=torch.float32)
        rows = rotate_keys(rows, inv_freq, config.rope_scaling, config.rope_offset + first, inverse=True)
    batch, heads, _, head_dim = x.shape
    rows = rows.permute(0, 2, 1, 3).reshape(batch * coded, heads * head_dim)
    return kept, (rows - torch.from_numpy(basis.mean)) @ torch.from_numpy(basis.basis)


def coefficient_shift(c: torch.Tensor) -> torch.Tensor:
    """float32 ``(F,)``: the tensor's own mean of each coefficient, rounded to float16 (stored; the
    profile's mean comes from other text, and what it misses would be error in a dropped component
    and bits in a kept one)."""
    if not c.shape[0]:
        return torch.zeros(c.shape[1])
    return c.mean(dim=0).clamp(-FP16_LIMIT, FP16_LIMIT).to(torch.float16).float()


def encode_transform(name: str, x: torch.Tensor, config: CodecConfig) -> tuple[CodecConfig, dict[str, bytes]]:
    """Encode one K/V tensor; returns the entry's config (with ``stream_bytes``) and its sections.

    Args:
        x: float16 / bfloat16 / float32 ``(batch, num_kv_heads, seq_len, head_dim)``, finite.
        config: a transform-codec config with its profile and a distortion level above 0.

    Raises:
        InvalidInputError: no profile or the wrong one, no distortion level, or steps too fine.
    """
    if config.params.distortion <= 0:
        raise InvalidInputError("the transform codec needs a distortion level (`distortion`) or `target_bits`")
    role, basis = layer_basis(name, tuple(x.shape), config)
    kept_tokens, c = coefficients(name, x, config)
    theta = config.params.distortion
    shift = coefficient_shift(c)
    c = c - shift
    mean_square = (c.double() ** 2).mean(dim=0).numpy() if c.shape[0] else np.zeros(c.shape[1])
    kept = kept_components(theta, basis.weight, mean_square)
    q = quantize(c, component_steps(theta, basis.weight), kept, config.params.deadzone)
    coded = encode_components(q, kept, config.params.chunk_tokens)
    entry_config = config.with_params(stream_bytes=len(coded.stream))
    sections = {
        "kept": tensor_bytes(kept_tokens.contiguous()),
        "components": pack(kept.astype(np.uint8), 1).tobytes(),
        "shift": tensor_bytes(shift.to(torch.float16)),
        "support": coded.support.astype("<i4").tobytes(),
        "scales": pack(coded.scales.reshape(-1), 8).tobytes(),
        "stream": coded.stream,
    }
    if _unropes(name, config):
        sections["rope_inv_freq"] = np.asarray(config.rope_inv_freq, dtype="<f4").tobytes()
    return entry_config, sections


def decode_transform(
    name: str, shape: tuple[int, ...], dtype: str, config: CodecConfig, sections: dict[str, bytes | np.ndarray]
) -> torch.Tensor:
    """Inverse of :func:`encode_transform`: float32 ``shape``.

    Raises:
        InvalidInputError: the profile is missing or is not the file's.
        FormatError: sections no encoder writes (a support beyond the limit, an undecodable stream).
    """
    role, basis = layer_basis(name, shape, config)
    batch, heads, _, head_dim = shape
    first, coded, last = token_split(shape, config)
    features = heads * head_dim
    rows = batch * coded
    chunks = len(chunk_bounds(rows, config.params.chunk_tokens))
    kept = unpack(as_uint8(sections["components"]), 1, features).astype(bool)
    support = np.frombuffer(bytes(as_uint8(sections["support"])), dtype="<i4")
    scales = unpack(as_uint8(sections["scales"]), 8, chunks * features).reshape(chunks, features)
    theta = config.params.distortion
    steps = component_steps(theta, basis.weight)
    if (kept & ~np.isfinite(steps)).any():
        raise FormatError(f"tensor {name!r}: a kept component has no step (weight 0)")
    coded_components = CodedComponents(support, scales, bytes(as_uint8(sections["stream"])))
    try:
        q = decode_components(coded_components, kept, rows, config.params.chunk_tokens)
    except (ValueError, RuntimeError, OverflowError, AssertionError) as exc:  # constriction: AssertionError
        raise FormatError(f"tensor {name!r}: the transform stream cannot be decoded ({exc})") from None
    shift = from_bytes(sections["shift"], "float16").float()
    if not bool(torch.isfinite(shift).all()):
        raise FormatError(f"tensor {name!r}: section shift holds NaN or infinite values")
    c = shift.repeat(rows, 1)
    values = reconstruction_levels(q, scales[:, kept], config.params.chunk_tokens, config.params.deadzone)
    index = torch.from_numpy(np.flatnonzero(kept))
    c[:, index] += values * torch.from_numpy(steps[kept])
    x = c @ torch.from_numpy(basis.basis).T + torch.from_numpy(basis.mean)
    x = x.reshape(batch, coded, heads, head_dim).permute(0, 2, 1, 3)
    if role == "key" and config.unrope:
        inv_freq = from_bytes(sections["rope_inv_freq"], "float32")
        if not bool(torch.isfinite(inv_freq).all()) or bool((inv_freq < 0).any()):
            raise FormatError(f"tensor {name!r}: rotary frequencies must be finite and non-negative")
        x = rotate_keys(x, inv_freq, config.rope_scaling, config.rope_offset + first, inverse=False)
    exact = from_bytes(sections["kept"], dtype).reshape(batch, heads, first + last, head_dim).float()
    return torch.cat([exact[:, :, :first], x, exact[:, :, first:]], dim=2)
