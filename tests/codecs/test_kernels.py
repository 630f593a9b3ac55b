"""The numba kernels (kvpack.codecs.kernels): float32 -> float16 / bfloat16 rounding exactly as torch rounds."""

import numba
import numpy as np
import torch

from kvpack.codecs.kernels import bfloat16_bits_of, float16_bits_of


@numba.njit
def _convert(values, half, brain):
    bits = values.view(np.uint32)
    for i in range(values.size):
        half[i] = float16_bits_of(bits[i])
        brain[i] = bfloat16_bits_of(bits[i])


def test_float32_to_half_rounding_matches_torch():
    gen = np.random.default_rng(0)
    patterns = gen.integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0x33000000, 0x33000001, 0x38800000, 0x387FFFFF, 0x477FEFFF, 0x477FF000, 0x7F800000, 0x3F801000])
    patterns = np.concatenate([patterns, edges.astype(np.uint32), edges.astype(np.uint32) | 0x80000000])
    values = patterns.view(np.float32)
    values = values[~np.isnan(values)]  # NaN payloads may differ; NaN stays NaN (checked below)
    half, brain = np.empty(values.size, np.uint16), np.empty(values.size, np.uint16)
    _convert(values, half, brain)
    expected = torch.from_numpy(values)
    assert np.array_equal(half, expected.half().view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(brain, expected.bfloat16().view(torch.int16).numpy().view(np.uint16))
    nan_half, nan_brain = np.empty(1, np.uint16), np.empty(1, np.uint16)
    _convert(np.array([np.nan], np.float32), nan_half, nan_brain)
    assert np.isnan(nan_half.view(np.float16)[0])
    assert np.isnan((nan_brain.astype(np.uint32) << 16).view(np.float32)[0])
