"""The streaming ``.kvp`` writer: sections as they come, the header last, the file renamed into place at the end.

The file goes through :func:`kvpack.formats.atomic.atomic_output` (temporary file, fsync,
rename), so a failure at any point leaves either the previous file or nothing. The same
placement without a file (:class:`KvpSizer`) gives the exact size a file would have.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from dataclasses import dataclass, replace

import numpy as np

from kvpack.config import CodecConfig
from kvpack.errors import FormatError, InvalidInputError
from kvpack.formats.atomic import atomic_output
from kvpack.formats.constants import FLAG_HEADER_ZSTD, FORMAT_MAJOR, FORMAT_MINOR, PREAMBLE_SIZE, pack_preamble
from kvpack.formats.entropy import EntropyConfig, compress_section
from kvpack.formats.header import (
    SectionEntry,
    TensorEntry,
    check_tensor_name,
    decode_header,
    encode_header,
    is_text,
    section_specs,
    spec_nbytes,
)
from kvpack.formats.layout import compress_header, padding_before
from kvpack.storage import location


@dataclass(frozen=True)
class StoredSection:
    """One section as a ``.kvp`` file stores it: after the entropy stage, before its alignment padding.

    Attributes:
        data: the stored bytes, or ``None`` when only the size is kept (:meth:`sized`).
        length: stored bytes.
        crc: CRC-32 of the stored bytes.
        decoded_length: bytes before the entropy stage (the densely packed section).
        encoding: ``"zstd"``, or ``None`` when the section is stored as packed.
        transpose: the feature-major row length of a code section (0: group order).
    """

    data: bytes | memoryview | None
    length: int
    crc: int
    decoded_length: int
    encoding: str | None
    transpose: int

    def sized(self) -> StoredSection:
        """The same section without its bytes (what a size needs)."""
        return replace(self, data=None)


class KvpSizer:
    """A ``.kvp`` file laid out section by section as :class:`KvpWriter` writes it, without writing it.

    :class:`KvpWriter` is this class with a file: both apply the entropy stage (:meth:`stage`),
    place sections with their alignment padding (:meth:`place`) and store the header in the same
    way, so :meth:`file_size` is the size in bytes the writer's file has when given the same
    metadata and tensors (rate control sizes candidate files with it).

    Raises:
        InvalidInputError: metadata that is not text, or a tensor's sections not as its codec declares them.
    """

    def __init__(self, metadata: dict[str, str] | None = None, entropy: EntropyConfig | None = None):
        self.entropy = EntropyConfig() if entropy is None else entropy
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        for key, value in self.metadata.items():
            if not is_text(key) or not is_text(value):
                raise InvalidInputError(f"metadata {key!r} is not valid Unicode text")
        self._entries: list[TensorEntry] = []
        self._position = PREAMBLE_SIZE

    @property
    def entries(self) -> list[TensorEntry]:
        return list(self._entries)

    def add_tensor(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: str,
        codec: CodecConfig | None,
        sections: dict[str, bytes | np.ndarray],
        transposes: dict[str, int] | None = None,
    ) -> TensorEntry:
        """Append one tensor: ``sections`` maps each section name to its serialized bytes.

        Each section goes through the entropy stage of the :class:`EntropyConfig` (kept only where
        it makes the section smaller), except those of a transform-codec entry (docs/format.md §6.4),
        which are stored as they are. ``transposes`` names the code sections whose bytes are
        feature-major (:func:`kvpack.formats.entropy.transpose_width`) and their row length.

        Raises:
            InvalidInputError: duplicate name, or sections not as the codec declares them.
        """
        self._check_new(name)
        return self.place(name, shape, dtype, codec, self.stage(name, shape, dtype, codec, sections, transposes))

    def stage(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: str,
        codec: CodecConfig | None,
        sections: dict[str, bytes | np.ndarray],
        transposes: dict[str, int] | None = None,
    ) -> dict[str, StoredSection]:
        """A tensor's sections checked against what its codec declares and passed through the entropy
        stage, in the order the file stores them (nothing is placed yet).

        Raises:
            InvalidInputError: a bad tensor name, or sections not as the codec declares them.
        """
        transposes = transposes or {}
        check_tensor_name(name)
        specs = section_specs(tuple(shape), dtype, codec, name)
        if set(sections) != set(specs):
            raise InvalidInputError(f"tensor {name!r}: sections {sorted(sections)} != declared {sorted(specs)}")
        views = {}
        for sec_name, spec in specs.items():  # every section checked before any byte is written
            views[sec_name] = memoryview(sections[sec_name]).cast("B")
            if len(views[sec_name]) != spec_nbytes(spec):
                raise InvalidInputError(
                    f"tensor {name!r}, section {sec_name}: {len(views[sec_name])} bytes, expected {spec_nbytes(spec)}"
                )
            transpose = transposes.get(sec_name, 0)
            if transpose and (spec.dtype != "code" or not 1 <= spec.bits <= 8 or spec.count % transpose):
                raise InvalidInputError(f"tensor {name!r}, section {sec_name}: cannot be transposed by {transpose}")
        if any(transposes.values()) and codec is not None and codec.whole_tensor:
            raise InvalidInputError(f"tensor {name!r}: the sections of a transform entry cannot be transposed")
        stored = {}
        for sec_name, spec in specs.items():
            data, transpose = views[sec_name], transposes.get(sec_name, 0)
            kept, encoding = data, None
            # a transform entry (§6.4) is stored as it is: its stream is range-coded already, and zstd on
            # its scales would let a few bytes declare chunks of up to 2**20 tokens each
            if self.entropy.applies_to(spec.kind) and len(data) and not (codec is not None and codec.whole_tensor):
                packed = compress_section(data, self.entropy.level, transpose, spec)
                if len(packed) < len(data):  # only where it pays
                    kept, encoding = packed, "zstd"
            stored[sec_name] = StoredSection(kept, len(kept), zlib.crc32(kept), len(data), encoding, transpose)
        return stored

    def place(
        self, name: str, shape: tuple[int, ...], dtype: str, codec: CodecConfig | None, stored: dict[str, StoredSection]
    ) -> TensorEntry:
        """Append one tensor whose sections went through :meth:`stage` (here or in another sizer with
        the same entropy stage), each after its alignment padding.

        Raises:
            InvalidInputError: the name is taken, or a section without its bytes given to a writer.
        """
        self._check_new(name)
        placed = {}
        for sec_name, section in stored.items():
            padding = padding_before(self._position)
            self._emit(padding, section)
            self._position += padding
            placed[sec_name] = SectionEntry(
                self._position,
                section.length,
                section.crc,
                padding,
                section.decoded_length,
                section.encoding,
                section.transpose,
            )
            self._position += section.length
        entry = TensorEntry(name, tuple(int(s) for s in shape), dtype, codec, placed)
        self._entries.append(entry)
        return entry

    def stored_header(self) -> bytes:
        """The header as the file stores it (one zstd frame of the JSON text, :mod:`kvpack.formats.layout`)."""
        return compress_header(encode_header(self.metadata, self._entries))

    def file_size(self) -> int:
        """The bytes of the file holding the tensors added so far: preamble, sections, padding, header."""
        return self._position + len(self.stored_header())

    def _check_new(self, name: str) -> None:
        if any(e.name == name for e in self._entries):
            raise InvalidInputError(f"tensor {name!r} is written twice")

    def _emit(self, padding: int, section: StoredSection) -> None:
        """Where the writer writes ``padding`` zero bytes and then the section's bytes (the sizer writes nothing)."""


