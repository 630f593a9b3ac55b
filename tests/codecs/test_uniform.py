"""The uniform codec (kvpack.codecs.uniform): the error bound of its grid."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kvpack.grouping import GroupLayout, to_groups
from tests.codec_settings import FLOATS, encode_decode, groups_of


@settings(max_examples=150, deadline=None)
@given(
    values=arrays(np.float16, (1, 2, 5, 8), elements=FLOATS),
    bits=st.integers(1, 8),
    symmetric=st.booleans(),
)
def test_uniform_error_is_at_most_half_a_step(values, bits, symmetric):
    layout, groups = groups_of(values)
    arrays, decoded = encode_decode("uniform", bits, groups, layout, symmetric=symmetric)
    scale = arrays["scale"][:, None]
    assert arrays["codes"].max() <= (1 << bits) - 1
    assert torch.all((groups - decoded).abs() <= scale / 2 * (1 + 1e-5) + 1e-30)
    # the step is the min/max one (up to float16 rounding of scale and zero-point), not a coarser one
    top = (1 << bits) - 1
    lo, hi = groups.double().amin(1, keepdim=True), groups.double().amax(1, keepdim=True)
    span = 2 * torch.maximum(hi.abs(), lo.abs()) if symmetric else hi - lo + lo.abs() * 2**-10
    assert torch.all(scale.double() <= span / top * (1 + 2**-10) + 2**-24)


@pytest.mark.model
def test_uniform_bound_on_real_keys_and_values(real_tensors):
    for name in ("layers.0.key", "layers.0.value", "layers.29.key"):
        x = real_tensors[name].float()
        layout = GroupLayout(tuple(x.shape), 64)
        groups = to_groups(x, layout)
        for bits in (2, 4):
            arrays, decoded = encode_decode("uniform", bits, groups, layout)
            assert torch.all((groups - decoded).abs() <= arrays["scale"][:, None] / 2 * (1 + 1e-5))
