"""Codec settings and helpers several test files share: one of each kind of code section, the codecs that
mix widths, a codec round trip on groups."""

import numpy as np
import torch
from hypothesis import strategies as st

from kvpack.config import CodecConfig
from kvpack.grouping import GroupLayout, to_groups

CODECS = {
    "uniform-4": CodecConfig.build("uniform", 4, 64),
    "uniform-2": CodecConfig.build("uniform", 2, 64),
    "normal-4": CodecConfig.build("normal", 4, 64, normalization="minmax"),
    "adaptive-3": CodecConfig.build("adaptive", 3, 64),
    "kivi-2": CodecConfig.build("uniform", 2, 32, transforms={"key_axis": "channel"}),
    "mxfp4": CodecConfig.build("mxfp4", None, None),
}

#: Codecs (with options) that code groups at mixed widths.
MIXED_CODECS = [
    ("uniform", {}),
    ("normal", {}),
    ("adaptive", {}),
    ("adaptive", {"codebook_scope": "group"}),
    ("mxfp4", {}),
    ("fp8-e4m3", {}),
    ("uniform", {"symmetric": True}),
]

FLOATS = st.floats(-1000, 1000, allow_nan=False, allow_infinity=False, width=16)


def encode_decode(method, bits, groups, layout, mask=None, **options):
    codec = CodecConfig.build(method, bits, layout.group_size, **options).make_codec()
    arrays = codec.encode(groups, layout, mask)
    decoded = codec.decode({k: v.float() if v.is_floating_point() else v.long() for k, v in arrays.items()}, layout)
    return arrays, decoded


def groups_of(values: np.ndarray) -> tuple[GroupLayout, torch.Tensor]:
    """Layout and ``(n_groups, 8)`` float32 groups of a float16 array drawn by hypothesis."""
    x = torch.from_numpy(values.astype(np.float32))
    layout = GroupLayout(tuple(x.shape), 8)
    return layout, to_groups(x, layout)
