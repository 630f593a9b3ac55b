"""Calibration: a model's profile (:mod:`kvpack.profile`) from its keys, values and queries on calibration text.

For every layer, over all calibration tokens but each sequence's first (the attention sink,
which the transform codec keeps exact):

- **Bases.** The mean and covariance of the keys before RoPE (un-RoPE'd exactly,
  :mod:`kvpack.transforms.rope`) and of the values, all kv heads together (``F = num_kv_heads *
  head_dim``); the eigenvectors of each covariance by decreasing eigenvalue are the basis, the
  eigenvalues the component variances (PCA, as KVTC calibrates it).
- **Error weights**, in the unit of the attention output's squared error. A value error ``dv``
  of a token moves query head ``h``'s output by ``a · W_o,h dv`` (``a`` its attention weight,
  ``W_o,h`` the head's columns of the output projection): the value weight of component ``u``
  is ``u^T M u`` with ``M`` the block-diagonal sum of ``W_o,h^T W_o,h`` over the query heads of
  each kv head. A key error ``dk`` moves the head's logit by ``s · q' dk`` (``q'`` the query
  rotated by the relative position, whose second moments are those of the post-RoPE query
  averaged over each rotary pair; ``s`` the attention scaling), and a logit error moves the
  output by about ``a · W_o,h (v - v̄)``: the key weight is ``u^T D u`` with ``D`` diagonal,
  ``s² E[q'²] E||W_o,h (v - v̄)||²`` summed over the query heads of each kv head. Both carry the
  same ``a²``, so one distortion level serves keys and values of every layer (SQuat / SMAQ weight
  key error by the query covariance; this puts values in the same unit).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kvpack import __version__
from kvpack.errors import InvalidInputError
from kvpack.llama_cpp.gguf_model import read_gguf_model
from kvpack.model.cache import build_cache
from kvpack.model.dump import (
    LoadedModel,
    cache_keyword,
    cache_layers,
    decoder_config,
    model_identity,
    output_cache,
    rope_for_cache,
    run_prefill,
    tokenize,
    weights_fingerprint,
)
from kvpack.model.queries import QueryCapture
from kvpack.profile import ROLES, LayerBasis, Profile, make_profile
from kvpack.transforms.rope import ROTATE_HALF, cached_first_position, rope_for_layer, rotate_keys

#: Tokens per calibration sequence (each a fresh cache).
CALIBRATION_SEQUENCE = 1024
DEFAULT_CALIBRATION_TOKENS = 8192
#: The layer-sensitivity probe: a prefix cache of this many tokens, this many continuation tokens
#: teacher-forced through it, white noise of this relative RMS on one layer's keys or values.
SENSITIVITY_PREFIX = 512
SENSITIVITY_CONTINUATION = 128
SENSITIVITY_NOISE = 0.05
SENSITIVITY_PROBES = 2
#: Tokens of the probe that finds each layer's rotary parameters.
PROBE_TOKENS = 64
#: Identity keys of the model a profile carries.
_IDENTITY_KEYS = ("model", "gguf_file", "model_type", "architecture", "num_layers", "num_kv_heads", "head_dim")


class _Moments:
    """Running sums of ``x`` and ``x x^T`` (float64) over rows ``(n, F)``."""

    def __init__(self, features: int) -> None:
        self.count = 0
        self.total = torch.zeros(features, dtype=torch.float64)
        self.outer = torch.zeros(features, features, dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.double()
        self.count += rows.shape[0]
        self.total += rows.sum(dim=0)
        self.outer += rows.T @ rows

    def mean_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        return mean, self.outer / self.count - torch.outer(mean, mean)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, seq, head_dim)`` -> ``(batch * seq, heads * head_dim)``, head-major features."""
    batch, heads, seq, head_dim = x.shape
    return x.permute(0, 2, 1, 3).reshape(batch * seq, heads * head_dim)


def _output_projection(model: Any, layer: int) -> torch.Tensor | None:
    """The attention output projection's weight ``(hidden, num_heads * head_dim)`` of a layer, if found."""
    attention = [m for m in model.modules() if getattr(m, "layer_idx", None) == layer and hasattr(m, "o_proj")]
    if len(attention) != 1 or not hasattr(attention[0].o_proj, "weight"):
        return None
    return attention[0].o_proj.weight.detach().to("cpu", torch.float64)


