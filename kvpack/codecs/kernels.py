"""Fused CPU kernels (numba) for the common case of the grouped codecs: one pass per step.

The torch pipeline (:mod:`kvpack.transforms.plan`) makes several passes over a tensor: float32 copy,
group view, min/max, scale, round, clamp, pack, feature-major transpose. For a plain token-axis
tensor (float16 or bfloat16, no outliers, protected tokens, rotation, un-RoPE or mixed widths,
codes stored feature-major, format 1.5 §6.3) these kernels do the same work in two passes to
encode (group statistics, then codes packed straight into the feature-major stream) and one to
decode (codes to values of the output dtype), on every core (``numba.prange``).

The results are exactly those of the torch path: the same float32 operations in the same order
(no fused multiply-add: numba does not contract without ``fastmath``), rounding half to even
(``np.rint``, like ``torch.round``), and float16 / bfloat16 outputs rounded to nearest even, as
``torch.Tensor.to`` does. ``tests/test_fused.py`` checks the codes and the decoded values
against the torch path bit for bit on real caches. Speed: ``bench/speed.py``.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

from kvpack import packing
from kvpack.codecs.base import FUSED_UNIFORM_ASYMMETRIC, FUSED_UNIFORM_SYMMETRIC

# the bit order of packed codes is packing's (one owner): compiled here
_append_code = njit(cache=True, inline="always")(packing.append_code)
_append_byte = njit(cache=True, inline="always")(packing.append_byte)

#: Features one kernel task packs: a cache line of float16 values, and a whole number of bytes
#: of codes at any width (32 * m * bits is a multiple of 8), so tasks never share an output byte.
FEATURE_BLOCK = 32
#: Tokens (rows) one decode task handles.
ROW_BLOCK = 512

#: Cells of [-1, 1] (where min/max-normalized values lie) the level search starts from.
LEVEL_CELLS = 512
OUT_FLOAT16, OUT_BFLOAT16, OUT_FLOAT32 = 0, 1, 2

#: float32 value of every float16 / bfloat16 bit pattern (256 KiB each: the table stays in cache).
_HALF_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
FLOAT16_VALUES = _HALF_BITS.view(np.float16).astype(np.float32)
BFLOAT16_VALUES = (_HALF_BITS.astype(np.uint32) << 16).view(np.float32)


def set_threads(threads: int) -> None:
    """Use ``threads`` cores in the kernels (at most numba's pool size)."""
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))


