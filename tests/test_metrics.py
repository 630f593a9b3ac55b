"""The fused error pass gives the float64 torch path's statistics (only the order of additions differs)."""

import math

import pytest
import torch

from kvpack.metrics import ErrorAccumulator
from kvpack.metrics_kernel import VECTORS_PER_TASK


def torch_path(ref, rec):
    acc = ErrorAccumulator()
    acc._add_vectors(ref.reshape(-1, ref.shape[-1]), rec.reshape(-1, rec.shape[-1]))
    return acc


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3, 7, 64), (2, 1, VECTORS_PER_TASK + 5, 16), (1, 1, 1, 1), (5, 3)])
def test_fused_error_pass_matches_the_torch_path(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    ref = (torch.randn(shape, generator=gen) * 4).to(dtype)
    rec = (ref.float() + 0.05 * torch.randn(shape, generator=gen)).to(dtype)
    flat_ref, flat_rec = ref.reshape(-1, shape[-1]), rec.reshape(-1, shape[-1])
    flat_ref[0].zero_()  # a pair of zero vectors counts as cosine 1
    flat_rec[0].zero_()
    if flat_ref.shape[0] > 1:
        flat_ref[1].zero_()  # a zero reference against a non-zero reconstruction counts as 0
    fused = ErrorAccumulator()
    fused.add(ref, rec)
    expected = torch_path(ref, rec)
    assert (fused.elements, fused.vectors) == (expected.elements, expected.vectors)
    assert fused.max_abs_err == expected.max_abs_err  # a max: exact in any order
    for name in ("sum_sq_err", "sum_sq_ref", "cosine_sum"):
        assert math.isclose(getattr(fused, name), getattr(expected, name), rel_tol=1e-12, abs_tol=1e-300), name


def test_identical_halves_have_no_error():
    x = torch.randn(1, 2, 33, 64).half()
    acc = ErrorAccumulator()
    acc.add(x, x.clone())
    result = acc.result()
    assert result["rel_mse"] == 0.0 and result["max_abs_err"] == 0.0 and result["snr_db"] is None
    assert result["cosine_mean"] == pytest.approx(1.0, abs=1e-12)


def test_mixed_float16_and_bfloat16_pair():
    x = torch.randn(1, 1, 10, 8)
    acc = ErrorAccumulator()
    acc.add(x.half(), x.bfloat16())
    expected = torch_path(x.half(), x.bfloat16())
    assert math.isclose(acc.sum_sq_err, expected.sum_sq_err, rel_tol=1e-12)
