import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import norm

from kvpack.codecs import Codec
from kvpack.codecs.adaptive import _lloyd, lloyd_codebooks, nearest_level
from kvpack.codecs.normal import gaussian_bins
from kvpack.compress import compress_tensors
from kvpack.config import CodecConfig
from kvpack.entry import decode_entry, encode_tensor
from kvpack.errors import InvalidInputError
from kvpack.formats.header import TensorEntry
from kvpack.grouping import GroupLayout, outliers_per_side, to_groups
from kvpack.restore.files import load_kvp

FLOATS = st.floats(-1000, 1000, allow_nan=False, allow_infinity=False, width=16)


def _encode_decode(method, bits, groups, layout, mask=None, **options):
    codec = CodecConfig.build(method, bits, layout.group_size, **options).make_codec()
    arrays = codec.encode(groups, layout, mask)
    decoded = codec.decode({k: v.float() if v.is_floating_point() else v.long() for k, v in arrays.items()}, layout)
    return arrays, decoded


def _groups_of(values: np.ndarray) -> tuple[GroupLayout, torch.Tensor]:
    """Layout and ``(n_groups, 8)`` float32 groups of a float16 array drawn by hypothesis."""
    x = torch.from_numpy(values.astype(np.float32))
    layout = GroupLayout(tuple(x.shape), 8)
    return layout, to_groups(x, layout)


@settings(max_examples=150, deadline=None)
@given(
    values=arrays(np.float16, (1, 2, 5, 8), elements=FLOATS),
    bits=st.integers(1, 8),
    symmetric=st.booleans(),
)
def test_uniform_error_is_at_most_half_a_step(values, bits, symmetric):
    layout, groups = _groups_of(values)
    arrays, decoded = _encode_decode("uniform", bits, groups, layout, symmetric=symmetric)
    scale = arrays["scale"][:, None]
    assert arrays["codes"].max() <= (1 << bits) - 1
    assert torch.all((groups - decoded).abs() <= scale / 2 * (1 + 1e-5) + 1e-30)
    # the step is the min/max one (up to float16 rounding of scale and zero-point), not a coarser one
    top = (1 << bits) - 1
    lo, hi = groups.double().amin(1, keepdim=True), groups.double().amax(1, keepdim=True)
    span = 2 * torch.maximum(hi.abs(), lo.abs()) if symmetric else hi - lo + lo.abs() * 2**-10
    assert torch.all(scale.double() <= span / top * (1 + 2**-10) + 2**-24)


def test_uniform_bound_on_real_keys_and_values(real_tensors):
    for name in ("layers.0.key", "layers.0.value", "layers.29.key"):
        x = real_tensors[name].float()
        layout = GroupLayout(tuple(x.shape), 64)
        groups = to_groups(x, layout)
        for bits in (2, 4):
            arrays, decoded = _encode_decode("uniform", bits, groups, layout)
            assert torch.all((groups - decoded).abs() <= arrays["scale"][:, None] / 2 * (1 + 1e-5))


GRID_CODECS = sorted(name for name, codec in Codec.registry.items() if codec.fixed_bits is None)


@pytest.mark.parametrize("method", GRID_CODECS)
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
    x = torch.randn(1, 2, 50, 32) * torch.linspace(0.1, 5, 32)  # float32: no ties
    x[0, 0, 3, 7] = 900.0
    config = CodecConfig.build(method, Codec.registry[method].fixed_bits or 3, 32, ratio)
    entry = TensorEntry("t", tuple(x.shape), "float32", config, {})
    decoded = decode_entry(entry, encode_tensor("t", x, config))
    per_side = {0.02: 1, 0.1: 2}[ratio]  # round(ratio * 32 / 2), at least 1
    assert outliers_per_side(ratio, 32) == per_side
    layout = GroupLayout(tuple(x.shape), 32)
    groups, dec_groups = to_groups(x, layout), to_groups(decoded, layout)
    order = groups.argsort(dim=1)
    extremes = torch.cat([order[:, :per_side], order[:, -per_side:]], dim=1)
    assert torch.equal(dec_groups.gather(1, extremes), groups.gather(1, extremes))
    assert float(decoded[0, 0, 3, 7]) == 900.0
    inliers = torch.ones_like(groups, dtype=torch.bool).scatter_(1, extremes, False)
    rel = ((dec_groups - groups)[inliers] ** 2).sum() / (groups[inliers] ** 2).sum()
    assert rel < 0.1  # the 900 did not stretch its group's grid


