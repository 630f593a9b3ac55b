"""Where sections and the header go in a ``.kvp`` file: alignment padding and the compressed header (docs/format.md §3).

The writer lays a file out with these rules, and the allocator's size estimate
(:func:`header_and_padding`) lays out the same entries with them before anything is written,
so both agree to the byte on everything but the entropy stage's savings.
"""

from __future__ import annotations

import zlib

import zstandard

from kvpack.config import CodecConfig
from kvpack.formats.constants import HEADER_ZSTD_LEVEL, PREAMBLE_SIZE, SECTION_ALIGNMENT
from kvpack.formats.entropy import EntropyConfig, section_transposes
from kvpack.formats.header import SectionEntry, TensorEntry, encode_header, section_specs, spec_nbytes


def padding_before(position: int) -> int:
    """Zero bytes to write at ``position`` so the next section starts on a ``SECTION_ALIGNMENT`` boundary."""
    return -position % SECTION_ALIGNMENT


def compress_header(text: bytes) -> bytes:
    """The header as stored: one zstd frame of the JSON text, declaring its content size."""
    return zstandard.ZstdCompressor(level=HEADER_ZSTD_LEVEL, write_content_size=True).compress(text)


def header_and_padding(
    metadata: dict[str, str],
    entries: list[tuple[str, tuple[int, ...], str, CodecConfig | None]],
    entropy: EntropyConfig | None = None,
) -> tuple[int, int]:
    """The bytes of the compressed header, and of the alignment padding between sections, of a
    file holding ``entries`` (name, shape, dtype, codec) in this order, laid out as the writer lays
    them out; checksums are stand-ins of the same size and entropy (rate control uses this before
    anything is written). With an ``entropy`` stage, every section it may apply to is listed with
    its ``encoding`` (and ``transpose``) keys, an upper bound on the header; the padding is that of
    dense sections.

    Returns:
        ``(header bytes, padding bytes)``.
    """
    position, padding, tensors = PREAMBLE_SIZE, 0, []
    for name, shape, dtype, codec in entries:
        sections = {}
        transposes = section_transposes(name, shape, dtype, codec, entropy) if entropy is not None else {}
        for section, spec in section_specs(shape, dtype, codec, name).items():
            pad = padding_before(position)
            position, padding = position + pad, padding + pad
            length = spec_nbytes(spec)
            staged = entropy is not None and not (codec is not None and codec.whole_tensor)  # §6.4: stored as is
            encoded = "zstd" if staged and length and entropy.applies_to(spec.kind) else None
            crc = zlib.crc32(f"{name}/{section}".encode())
            sections[section] = SectionEntry(position, length, crc, pad, -1, encoded, transposes.get(section, 0))
            position += length
        tensors.append(TensorEntry(name, tuple(shape), dtype, codec, sections))
    return len(compress_header(encode_header(metadata, tensors))), padding
