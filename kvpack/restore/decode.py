"""Whole tensors decoded from an open ``.kvp`` reader: the one place a reader's sections become values.

The reader (:mod:`kvpack.formats.reader`) only reads and checks bytes; this module hands them
to :func:`kvpack.entry.decode_entry` and names the file in every error.
"""

from __future__ import annotations

import os

import torch

from kvpack.entry import decode_entry
from kvpack.errors import FormatError, brief
from kvpack.formats.reader import KvpReader
from kvpack.names import parse_kv_name
from kvpack.storage import accepts_storage_options


class EntryDecoder:
    """Decodes the tensors of one open :class:`KvpReader`; a stacked entry (``layers.all.key``,
    ``--level token``) is decoded once and kept until each of its layers has been read.

    Everything else (``keys()``, ``tensor_names()``, ``metadata``, ``entries()``, ``verify()`` ...)
    is the reader's. As a context manager it closes the reader it was opened with.
    """

    def __init__(self, reader: KvpReader):
        self.reader = reader
        self._decoded_stacks: dict[tuple, tuple[torch.Tensor, set[int]]] = {}  # (entry, dtype) -> (decoded, unread)

    def read_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Decode one tensor to a torch tensor of its stored shape (see :func:`kvpack.entry.decode_entry`).

        Args:
            name: an entry, or a layer ``layers.{i}.key|value`` of a stacked entry.
            dtype: a torch dtype to return; default the stored dtype.

        Raises:
            InvalidInputError: no such tensor.
            FormatError: a checksum, the padding or a decoded value is wrong (naming the file).
        """
        reader = self.reader
        parsed = parse_kv_name(name)
        stacked = reader.stacked_entry(parsed[1]) if parsed and name not in reader.keys() else None
        if stacked is not None and parsed[0] < stacked.shape[0]:
            key = (stacked.name, dtype)
            if key not in self._decoded_stacks:
                self._decoded_stacks[key] = (self.read_tensor(stacked.name, dtype), set(range(stacked.shape[0])))
            decoded, unread = self._decoded_stacks[key]
            unread.discard(parsed[0])
            if not unread:  # every layer has been read once: a reader of the whole cache holds no second copy
                del self._decoded_stacks[key]
            return decoded[parsed[0]].clone()
        sections = reader.read_sections(name)
        try:
            return decode_entry(reader.entry(name), sections, dtype)
        except FormatError as exc:
            raise type(exc)(f"{reader.path}: {exc}") from None
        except (RuntimeError, ValueError, IndexError, TypeError, OverflowError) as exc:
            # Every size was validated; what remains are values no encoder writes.
            raise FormatError(f"{reader.path}: tensor {brief(name)} cannot be decoded ({exc})") from None

    def __getattr__(self, name: str):
        if name == "reader":  # not set yet (during unpickling or a failed __init__)
            raise AttributeError(name)
        return getattr(self.reader, name)

    def __enter__(self) -> EntryDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.reader.close()


@accepts_storage_options
def open_kvp(path: str | os.PathLike, *, storage_options: dict | None = None) -> EntryDecoder:
    """Open a ``.kvp`` lazily: the header is read and validated, tensors are decoded one at a
    time with ``read_tensor(name, dtype=None)``; use with ``with``. ``profile``: the calibration
    profile of a transform-coded file (:mod:`kvpack.restore.profiles`).

    ``storage_options``: fsspec options (credentials, ``endpoint_url``, ...) for the URLs among the paths
    (:mod:`kvpack.storage`: ``s3://``, ``gs://``, ``memory://`` ...), which any path argument may be.

    Raises:
        FormatError: see :class:`KvpReader` (missing, truncated or corrupted file).
    """
    return EntryDecoder(KvpReader(path))


def read_tensor(reader: KvpReader, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor of an open reader, decoded (see :meth:`EntryDecoder.read_tensor`)."""
    return EntryDecoder(reader).read_tensor(name, dtype)
