from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.errors import InvalidInputError
from kvpack.packing import pack, packed_nbytes, unpack, unpack_range


def reference_pack(codes, bits):
    """Bit-by-bit reference of docs/format.md: code i at stream bits [i*b, (i+1)*b), LSB first."""
    if bits > 8:
        low = reference_pack([c & 0xFF for c in codes], 8)
        return low + reference_pack([c >> 8 for c in codes], bits - 8)
    stream = []
    for code in codes:
        stream += [(int(code) >> k) & 1 for k in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return [sum(bit << k for k, bit in enumerate(stream[i : i + 8])) for i in range(0, len(stream), 8)]


@settings(max_examples=300, deadline=None)
@given(bits=st.integers(1, 16), data=st.data())
def test_round_trip_every_width_and_length(bits, data):
    count = data.draw(st.integers(0, 300))
    codes = np.array(
        data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=count, max_size=count)), dtype=np.int64
    )
    packed = pack(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.tolist() == reference_pack(codes.tolist(), bits)
    assert packed.size == packed_nbytes(count, bits)
    assert np.array_equal(unpack(packed, bits, count), codes)


def test_chunked_paths_match_the_reference_on_long_streams():
    rng = np.random.default_rng(0)
    for bits in (1, 3, 7, 8, 11):
        codes = rng.integers(0, 1 << bits, 1_200_003)
        packed = pack(codes, bits)
        head = codes[:4000].tolist()
        assert packed[: len(reference_pack(head, min(bits, 8))) - 1].tolist() == reference_pack(head, min(bits, 8))[:-1]
        assert np.array_equal(unpack(packed, bits, codes.size), codes)


def test_dense_sizes_waste_no_bits():
    for bits in range(1, 9):
        assert packed_nbytes(8, bits) == bits
        assert packed_nbytes(1000, bits) == -(-1000 * bits // 8)


def test_bit_order_worked_by_hand():
    # codes 1, 2, 3 at 3 bits: stream (LSB first) 1 0 0 | 0 1 0 | 1 1 0 -> byte 0 = 0b11010001
    assert pack(np.array([1, 2, 3]), 3).tolist() == [0b11010001, 0]
    # 4-bit codes: the first code is the low nibble
    assert pack(np.array([0xA, 0x5]), 4).tolist() == [0x5A]
    # 1-bit codes: first code is bit 0
    assert pack(np.array([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0b10000001, 1]
    # 12-bit codes: low-byte plane then a 4-bit plane of high nibbles
    assert pack(np.array([0xABC, 0x123]), 12).tolist() == [0xBC, 0x23, 0x1A]


def test_rejects_out_of_range_codes_and_widths():
    with pytest.raises(InvalidInputError, match="out of range"):
        pack(np.array([0, 8]), 3)
    with pytest.raises(InvalidInputError, match="out of range"):
        pack(np.array([-1]), 3)
    with pytest.raises(InvalidInputError, match="bits must be"):
        pack(np.array([0]), 0)
    with pytest.raises(InvalidInputError, match="bits must be"):
        pack(np.array([0]), 17)


def test_unpack_rejects_wrong_length():
    with pytest.raises(InvalidInputError, match="expected 3"):
        unpack(np.zeros(2, np.uint8), 3, 8)


def test_unpack_range_matches_unpack_at_every_width():
    rng = np.random.default_rng(0)
    for bits in (1, 2, 3, 5, 8, 9, 13):
        codes = rng.integers(0, 1 << bits, 203)
        packed = pack(codes, bits)
        full = unpack(packed, bits, 203)
        for start, stop in [(0, 203), (1, 2), (7, 9), (8, 8), (13, 200), (200, 203)]:
            assert np.array_equal(unpack_range(packed, bits, 203, start, stop), full[start:stop]), (bits, start)
    with pytest.raises(InvalidInputError):
        unpack_range(pack(codes, 13), 13, 203, 5, 204)
