"""The fused encode / decode of plain token-axis tensors (:mod:`kvpack.codecs.kernels`), bit for bit the torch path.

A tensor takes the fast path when it is float16 or bfloat16, its codec is ``uniform``,
``normal`` with ``minmax`` normalization, or ``adaptive`` with ``minmax`` normalization and a
``tensor`` or ``head`` codebook scope, its groups lie on the token axis, it has no outliers,
protected tokens, rotation, un-RoPE, stacked layers or mixed widths, and its codes are stored
feature-major (format 1.5 §6.3, the default). Everything else goes through
:class:`kvpack.transforms.plan.TensorPlan`. Both give the same bytes (``tests/test_fused.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from kvpack.codecs.base import FP16_MAX, check_fp16_range
from kvpack.config import CodecConfig
from kvpack.dtypes import check_finite
from kvpack.errors import InvalidInputError
from kvpack.packing import packed_nbytes
from kvpack.transforms.plan import TensorPlan

HALF_DTYPES = (torch.float16, torch.bfloat16)
#: Output dtypes of the decode kernel (``kvpack.codecs.kernels.OUT_*``); numba is imported on first use.
OUT_KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def plain_codec(config: CodecConfig, plan: TensorPlan) -> bool:
    """True when the tensor's codec has a fused path (:meth:`kvpack.codecs.base.Codec.fuses`) and its
    layout is one the kernels handle (see the module docstring)."""
    return (
        not config.width_counts
        and not config.stack_layers
        and config.outlier_ratio == 0
        and config.rotate == "none"
        and not plan.unrope
        and plan.axis == "token"
        and plan.kept_tokens == 0
        and plan.layout.n_elements > 0
        and config.make_codec().fuses()
    )


def can_encode(x: torch.Tensor, config: CodecConfig | None, plan: TensorPlan, transposes: dict[str, int]) -> bool:
    return (
        config is not None
        and x.dtype in HALF_DTYPES
        and plain_codec(config, plan)
        and transposes.get("codes") == plan.layout.features
    )


def encode(name: str, x: torch.Tensor, config: CodecConfig, plan: TensorPlan) -> dict[str, torch.Tensor | bytes]:
    """The arrays of a plain tensor's sections, ``codes`` already packed feature-major (bytes).

    Raises:
        InvalidInputError: NaN / Inf values, or values beyond the float16 range of the metadata
            (the messages of the torch path).
    """
    from kvpack.codecs import kernels  # first use of numba: header-only commands never load it

    layout = plan.layout
    batch, heads, tokens, head_dim = layout.shape
    group, bits = layout.group_size, config.bits
    bits16, table = kernels.half_bits(x)
    lo = np.empty(layout.n_groups, np.float32)
    hi = np.empty(layout.n_groups, np.float32)
    if kernels.group_min_max(bits16, table, batch, heads, tokens, head_dim, group, lo, hi):
        check_finite(name, x)  # raises, naming the count
    lo_t, hi_t = torch.from_numpy(lo), torch.from_numpy(hi)
    peak = torch.maximum(lo_t.abs(), hi_t.abs())
    if layout.n_groups and float(peak.max()) > FP16_MAX / 2:
        try:
            check_fp16_range(peak[:, None])  # raises
        except InvalidInputError as exc:
            raise InvalidInputError(f"tensor {name!r}: {exc}") from None
    top = (1 << bits) - 1
    fused = config.make_codec().fused_encoding(lo_t, hi_t, x, layout)
    offset, scale = fused.offset, fused.scale
    bounds = np.zeros((1, 1), np.float32)
    guesses = np.zeros((1, 1), np.int64)
    books = _books(layout, fused.book_per_head)
    if fused.levels is not None:
        levels = fused.levels
        inner = ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()  # as nearest_level / torch.bucketize compare
        edges = torch.linspace(-1.0, 1.0, kernels.LEVEL_CELLS + 1)[:-1].expand(inner.shape[0], -1).contiguous()
        guesses = torch.searchsorted(inner, edges).numpy()
        bounds = inner.numpy()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = np.zeros(packed_nbytes(layout.n_elements, bits), np.uint8)
    kernels.pack_feature_major(
        bits16,
        table,
        batch,
        heads,
        tokens,
        head_dim,
        group,
        bits,
        fused.mode,
        offset.contiguous().numpy(),
        safe.contiguous().numpy(),
        top,
        bounds,
        guesses,
        books,
        codes,
    )
    arrays: dict[str, torch.Tensor | bytes] = dict(fused.arrays)
    arrays["codes"] = codes.tobytes()
    return arrays


def _books(layout, per_head: bool) -> np.ndarray:
    """The codebook of every feature: its kv head's, or the one book."""
    if per_head:
        return np.arange(layout.features, dtype=np.int64) // layout.shape[3]
    return np.zeros(layout.features, np.int64)


def can_decode(entry, out_dtype: torch.dtype) -> bool:
    codes = entry.sections.get("codes")
    return (
        entry.codec is not None
        and out_dtype in OUT_KINDS
        and codes is not None
        and plain_codec(entry.codec, entry.plan)
        and codes.transpose == entry.plan.layout.features
    )


def decode(entry, codes: np.ndarray, arrays: dict[str, torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """A plain tensor from its feature-major code bytes and its float32 ``scale`` / ``zero_point`` /
    ``codebook`` arrays, as ``out_dtype`` of the entry's shape.

    Raises:
        InvalidInputError: decoded values that overflow float32 (no encoder writes such scales).
    """
    from kvpack.codecs import kernels  # first use of numba

    config, layout = entry.codec, entry.plan.layout
    batch, heads, tokens, head_dim = layout.shape
    levels, per_head = config.make_codec().fused_levels(arrays)
    books = _books(layout, per_head)
    has_zero = "zero_point" in arrays
    zero = arrays["zero_point"] if has_zero else torch.zeros(1)
    kind = OUT_KINDS[out_dtype]
    values = torch.empty(layout.n_elements, dtype=out_dtype)  # torch's allocator, like the torch path's output
    out = values.numpy() if kind == kernels.OUT_FLOAT32 else values.view(torch.int16).numpy().view(np.uint16)
    bad = kernels.unpack_feature_major(
        codes,
        batch,
        heads,
        tokens,
        head_dim,
        layout.group_size,
        config.bits,
        levels.contiguous().numpy(),
        books,
        arrays["scale"].contiguous().numpy(),
        zero.contiguous().numpy(),
        has_zero,
        kind,
        out,
    )
    if bad:
        raise InvalidInputError("decoded values overflow float32; no encoder writes such scales")
    return values.reshape(entry.shape)