@torch.no_grad()
def calibrate(
    loaded: LoadedModel,
    text: str,
    max_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    sequence: int = CALIBRATION_SEQUENCE,
    progress: Callable[[int, int], None] | None = None,
) -> Profile:
    """Run the model over ``text`` (at most ``max_tokens`` tokens, in sequences of ``sequence``) and
    return its calibration profile.

    Raises:
        InvalidInputError: too little text (fewer than 2 tokens per feature), or a model whose
            layers have different kv heads or head_dim.
    """
    model = loaded.model
    identity = model_identity(model, loaded.name, loaded.gguf_file)
    ids = tokenize(loaded.tokenizer, text, max_tokens)
    rope_metadata = rope_for_cache(model, ids[:, :PROBE_TOKENS])
    ropes = [_layer_rope(rope_metadata, layer) for layer in range(len(json.loads(rope_metadata["rope_layers"])))]
    total = ids.shape[1]
    keys: dict[int, _Moments] = {}
    values: dict[int, _Moments] = {}
    queries: dict[int, torch.Tensor] = {}  # (num_heads, head_dim) sums of q^2
    scales: dict[int, float] = {}
    query_count = 0
    with QueryCapture(model) as capture:
        capture.recording = True
        for start in range(0, total, sequence):
            chunk = ids[:, start : start + sequence]
            if chunk.shape[1] < 2:
                continue
            pairs = cache_layers(run_prefill(model, chunk, chunk_size=chunk.shape[1]))
            captured = capture.take()
            for layer, (k, v) in enumerate(pairs):
                first = cached_first_position({"seq_len": str(chunk.shape[1])}, k.shape[2])
                k, v = k[:, :, 1:].float().cpu(), v[:, :, 1:].float().cpu()  # the sink token is kept exact
                rope = ropes[layer]
                inv_freq = torch.tensor(rope.inv_freq, dtype=torch.float32)
                k = rotate_keys(k, inv_freq, rope.attention_scaling, first + 1, inverse=True)
                keys.setdefault(layer, _Moments(k.shape[1] * k.shape[3])).add(_rows(k))
                values.setdefault(layer, _Moments(v.shape[1] * v.shape[3])).add(_rows(v))
                q, scale = captured[layer]
                q_sq = (q[:, :, 1:].double() ** 2).sum(dim=(0, 2))
                queries[layer] = queries.get(layer, 0) + q_sq
                scales[layer] = scale
            query_count += chunk.shape[1] - 1
            if progress:
                progress(min(start + sequence, total), total)
    if not keys:
        raise InvalidInputError("calibration needs at least 2 tokens of text")
    sensitivity, sink_kl, sink_noise = layer_sensitivity(model, ids, len(keys))
    head_dim = int(identity.get("head_dim") or 0) or None
    layers = []
    for layer in range(len(keys)):
        features = keys[layer].total.shape[0]
        if keys[layer].count < 2 * features:
            raise InvalidInputError(
                f"calibration saw {keys[layer].count} tokens, fewer than twice the {features} features per token: "
                "give more text (`--max-tokens`, `--text-file`)"
            )
        q_sq = queries[layer] / query_count
        kv_heads = features // (head_dim or q_sq.shape[1])
        shapes = _layer_profile(
            keys[layer], values[layer], q_sq, scales[layer], kv_heads, _output_projection(model, layer), ropes[layer]
        )
        layers.append({role: _scaled(shapes[role], float(sensitivity[layer, r])) for r, role in enumerate(ROLES)})
    # the sink token: measured KL over what the within-token weights predict for the same noise
    predicted = [
        sum(
            sink_noise[layer, r] * float(layers[layer][role].weight.astype(np.float64).mean())
            for layer in range(len(layers))
        )
        for r, role in enumerate(ROLES)
    ]
    sink = [float(kl / p) if p > 0 else 0.0 for kl, p in zip(sink_kl, predicted, strict=True)]
    text_config = decoder_config(model)
    metadata = {key: identity.get(key, "") for key in _IDENTITY_KEYS}
    metadata.update(
        weights_fingerprint=weights_fingerprint(model),
        num_attention_heads=str(getattr(text_config, "num_attention_heads", "")),
        keys="pre_rope",
        rope_specs=rope_metadata["rope_specs"],
        rope_layers=rope_metadata["rope_layers"],
        calibration_tokens=str(query_count),
        calibration_text_sha256=hashlib.sha256(text.encode()).hexdigest(),
        value_weight="o_proj" if _output_projection(model, 0) is not None else "identity",
        sensitivity=json.dumps([[round(float(v), 6) for v in row] for row in sensitivity.tolist()]),
        sink_sensitivity=json.dumps([round(v, 6) for v in sink]),
        kvpack_version=__version__,
    )
    if loaded.gguf_path:  # llama.cpp state files name their model by the GGUF's fingerprint
        metadata["gguf_fingerprint"] = read_gguf_model(loaded.gguf_path).fingerprint
    return make_profile(layers, metadata)


