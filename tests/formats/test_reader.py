"""The validating reader (kvpack.formats.reader): truncated, corrupted and lying files are refused with a
named FormatError before anything is allocated or decoded."""

import struct

import pytest
import torch
import zstandard

from kvpack import CodecConfig, KvpReader, compress_tensors, load_kvp
from kvpack.errors import (
    ChecksumMismatchError,
    FormatError,
    HeaderLimitError,
    InvalidInputError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from kvpack.formats.constants import MAGIC, PREAMBLE, PREAMBLE_SIZE, pack_preamble
from kvpack.restore.decode import read_tensor
from tests.kvp_bytes import header_json, patch_section, rewrite_header, with_header


def test_truncation_at_every_length_is_a_format_error(sample, tmp_path):
    data = sample.read_bytes()
    cut = tmp_path / "cut.kvp"
    for length in list(range(0, 80)) + list(range(80, len(data), 37)) + [len(data) - 1]:
        cut.write_bytes(data[:length])
        with pytest.raises(FormatError):
            with KvpReader(cut) as reader:
                for name in reader.keys():
                    read_tensor(reader, name)


def test_wrong_magic_newer_version_and_bad_flags(sample, tmp_path):
    data = bytearray(sample.read_bytes())
    bad = tmp_path / "bad.kvp"
    bad.write_bytes(b"PK\x03\x04" + bytes(data[4:]))
    with pytest.raises(FormatError, match="not a .kvp file"):
        KvpReader(bad)
    _, _, _, flags, offset, length, crc, _ = PREAMBLE.unpack(bytes(data[:PREAMBLE_SIZE]))
    bad.write_bytes(pack_preamble(2, 3, flags, offset, length, crc) + bytes(data[PREAMBLE_SIZE:]))
    with pytest.raises(
        UnsupportedVersionError,
        match=r"format version 2\.3 is newer than this kvpack \(0\.\d+\.\d+\) reads \(1\.\d+\); upgrade kvpack to a "
        r"release that reads format 2\.x",
    ):
        KvpReader(bad)
    bad.write_bytes(pack_preamble(1, 1, 2, offset, length, crc) + bytes(data[PREAMBLE_SIZE:]))
    with pytest.raises(FormatError, match="unknown flags"):
        KvpReader(bad)

    # a flipped bit in the version field is corruption, not a newer version
    flipped = bytearray(data)
    flipped[9] ^= 1
    bad.write_bytes(bytes(flipped))
    with pytest.raises(UnsupportedVersionError, match=r"version 257\.\d+ is newer.*; or the file is corrupted"):
        KvpReader(bad)


def test_header_corruption_and_limits(sample, tmp_path):
    data = bytearray(sample.read_bytes())
    _, _, _, _, offset, length, crc, _ = PREAMBLE.unpack(bytes(data[:PREAMBLE_SIZE]))
    bad = tmp_path / "bad.kvp"
    flipped = bytearray(data)
    flipped[offset + 5] ^= 0x20
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ChecksumMismatchError, match="header checksum"):
        KvpReader(bad)
    bad.write_bytes(pack_preamble(1, 1, 1, offset, 1 << 60, crc) + bytes(data[PREAMBLE_SIZE:]))
    with pytest.raises(HeaderLimitError, match="exceeds the limit"):
        KvpReader(bad)


def test_plain_and_zstd_headers_read_the_same(sample, tmp_path):
    data = sample.read_bytes()
    assert PREAMBLE.unpack(data[:PREAMBLE_SIZE])[3] == 1  # the writer compresses the header
    plain = tmp_path / "plain.kvp"
    plain.write_bytes(rewrite_header(data, lambda h: h))
    with KvpReader(sample) as a, KvpReader(plain) as b:
        assert a.metadata == b.metadata and a.entries() == b.entries()
        assert all(torch.equal(read_tensor(a, n), read_tensor(b, n)) for n in a.keys())


