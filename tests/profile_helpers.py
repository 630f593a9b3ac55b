"""Synthetic correlated caches and a profile calibrated on them (no model): for the transform codec's tests."""

from __future__ import annotations

import numpy as np
import torch

from kvpack.profile import LayerBasis, Profile, make_profile

#: A weights fingerprint for synthetic caches (what a dump's ``weights_fingerprint`` would hold).
SYNTHETIC_MODEL = "00112233aabbccdd"


def mixing(layer: int, role: str, features: int, seed: int = 0) -> torch.Tensor:
    """A fixed ``(features, features)`` mixing matrix with decaying spectrum: correlated features, as in real caches."""
    gen = torch.Generator().manual_seed(1000 * seed + 10 * layer + (role == "value"))
    q, _ = torch.linalg.qr(torch.randn(features, features, generator=gen))
    spectrum = torch.logspace(0.5, -1.5, features)
    return (q * spectrum) @ torch.linalg.qr(torch.randn(features, features, generator=gen))[0].T


def correlated_cache(
    layers: int = 2, heads: int = 2, head_dim: int = 16, seq: int = 96, batch: int = 1, seed: int = 0, text: int = 1
) -> dict[str, torch.Tensor]:
    """``layers.{i}.key|value`` float16 ``(batch, heads, seq, head_dim)``: rows ``z A + mean`` of a fixed mixing
    ``A`` per layer and role (``seed`` picks the model), ``z`` drawn with ``text`` as the seed (another text)."""
    gen = torch.Generator().manual_seed(text)
    features = heads * head_dim
    tensors = {}
    for layer in range(layers):
        for role in ("key", "value"):
            rows = torch.randn(batch * seq, features, generator=gen) @ mixing(layer, role, features, seed) + 0.3
            tensors[f"layers.{layer}.{role}"] = (
                rows.reshape(batch, seq, heads, head_dim).permute(0, 2, 1, 3).contiguous().to(torch.float16)
            )
    tensors["token_ids"] = torch.arange(batch * seq).reshape(batch, seq)
    return tensors


def synthetic_profile(
    layers: int = 2, heads: int = 2, head_dim: int = 16, seed: int = 0, keys: str = "as_cached", rows: int = 4096
) -> Profile:
    """A profile calibrated (PCA, unit weights per relative error) on another draw of :func:`correlated_cache`'s model."""
    features = heads * head_dim
    gen = torch.Generator().manual_seed(12345)
    built = []
    for layer in range(layers):
        entry = {}
        for role in ("key", "value"):
            x = (torch.randn(rows, features, generator=gen) @ mixing(layer, role, features, seed) + 0.3).double()
            mean = x.mean(dim=0)
            values, vectors = torch.linalg.eigh(torch.cov(x.T))
            order = torch.argsort(values, descending=True)
            variance = values[order].clamp_min(0).numpy()
            entry[role] = LayerBasis(
                mean.float().numpy(),
                vectors[:, order].to(torch.float16).float().numpy(),
                variance.astype(np.float32),
                np.full(features, 1.0 / variance.mean(), dtype=np.float32),
            )
        built.append(entry)
    metadata = {
        "model": "synthetic",
        "weights_fingerprint": SYNTHETIC_MODEL,
        "num_layers": str(layers),
        "num_kv_heads": str(heads),
        "head_dim": str(head_dim),
        "keys": keys,
    }
    return make_profile(built, metadata)
