"""The literature's baselines (kvpack.evaluation.baselines): FP8 per head and KIVI."""

from __future__ import annotations

import pytest
import torch

from kvpack.evaluation.baselines import KIVI_GROUP, fp8_per_head, kivi


def test_fp8_baseline_error_and_bits():
    torch.manual_seed(1)
    x = torch.randn(1, 3, 40, 64) * torch.tensor([1.0, 10.0, 0.01])[None, :, None, None]
    x_hat, bits = fp8_per_head(x, torch.float8_e4m3fn)
    assert bits == x.numel() * 8 + 3 * 16
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for values in its normal range
    amax = x.abs().amax(dim=(0, 2, 3), keepdim=True)
    normal = x.abs() >= amax / 448 * 2**-6 * 2
    err = (x - x_hat).abs()
    assert bool((err[normal] <= x.abs()[normal] * 2**-4 * 1.001).all())
    assert bool((x_hat.abs().amax(dim=(0, 2, 3), keepdim=True) <= amax * 1.001).all())


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_groups_keys_per_channel_and_values_per_token(bits):
    torch.manual_seed(2)
    seq = 2 * KIVI_GROUP + 5
    x = torch.randn(1, 2, seq, 64)
    top = 2**bits - 1
    key_hat, key_bits = kivi(x, bits, "key")
    # keys: a group is 32 consecutive tokens of one channel; |err| <= scale / 2 (+ fp16 rounding of the grid)
    body = x[:, :, : 2 * KIVI_GROUP].reshape(1, 2, 2, KIVI_GROUP, 64)
    scale = (body.amax(dim=3) - body.amin(dim=3)) / top
    err = (x[:, :, : 2 * KIVI_GROUP] - key_hat[:, :, : 2 * KIVI_GROUP]).reshape(body.shape).abs()
    assert bool((err <= scale[:, :, :, None, :] * 0.5 * 1.01 + 1e-3).all())
    # the residual tokens are kept as float16
    torch.testing.assert_close(key_hat[:, :, 2 * KIVI_GROUP :], x[:, :, 2 * KIVI_GROUP :].half().float())
    n_groups = 2 * 2 * 64
    assert key_bits == n_groups * KIVI_GROUP * bits + n_groups * 32 + 2 * 5 * 64 * 16
    # values: a group is 32 consecutive channels of one token
    value_hat, value_bits = kivi(x, bits, "value")
    groups = x.reshape(-1, KIVI_GROUP)
    scale = (groups.amax(dim=1) - groups.amin(dim=1)) / top
    assert bool(((groups - value_hat.reshape(-1, KIVI_GROUP)).abs() <= scale[:, None] * 0.5 * 1.01 + 1e-3).all())
    assert value_bits == x.numel() * bits + groups.shape[0] * 32
    # a channel constant over tokens is exact for keys
    const = torch.ones(1, 1, KIVI_GROUP, 64) * (torch.arange(64) / 16 - 2)  # exact in float16
    assert torch.equal(kivi(const, bits, "key")[0], const)
