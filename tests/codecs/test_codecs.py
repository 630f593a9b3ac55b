"""Every grouped codec of the registry: constant groups, outliers, the registry itself."""

import pytest
import torch

from kvpack.codecs import Codec
from kvpack.config import CodecConfig
from kvpack.entry import decode_entry, encode_tensor
from kvpack.errors import InvalidInputError
from kvpack.formats.header import TensorEntry
from kvpack.grouping import GroupLayout, outliers_per_side, to_groups
from tests.codec_settings import encode_decode

GROUPED = sorted(
    name for name, codec in Codec.registry.items() if not codec.whole_tensor
)  # transform: tests/transforms
GRID_CODECS = sorted(name for name in GROUPED if Codec.registry[name].fixed_bits is None)


@pytest.mark.parametrize("method", GRID_CODECS)
def test_constant_and_zero_groups_are_exact(method):
    x = torch.zeros(1, 1, 4, 16)
    x[0, 0, 1] = 3.5
    x[0, 0, 2] = -0.25
    layout = GroupLayout(tuple(x.shape), 16)
    _, decoded = encode_decode(method, 3, to_groups(x, layout), layout)
    assert torch.equal(decoded, to_groups(x, layout))


@pytest.mark.parametrize("method", GROUPED)
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


def test_codec_registry_rejects_duplicate_names():
    with pytest.raises(TypeError, match="already registered"):

        class Duplicate(Codec):  # noqa: F841
            name = "uniform"
