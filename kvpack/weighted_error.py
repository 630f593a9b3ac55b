"""The error of a decoded K/V tensor weighted where the model sees it: an estimate of the KL it causes.

Relative MSE treats every channel alike, so it can rank codecs against their effect on the model
(issue 17: a learned codebook with half of uniform's relMSE had four times its KL). A calibration
profile (:mod:`kvpack.profile`, ``kvpack calibrate``) carries, per layer and role, a PCA basis and
per-component weights in KL per unit squared error: within a layer the queries' second moments
(keys; SQuat / SMAQ weight key error by the query covariance) or the output projection (values),
across layers and between keys and values the layer's measured sensitivity (white noise on one
layer's keys or values, KL of the next-token distributions). The estimate of one tensor is the
mean over its tokens and components of ``weight · (basis^T e)²``, ``e`` the error (keys un-RoPE'd
first when the profile's keys are pre-RoPE); summed over tensors it estimates the KL divergence of
the next-token distributions. The first token of a sequence (the attention sink, which most heads
attend to whatever the length) is weighed apart: its weighted error, not averaged over the tokens,
times the profile's ``sink_sensitivity`` (calibration's measured KL of white noise on the first
token over what the per-token weights predict for it). Profiles without it weigh the sink as any token.
"""

from __future__ import annotations

import json
import math

import torch

from kvpack.errors import InvalidInputError
from kvpack.names import parse_kv_name
from kvpack.profile import Profile
from kvpack.transforms.rope import cached_first_position, rope_for_layer, rotate_keys

#: Tokens projected at once (bounded memory on long caches).
TOKENS_PER_STEP = 4096


def estimated_kl(
    profile: Profile, name: str, original: torch.Tensor, decoded: torch.Tensor, metadata: dict[str, str]
) -> float | None:
    """The profile-weighted error of one K/V tensor, in nats of KL divergence (an estimate).

    Args:
        profile: the model's calibration profile.
        name: ``layers.{i}.key`` or ``layers.{i}.value``.
        original, decoded: float tensors ``(batch, num_kv_heads, seq_len, head_dim)``.
        metadata: the dump's metadata (each layer's rotary parameters, for un-RoPE'ing key errors).

    Returns:
        The estimate, or ``None`` when the tensor cannot be weighed: not a K/V tensor of the profile's
        shape, or keys whose layer records no rotary parameters kvpack can undo while the profile's
        keys are pre-RoPE.
    """
    parsed = parse_kv_name(name)
    if parsed is None or original.ndim != 4 or original.shape != decoded.shape:
        return None
    layer, role = parsed
    try:
        basis = profile.layer(layer, role)
    except InvalidInputError:
        return None
    batch, heads, tokens, head_dim = original.shape
    if basis.features != heads * head_dim:
        return None
    error = decoded.float() - original.float()
    first = cached_first_position(metadata, tokens)
    if role == "key" and profile.metadata.get("keys") == "pre_rope":
        try:
            spec = rope_for_layer(metadata, layer)
        except InvalidInputError:
            return None
        inv_freq = torch.tensor(spec.inv_freq, dtype=torch.float32)
        error = rotate_keys(error, inv_freq, spec.attention_scaling, first, inverse=True, layout=spec.layout)
    rows = error.permute(0, 2, 1, 3).reshape(batch * tokens, heads * head_dim)
    if rows.shape[0] == 0:
        return 0.0
    projection = torch.from_numpy(basis.basis).float()
    weight = torch.from_numpy(basis.weight).double()

    def weighed(part: torch.Tensor) -> float:
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, part.shape[0], TOKENS_PER_STEP):
            coefficients = part[start : start + TOKENS_PER_STEP] @ projection
            total += (coefficients.double().pow(2).sum(dim=0) * weight).sum()
        return float(total) / basis.features

    sink = sink_sensitivity(profile)[role == "value"]
    if sink is None or first != 0:
        return weighed(rows) / rows.shape[0]
    per_sequence = error.permute(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)
    rest = weighed(per_sequence[:, 1:].reshape(-1, heads * head_dim)) / max(batch * (tokens - 1), 1)
    return rest + sink * weighed(per_sequence[:, 0]) / batch


def sink_sensitivity(profile: Profile) -> tuple[float | None, float | None]:
    """The profile's sink factors for keys and values (``sink_sensitivity`` metadata), else ``(None, None)``."""
    try:
        factors = json.loads(profile.metadata.get("sink_sensitivity", "null"))
    except ValueError:
        return None, None
    if (
        not isinstance(factors, list)
        or len(factors) != 2
        or not all(type(f) in (int, float) and math.isfinite(f) and f >= 0 for f in factors)
    ):
        return None, None
    return float(factors[0]), float(factors[1])