def test_outlier_count_rule():
    assert outliers_per_side(0.0, 64) == 0
    assert outliers_per_side(1e-12, 64) == 1  # any positive ratio keeps at least one per side
    assert outliers_per_side(0.1, 20) == 1 and outliers_per_side(0.1, 64) == 3 and outliers_per_side(0.05, 64) == 2
    with pytest.raises(InvalidInputError, match="fewer than 2"):
        outliers_per_side(0.3, 3)


@pytest.mark.parametrize("method", GRID_CODECS)
def test_outliers_do_not_waste_levels(method):
    """Keeping more extremes exactly leaves a narrower middle, which must be coded no worse."""
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((1, 2, 256, 64))
    layout = GroupLayout(tuple(x.shape), 64)
    groups = to_groups(x, layout)
    order = groups.argsort(dim=1)
    errors = []
    for ratio in (0.2, 0.45):
        per_side = outliers_per_side(ratio, 64)
        config = CodecConfig.build(method, 2, 64, ratio)
        entry = TensorEntry("t", tuple(x.shape), "float32", config, {})
        decoded = to_groups(decode_entry(entry, encode_tensor("t", x, config)), layout)
        middle = order[:, per_side:-per_side]
        err = (decoded.gather(1, middle) - groups.gather(1, middle)) ** 2
        errors.append(float(err.sum() / (groups.gather(1, middle) ** 2).sum()))
    assert errors[1] <= errors[0], errors


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
    # and no worse than Lloyd refined from either start alone: the better start is kept per row
    ordered, order = heavy.sort(dim=1)
    w = weights.gather(1, order).double()
    zero = torch.zeros(3, 1, dtype=torch.float64)
    prefix = {
        "mass": torch.cat([zero, w.cumsum(1)], 1),
        "first": torch.cat([zero, (ordered.double() * w).cumsum(1)], 1),
        "second": torch.cat([zero, (ordered.double() ** 2 * w).cumsum(1)], 1),
    }
    for start in (quantiles, grid):
        refined, _ = _lloyd(ordered, prefix, start)
        assert _weighted_mse(heavy, weights, learned) <= _weighted_mse(heavy, weights, refined) * (1 + 1e-6)


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
def test_adaptive_options_through_a_file(real_tensors, tmp_path, scope, normalization, group_size):
    x = real_tensors["layers.3.key"][:, :, :64]
    config = CodecConfig.build("adaptive", 3, group_size, codebook_scope=scope, normalization=normalization)
    compress_tensors({"layers.3.key": x}, tmp_path / "a.kvp", config)
    decoded, _ = load_kvp(tmp_path / "a.kvp")
    rel = float(((decoded["layers.3.key"].float() - x.float()) ** 2).sum() / (x.float() ** 2).sum())
    assert rel < 0.1  # 3-bit adaptive measures 0.02-0.07 on these keys


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


@settings(max_examples=100, deadline=None)
@given(
    values=arrays(np.float16, (1, 2, 4, 8), elements=FLOATS),
    bits=st.integers(1, 8),
    symmetric=st.booleans(),
)
def test_normal_minmax_error_is_at_most_half_the_widest_gap(values, bits, symmetric):
    layout, groups = _groups_of(values)
    arrays, decoded = _encode_decode("normal", bits, groups, layout, symmetric=symmetric, normalization="minmax")
    _, centroids = gaussian_bins(bits)
    scaled = (centroids / centroids.abs().max()).double()
    widest = float((scaled[1:] - scaled[:-1]).max()) if bits > 1 else 2.0
    half_range = arrays["scale"].double()[:, None]
    assert torch.all((groups - decoded).abs().double() <= half_range * widest / 2 * (1 + 1e-5) + 1e-30)


def test_normal_minmax_keeps_key_outliers_that_meanstd_clips(real_tensors):
    x = real_tensors["layers.10.key"].float()
    layout = GroupLayout(tuple(x.shape), 64)
    groups = to_groups(x, layout)
    errors = {}
    for normalization in ("meanstd", "minmax"):
        _, decoded = _encode_decode("normal", 8, groups, layout, normalization=normalization)
        errors[normalization] = float(((decoded - groups) ** 2).sum() / (groups**2).sum())
    assert errors["minmax"] < 2e-3 < errors["meanstd"]
