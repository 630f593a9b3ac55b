"""The adaptive codec (kvpack.codecs.adaptive): Lloyd codebooks and their scopes."""

import pytest
import torch

from kvpack.codecs.adaptive import _lloyd, lloyd_codebooks, nearest_level
from kvpack.compress import compress_tensors
from kvpack.config import CodecConfig
from kvpack.grouping import GroupLayout, to_groups
from kvpack.restore.files import load_kvp
from tests.codec_settings import encode_decode


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


@pytest.mark.model
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_adaptive_no_worse_than_uniform_on_real_cache(real_tensors, bits):
    for role in ("key", "value"):
        sq_err = {"uniform": 0.0, "adaptive": 0.0}
        for layer in (0, 7, 15, 29):
            x = real_tensors[f"layers.{layer}.{role}"].float()
            layout = GroupLayout(tuple(x.shape), 64)
            groups = to_groups(x, layout)
            for method in sq_err:
                _, decoded = encode_decode(method, bits, groups, layout)
                sq_err[method] += float(((decoded - groups) ** 2).sum())
        assert sq_err["adaptive"] <= sq_err["uniform"], (role, bits, sq_err)


@pytest.mark.model
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