def _layer_profile(
    keys: _Moments,
    values: _Moments,
    q_sq: torch.Tensor,
    scale: float,
    kv_heads: int,
    w_o: torch.Tensor | None,
    rope,
) -> dict[str, LayerBasis]:
    """One layer's key and value bases and weights (see the module docstring)."""
    num_heads, head_dim = q_sq.shape
    group = num_heads // kv_heads  # query heads per kv head (transformers' repeat_kv order)
    if len(rope.inv_freq):  # average each rotary pair (i, i + half): the relative rotation mixes them
        half = len(rope.inv_freq)
        pair = (q_sq[:, :half] + q_sq[:, half : 2 * half]) / 2
        q_sq = torch.cat([pair, pair, q_sq[:, 2 * half :]], dim=1)
    value_mean, value_cov = values.mean_covariance()
    blocks = []  # per query head: W_o,h^T W_o,h (head_dim, head_dim)
    for head in range(num_heads):
        if w_o is None:
            blocks.append(torch.eye(head_dim, dtype=torch.float64))
        else:
            columns = w_o[:, head * head_dim : (head + 1) * head_dim]
            blocks.append(columns.T @ columns)
    value_metric = torch.zeros(kv_heads * head_dim, kv_heads * head_dim, dtype=torch.float64)
    key_diagonal = torch.zeros(kv_heads * head_dim, dtype=torch.float64)
    for head in range(num_heads):
        kv = head // group
        span = slice(kv * head_dim, (kv + 1) * head_dim)
        value_metric[span, span] += blocks[head]
        spread = float(torch.trace(blocks[head] @ value_cov[span, span]))  # E||W_o,h (v - mean)||^2
        key_diagonal[span] += scale**2 * spread * q_sq[head]
    key_mean, key_cov = keys.mean_covariance()
    return {
        "key": _basis(key_mean, key_cov, lambda basis: (basis**2 * key_diagonal[:, None]).sum(dim=0)),
        "value": _basis(value_mean, value_cov, lambda basis: ((value_metric @ basis) * basis).sum(dim=0)),
    }


def _layer_rope(metadata: dict[str, str], layer: int):
    """A layer's rotary parameters, as un-RoPE needs them (zero frequencies for a layer without RoPE).

    Raises:
        InvalidInputError: a rotary embedding kvpack cannot undo (interleaved pairs, no frequencies).
    """
    spec = rope_for_layer(metadata, layer)
    if spec.layout != ROTATE_HALF:
        raise InvalidInputError(
            f"layer {layer} rotates interleaved channel pairs (GPT-J style RoPE): the transform codec cannot un-RoPE it"
        )
    return spec


def _scaled(basis: LayerBasis, sensitivity: float) -> LayerBasis:
    """``basis`` with its weights in KL per unit squared error: the within-layer shape of the
    attention-output weights (normalized so that white noise of a given relative MSE weighs the
    same in every layer), times the layer's measured sensitivity (:func:`layer_sensitivity`)."""
    energy = float((basis.weight.astype(np.float64) * basis.variance).sum())
    total = float(basis.variance.astype(np.float64).sum())
    if energy <= 0 or total <= 0:
        return LayerBasis(basis.mean, basis.basis, basis.variance, np.zeros_like(basis.weight))
    mean_variance = total / basis.variance.shape[0]
    weight = basis.weight * (total / energy) * (sensitivity / mean_variance)
    return LayerBasis(basis.mean, basis.basis, basis.variance, weight.astype(np.float32))


