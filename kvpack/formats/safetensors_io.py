"""KV-cache dumps as safetensors files.

A dump holds ``layers.{i}.key`` and ``layers.{i}.value`` for every layer, shape
``(batch, num_kv_heads, seq_len, head_dim)`` as the model's cache holds them (layers may
differ in shape), ``token_ids`` (int64, ``(batch, seq_len)``), and string metadata
(model, num_layers, num_kv_heads, head_dim, seq_len, dtype, versions).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from kvpack.dtypes import DTYPE_NAMES, DTYPE_SIZES, SAFETENSORS_CODES, SAFETENSORS_NAMES, TORCH_DTYPES
from kvpack.errors import FormatError, InvalidInputError
from kvpack.formats.atomic import atomic_output
from kvpack.formats.reader import not_a_kvp_file, open_input
from kvpack.names import KV_NAME, kv_tensor_name, parse_kv_name, parse_stacked_name, stacked_name  # noqa: F401
from kvpack.storage import is_url, location


class SafetensorsSource:
    """A safetensors file opened lazily (one tensor at a time). Use as a context manager.

    Raises:
        InvalidInputError: missing or unreadable file.
        FormatError: not a valid safetensors file (also raised by :meth:`get` for a
            tensor whose data is cut off).
    """

    def __init__(self, path: str | os.PathLike):
        if is_url(path):  # safetensors memory-maps a local file: sources.open_dump makes a local copy first
            raise InvalidInputError(f"{path}: a safetensors file at a URL is read through a local copy (open_dump)")
        self.path = Path(location(path))
        open_input(self.path).close()
        if self.path.stat().st_size == 0:
            raise FormatError(f"{self.path}: empty file")
        try:
            self._handle = safe_open(str(self.path), framework="pt")
            # sorted: safetensors returns its metadata in hash order, which differs between processes
            self.metadata = dict(sorted((self._handle.metadata() or {}).items()))
            self._keys = list(self._handle.keys())
        except Exception as exc:  # safetensors raises its own error types for every malformed file
            if self.path.suffix.lower() == ".kvp":  # named as ours: say what it lacks
                raise not_a_kvp_file(self.path) from None
            raise FormatError(f"{self.path}: not a readable safetensors file ({_first_line(exc)})") from None
        self.file_size = self.path.stat().st_size

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc) -> None:
        self._handle = None

    def keys(self) -> list[str]:
        return list(self._keys)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, whole. 4-D tensors (K/V) are read with positioned reads (:meth:`get_slice`), so
        reading a cache tensor by tensor does not keep the file's pages in the resident set the way
        the memory map of ``safe_open`` does; others through ``safe_open``.

        Raises:
            FormatError: the tensor cannot be read (cut off, bad header).
        """
        shape, dtype = self.shape_dtype(name)
        if len(shape) == 4 and dtype in TORCH_DTYPES:
            return self.get_slice(name, 0, shape[2])
        try:
            return self._handle.get_tensor(name)
        except Exception as exc:
            raise FormatError(f"{self.path}: cannot read tensor {name!r} ({_first_line(exc)})") from None

    def get_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Tokens ``start`` to ``stop - 1`` of a 4-D tensor ``(batch, num_kv_heads, seq_len, head_dim)``
        (axis 2), in its dtype, reading only their bytes.

        Read with positioned reads rather than through the memory map :meth:`get` uses, so the
        pages read do not stay in the process's resident set: reading a whole file a slice at a
        time keeps the memory of one slice.

        Raises:
            FormatError: not a 4-D tensor, a range outside it, or a file cut short.
        """
        shape, dtype = self.shape_dtype(name)
        if len(shape) != 4 or not 0 <= start <= stop <= shape[2] or dtype not in TORCH_DTYPES:
            raise FormatError(f"{self.path}: cannot read tokens {start}:{stop} of tensor {name!r} of shape {shape}")
        batch, heads, seq, dim = shape
        size = DTYPE_SIZES[dtype]
        run = (stop - start) * dim * size  # contiguous bytes per (batch, head)
        if run == 0 or batch * heads == 0:
            return torch.empty((batch, heads, stop - start, dim), dtype=TORCH_DTYPES[dtype])
        buffer = bytearray(batch * heads * run)
        view = memoryview(buffer)
        first = self._data_start(name)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for row in range(batch * heads):
                offset = first + (row * seq + start) * dim * size
                if os.preadv(fd, [view[row * run : (row + 1) * run]], offset) != run:
                    raise FormatError(f"{self.path}: truncated: tensor {name!r} is cut off")
        finally:
            os.close(fd)
        return torch.frombuffer(buffer, dtype=TORCH_DTYPES[dtype]).reshape(batch, heads, stop - start, dim)

    def _data_start(self, name: str) -> int:
        """Absolute offset of tensor ``name``'s first byte (from the header, which ``safe_open`` has validated)."""
        if not hasattr(self, "_starts"):
            with open(self.path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            self._starts = {
                key: 8 + length + int(value["data_offsets"][0])
                for key, value in header.items()
                if key != "__metadata__"
            }
        return self._starts[name]

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        info = self._handle.get_slice(name)
        return tuple(info.get_shape()), _dtype_name(info.get_dtype())


#: Bytes per pwrite call: bounds the temporary a piece's bytes may need.
_WRITE_BYTES = 1 << 24


@dataclass(frozen=True)
class SafetensorsLayout:
    """Where every tensor of a safetensors file goes, computed from names, shapes and dtypes alone.

    Attributes:
        header: the 8-byte little-endian header length, then the JSON header padded with
            spaces to a multiple of 8 bytes (so the data starts 8-byte aligned).
        offsets: tensor name -> ``(start, stop)``, absolute byte offsets in the file.
        shapes: tensor name -> shape.
        dtypes: tensor name -> dtype name (``float16`` ...).
        size: the file size in bytes.
    """

    header: bytes
    offsets: dict[str, tuple[int, int]]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    size: int


def safetensors_layout(
    tensors: list[tuple[str, tuple[int, ...], str]], metadata: dict[str, str] | None
) -> SafetensorsLayout:
    """Lay out a safetensors file holding ``tensors`` ``(name, shape, dtype name)``.

    The format (safetensors README, "Format"): 8 bytes, the header length ``N`` as a
    little-endian u64; ``N`` bytes of UTF-8 JSON, an object with an optional ``__metadata__``
    (a string -> string map) and, per tensor, ``{"dtype": "F16", "shape": [...],
    "data_offsets": [begin, end]}``, offsets relative to the byte after the header; then the
    data, row-major and little-endian, with no holes: the tensors' byte ranges follow one
    another from 0 to the end of the file. The header is padded with spaces to a multiple of 8
    bytes, as the safetensors library writes it.

    The data is ordered by element size, largest first (then in the order given), so every
    tensor starts at a multiple of its element size; the header lists the tensors in data order.
    ``metadata=None`` writes no ``__metadata__`` key (as ``safetensors.torch.save_file`` does).

    Raises:
        InvalidInputError: a dtype safetensors cannot hold, a duplicate name or ``__metadata__``
            as a tensor name.
    """
    names = [name for name, _, _ in tensors]
    if len(set(names)) != len(names) or "__metadata__" in names:
        raise InvalidInputError("safetensors tensor names must be unique and not __metadata__")
    for name, _, dtype in tensors:
        if dtype not in SAFETENSORS_CODES:
            raise InvalidInputError(f"tensor {name!r}: dtype {dtype} has no safetensors code")
    ordered = sorted(tensors, key=lambda t: -DTYPE_SIZES[t[2]])  # stable: keeps the given order per size
    header: dict = {} if metadata is None else {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    relative, position = {}, 0
    for name, shape, dtype in ordered:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        relative[name] = (position, position + nbytes)
        header[name] = {
            "dtype": SAFETENSORS_CODES[dtype],
            "shape": [int(s) for s in shape],
            "data_offsets": [position, position + nbytes],
        }
        position += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return SafetensorsLayout(
        header=struct.pack("<Q", len(text)) + text,
        offsets={name: (start + a, start + b) for name, (a, b) in relative.items()},
        shapes={name: tuple(int(s) for s in shape) for name, shape, _ in tensors},
        dtypes={name: dtype for name, _, dtype in tensors},
        size=start + position,
    )


class SafetensorsStream:
    """An open safetensors file being written (see :func:`safetensors_writer`)."""

    def __init__(self, handle, layout: SafetensorsLayout):
        self._handle = handle
        self.layout = layout
        self._written = dict.fromkeys(layout.offsets, 0)
        self._write_at(0, memoryview(layout.header))

    def write(self, name: str, x: torch.Tensor, axis: int = 0, start: int = 0) -> None:
        """Write ``x`` into tensor ``name`` at index ``start`` of dimension ``axis``.

        ``x`` has the tensor's shape except along ``axis``, where it covers ``start`` to
        ``start + x.shape[axis] - 1``; ``axis=0, start=0`` with the full shape writes the whole
        tensor. ``x`` is converted to the tensor's dtype first if it differs. Each piece goes to
        its place with positioned writes, so pieces may come in any order.

        Raises:
            InvalidInputError: unknown name, or a piece that does not fit the tensor.
            OSError: the disk is full, a file size limit (EFBIG) ...
        """
        if name not in self.layout.offsets:
            raise InvalidInputError(f"no tensor named {name!r} in this safetensors layout")
        shape, dtype = self.layout.shapes[name], self.layout.dtypes[name]
        if x.dtype != TORCH_DTYPES[dtype]:
            x = x.to(TORCH_DTYPES[dtype])
        if not shape:  # a scalar
            axis, start = 0, 0
            x = x.reshape(1)
            shape = (1,)
        count = x.shape[axis] if x.ndim == len(shape) and 0 <= axis < len(shape) else -1
        if (
            count < 0
            or tuple(x.shape) != (*shape[:axis], count, *shape[axis + 1 :])
            or not 0 <= start <= shape[axis] - count
        ):
            raise InvalidInputError(
                f"tensor {name!r}: a piece of shape {tuple(x.shape)} at {start} along axis {axis} "
                f"does not fit its shape {shape}"
            )
        if x.numel() == 0:
            return
        size = DTYPE_SIZES[dtype]
        outer = math.prod(shape[:axis])
        inner = math.prod(shape[axis + 1 :]) * size  # bytes of one index along the axis
        run = count * inner  # contiguous bytes per outer index
        data = x.contiguous().reshape(outer, -1).view(torch.uint8).numpy()
        base = self.layout.offsets[name][0]
        for index in range(outer):
            self._write_at(base + (index * shape[axis] + start) * inner, memoryview(data[index]).cast("B"))
        self._written[name] += outer * run

    def finish(self) -> None:
        """Check that every byte of every tensor was written.

        Raises:
            RuntimeError: a tensor was not written completely (a bug of the caller).
        """
        missing = [name for name, (a, b) in self.layout.offsets.items() if self._written[name] != b - a]
        if missing:
            raise RuntimeError(f"safetensors output incomplete: tensors {', '.join(missing[:5])} not fully written")
        self._handle.truncate(self.layout.size)  # already that size: every byte was written

    def _write_at(self, offset: int, data: memoryview) -> None:
        fd = self._handle.fileno()
        done = 0
        while done < len(data):
            count = os.pwrite(fd, data[done : done + _WRITE_BYTES], offset + done)
            if count <= 0:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            done += count


@contextlib.contextmanager
def safetensors_writer(
    path: str | os.PathLike,
    tensors: list[tuple[str, tuple[int, ...], str]],
    metadata: dict[str, str] | None,
    force: bool = False,
) -> Iterator[SafetensorsStream]:
    """Write a safetensors file piece by piece, atomically; use as a context manager.

    The header is computed from ``tensors`` ``(name, shape, dtype name)`` and ``metadata``
    alone (:func:`safetensors_layout`) and written first; then :meth:`SafetensorsStream.write`
    puts each tensor, or each piece of one, at its place. Memory is bounded by the pieces the
    caller holds. The output appears only when the block ends without error and every byte
    was written; on any error (or Ctrl-C) neither it nor a temporary file is left
    (:func:`kvpack.formats.atomic.atomic_output`).

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
        InvalidInputError: see :func:`safetensors_layout` and :func:`check_output_path`.
    """
    layout = safetensors_layout(tensors, metadata)
    with atomic_output(path, force) as tmp:
        with open(tmp, "r+b") as handle:
            stream = SafetensorsStream(handle, layout)
            yield stream
            stream.finish()


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str], force: bool = False
) -> int:
    """Write ``tensors`` atomically (temp file + rename; see :func:`safetensors_writer`).

    Returns:
        The file size in bytes.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
        InvalidInputError: a dtype safetensors cannot hold.
    """
    specs = [(name, tuple(x.shape), _dtype_of(name, x)) for name, x in tensors.items()]
    with safetensors_writer(path, specs, metadata, force) as stream:
        for name, x in tensors.items():
            stream.write(name, x.detach().to("cpu"))
    return stream.layout.size


def _dtype_of(name: str, x: torch.Tensor) -> str:
    try:
        return DTYPE_NAMES[x.dtype]
    except KeyError:
        raise InvalidInputError(f"tensor {name!r}: dtype {x.dtype} cannot be written to safetensors") from None


def _dtype_name(code: str) -> str:
    return SAFETENSORS_NAMES.get(code, code.lower())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
