"""Lazy, validating ``.kvp`` reader.

Opening a file reads only the 64-byte preamble and the header; the whole header is
validated (magic, version, sizes, offsets, section lengths against shapes) before any
section is read. A section is read with one seek and one bounded read, and its CRC-32 is
checked before it is used.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import numpy as np
import zstandard

from kvpack import __version__
from kvpack.errors import (
    ChecksumMismatchError,
    FormatError,
    HeaderLimitError,
    InvalidInputError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from kvpack.formats.constants import (
    FLAG_HEADER_ZSTD,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    HEADER_EXPANSION_SLACK,
    KNOWN_FLAGS,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_HEADER_EXPANSION,
    PREAMBLE,
    PREAMBLE_CRC_OFFSET,
    PREAMBLE_SIZE,
)
from kvpack.formats.entropy import decompress_section
from kvpack.formats.header import SectionEntry, TensorEntry, decode_header
from kvpack.names import kv_tensor_name, parse_kv_name
from kvpack.storage import is_url, location, open_read


def open_input(path: str | os.PathLike):
    """Open a file (or a URL, :func:`kvpack.storage.open_read`: ranged reads) for binary reading,
    turning OS and storage errors into one readable error.

    Raises:
        InvalidInputError: missing, a directory, or unreadable.
    """
    path = location(path)
    if is_url(path):
        return open_read(str(path))
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file")
    if path.is_dir():
        raise InvalidInputError(f"{path}: is a directory, expected a file")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot be read ({exc.strerror})") from None


def not_a_kvp_file(name: str | os.PathLike) -> FormatError:
    """The one error for a file that does not start with the ``.kvp`` magic bytes."""
    return FormatError(f"{name}: not a .kvp file (it does not start with the .kvp magic bytes)")


def is_kvp_file(path: str | os.PathLike) -> bool:
    """True when the file starts with the ``.kvp`` magic."""
    with open_input(path) as handle:
        return handle.read(len(MAGIC)) == MAGIC


class KvpReader:
    """A ``.kvp`` file opened for reading. Use as a context manager.

    Attributes:
        path: the file.
        version: ``(major, minor)`` format version of the file.
        metadata: the source metadata (str -> str).
        file_size: bytes.

    Raises (on construction):
        InvalidInputError: the file is missing or unreadable.
        FormatError: not a ``.kvp`` file, truncated, corrupted header
            (:class:`~kvpack.errors.TruncatedFileError`, :class:`~kvpack.errors.ChecksumMismatchError`,
            :class:`~kvpack.errors.HeaderLimitError`), or a newer major version
            (:class:`~kvpack.errors.UnsupportedVersionError`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = location(path)
        self._file = open_input(self.path)
        try:
            self._load_header()
        except BaseException:
            self._file.close()
            raise

    def _load_header(self) -> None:
        name = str(self.path)
        size = getattr(self._file, "size", None)  # a URL's reader knows its object's size
        self.file_size = os.fstat(self._file.fileno()).st_size if size is None else int(size)
        preamble = self._file.read(PREAMBLE_SIZE)
        if not preamble:
            raise FormatError(f"{name}: empty file")
        if preamble[: len(MAGIC)] != MAGIC[: len(preamble)]:
            if not any(preamble[: len(MAGIC)]):  # the writer fills the preamble in last
                raise FormatError(f"{name}: not a complete .kvp file (it starts with zero bytes: an unfinished write)")
            raise not_a_kvp_file(name)
        if len(preamble) < PREAMBLE_SIZE:
            raise TruncatedFileError(f"{name}: truncated: {len(preamble)} bytes, shorter than the 64-byte preamble")
        magic, major, minor, flags, header_offset, header_length, header_crc, preamble_crc = PREAMBLE.unpack(preamble)
        if magic != MAGIC:
            raise not_a_kvp_file(name)
        if major != FORMAT_MAJOR:
            # a 1.x-style preamble checksum that fails suggests a flipped bit rather than a real version
            suspect = zlib.crc32(preamble[:PREAMBLE_CRC_OFFSET]) != preamble_crc
            newer = major > FORMAT_MAJOR
            raise UnsupportedVersionError(
                f"{name}: format version {major}.{minor} is "
                + (
                    f"newer than this kvpack ({__version__}) reads ({FORMAT_MAJOR}.{FORMAT_MINOR}); "
                    f"upgrade kvpack to a release that reads format {major}.x"
                    if newer
                    else f"not readable by this kvpack (reads {FORMAT_MAJOR}.x)"
                )
                + ("; or the file is corrupted (its preamble checksum does not match)" if suspect else "")
            )
        if (major, minor) >= (1, 1):
            if zlib.crc32(preamble[:PREAMBLE_CRC_OFFSET]) != preamble_crc:
                raise ChecksumMismatchError(f"{name}: preamble checksum mismatch (the file is corrupted)")
        elif preamble_crc:
            raise FormatError(f"{name}: corrupted preamble: reserved bytes 36-39 are not zero in a 1.0 file")
        if any(preamble[PREAMBLE_CRC_OFFSET + 4 :]):
            raise FormatError(f"{name}: corrupted preamble: reserved bytes 40-63 are not zero")
        if flags & ~KNOWN_FLAGS:
            raise FormatError(f"{name}: unknown flags {flags:#x} in the preamble")
        self.version = (major, minor)
        if header_length > MAX_HEADER_BYTES:
            raise HeaderLimitError(f"{name}: header of {header_length} bytes exceeds the limit of {MAX_HEADER_BYTES}")
        if header_offset < PREAMBLE_SIZE or header_offset + header_length != self.file_size:
            if header_offset + header_length > self.file_size:
                raise TruncatedFileError(
                    f"{name}: truncated or corrupted: the preamble puts the header at bytes {header_offset}.."
                    f"{header_offset + header_length}, the file has {self.file_size}"
                )
            raise FormatError(
                f"{name}: corrupted preamble: header offset {header_offset} / length {header_length} "
                f"do not end at the file size {self.file_size}"
            )
        self._file.seek(header_offset)
        raw = self._file.read(header_length)
        if zlib.crc32(raw) != header_crc:
            raise ChecksumMismatchError(f"{name}: header checksum mismatch (the file is corrupted)")
        if flags & FLAG_HEADER_ZSTD:
            raw = _inflate_header(raw, name)
        self.metadata, entries, self._extra_sections = decode_header(
            raw, PREAMBLE_SIZE, header_offset, name, self.version, self.file_size
        )
        self._entries = {e.name: e for e in entries}
        self._stacks = {e.stacked_role: e for e in entries if e.stacked_role}  # role -> stacked entry
        self.header_bytes = header_length

    def __enter__(self) -> KvpReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        """Entry names in file order (a stacked entry is one name, ``layers.all.key``)."""
        return list(self._entries)

    def tensor_names(self) -> list[str]:
        """The tensors the file restores: the entry names in file order, or, when the file has
        stacked entries (``stack_layers``), their layers ``layers.{i}.key|value`` and the other
        K/V tensors by layer, then the rest."""
        if not self._stacks:
            return list(self._entries)
        stacked = {e.name for e in self._stacks.values()}
        names = [n for n in self._entries if n not in stacked]
        names += [kv_tensor_name(i, role) for role, e in self._stacks.items() for i in range(e.shape[0])]
        kv = sorted((n for n in names if parse_kv_name(n)), key=lambda n: (parse_kv_name(n)[0], n))
        return kv + [n for n in names if not parse_kv_name(n)]

    def entry(self, name: str) -> TensorEntry:
        """Header entry of a tensor. Raises InvalidInputError for an unknown name."""
        try:
            return self._entries[name]
        except KeyError:
            raise InvalidInputError(f"{self.path}: no tensor named {name!r}") from None

    def entries(self) -> list[TensorEntry]:
        return list(self._entries.values())

    def attach(self, name: str, codec) -> None:
        """Give entry ``name`` a codec config equal to its own that carries what the file does not
        serialize (the transform codec's calibration profile, :mod:`kvpack.restore.profiles`).

        Raises:
            ValueError: ``codec`` differs from the entry's (a bug in the caller).
        """
        entry = self.entry(name)
        if codec != entry.codec:
            raise ValueError(f"tensor {name!r}: the attached codec config differs from the file's")
        self._entries[name] = dataclasses.replace(entry, codec=codec)

    def read_section(self, name: str, section: str) -> np.ndarray:
        """The bytes of one section as a ``uint8`` array, after checking its CRC-32 (of the stored
        bytes) and undoing its zstd stage (format 1.5): ``decoded_length`` bytes, still
        feature-major when the section is transposed (:func:`kvpack.formats.entropy.untransposed`).

        Memory: a zstd section declares its size, at most 32,768 times its stored length
        (:data:`kvpack.formats.entropy.MAX_EXPANSION`), checked when the header is read.

        Raises:
            TruncatedFileError: the file shrank under us.
            ChecksumMismatchError: the bytes do not match the recorded checksum.
            FormatError: a zstd section that is not one frame of its declared size.
        """
        return self._read_decoded(self.entry(name).sections[section], f"section {section} of tensor {name!r}")

    def verify(self) -> int:
        """Read every section (also those of header keys this reader ignores) and check it; no
        decoding (:func:`kvpack.restore.streaming.verify_entries` decodes too).

        Returns:
            The number of sections checked.

        Raises:
            TruncatedFileError, ChecksumMismatchError, FormatError: see :meth:`read_section`.
        """
        checked = 0
        for entry in self._entries.values():
            for section, where in entry.sections.items():
                self._read_decoded(where, f"section {section} of tensor {entry.name!r}")
            checked += len(entry.sections)
        for label, section in self._extra_sections:
            self._read_checked(section, label)
        return checked + len(self._extra_sections)

    def _read_checked(self, section: SectionEntry, label: str) -> np.ndarray:
        """The bytes of one section after checking its checksum and the zero padding before it."""
        self._file.seek(section.offset - section.padding)
        data = self._file.read(section.padding + section.length)
        if len(data) != section.padding + section.length:
            raise TruncatedFileError(f"{self.path}: truncated in {label}")
        if any(data[: section.padding]):
            raise FormatError(f"{self.path}: corrupted: non-zero padding before {label}")
        data = data[section.padding :]
        if zlib.crc32(data) != section.crc32:
            raise ChecksumMismatchError(f"{self.path}: checksum mismatch in {label} (the file is corrupted)")
        return np.frombuffer(data, dtype=np.uint8)

    def _read_decoded(self, section: SectionEntry, label: str) -> np.ndarray:
        """The bytes of one section with its entropy stage undone (still feature-major when transposed)."""
        data = self._read_checked(section, label)
        if section.encoding is None:
            return data
        try:
            return np.frombuffer(decompress_section(data, section.decoded_length), dtype=np.uint8)
        except ValueError as exc:
            raise FormatError(f"{self.path}: corrupted {label}: {exc}") from None

    def read_sections(self, name: str) -> dict[str, np.ndarray]:
        return {section: self.read_section(name, section) for section in self.entry(name).sections}

    def stacked_entry(self, role: str) -> TensorEntry | None:
        """The entry that stacks every layer's ``role`` tensor (``layers.all.key|value``), if the file has one."""
        return self._stacks.get(role)

    def verify_extra_sections(self) -> int:
        """Read and check the sections of header keys this reader ignores (optional sections, §7).

        Returns:
            Their number.

        Raises:
            TruncatedFileError, ChecksumMismatchError, FormatError: see :meth:`read_section`.
        """
        for label, section in self._extra_sections:
            self._read_checked(section, label)
        return len(self._extra_sections)


def _inflate_header(raw: bytes, name: str) -> bytes:
    """Decompress a zstd-framed header; its declared size is checked against the limit first."""
    try:
        size = zstandard.frame_content_size(raw)
    except zstandard.ZstdError:
        raise FormatError(f"{name}: corrupted header: not a zstd frame") from None
    if size < 0:
        raise FormatError(f"{name}: corrupted header: the zstd frame does not declare its size")
    if size > MAX_HEADER_BYTES:
        raise HeaderLimitError(f"{name}: header of {size} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    if size > MAX_HEADER_EXPANSION * len(raw) + HEADER_EXPANSION_SLACK:
        raise HeaderLimitError(
            f"{name}: a {len(raw)}-byte compressed header declares {size} bytes, "
            f"more than {MAX_HEADER_EXPANSION}x its size (refused as a decompression bomb)"
        )
    try:  # the same frame rules as a zstd section (§6.3)
        return decompress_section(raw, size)
    except ValueError as exc:
        raise FormatError(f"{name}: corrupted header: {exc}") from None