@torch.no_grad()
def layer_sensitivity(model: Any, ids: torch.Tensor, layers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """KL per unit relative squared error of each layer's keys and values: float64 ``(layers, 2)``;
    and the attention-sink probe: the KL ``(2,)`` of white noise on the first token's keys (values) of
    every layer at once, and that noise's variance per element ``(layers, 2)``.

    On :data:`SENSITIVITY_PROBES` stretches of the calibration tokens, the prefix cache of
    :data:`SENSITIVITY_PREFIX` tokens gets white Gaussian noise of relative RMS
    :data:`SENSITIVITY_NOISE` on one layer's keys (or values), all tokens but the first (kept
    exact by the codec); the mean KL(reference ‖ noisy) of the next-token distributions over
    :data:`SENSITIVITY_CONTINUATION` teacher-forced tokens, divided by the noise's relative MSE,
    is that layer's sensitivity. It sets how the codec spreads its bits across layers and between
    keys and values, measured on the model itself rather than assumed.
    """
    span = SENSITIVITY_PREFIX + SENSITIVITY_CONTINUATION
    starts = [s for s in np.linspace(0, max(ids.shape[1] - span, 0), SENSITIVITY_PROBES).astype(int).tolist()]
    if ids.shape[1] < span:
        raise InvalidInputError(f"calibration needs at least {span} tokens of text, got {ids.shape[1]}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    sink_generator = torch.Generator().manual_seed(1)  # its own: the layer probes' noise stays as it was
    total = np.zeros((layers, len(ROLES)))
    sink_kl, sink_noise = np.zeros(len(ROLES)), np.zeros((layers, len(ROLES)))
    for start in sorted(set(starts)):
        prefix = ids[:, start : start + SENSITIVITY_PREFIX].to(device)
        tokens = ids[:, start + SENSITIVITY_PREFIX : start + span].to(device)
        pairs = [
            (k.detach().clone(), v.detach().clone())
            for k, v in cache_layers(output_cache(model(prefix, use_cache=True)))
        ]

        reference = _log_probs(model, pairs, tokens)
        for layer in range(layers):
            for r in range(len(ROLES)):
                x = pairs[layer][r]
                rms = x[:, :, 1:].float().pow(2).mean().sqrt()
                noise = torch.randn(x.shape, generator=generator).to(x) * SENSITIVITY_NOISE * rms
                noise[:, :, :1] = 0
                noisy = list(pairs)
                noisy[layer] = (x + noise, pairs[layer][1]) if r == 0 else (pairs[layer][0], x + noise)
                logp = _log_probs(model, noisy, tokens)
                kl = float((reference.exp() * (reference - logp)).sum(dim=-1).mean())
                total[layer, r] += max(kl, 0.0) / SENSITIVITY_NOISE**2
        for r in range(len(ROLES)):
            noisy = [list(pair) for pair in pairs]
            for layer in range(layers):
                x = pairs[layer][r]
                rms = x[:, :, :1].float().pow(2).mean().sqrt()
                sink_noise[layer, r] += float(rms * SENSITIVITY_NOISE) ** 2
                noise = torch.zeros_like(x)
                noise[:, :, :1] = (
                    torch.randn(noise[:, :, :1].shape, generator=sink_generator).to(x) * SENSITIVITY_NOISE * rms
                )
                noisy[layer][r] = x + noise
            logp = _log_probs(model, [tuple(pair) for pair in noisy], tokens)
            sink_kl[r] += max(float((reference.exp() * (reference - logp)).sum(dim=-1).mean()), 0.0)
    count = len(set(starts))
    return total / count, sink_kl / count, sink_noise / count


def _log_probs(model: Any, pairs: list, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``(tokens, vocab)`` of ``tokens`` teacher-forced through a cache of ``pairs``."""
    device = next(model.parameters()).device
    cache = build_cache(pairs, model, pairs[0][0].shape[2], device)
    logits = model(input_ids=tokens, use_cache=True, **{cache_keyword(model): cache}).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _basis(mean: torch.Tensor, covariance: torch.Tensor, weigh: Callable[[torch.Tensor], torch.Tensor]) -> LayerBasis:
    eigenvalues, eigenvectors = torch.linalg.eigh((covariance + covariance.T) / 2)
    order = torch.argsort(eigenvalues, descending=True)
    basis = eigenvectors[:, order]
    # fp16 storage: the decoder uses the rounded basis, so weights are computed on it
    rounded = basis.to(torch.float16).double()
    return LayerBasis(
        mean.float().numpy(),
        rounded.float().numpy(),
        eigenvalues[order].clamp_min(0).float().numpy(),
        weigh(rounded).clamp_min(0).float().numpy(),
    )


def calibration_text() -> str:
    """The calibration text that ships with kvpack (``kvpack/data/calibration.txt``: WikiText-2 text
    outside the evaluation windows and Python source; see ``kvpack/data/README.md``)."""
    from importlib.resources import files

    return (files("kvpack") / "data" / "calibration.txt").read_text(encoding="utf-8")
