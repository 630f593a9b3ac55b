"""The transform codec's coefficient coding (kvpack.codecs.transform): lossless range coding, rate estimates, steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codecs.transform import (
    MAX_SUPPORT,
    TransformParams,
    chunk_statistics,
    code_lengths,
    code_mean,
    component_steps,
    decode_components,
    encode_components,
    kept_components,
    model_ratio,
    quantize,
    reconstruction_levels,
    scale_code,
)
from kvpack.errors import InvalidInputError


def laplace_ints(rows, features, seed, scale=3.0):
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(np.log(0.05), np.log(scale * 4), features))
    return np.rint(rng.laplace(0, scales, (rows, features))).astype(np.int32)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 300),
    features=st.integers(1, 12),
    chunk=st.integers(1, 128),
    seed=st.integers(0, 2**31),
    drop=st.integers(0, 2**12),
)
def test_range_coding_is_lossless(rows, features, chunk, seed, drop):
    kept = np.array([(drop >> j) & 1 == 0 for j in range(features)])
    q = laplace_ints(rows, int(kept.sum()), seed)
    coded = encode_components(q, kept, chunk)
    assert np.array_equal(decode_components(coded, kept, rows, chunk), q)
    assert coded.support.shape == (-(-rows // chunk),) and coded.scales.shape == (-(-rows // chunk), features)
    assert not coded.scales[:, ~kept].any()


def test_stream_matches_the_ideal_code_length():
    q = laplace_ints(4096, 24, seed=1)
    kept = np.ones(24, dtype=bool)
    coded = encode_components(q, kept, 1024)
    sums, counts, codes = chunk_statistics(q, 1024)
    ideal = code_lengths(sums, counts, codes).sum() / 8
    assert np.array_equal(codes, coded.scales)
    assert ideal <= len(coded.stream) <= ideal * 1.01 + 16
    # and close to the order-0 entropy of each chunk's component (the model costs little)
    entropy = 0.0
    for a in range(0, 4096, 1024):
        for column in q[a : a + 1024].T:
            _, counts_ = np.unique(column, return_counts=True)
            p = counts_ / counts_.sum()
            entropy -= (counts_ * np.log2(p)).sum()
    assert len(coded.stream) * 8 <= entropy * 1.05 + 64


def test_all_zero_components_cost_almost_nothing():
    q = np.zeros((2048, 8), dtype=np.int32)
    coded = encode_components(q, np.ones(8, dtype=bool), 1024)
    assert len(coded.stream) <= 16 and not coded.support.any()


def test_model_ratio_is_the_maximum_likelihood_ratio():
    for code in (1, 5, 8, 40, 160, 200, 255):
        m = code_mean(code)
        r = model_ratio(code)
        assert 0 < r < 1 and 2 * r / (1 - r * r) == pytest.approx(m, rel=1e-9)  # E|k| of the two-sided geometric
    assert model_ratio(0) == 0.0 and code_mean(160) == 1.0 and code_mean(168) == 2.0 and code_mean(152) == 0.5
    assert code_mean(161) == pytest.approx(2 ** (1 / 8), rel=1e-15)


def test_scale_codes_round_trip_on_the_log_grid():
    means = np.array([0.0, 1e-7, 1e-3, 0.37, 1.0, 5.5, 1e4])
    codes = scale_code(means)
    assert codes[0] == 0 and codes[1] == 1 and codes[-1] == 255
    for m, code in zip(means[2:-1], codes[2:-1], strict=True):
        assert code_mean(int(code)) == pytest.approx(m, rel=0.05)


def test_steps_follow_reverse_water_filling():
    weight = np.array([4.0, 1.0, 0.25, 0.0], dtype=np.float32)
    steps = component_steps(0.5, weight)
    assert steps[:3] == pytest.approx(np.sqrt(12 * 0.5 / weight[:3]))
    assert np.isinf(steps[3])
    mean_square = np.array([1.0, 1.0, 1.0, 100.0])
    assert kept_components(0.5, weight, mean_square).tolist() == [True, True, False, False]


@pytest.mark.parametrize("deadzone", [0.0, 0.1, 0.3])
def test_quantization_error_is_bounded_by_the_bins(deadzone):
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(500, 6, generator=gen) * torch.tensor([5.0, 2, 1, 0.5, 0.2, 0.1])
    steps = np.array([0.5, 0.3, 0.3, 0.2, 0.4, 1.0], dtype=np.float32)
    kept = np.ones(6, dtype=bool)
    q = quantize(c, steps, kept, deadzone)
    coded = encode_components(q, kept, 128)
    levels = reconstruction_levels(q, coded.scales, 128, deadzone)
    error = (levels * torch.from_numpy(steps) - c).abs() / torch.from_numpy(steps)
    zero = torch.from_numpy(q == 0)
    assert float(error[zero].max()) <= 0.5 + deadzone + 1e-5  # the widened zero bin
    assert float(error[~zero].max()) <= 1.0 + 1e-5  # within its bin of width 1
    assert (np.sign(q) == np.sign(np.rint(c.numpy() / steps)) * (q != 0)).all()


def test_too_fine_steps_are_refused():
    c = torch.full((4, 1), float(MAX_SUPPORT + 10))
    with pytest.raises(InvalidInputError, match="ask for fewer bits"):
        quantize(c, np.ones(1, dtype=np.float32), np.ones(1, dtype=bool), 0.0)


@pytest.mark.parametrize(
    "field, value",
    [("chunk_tokens", 0), ("deadzone", 0.5), ("distortion", -1.0), ("profile", "XYZ"), ("stream_bytes", -1)],
)
def test_params_out_of_range_are_refused(field, value):
    with pytest.raises(InvalidInputError, match=field):
        TransformParams(**{field: value})
