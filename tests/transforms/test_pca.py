"""Whole-tensor transform coding (kvpack.transforms.pca) on correlated synthetic caches and a synthetic profile."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kvpack.config import CodecConfig
from kvpack.entry import decode_entry, encode_entry
from kvpack.errors import InvalidInputError
from kvpack.formats.header import TensorEntry, section_specs, spec_nbytes
from kvpack.transforms.pca import coefficients, decode_transform, encode_transform, token_split
from kvpack.transforms.rope import rotate_keys
from tests.profile_helpers import correlated_cache, synthetic_profile


@pytest.fixture(scope="module")
def profile():
    return synthetic_profile()


def config(profile, distortion, **transforms):
    transforms = {"unrope": False, **transforms}
    return (
        CodecConfig.build("transform", transforms=transforms).with_profile(profile).with_params(distortion=distortion)
    )


def rel_mse(x, y):
    return float(((x.float() - y.float()) ** 2).sum() / (x.float() ** 2).sum())


@pytest.mark.parametrize("role", ["key", "value"])
def test_round_trip_error_falls_with_the_distortion(profile, role):
    x = correlated_cache(seq=200, text=7)[f"layers.1.{role}"]
    name = f"layers.1.{role}"
    errors, sizes = [], []
    for theta in (1e-1, 1e-2, 1e-3, 1e-4):
        cfg, sections = encode_transform(name, x, config(profile, theta))
        assert set(sections) == set(section_specs(tuple(x.shape), "float16", cfg, name))
        for section, spec in section_specs(tuple(x.shape), "float16", cfg, name).items():
            assert len(sections[section]) == spec_nbytes(spec), section
        y = decode_transform(name, tuple(x.shape), "float16", cfg, sections)
        errors.append(rel_mse(x[:, :, 1:], y[:, :, 1:]))
        sizes.append(len(sections["stream"]))
        assert torch.equal(y[:, :, :1].half(), x[:, :, :1])  # the sink token is exact
    assert errors == sorted(errors, reverse=True) and sizes == sorted(sizes)
    assert errors[-1] < 1e-4  # fine steps: close to the fp16 input
    # at high rate the weighted error tracks the distortion level: E = theta / w per kept component
    weight = float(profile.layer(1, role).weight[0])
    assert errors[-1] * float((x[:, :, 1:].float() ** 2).mean()) * x.shape[1] * x.shape[3] < 3 * 1e-4 / weight * 32


def test_every_coefficient_is_within_its_bin(profile):
    x = correlated_cache(seq=128, text=3)["layers.0.value"]
    cfg, sections = encode_transform("layers.0.value", x, config(profile, 1e-3))
    y = decode_transform("layers.0.value", tuple(x.shape), "float16", cfg, sections)
    _, c = coefficients("layers.0.value", x, cfg)
    _, c_hat = coefficients("layers.0.value", y, cfg)
    steps = np.sqrt(12 * 1e-3 / profile.layer(0, "value").weight)
    kept = np.unpackbits(np.frombuffer(sections["components"], np.uint8), bitorder="little")[: c.shape[1]].astype(bool)
    # zero bin: |c| <= (1/2 + deadzone) step; other bins decode to their centroid, within the bin's width
    bound = torch.from_numpy(steps * max(1.0, 0.5 + cfg.params.deadzone) + 1e-3)
    assert bool(((c - c_hat).abs()[:, kept] <= bound[kept]).all())


def test_kept_tokens_batches_and_empty(profile):
    x = correlated_cache(seq=40, batch=2, text=5)["layers.0.key"]
    cfg = config(profile, 1e-3, keep_first=3, keep_last=5)
    assert token_split(tuple(x.shape), cfg) == (3, 32, 5)
    cfg, sections = encode_transform("layers.0.key", x, cfg)
    y = decode_transform("layers.0.key", tuple(x.shape), "float16", cfg, sections).half()
    assert torch.equal(y[:, :, :3], x[:, :, :3]) and torch.equal(y[:, :, -5:], x[:, :, -5:])
    assert rel_mse(x, y) < 1e-2
    short = x[:, :, :6]  # every token kept: nothing coded
    cfg2, sections = encode_transform("layers.0.key", short, config(profile, 1e-3, keep_first=3, keep_last=5))
    assert cfg2.params.stream_bytes == 0
    assert torch.equal(decode_transform("layers.0.key", tuple(short.shape), "float16", cfg2, sections).half(), short)


def test_unrope_keys_round_trip(profile):
    x = correlated_cache(seq=64, text=2)["layers.0.key"].float()
    inv_freq = tuple(10000.0 ** (-torch.arange(0, 16, 2).double() / 16).numpy())
    roped = rotate_keys(x, torch.tensor(inv_freq, dtype=torch.float32), 1.0, 0, inverse=False).half()
    cfg = config(profile, 1e-4, unrope=True).with_rope(inv_freq, 1.0)
    cfg, sections = encode_transform("layers.0.key", roped, cfg)
    assert "rope_inv_freq" in sections
    y = decode_transform("layers.0.key", tuple(roped.shape), "float16", cfg, sections)
    assert rel_mse(roped, y) < 1e-3


def test_entry_path_and_wrong_profiles(profile):
    x = correlated_cache(seq=50)["layers.1.value"]
    cfg, sections = encode_entry("layers.1.value", x, config(profile, 1e-3))
    entry = TensorEntry("layers.1.value", tuple(x.shape), "float16", cfg, {})
    assert rel_mse(x, decode_entry(entry, sections)) < 1e-2
    stripped = dataclasses.replace(entry, codec=dataclasses.replace(cfg, profile=None))
    with pytest.raises(InvalidInputError, match=cfg.params.profile):
        decode_entry(stripped, sections)
    other = synthetic_profile(heads=1)  # a profile of another model shape
    with pytest.raises(InvalidInputError, match="another model"):
        encode_entry("layers.1.value", x, config(other, 1e-3))
    with pytest.raises(InvalidInputError, match="distortion"):
        encode_entry(
            "layers.1.value", x, CodecConfig.build("transform", transforms={"unrope": False}).with_profile(profile)
        )
    with pytest.raises(InvalidInputError, match="NaN"):
        encode_entry("layers.1.value", torch.full_like(x, float("nan")), config(profile, 1e-3))


def test_options_that_do_not_apply_are_refused():
    for transforms in ({"rotate": "hadamard"}, {"key_axis": "channel"}, {"stack_layers": True}):
        with pytest.raises(InvalidInputError, match="do not apply"):
            CodecConfig.build("transform", transforms=transforms)
    with pytest.raises(InvalidInputError, match="do not apply"):
        CodecConfig.build("transform", outlier_ratio=0.01)