@pytest.mark.parametrize(
    "frame, error, message",
    [
        (
            lambda j: zstandard.ZstdCompressor(write_content_size=True).compress(j) + b"junk",
            FormatError,
            "bytes follow the zstd frame",
        ),
        (lambda j: zstandard.ZstdCompressor(write_content_size=False).compress(j), FormatError, "does not declare"),
        (lambda j: zstandard.ZstdCompressor().compress(j)[:-4], FormatError, "corrupted header"),
        (lambda j: b"not a zstd frame at all", FormatError, "not a zstd frame"),
        (lambda j: zstandard.ZstdCompressor().compress(b" " * (65 << 20)), HeaderLimitError, "exceeds the limit"),
    ],
)
def test_hostile_compressed_headers(sample, tmp_path, frame, error, message):
    data = sample.read_bytes()
    bad = tmp_path / "zbad.kvp"
    bad.write_bytes(with_header(data, frame(header_json(data).encode()), flags=1))
    with pytest.raises(error, match=message):
        KvpReader(bad)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h: h.replace('"shape":[1,2,20,16]', '"shape":[1,2,2000000,16]', 1), "needs"),
        (lambda h: h.replace('"offset":64', '"offset":999999999', 1), "expected 64"),
        (lambda h: h.replace('"method":"uniform"', '"method":"evil"', 1), "unknown method"),
        (lambda h: h.replace('"bits":3', '"bits":30', 1), "bits must be"),
        (lambda h: h[:-1], "not valid JSON"),
        (lambda h: h.replace('{"metadata":{', '{"metadata":{"model":"x",', 1), "duplicate key"),
        (lambda h: h.replace('"dtype":"float16"', '"dtype":"complex128"', 1), "unsupported dtype"),
        (lambda h: h.replace('"group_size":16', '"group_size":5', 1), "does not divide"),
    ],
)
def test_lying_headers_are_refused_before_reading_data(sample, tmp_path, mutate, message):
    bad = tmp_path / "lie.kvp"
    bad.write_bytes(rewrite_header(sample.read_bytes(), mutate))
    with pytest.raises(FormatError, match=message):
        KvpReader(bad)


def test_overlapping_sections_refused(sample, tmp_path):
    with KvpReader(sample) as reader:
        first = reader.entries()[0]
        codes_offset = first.sections["codes"].offset
        scale_offset = first.sections["scale"].offset
    bad = tmp_path / "overlap.kvp"
    bad.write_bytes(
        rewrite_header(
            sample.read_bytes(), lambda h: h.replace(f'"offset":{scale_offset},', f'"offset":{codes_offset},', 1)
        )
    )
    with pytest.raises(FormatError, match=f"at offset {codes_offset}, expected {scale_offset}"):
        KvpReader(bad)


def test_every_bit_flip_in_a_data_section_is_detected(tmp_path):
    path = tmp_path / "tiny.kvp"
    compress_tensors({"layers.0.key": torch.randn(1, 1, 4, 8).half()}, path, CodecConfig.build("uniform", 2, 8))
    data = path.read_bytes()
    with KvpReader(path) as reader:
        spans = [(s.offset, s.length, sec) for sec, s in reader.entry("layers.0.key").sections.items()]
    bad = tmp_path / "flip.kvp"
    flips = 0
    for offset, length, section in spans:
        for byte in range(offset, offset + length):
            for bit in range(8):
                mutated = bytearray(data)
                mutated[byte] ^= 1 << bit
                bad.write_bytes(bytes(mutated))
                with KvpReader(bad) as reader, pytest.raises(ChecksumMismatchError, match=section):
                    reader.read_section("layers.0.key", section)
                flips += 1
    assert flips == 8 * sum(length for _, length, _ in spans)


