import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import norm

from kvpack.api import decode_entry, encode_tensor
from kvpack.codecs import Codec
from kvpack.codecs.adaptive import lloyd_codebooks, nearest_level
from kvpack.codecs.normal import gaussian_bins
from kvpack.config import CodecConfig
from kvpack.errors import InvalidInputError
from kvpack.formats.header import TensorEntry
from kvpack.grouping import GroupLayout, outliers_per_side, split_outliers, to_groups

FLOATS = st.floats(-1000, 1000, allow_nan=False, allow_infinity=False, width=16)


def _encode_decode(method, bits, groups, layout, mask=None, **options):
    codec = CodecConfig.build(method, bits, layout.group_size, **options).make_codec()
    arrays = codec.encode(groups, layout, mask)
    decoded = codec.decode({k: v.float() if v.is_floating_point() else v.long() for k, v in arrays.items()}, layout)
    return arrays, decoded


@settings(max_examples=150, deadline=None)
@given(
    values=arrays(np.float16, (1, 2, 5, 8), elements=FLOATS),
    bits=st.integers(1, 8),
    symmetric=st.booleans(),
)
def test_uniform_error_is_at_most_half_a_step(values, bits, symmetric):
    x = torch.from_numpy(values.astype(np.float32))
    layout = GroupLayout(tuple(x.shape), 8)
    groups = to_groups(x, layout)
    arrays, decoded = _encode_decode("uniform", bits, groups, layout, symmetric=symmetric)
    scale = arrays["scale"][:, None]
    assert arrays["codes"].max() <= (1 << bits) - 1
    assert torch.all((groups - decoded).abs() <= scale / 2 * (1 + 1e-5) + 1e-30)


def test_uniform_bound_on_real_keys_and_values(real_tensors):
    for name in ("layers.0.key", "layers.0.value", "layers.29.key"):
        x = real_tensors[name].float()
        layout = GroupLayout(tuple(x.shape), 64)
        groups = to_groups(x, layout)
        for bits in (2, 4):
            arrays, decoded = _encode_decode("uniform", bits, groups, layout)
            assert torch.all((groups - decoded).abs() <= arrays["scale"][:, None] / 2 * (1 + 1e-5))


@pytest.mark.parametrize("method", sorted(Codec.registry))
def test_constant_and_zero_groups_are_exact(method):
    x = torch.zeros(1, 1, 4, 16)
    x[0, 0, 1] = 3.5
    x[0, 0, 2] = -0.25
    layout = GroupLayout(tuple(x.shape), 16)
    _, decoded = _encode_decode(method, 3, to_groups(x, layout), layout)
    assert torch.equal(decoded, to_groups(x, layout))


@pytest.mark.parametrize("method", sorted(Codec.registry))
@pytest.mark.parametrize("ratio", [0.02, 0.1])
def test_outliers_restored_exactly_and_rest_bounded(method, ratio):
    torch.manual_seed(0)
    x = (torch.randn(1, 2, 50, 32) * torch.linspace(0.1, 5, 32)).half()
    x[0, 0, 3, 7] = 900.0
    config = CodecConfig.build(method, 3, 32, ratio)
    sections = encode_tensor("t", x, config)
    entry = TensorEntry("t", tuple(x.shape), "float16", config, {})
    decoded = decode_entry(entry, sections, dtype=torch.float32)
    layout = GroupLayout(tuple(x.shape), 32)
    groups = to_groups(x.float(), layout)
    per_side = outliers_per_side(ratio, 32)
    positions, values, mask = split_outliers(groups, per_side)
    dec_groups = to_groups(decoded, layout)
    assert torch.equal(torch.gather(dec_groups, 1, positions), values)
    assert float(decoded[0, 0, 3, 7]) == 900.0
    # the big outlier did not enter the statistics: the rest is reconstructed closely
    inliers = mask
    rel = ((dec_groups - groups)[inliers] ** 2).sum() / (groups[inliers] ** 2).sum()
    assert rel < 0.1


def test_outlier_ratio_needs_inliers():
    with pytest.raises(InvalidInputError, match="fewer than 2"):
        outliers_per_side(0.3, 3)


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
    _, decoded = _encode_decode("normal", 4, groups, layout)
    centered = groups - groups.mean(dim=1, keepdim=True)
    rel = ((decoded - groups) ** 2).sum() / (centered**2).sum()
    # equiprobable 16-level quantizer of a Gaussian: MSE about 0.0134 sigma^2 (1 - sum(levels^2)/16)
    _, levels = gaussian_bins(4)
    expected = 1 - float((levels**2).mean())
    assert abs(float(rel) - expected) < 0.01


def _weighted_mse(values, weights, codebook):
    recon = torch.gather(codebook, 1, nearest_level(values, codebook))
    return float(((values - recon) ** 2 * weights).sum())


