"""Dense bit-packing of unsigned integer codes.

The only module that knows the bit order of packed codes. Code ``i`` of a stream of
``b``-bit codes occupies stream bits ``[i*b, (i+1)*b)``, least significant bit first;
stream bit ``k`` is bit ``k % 8`` (LSB = 0) of byte ``k // 8``. The last byte is padded
with zero bits. So ``n`` codes of ``b`` bits take exactly ``ceil(n*b/8)`` bytes: 3-, 5-,
6- and 7-bit codes waste no bits.

The fused kernels (:mod:`kvpack.codecs.kernels`), which pack codes as they compute them,
compile :func:`append_code` and :func:`append_byte` from here, so this order has one owner.

Codes of 9 to 16 bits (outlier positions in very large groups) are packed as two planes:
the low 8 bits of every code as one 8-bit stream, then the high ``b-8`` bits as a
``(b-8)``-bit stream.
"""

from __future__ import annotations

import numpy as np

from kvpack.errors import InvalidInputError

MAX_BITS = 16


def append_code(word, used, code):
    """A bit accumulator ``word`` holding ``used`` stream bits, with ``code`` appended as the next
    stream bits (least significant first): ``word | code << used``. Scalar; numba compiles it for
    the kernels."""
    return word | (code << used)


def append_byte(word, have, byte):
    """A read accumulator ``word`` holding ``have`` stream bits, with the next stream ``byte``
    appended (stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``). Scalar; numba compiles it."""
    return word | (byte << have)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits (1..16) when densely packed."""
    _check_bits(bits)
    if count < 0:
        raise InvalidInputError(f"code count must be >= 0, got {count}")
    if bits > 8:
        return packed_nbytes(count, 8) + packed_nbytes(count, bits - 8)
    return (count * bits + 7) // 8


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integer codes densely.

    Args:
        codes: 1-D integer array, every value in ``[0, 2**bits - 1]`` (any integer dtype).
        bits: code width, 1 to 16.

    Returns:
        ``uint8`` array of ``packed_nbytes(len(codes), bits)`` bytes.

    Raises:
        InvalidInputError: ``bits`` out of range, ``codes`` not 1-D, or a code out of range.
    """
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.ndim != 1:
        raise InvalidInputError(f"codes must be 1-D, got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or int(codes.max()) >= (1 << bits)):
        raise InvalidInputError(f"codes out of range for {bits}-bit packing")
    if bits > 8:
        wide = codes.astype(np.uint32)
        return np.concatenate([_pack_narrow(wide & 0xFF, 8), _pack_narrow(wide >> 8, bits - 8)])
    return _pack_narrow(codes, bits)


def unpack(data: np.ndarray | bytes, bits: int, count: int) -> np.ndarray:
    """Unpack ``count`` codes of ``bits`` bits packed by :func:`pack`.

    Args:
        data: the packed bytes (``uint8`` array or ``bytes``), exactly
            ``packed_nbytes(count, bits)`` long.
        bits: code width, 1 to 16.
        count: number of codes.

    Returns:
        1-D array of ``count`` codes, ``uint8`` for ``bits <= 8`` else ``uint16``.

    Raises:
        InvalidInputError: wrong data length or ``bits`` out of range.
    """
    _check_bits(bits)
    data = (
        np.frombuffer(data, dtype=np.uint8)
        if isinstance(data, (bytes, bytearray, memoryview))
        else np.asarray(data, dtype=np.uint8)
    )
    expected = packed_nbytes(count, bits)
    if data.size != expected:
        raise InvalidInputError(
            f"packed data has {data.size} bytes, expected {expected} for {count} codes of {bits} bits"
        )
    if bits > 8:
        split = packed_nbytes(count, 8)
        low = _unpack_narrow(data[:split], 8, count).astype(np.uint16)
        high = _unpack_narrow(data[split:], bits - 8, count).astype(np.uint16)
        return low | (high << 8)
    return _unpack_narrow(data, bits, count)


def unpack_range(data: np.ndarray | bytes, bits: int, count: int, start: int, stop: int) -> np.ndarray:
    """Codes ``start`` to ``stop - 1`` of ``count`` codes packed by :func:`pack`, reading only their bytes.

    Unpacks from code ``start - start % 8`` (whose first bit starts a byte at every width), so
    at most 7 codes more than asked for are unpacked.

    Args:
        data: all the packed bytes (``packed_nbytes(count, bits)``).
        bits: code width, 1 to 16.
        count: number of codes in ``data``.
        start, stop: the code range, ``0 <= start <= stop <= count``.

    Returns:
        1-D array of ``stop - start`` codes, ``uint8`` for ``bits <= 8`` else ``uint16``.

    Raises:
        InvalidInputError: wrong data length, ``bits`` or range out of range.
    """
    _check_bits(bits)
    data = (
        np.frombuffer(data, dtype=np.uint8)
        if isinstance(data, (bytes, bytearray, memoryview))
        else np.asarray(data, dtype=np.uint8)
    )
    if data.size != packed_nbytes(count, bits):
        raise InvalidInputError(
            f"packed data has {data.size} bytes, expected {packed_nbytes(count, bits)} for {count} codes of {bits} bits"
        )
    if not 0 <= start <= stop <= count:
        raise InvalidInputError(f"code range {start}:{stop} is outside the {count} codes")
    if bits > 8:  # two planes: the low 8 bits of every code, then the high bits
        split = packed_nbytes(count, 8)
        low = unpack_range(data[:split], 8, count, start, stop).astype(np.uint16)
        high = unpack_range(data[split:], bits - 8, count, start, stop).astype(np.uint16)
        return low | (high << 8)
    first = start - start % 8  # first * bits is a multiple of 8: a byte boundary
    begin = first * bits // 8
    end = (stop * bits + 7) // 8
    return _unpack_narrow(data[begin:end], bits, stop - first)[start - first :]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
        raise InvalidInputError(f"bits must be an integer from 1 to {MAX_BITS}, got {bits!r}")


# Words (8 codes each) handled per step: bounds the uint64 temporaries to a few MiB.
_CHUNK_WORDS = 1 << 16


def _pack_narrow(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes of 1..8 bits: every 8 codes become ``bits`` bytes via one uint64 word."""
    count = codes.size
    n_words = -(-count // 8)
    out = np.empty((n_words, bits), dtype=np.uint8)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    for first in range(0, n_words, _CHUNK_WORDS):
        last = min(first + _CHUNK_WORDS, n_words)
        block = np.zeros((last - first) * 8, dtype=np.uint64)
        piece = codes[first * 8 : last * 8]
        block[: piece.size] = piece
        words = np.bitwise_or.reduce(block.reshape(-1, 8) << shifts, axis=1)
        out[first:last] = words.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits]
    return out.reshape(-1)[: (count * bits + 7) // 8]


def _unpack_narrow(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`_pack_narrow`; returns ``uint8`` codes."""
    n_words = -(-count // 8)
    padded = np.zeros(n_words * bits, dtype=np.uint8)
    padded[: data.size] = data
    padded = padded.reshape(n_words, bits)
    out = np.empty(n_words * 8, dtype=np.uint8)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    mask = np.uint64((1 << bits) - 1)
    for first in range(0, n_words, _CHUNK_WORDS):
        last = min(first + _CHUNK_WORDS, n_words)
        block = np.zeros((last - first, 8), dtype=np.uint8)
        block[:, :bits] = padded[first:last]
        words = block.view("<u8").reshape(-1)
        out[first * 8 : last * 8] = ((words[:, None] >> shifts) & mask).reshape(-1)
    return out[:count]