def test_missing_and_non_kvp_inputs(tmp_path):
    with pytest.raises(InvalidInputError, match="no such file"):
        KvpReader(tmp_path / "missing.kvp")
    (tmp_path / "empty.kvp").write_bytes(b"")
    with pytest.raises(FormatError, match="empty file"):
        KvpReader(tmp_path / "empty.kvp")
    (tmp_path / "short.kvp").write_bytes(MAGIC + b"\x01")
    with pytest.raises(TruncatedFileError):
        KvpReader(tmp_path / "short.kvp")


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (
            lambda h: h.replace('{"metadata":', '{"x":' + "[" * 30000 + "]" * 30000 + ',"metadata":', 1),
            FormatError,
            "nested too deeply",
        ),
        (
            lambda h: h.replace('{"metadata":', '{"x":' + "[]," * 70000 + '[],"metadata":', 1),
            HeaderLimitError,
            "structural characters, more than 65536",
        ),
        (lambda h: h.replace('"dtype":"float16"', '"dtype":["bool"]', 1), FormatError, "dtype must be a string"),
        (lambda h: h.replace('{"metadata":{', '{"metadata":{"bad":"\\ud800",', 1), FormatError, "valid Unicode"),
        (lambda h: h.replace('"token_ids":', '"__metadata__":', 1), FormatError, "invalid tensor name"),
        (
            lambda h: h.replace('"shape":[1,20]', '"shape":[0,281474976710655,281474976710655]', 1),
            HeaderLimitError,
            "exceeds the limit",
        ),
    ],
)
def test_hostile_headers_raise_format_errors(sample, tmp_path, mutate, error, message):
    bad = tmp_path / "hostile.kvp"
    bad.write_bytes(rewrite_header(sample.read_bytes(), mutate))
    with pytest.raises(error, match=message):
        with KvpReader(bad) as reader:
            for name in reader.keys():
                read_tensor(reader, name)


def test_reader_memory_is_bounded_by_the_file_size(tmp_path):
    """A 1-bit file that decodes to float32: peak traced memory stays a small multiple of the output."""
    import tracemalloc

    path = tmp_path / "amp.kvp"
    x = torch.randn(1, 1, 512, 65536)
    compress_tensors({"layers.0.key": x}, path, CodecConfig.build("uniform", 1, 65536))
    file_size = path.stat().st_size
    tracemalloc.start()
    with KvpReader(path) as reader:
        out = read_tensor(reader, "layers.0.key")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == x.shape
    # codes unpack to one byte each (8x the 1-bit file), plus the file bytes and a bounded unpacking buffer
    assert peak < 12 * file_size + (16 << 20), (peak, file_size)


def test_compressed_header_bomb_is_refused_before_inflating(sample, tmp_path):
    data = sample.read_bytes()
    bomb = zstandard.ZstdCompressor(level=19).compress(
        b'{"metadata":{"a":[' + b"[]," * 10_000_000 + b'[]]},"tensors":{}}'
    )
    bad = tmp_path / "bomb.kvp"
    bad.write_bytes(with_header(data, bomb, flags=1))
    assert len(bomb) < 10_000
    with pytest.raises(HeaderLimitError, match="decompression bomb"):
        KvpReader(bad)


def test_values_no_encoder_writes_are_refused(tmp_path):
    """Re-checksummed sections with a NaN scale, an infinite codebook level, or a bool byte of 2."""
    path = tmp_path / "ok.kvp"
    tensors = {"layers.0.key": torch.randn(1, 1, 4, 16).half(), "mask": torch.tensor([True, False])}
    compress_tensors(tensors, path, CodecConfig.build("adaptive", 2, 16))
    data = path.read_bytes()
    with KvpReader(path) as reader:
        scale = bytes(reader.read_section("layers.0.key", "scale"))
        codebook = bytes(reader.read_section("layers.0.key", "codebook"))
    nan, inf = struct.pack("<e", float("nan")), struct.pack("<e", float("inf"))
    cases = {
        "scale holds NaN": patch_section(data, "layers.0.key", "scale", nan + scale[2:]),
        "codebook holds inf": patch_section(data, "layers.0.key", "codebook", codebook[:-2] + inf),
        "bool": patch_section(data, "mask", "data", b"\x02\x00"),
    }
    for label, content in cases.items():
        bad = tmp_path / "bad.kvp"
        bad.write_bytes(content)
        with pytest.raises(FormatError, match=r"NaN or infinite|other than 0 and 1") as info:
            load_kvp(bad)
        assert str(bad) in str(info.value), label