def test_lloyd_codebook_is_near_a_fixed_point_and_beats_its_start():
    torch.manual_seed(2)
    values = torch.randn(3, 5000)
    weights = torch.rand(3, 5000)
    codebook = lloyd_codebooks(values, weights, 8)
    assert torch.all(codebook[:, 1:] >= codebook[:, :-1])
    cells = nearest_level(values, codebook)
    for row in range(3):
        for level in range(8):
            sel = cells[row] == level
            mean = (values[row][sel] * weights[row][sel]).sum() / weights[row][sel].sum()
            spacing = float((codebook[row, 1:] - codebook[row, :-1])[max(level - 1, 0) : level + 1].min())
            assert abs(float(mean - codebook[row, level])) < 0.05 * spacing
    heavy = values**3
    learned = lloyd_codebooks(heavy, weights, 8)
    quantiles = torch.quantile(heavy, (torch.arange(8) + 0.5) / 8, dim=1).T.contiguous()
    lo, hi = heavy.amin(1, keepdim=True), heavy.amax(1, keepdim=True)
    grid = (lo + (hi - lo) * torch.linspace(0, 1, 8)).contiguous()
    assert _weighted_mse(heavy, weights, learned) < _weighted_mse(heavy, weights, quantiles)
    assert _weighted_mse(heavy, weights, learned) < _weighted_mse(heavy, weights, grid)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_adaptive_no_worse_than_uniform_on_real_cache(real_tensors, bits):
    for role in ("key", "value"):
        sq_err = {"uniform": 0.0, "adaptive": 0.0}
        for layer in (0, 7, 15, 29):
            x = real_tensors[f"layers.{layer}.{role}"].float()
            layout = GroupLayout(tuple(x.shape), 64)
            groups = to_groups(x, layout)
            for method in sq_err:
                _, decoded = _encode_decode(method, bits, groups, layout)
                sq_err[method] += float(((decoded - groups) ** 2).sum())
        assert sq_err["adaptive"] <= sq_err["uniform"], (role, bits, sq_err)


@pytest.mark.parametrize("scope", ["tensor", "head", "group"])
@pytest.mark.parametrize("normalization", ["minmax", "meanstd"])
@pytest.mark.parametrize("group_size", [16, 64, 192])
def test_adaptive_options_round_trip_through_file_bytes(real_tensors, scope, normalization, group_size):
    x = real_tensors["layers.3.key"][:, :, :64]
    config = CodecConfig.build("adaptive", 3, group_size, codebook_scope=scope, normalization=normalization)
    entry = TensorEntry("k", tuple(x.shape), "float16", config, {})
    decoded = decode_entry(entry, encode_tensor("k", x, config), dtype=torch.float32)
    rel = float(((decoded - x.float()) ** 2).sum() / (x.float() ** 2).sum())
    assert rel < 0.2


def test_codec_registry_rejects_duplicate_names():
    with pytest.raises(TypeError, match="already registered"):

        class Duplicate(Codec):  # noqa: F841
            name = "uniform"


def test_config_validation_messages():
    with pytest.raises(InvalidInputError, match="bits must be an integer from 1 to 8"):
        CodecConfig.build("uniform", 9)
    with pytest.raises(InvalidInputError, match="unknown method 'zip'"):
        CodecConfig.build("zip")
    with pytest.raises(InvalidInputError, match="unknown option"):
        CodecConfig.build("uniform", codebook_scope="head")
    with pytest.raises(InvalidInputError, match="codebook_scope must be one of"):
        CodecConfig.build("adaptive", codebook_scope="layer")
    with pytest.raises(InvalidInputError, match="outlier ratio"):
        CodecConfig.build("uniform", outlier_ratio=float("nan"))
    config = CodecConfig.build("adaptive", 3, 32, 0.05, codebook_scope="group")
    assert CodecConfig.from_dict(config.to_dict()) == config


def test_encode_rejects_nan_inf_and_bad_shapes():
    config = CodecConfig.build("uniform", 4, 8)
    bad = torch.zeros(1, 1, 4, 8)
    bad[0, 0, 2, 3] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        encode_tensor("layers.0.key", bad, config)
    bad[0, 0, 2, 3] = float("inf")
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        encode_tensor("layers.0.key", bad, config)
    with pytest.raises(InvalidInputError, match="shape"):
        encode_tensor("layers.0.key", torch.zeros(4, 8), config)
    with pytest.raises(InvalidInputError, match="does not divide"):
        encode_tensor("layers.0.key", torch.zeros(1, 1, 4, 12), config)
    with pytest.raises(InvalidInputError, match="float16 range"):
        encode_tensor("layers.0.key", torch.full((1, 1, 4, 8), 1e6), config)
