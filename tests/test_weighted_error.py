"""The profile-weighted error estimate (kvpack.weighted_error) and its place in compress's report."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kvpack.compress import compress_file
from kvpack.config import CodecConfig
from kvpack.formats.safetensors_io import write_safetensors
from kvpack.transforms.rope import RopeSpec, rope_metadata, rotate_keys
from kvpack.weighted_error import estimated_kl, sink_sensitivity
from tests.profile_helpers import SYNTHETIC_MODEL, correlated_cache, synthetic_profile

HEADS, HEAD_DIM, SEQ = 2, 16, 512


def _with_metadata(profile, **extra):
    return dataclasses.replace(profile, metadata={**profile.metadata, **extra})


def _noise(seed: int, scale: float = 0.1, shape=(1, HEADS, SEQ, HEAD_DIM)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_zero_error_weighs_nothing():
    profile = synthetic_profile(layers=1, heads=HEADS, head_dim=HEAD_DIM)
    x = correlated_cache(layers=1, heads=HEADS, head_dim=HEAD_DIM, seq=SEQ)["layers.0.key"].float()
    assert estimated_kl(profile, "layers.0.key", x, x.clone(), {}) == 0.0


def test_white_noise_weighs_its_variance_times_the_mean_weight():
    # white noise of variance s^2 has coefficient variance s^2 in any orthonormal basis
    profile = _with_metadata(synthetic_profile(layers=1, heads=HEADS, head_dim=HEAD_DIM), sink_sensitivity="[0, 0]")
    x = torch.zeros(1, HEADS, 4096, HEAD_DIM)
    error = _noise(3, 0.2, x.shape)
    mean_weight = float(profile.layer(0, "value").weight.astype(np.float64).mean())
    got = estimated_kl(profile, "layers.0.value", x, x + error, {})
    expected = 0.04 * mean_weight * 4095 / 4096  # the sink token weighs 0 here
    assert got == pytest.approx(expected, rel=0.05)


def test_sink_token_is_weighed_by_the_profiles_sink_factor():
    base = synthetic_profile(layers=1, heads=HEADS, head_dim=HEAD_DIM)
    x = torch.zeros(1, HEADS, SEQ, HEAD_DIM)
    error = torch.zeros_like(x)
    error[:, :, 0] = 0.5  # only the first token is wrong
    plain = estimated_kl(base, "layers.0.value", x, x + error, {})
    weighed = estimated_kl(_with_metadata(base, sink_sensitivity="[1.0, 2.0]"), "layers.0.value", x, x + error, {})
    # without the factor the sink is one token among SEQ; with it, its own weighted error times 2
    assert weighed == pytest.approx(plain * SEQ * 2.0, rel=1e-6)
    # a tensor whose first cached token is not position 0 (a sliding window) has no sink
    later = estimated_kl(
        _with_metadata(base, sink_sensitivity="[1.0, 2.0]"), "layers.0.value", x, x + error, {"seq_len": str(SEQ + 8)}
    )
    assert later == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("bad", ["[1]", "[1, -2]", '["a", 1]', "nope", "[NaN, 1]"])
def test_malformed_sink_factors_are_ignored(bad):
    profile = _with_metadata(synthetic_profile(layers=1, heads=HEADS, head_dim=HEAD_DIM), sink_sensitivity=bad)
    assert sink_sensitivity(profile) == (None, None)


def test_key_error_is_weighed_before_rope():
    """A pre-RoPE profile weighs a cached (post-RoPE) key error as the same error before RoPE."""
    profile = synthetic_profile(layers=1, heads=HEADS, head_dim=HEAD_DIM, keys="pre_rope")
    inv_freq = tuple(float(10000 ** (-2 * i / HEAD_DIM)) for i in range(HEAD_DIM // 2))
    metadata = {**rope_metadata([RopeSpec(inv_freq)]), "seq_len": str(SEQ)}
    pre = _noise(5)
    post = rotate_keys(pre, torch.tensor(inv_freq), 1.0, 0, inverse=False)
    x = torch.zeros_like(pre)
    as_cached = estimated_kl(profile, "layers.0.key", x, x + post, metadata)
    unroped = estimated_kl(_with_metadata(profile, keys="as_cached"), "layers.0.key", x, x + pre, metadata)
    assert as_cached == pytest.approx(unroped, rel=1e-4)
    # without the layer's rotary parameters a pre-RoPE profile cannot weigh keys
    assert estimated_kl(profile, "layers.0.key", x, x + post, {}) is None


def test_foreign_shapes_are_not_weighed():
    profile = synthetic_profile(layers=1, heads=HEADS, head_dim=HEAD_DIM)
    x = torch.zeros(1, HEADS, 8, 2 * HEAD_DIM)
    assert estimated_kl(profile, "layers.0.key", x, x + 1, {}) is None  # another model's features
    assert estimated_kl(profile, "layers.5.key", x[..., :HEAD_DIM], x[..., :HEAD_DIM] + 1, {}) is None
    assert estimated_kl(profile, "token_ids", x, x, {}) is None


def _dump(path, tensors):
    metadata = {"weights_fingerprint": SYNTHETIC_MODEL, "model": "synthetic", "seq_len": str(SEQ)}
    write_safetensors(path, tensors, metadata)


def test_compress_reports_estimated_kl_with_the_models_profile(tmp_path, monkeypatch):
    profile = _with_metadata(synthetic_profile(layers=2, heads=HEADS, head_dim=HEAD_DIM), sink_sensitivity="[3, 1]")
    monkeypatch.setenv("KVPACK_PROFILES", str(tmp_path / "profiles"))
    cache = tmp_path / "c.safetensors"
    _dump(cache, correlated_cache(layers=2, heads=HEADS, head_dim=HEAD_DIM, seq=SEQ))
    config = CodecConfig.build("uniform", 3, 32)
    without = compress_file(cache, tmp_path / "a.kvp", config)
    assert "weighted_by" not in without and "estimated_kl" not in without["rows"]["all"]

    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / f"{SYNTHETIC_MODEL}.safetensors").write_bytes(profile.to_bytes())
    coarse = compress_file(cache, tmp_path / "b.kvp", config)
    fine = compress_file(cache, tmp_path / "c.kvp", CodecConfig.build("uniform", 6, 32))
    assert coarse["weighted_by"] == profile.fingerprint
    rows = coarse["rows"]
    assert rows["all"]["estimated_kl"] == pytest.approx(rows["key"]["estimated_kl"] + rows["value"]["estimated_kl"])
    assert sum(layer["estimated_kl"] for layer in coarse["layers"]) == pytest.approx(rows["all"]["estimated_kl"])
    assert 0 < fine["rows"]["all"]["estimated_kl"] < rows["all"]["estimated_kl"] / 10  # 3 more bits: ~64x less


def test_compress_refuses_a_given_profile_of_another_model(tmp_path):
    from kvpack.errors import InvalidInputError

    profile = _with_metadata(synthetic_profile(layers=2, heads=HEADS, head_dim=HEAD_DIM), weights_fingerprint="ff" * 8)
    path = tmp_path / "p.safetensors"
    path.write_bytes(profile.to_bytes())
    cache = tmp_path / "c.safetensors"
    _dump(cache, correlated_cache(layers=2, heads=HEADS, head_dim=HEAD_DIM, seq=SEQ))
    with pytest.raises(InvalidInputError, match="does not belong|calibrate a profile"):
        compress_file(cache, tmp_path / "a.kvp", CodecConfig.build("uniform", 4, 32), profile=path)
    assert not (tmp_path / "a.kvp").exists()
