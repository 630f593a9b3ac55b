"""The normal codec (kvpack.codecs.normal): Gaussian bin centroids, minmax and meanstd normalization."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import norm

from kvpack.codecs.normal import gaussian_bins
from kvpack.grouping import GroupLayout, to_groups
from tests.codec_settings import FLOATS, encode_decode, groups_of


def test_normal_levels_are_gaussian_bin_centroids():
    for bits in (1, 2, 3, 4, 8):
        edges, levels = gaussian_bins(bits)
        n = 1 << bits
        # every bin has probability 1/n under N(0, 1)
        full = np.concatenate([[-np.inf], edges.double().numpy(), [np.inf]])
        assert np.allclose(np.diff(norm.cdf(full)), 1 / n, atol=1e-6)
        # each level lies inside its bin, levels are symmetric, and match a numeric conditional mean
        assert np.all((levels.numpy() > full[:-1]) & (levels.numpy() < full[1:]))
        assert torch.allclose(levels, -levels.flip(0), atol=1e-5)
        grid = np.linspace(full[1] - 8 if n > 1 else -8, full[-2] + 8 if n > 1 else 8, 400_001)
        dens = norm.pdf(grid)
        idx = np.searchsorted(full[1:-1], grid)
        numeric = np.bincount(idx, grid * dens, n) / np.bincount(idx, dens, n)
        assert np.allclose(levels.numpy(), numeric, atol=2e-3)


def test_normal_codec_reconstructs_gaussian_data_at_expected_error():
    torch.manual_seed(1)
    x = torch.randn(1, 4, 512, 64) * 2 + 1
    layout = GroupLayout(tuple(x.shape), 64)
    groups = to_groups(x, layout)
    _, decoded = encode_decode("normal", 4, groups, layout)
    centered = groups - groups.mean(dim=1, keepdim=True)
    rel = ((decoded - groups) ** 2).sum() / (centered**2).sum()
    # equiprobable 16-level quantizer of a Gaussian: MSE about 0.0134 sigma^2 (1 - sum(levels^2)/16)
    _, levels = gaussian_bins(4)
    expected = 1 - float((levels**2).mean())
    assert abs(float(rel) - expected) < 0.01


@settings(max_examples=100, deadline=None)
@given(
    values=arrays(np.float16, (1, 2, 4, 8), elements=FLOATS),
    bits=st.integers(1, 8),
    symmetric=st.booleans(),
)
def test_normal_minmax_error_is_at_most_half_the_widest_gap(values, bits, symmetric):
    layout, groups = groups_of(values)
    arrays, decoded = encode_decode("normal", bits, groups, layout, symmetric=symmetric, normalization="minmax")
    _, centroids = gaussian_bins(bits)
    scaled = (centroids / centroids.abs().max()).double()
    widest = float((scaled[1:] - scaled[:-1]).max()) if bits > 1 else 2.0
    half_range = arrays["scale"].double()[:, None]
    assert torch.all((groups - decoded).abs().double() <= half_range * widest / 2 * (1 + 1e-5) + 1e-30)


@pytest.mark.model
def test_normal_minmax_keeps_key_outliers_that_meanstd_clips(real_tensors):
    x = real_tensors["layers.10.key"].float()
    layout = GroupLayout(tuple(x.shape), 64)
    groups = to_groups(x, layout)
    errors = {}
    for normalization in ("meanstd", "minmax"):
        _, decoded = encode_decode("normal", 8, groups, layout, normalization=normalization)
        errors[normalization] = float(((decoded - groups) ** 2).sum() / (groups**2).sum())
    assert errors["minmax"] < 2e-3 < errors["meanstd"]