@njit(cache=True, inline="always")
def float16_bits_of(x):
    """float32 bits ``x`` (uint32) -> float16 bits, round to nearest even, overflow to infinity (as
    ``torch.Tensor.half``)."""
    sign = (x >> np.uint32(16)) & np.uint32(0x8000)
    x = x & np.uint32(0x7FFFFFFF)
    if np.uint32(0x38800000) <= x < np.uint32(0x477FF000):  # a normal float16 (the common case)
        # adding 0xFFF plus the lowest kept bit, then dropping 13 bits, rounds half to even
        x = x - np.uint32(0x38000000)
        return np.uint16(((x + np.uint32(0x0FFF) + ((x >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)) | sign)
    if x >= np.uint32(0x7F800000):  # inf or NaN
        return np.uint16(np.uint32(0x7C00) | (np.uint32(0x200) if x > np.uint32(0x7F800000) else np.uint32(0)) | sign)
    if x >= np.uint32(0x477FF000):  # >= 65520: rounds to infinity
        return np.uint16(np.uint32(0x7C00) | sign)
    if x <= np.uint32(0x33000000):  # at most 2^-25: rounds to zero (2^-25 is a tie, to even 0)
        return np.uint16(sign)
    exponent = x >> np.uint32(23)  # a subnormal float16
    mantissa = (x & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    shift = np.uint32(126) - exponent
    half = mantissa >> shift
    rest = mantissa & ((np.uint32(1) << shift) - np.uint32(1))
    tie = np.uint32(1) << (shift - np.uint32(1))
    if rest > tie or (rest == tie and (half & np.uint32(1))):
        half += np.uint32(1)
    return np.uint16(half | sign)


@njit(cache=True, inline="always")
def bfloat16_bits_of(x):
    """float32 bits ``x`` (uint32) -> bfloat16 bits, round to nearest even (NaN stays NaN), as
    ``torch.Tensor.bfloat16``."""
    if (x & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((x >> np.uint32(16)) | np.uint32(0x40))
    rounding = np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))
    return np.uint16((x + rounding) >> np.uint32(16))


@njit(parallel=True, cache=True)
def group_min_max(x, table, batch, heads, tokens, head_dim, group, lo, hi):
    """Per token-axis group: min and max of the values (float32); returns the count of NaN / Inf.

    ``x``: the uint16 bits of a contiguous ``(batch, heads, tokens, head_dim)`` float16 /
    bfloat16 tensor, flattened; ``table``: float32 of every bit pattern; ``lo``, ``hi``:
    float32 ``(n_groups,)`` outputs, groups in §5 order (rows of ``heads * head_dim`` features).
    """
    per_row = heads * head_dim // group
    bad = 0
    for row in prange(batch * tokens):
        b = row // tokens
        s = row - b * tokens
        g = row * per_row
        count = 0
        low = np.float32(np.inf)
        high = np.float32(-np.inf)
        for h in range(heads):
            base = ((b * heads + h) * tokens + s) * head_dim
            for d in range(head_dim):
                v = table[x[base + d]]
                bad += not (v - v == 0)
                low = min(low, v)
                high = max(high, v)
                count += 1
                if count == group:
                    lo[g] = low + np.float32(0.0)  # a zero is +0.0, as in the torch path
                    hi[g] = high + np.float32(0.0)
                    g += 1
                    count = 0
                    low = np.float32(np.inf)
                    high = np.float32(-np.inf)
    return bad


@njit(cache=True, inline="always")
def _code_of(v, mode, zero, scale, top, half_top, bounds, guesses, book, n_bounds):
    if mode == FUSED_UNIFORM_ASYMMETRIC:
        q = np.rint((v - zero) / scale)
        return np.int64(min(max(q, np.float32(0.0)), np.float32(top)))
    if mode == FUSED_UNIFORM_SYMMETRIC:
        q = np.rint(v / scale + half_top)
        return np.int64(min(max(q, np.float32(0.0)), np.float32(top)))
    z = (v - zero) / scale
    # a first guess from the cell of z in [-1, 1], then the exact count of bounds below z
    cell = min(max(np.int64((z + np.float32(1.0)) * np.float32(LEVEL_CELLS / 2)), 0), LEVEL_CELLS - 1)
    position = np.int64(guesses[book, cell])
    while position > 0 and bounds[book, position - 1] >= z:
        position -= 1
    while position < n_bounds and bounds[book, position] < z:
        position += 1
    return position


@njit(parallel=True, cache=True)
def pack_feature_major(
    x,
    table,
    batch,
    heads,
    tokens,
    head_dim,
    group,
    bits,
    mode,
    offset,
    scale,
    top,
    bounds,
    guesses,
    book_of_feature,
    out,
):
    """Codes of every value, packed ``bits`` wide into the feature-major stream of format 1.5 §6.3.

    ``mode`` (:data:`kvpack.codecs.base.FUSED_LEVELS` and the others): uniform asymmetric ``q =
    clamp(rint((v - offset[g]) / scale[g]), 0, top)``; uniform symmetric ``q = clamp(rint(v / scale[g]
    + top / 2), 0, top)``; levels: ``z = (v - offset[g]) / scale[g]`` and ``q`` = the number of
    ``bounds[book]`` below ``z`` (``torch.bucketize``), with
    ``book = book_of_feature[feature]``, ``bounds`` float32 ``(books, 2**bits - 1)`` sorted, and
    ``guesses`` int64 ``(books, LEVEL_CELLS)``: a count of bounds near each cell of ``[-1, 1]`` to start
    from (any start gives the exact count; a good one saves steps). ``scale`` is already safe (no zeros). ``out``: zeroed
    uint8 of ``ceil(n * bits / 8)`` bytes. Each task packs ``FEATURE_BLOCK`` features, tokens
    in tiles of ``ROW_BLOCK`` (a tile's cache lines stay in cache while its features are read).
    """
    features = heads * head_dim
    rows = batch * tokens
    per_row = features // group
    blocks = (features + FEATURE_BLOCK - 1) // FEATURE_BLOCK
    half_top = np.float32(top / 2.0)
    n_bounds = bounds.shape[1]
    plane = tokens * head_dim
    for block in prange(blocks):
        c0 = block * FEATURE_BLOCK
        c1 = min(features, c0 + FEATURE_BLOCK)
        acc = np.zeros(FEATURE_BLOCK, np.int64)
        filled = np.zeros(FEATURE_BLOCK, np.int64)
        position = np.zeros(FEATURE_BLOCK, np.int64)
        for c in range(c0, c1):
            start = c * rows * bits
            position[c - c0] = start // 8
            filled[c - c0] = start % 8  # the first byte is shared with the previous feature: OR into it
        for r0 in range(0, rows, ROW_BLOCK):
            r1 = min(rows, r0 + ROW_BLOCK)
            for c in range(c0, c1):
                k = c - c0
                h = c // head_dim
                column = h * plane + (c - h * head_dim)
                book = book_of_feature[c]
                gcol = c // group
                word = acc[k]
                used = filled[k]
                at = position[k]
                b = r0 // tokens
                s = r0 - b * tokens
                src = b * heads * plane + s * head_dim + column
                g = r0 * per_row + gcol
                for _ in range(r0, r1):
                    v = table[x[src]]
                    src += head_dim
                    s += 1
                    if s == tokens:  # next batch row
                        s = 0
                        src += (heads - 1) * plane
                    code = _code_of(v, mode, offset[g], scale[g], top, half_top, bounds, guesses, book, n_bounds)
                    g += per_row
                    word = _append_code(word, used, code)
                    used += bits
                    if used >= 32:  # four whole bytes (the first may be shared with the previous feature)
                        out[at] |= np.uint8(word & 0xFF)
                        out[at + 1] = np.uint8((word >> 8) & 0xFF)
                        out[at + 2] = np.uint8((word >> 16) & 0xFF)
                        out[at + 3] = np.uint8((word >> 24) & 0xFF)
                        word >>= 32
                        at += 4
                        used -= 32
                acc[k] = word
                filled[k] = used
                position[k] = at
        for k in range(c1 - c0):
            word = acc[k]
            used = filled[k]
            at = position[k]
            while used > 0:
                out[at] |= np.uint8(word & 0xFF)
                word >>= 8
                at += 1
                used -= 8


@njit(parallel=True, cache=True)
def unpack_feature_major(
    codes, batch, heads, tokens, head_dim, group, bits, levels, book_of_feature, scale, zero, has_zero, out_kind, out
):
    """Values of every element from the feature-major stream: ``levels[book, q] * scale[g] (+ zero[g])``
    in float32, written as ``out_kind`` (float16 / bfloat16 bits into uint16 ``out``, or float32).
    Returns the count of non-finite float32 results (no encoder writes scales that give them)."""
    features = heads * head_dim
    rows = batch * tokens
    per_row = features // group
    blocks = (features + FEATURE_BLOCK - 1) // FEATURE_BLOCK
    chunks = (rows + ROW_BLOCK - 1) // ROW_BLOCK
    mask = np.uint64((1 << bits) - 1)
    n_bytes = codes.shape[0]
    plane = tokens * head_dim
    bad = 0
    for task in prange(blocks * chunks):
        block = task // chunks
        chunk = task - block * chunks
        c0 = block * FEATURE_BLOCK
        c1 = min(features, c0 + FEATURE_BLOCK)
        r0 = chunk * ROW_BLOCK
        r1 = min(rows, r0 + ROW_BLOCK)
        scratch = np.empty(1, np.float32)  # read back as uint32: the float's bits
        scratch_bits = scratch.view(np.uint32)
        for c in range(c0, c1):
            h = c // head_dim
            column = h * plane + (c - h * head_dim)
            book = book_of_feature[c]
            gcol = c // group
            bit = (c * rows + r0) * bits
            at = bit >> 3
            used = bit & 7
            word = np.uint64(0)
            have = 0  # bits in word
            while have < 56 and at < n_bytes:
                word = _append_byte(word, np.uint64(have), np.uint64(codes[at]))
                at += 1
                have += 8
            word >>= np.uint64(used)
            have -= used
            b = r0 // tokens
            s = r0 - b * tokens
            index = b * heads * plane + s * head_dim + column
            g = r0 * per_row + gcol
            for _ in range(r0, r1):
                if have < bits:
                    while have <= 56 and at < n_bytes:
                        word = _append_byte(word, np.uint64(have), np.uint64(codes[at]))
                        at += 1
                        have += 8
                q = word & mask
                word >>= np.uint64(bits)
                have -= bits
                v = levels[book, q] * scale[g]
                if has_zero:
                    v = v + zero[g]
                g += per_row
                bad += not (v - v == 0)
                if out_kind == 2:
                    out[index] = v
                else:
                    scratch[0] = v
                    if out_kind == 0:
                        out[index] = float16_bits_of(scratch_bits[0])
                    else:
                        out[index] = bfloat16_bits_of(scratch_bits[0])
                index += head_dim
                s += 1
                if s == tokens:  # next batch row
                    s = 0
                    index += (heads - 1) * plane
    return bad


def half_bits(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The uint16 bits of a contiguous float16 / bfloat16 tensor (no copy) and the table of their values."""
    table = FLOAT16_VALUES if x.dtype == torch.float16 else BFLOAT16_VALUES
    return x.contiguous().reshape(-1).view(torch.int16).numpy().view(np.uint16), table
