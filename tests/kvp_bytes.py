"""Byte-level helpers for tests that take ``.kvp`` files apart and put them back together
(well-formed but lying files: every checksum recomputed, so only the reader's other checks stand)."""

from __future__ import annotations

import json
import zlib

import zstandard

from kvpack.formats.constants import PREAMBLE, PREAMBLE_SIZE, pack_preamble
from kvpack.formats.reader import KvpReader
from kvpack.restore.decode import read_tensor
from kvpack.restore.profiles import PROFILE_TENSOR, attach_profile


def read_everything(path, profile=None) -> dict:
    """What a user of the reader does: open, give transform entries their calibration profile (the one
    the file embeds, else ``profile``: docs/format.md §6.5), verify every section, decode every tensor."""
    with KvpReader(path) as reader:
        attach_profile(reader, None if PROFILE_TENSOR in reader.keys() else profile)
        reader.verify()
        return {name: read_tensor(reader, name) for name in reader.keys()}


def preamble_fields(data: bytes) -> tuple:
    """(magic, major, minor, flags, header_offset, header_length, header_crc, preamble_crc)."""
    return PREAMBLE.unpack(data[:PREAMBLE_SIZE])


def header_json(data: bytes) -> str:
    _, _, _, flags, offset, length, _, _ = preamble_fields(data)
    raw = data[offset : offset + length]
    return (zstandard.ZstdDecompressor().decompress(raw) if flags & 1 else raw).decode()


def with_header(data: bytes, raw: bytes, flags: int = 0, version: tuple[int, int] | None = None) -> bytes:
    """``data`` with its header replaced by ``raw`` (and optionally its version), re-checksummed."""
    _, major, minor, _, offset, _, _, _ = preamble_fields(data)
    major, minor = version or (major, minor)
    return pack_preamble(major, minor, flags, offset, len(raw), zlib.crc32(raw)) + data[PREAMBLE_SIZE:offset] + raw


def rewrite_header(data: bytes, mutate) -> bytes:
    """A file whose JSON header text was edited by ``mutate``, stored uncompressed and re-checksummed."""
    return with_header(data, mutate(header_json(data)).encode())


def append_section(data: bytes, payload: bytes) -> tuple[bytes, dict]:
    """``data`` with ``payload`` placed after the last section (8-byte aligned), before the header.

    Returns the new file (header unchanged, so not yet valid) and the section entry to add to it.
    """
    _, major, minor, flags, offset, length, header_crc, _ = preamble_fields(data)
    body = data[:offset]
    body += b"\0" * (-len(body) % 8)
    entry = {"offset": len(body), "length": len(payload), "crc32": zlib.crc32(payload)}
    body += payload
    raw = data[offset:]
    return pack_preamble(major, minor, flags, len(body), length, header_crc) + body[PREAMBLE_SIZE:] + raw, entry


def dumps(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def patch_section(data: bytes, tensor: str, section: str, content: bytes) -> bytes:
    """``data`` with one section's bytes replaced (same length) and its CRC-32 updated in the header."""
    header = json.loads(header_json(data))
    where = header["tensors"][tensor]["sections"][section]
    assert len(content) == where["length"]
    where["crc32"] = zlib.crc32(content)
    body = data[: where["offset"]] + content + data[where["offset"] + where["length"] :]
    return with_header(body, dumps(header))