class KvpWriter(KvpSizer):
    """Stream tensors into a ``.kvp`` file; the file appears only when :meth:`close` succeeds.

    Use as a context manager::

        with KvpWriter("cache.kvp", metadata={"model": "..."}) as writer:
            writer.add_tensor("layers.0.key", shape, "float16", codec_config, {"codes": ..., ...})

    Sections are written as they are added (the header goes at the end of the file and
    the preamble is rewritten last), so memory stays bounded by one tensor. Sections, padding
    and the header are laid out by :class:`KvpSizer`.

    Raises:
        OutputExistsError: the output exists and ``force`` is false (raised on construction).
        InvalidInputError: a tensor's sections do not match what its codec declares.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: dict[str, str] | None = None,
        force: bool = False,
        entropy: EntropyConfig | None = None,
    ):
        super().__init__(metadata, entropy)
        self.path = location(path)
        self._closed = False
        self._output = atomic_output(path, force)
        self._tmp_path = self._output.__enter__()
        try:
            self._file = open(self._tmp_path, "wb")
            try:
                self._file.write(b"\0" * PREAMBLE_SIZE)
            except BaseException:
                self._file.close()
                raise
        except BaseException as exc:  # the temp file exists now: remove it
            self._output.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def __enter__(self) -> KvpWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(exc_type, exc, tb)

    def _emit(self, padding: int, section: StoredSection) -> None:
        if section.data is None:
            raise InvalidInputError("a section without its bytes cannot be written (it was kept for its size only)")
        if padding:
            self._file.write(b"\0" * padding)
        self._file.write(section.data)

    def close(self) -> int:
        """Write the header and preamble, fsync and rename into place. Returns the file size in bytes."""
        if self._closed:
            return self._position
        try:
            return self._finish()
        except BaseException as exc:
            self.abort(type(exc), exc, exc.__traceback__)
            raise

    def _finish(self) -> int:
        text = encode_header(self.metadata, self._entries)
        header = compress_header(text)  # what stored_header() gives: the text is checked below
        header_offset = self._position
        try:  # the reader's own rules (limits, layout): never write a file kvpack would refuse
            decode_header(text, PREAMBLE_SIZE, header_offset, str(self.path), file_size=header_offset + len(header))
        except FormatError as exc:
            reason = str(exc).removeprefix(f"{self.path}: ").removeprefix("corrupted header: ")
            raise InvalidInputError(f"cannot write {self.path}: {reason}") from None
        self._file.write(header)
        self._position += len(header)
        self._file.seek(0)
        self._file.write(
            pack_preamble(FORMAT_MAJOR, FORMAT_MINOR, FLAG_HEADER_ZSTD, header_offset, len(header), zlib.crc32(header))
        )
        self._file.flush()
        self._file.close()
        self._output.__exit__(None, None, None)
        self._closed = True  # only now: an interrupt before this still lets abort() remove the temp file
        return self._position

    def abort(self, exc_type=None, exc=None, tb=None) -> None:
        """Discard everything written so far (the temporary file is removed)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(BaseException):  # a failing flush must not keep the temp file
            self._file.close()
        with contextlib.suppress(BaseException):
            self._output.__exit__(exc_type or RuntimeError, exc or RuntimeError("aborted"), tb)
