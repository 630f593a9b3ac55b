"""llama.cpp state files as bytes: the layout of sequence-state (slot) and session files, read and written.

Source: llama.cpp's ``llama_state_seq_save_file`` (magic ``ggsq``, version 3) and
``llama_state_save_file`` (magic ``ggsn``, version 10), whose body is ``llama_kv_cache::state_write``
(``src/llama-kv-cache.cpp``; llama-cpp-python 0.3.36 vendors it). Little-endian throughout::

    u32 magic, u32 version, u32 n_tokens, i32 token_ids[n_tokens]
    session files only: u32 len, char arch[len]                     (the model's architecture name)
    u32 n_stream; per stream: u32 cell_count; if cell_count > 0:
      cell_count × (i32 pos, u32 n_seq_id, [i32 ext_x, ext_y, ext_tok], i32 seq_id[n_seq_id])
      u32 v_trans, u32 n_layer
      n_layer × (i32 key ggml type, u64 key row bytes, cell_count rows)
      v_trans == 0: n_layer × (i32 value type, u64 value row bytes, cell_count rows)
      v_trans == 1: n_layer × (i32 value type, u32 element bytes, u32 n_embd_v, n_embd_v × cell_count elements)

A row holds one cell's ``kv_heads · head_dim`` features, head after head. The cell extension
(``llama_kv_cell_ext``) is present only for M-RoPE models; it is found by which reading accounts
for every byte. This module knows bytes only: where each layer's K/V data lies and how to write a
file with other K/V bytes in its place; :mod:`kvpack.llama_cpp` turns the rows into tensors.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from kvpack.errors import FormatError, InvalidInputError
from kvpack.storage import is_url, location

SEQ_MAGIC = 0x67677371  # 'ggsq'
SESSION_MAGIC = 0x6767736E  # 'ggsn'
SEQ_VERSION = 3
SESSION_VERSION = 10
KINDS = {SEQ_MAGIC: ("seq", SEQ_VERSION), SESSION_MAGIC: ("session", SESSION_VERSION)}
#: In a ``.kvp`` made from a state file: every non-K/V byte of it (uint8, in file order), and, in a
#: lossless one, a block-type layer's bytes as they were (``llama_cpp.raw.{i}.key|value``, uint8).
STATE_TENSOR = "llama_cpp.state"
RAW_PREFIX = "llama_cpp.raw."
CELL_EXT_BYTES = 12  # llama_kv_cell_ext: i32 x, i32 y, i32 tok
#: Bounds a hostile file cannot pass (llama.cpp has no larger models or contexts).
MAX_STREAMS = 4096
MAX_LAYERS = 4096
MAX_ARCH_BYTES = 256
MAX_SEQ_IDS = 256  # LLAMA_MAX_SEQ
MAX_DATA_BYTES = 1 << 40  # one layer's K or V data


def refuse_raw_blocks(names, path) -> None:
    """Refuse to read a ``.kvp`` whose K/V are partly llama.cpp blocks kept as bytes (a lossless archive of
    a quantized cache) as a cache of tensors.

    Raises:
        InvalidInputError: ``names`` holds a ``llama_cpp.raw.*`` tensor.
    """
    if any(name.startswith(RAW_PREFIX) for name in names):
        raise InvalidInputError(
            f"{path} keeps a quantized llama.cpp cache's layers as their bytes (a lossless archive): restore it "
            "with `kvpack decompress --format llama-cpp`, or compress the state file with a codec to compare it"
        )


def is_llama_state(path: str | os.PathLike) -> bool:
    """Whether the file starts with a llama.cpp state magic (``ggsq`` or ``ggsn``)."""
    if is_url(path):  # read from a local copy (sources.open_dump)
        return False
    try:
        with open(location(path), "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and struct.unpack("<I", head)[0] in KINDS


@dataclass(frozen=True)
class LayerData:
    """One layer's keys or values in the file.

    ``ggml_type``: the GGML type id (``gguf.GGMLQuantizationType``); ``offset``/``nbytes``: the data's
    place in the file (bytes); ``row_bytes``: bytes per cell; ``transposed``: values stored as
    ``n_embd`` rows of ``cell_count`` elements (``v_trans``), else one row per cell.
    """

    ggml_type: int
    offset: int
    nbytes: int
    row_bytes: int
    n_embd: int
    transposed: bool = False

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name


@dataclass(frozen=True)
class StreamData:
    """One non-empty KV stream: its cells and per layer its key and value data.

    ``positions``: int32 ``(cell_count,)``; ``seq_counts``: how many sequences each cell belongs to;
    ``meta_offset``/``meta_nbytes``: the cell metadata's bytes; ``header_offset``: where ``v_trans`` starts.
    """

    index: int
    cell_count: int
    positions: np.ndarray
    seq_counts: np.ndarray
    meta_offset: int
    meta_nbytes: int
    v_trans: bool
    keys: tuple[LayerData, ...]
    values: tuple[LayerData, ...]


@dataclass(frozen=True)
class LlamaState:
    """What a llama.cpp state file holds (no K/V data read).

    ``kind``: ``"seq"`` or ``"session"``; ``token_ids``: int32 ``(n_tokens,)``; ``arch``: the model's
    architecture (session files; ``""`` in sequence files); ``n_stream``: the stream count the file was
    written with; ``streams``: the non-empty streams; ``cell_ext``: whether cells carry the M-RoPE
    extension; ``file_size`` in bytes.
    """

    path: str
    kind: str
    version: int
    token_ids: np.ndarray
    arch: str
    n_stream: int
    streams: tuple[StreamData, ...]
    cell_ext: bool
    file_size: int

    def only_stream(self) -> StreamData:
        """The one non-empty stream.

        Raises:
            InvalidInputError: the file holds no cells or several non-empty streams.
        """
        if len(self.streams) != 1:
            raise InvalidInputError(
                f"{self.path}: the state holds {len(self.streams)} non-empty KV streams; kvpack maps exactly one "
                "(save one sequence with llama_state_seq_save_file)"
            )
        return self.streams[0]

    def read(self, data: LayerData) -> np.ndarray:
        """One layer's raw K/V bytes as uint8 ``(nbytes,)``, read from the file.

        Raises:
            FormatError: the file changed since it was parsed.
        """
        with open(self.path, "rb") as f:
            f.seek(data.offset)
            raw = f.read(data.nbytes)
        if len(raw) != data.nbytes:
            raise FormatError(f"{self.path}: truncated while reading K/V data")
        return np.frombuffer(raw, dtype=np.uint8)


class _Cursor:
    """Bounds-checked little-endian reads from a state file, or from its skeleton (:func:`kv_free_bytes`),
    where K/V data is skipped without being there; ``offset`` is always the position in the full file."""

    def __init__(self, f, size: int, path: str, skeleton: bool = False):
        self.f, self.size, self.path, self.skeleton = f, size, path, skeleton
        self.pos = 0  # in what is read (the file or the skeleton)
        self.virtual = 0  # K/V bytes skipped in a skeleton

    @property
    def offset(self) -> int:
        return self.pos + self.virtual

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise FormatError(f"{self.path}: truncated llama.cpp state file (reading {what} at byte {self.offset})")
        self.f.seek(self.pos)
        raw = self.f.read(n)
        self.pos += n
        return raw

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def skip_data(self, n: int, what: str) -> int:
        """Skip K/V data; returns its offset in the full file."""
        start = self.offset
        if self.skeleton:
            if n > MAX_DATA_BYTES:
                raise FormatError(f"{self.path}: {what} of {n} bytes")
            self.virtual += n
        elif n < 0 or self.pos + n > self.size:
            raise FormatError(f"{self.path}: truncated llama.cpp state file ({what} runs past the end)")
        else:
            self.pos += n
        return start

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise FormatError(f"{self.path}: truncated llama.cpp state file ({what} runs past the end)")
        self.pos += n


def read_llama_state(path: str | os.PathLike) -> LlamaState:
    """Parse a llama.cpp sequence-state (``ggsq`` v3) or session (``ggsn`` v10) file's layout.

    Reads the token ids, the cell metadata and each layer's type and row size; K/V data stays on
    disk (:meth:`LlamaState.read`), so memory is bounded by the metadata.

    Raises:
        FormatError: not a llama.cpp state file, another version, a truncated or inconsistent file,
            or one whose memory is not a single KV cache (sliding-window or recurrent models).
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            return _parse(_Cursor(f, size, path))
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None


def state_from_skeleton(skeleton: bytes, path: str = "the stored llama.cpp state") -> LlamaState:
    """The layout of a state file given only its K/V-free bytes (:func:`kv_free_bytes`); offsets
    and ``file_size`` are the full file's.

    Raises:
        FormatError: the bytes are not a llama.cpp state skeleton.
    """
    return _parse(_Cursor(io.BytesIO(skeleton), len(skeleton), path, skeleton=True))


def _parse(cur: _Cursor) -> LlamaState:
    path, size = cur.path, cur.size
    magic, version = cur.u32("the magic"), cur.u32("the version")
    if magic not in KINDS:
        raise FormatError(f"{path}: not a llama.cpp state file (magic {magic:#010x}; expected 'ggsq' or 'ggsn')")
    kind, expected = KINDS[magic]
    if version != expected:
        raise FormatError(
            f"{path}: llama.cpp {kind} state version {version}; kvpack reads version {expected} (llama.cpp's "
            f"LLAMA_{'STATE_SEQ' if kind == 'seq' else 'SESSION'}_VERSION)"
        )
    n_tokens = cur.u32("the token count")
    if n_tokens * 4 > size - cur.pos:
        raise FormatError(f"{path}: {n_tokens} token ids do not fit in the file")
    token_ids = np.frombuffer(cur.take(4 * n_tokens, "the token ids"), dtype="<i4").astype(np.int32)
    arch = ""
    if kind == "session":
        length = cur.u32("the architecture name")
        if length > MAX_ARCH_BYTES:
            raise FormatError(f"{path}: architecture name of {length} bytes")
        arch = cur.take(length, "the architecture name").decode("utf-8", errors="replace")
    body = cur.pos
    errors = []
    for cell_ext in (False, True):  # the extension is not recorded: the reading that fits every byte wins
        cur.pos, cur.virtual = body, 0
        try:
            n_stream, streams = _parse_cache(cur, path, cell_ext)
        except FormatError as exc:
            errors.append(str(exc))
            continue
        if cur.pos != size:
            errors.append(
                f"{path}: {size - cur.pos} bytes after the KV cache; state files of models with more than one "
                "cache (sliding-window, hybrid or recurrent memory) are not supported"
            )
            continue
        return LlamaState(path, kind, version, token_ids, arch, n_stream, streams, cell_ext, cur.offset)
    raise FormatError(errors[0])


def _parse_cache(cur: _Cursor, path: str, cell_ext: bool) -> tuple[int, tuple[StreamData, ...]]:
    n_stream = cur.u32("the stream count")
    if not 1 <= n_stream <= MAX_STREAMS:
        raise FormatError(f"{path}: {n_stream} KV streams (at most {MAX_STREAMS})")
    streams = []
    for index in range(n_stream):
        cell_count = cur.u32("a cell count")
        if cell_count == 0:
            continue
        if cell_count * 12 > cur.size - cur.pos:
            raise FormatError(f"{path}: {cell_count} cells do not fit in the file")
        meta_offset = cur.offset
        positions, seq_counts = _parse_cells(cur, path, cell_count, cell_ext)
        meta_nbytes = cur.offset - meta_offset
        v_trans, n_layer = cur.u32("v_trans"), cur.u32("the layer count")
        if v_trans > 1 or not 1 <= n_layer <= MAX_LAYERS:
            raise FormatError(f"{path}: v_trans {v_trans} and {n_layer} layers are not a llama.cpp KV cache")
        keys = tuple(_parse_rows(cur, path, cell_count, "key") for _ in range(n_layer))
        if v_trans:
            values = tuple(_parse_transposed(cur, path, cell_count) for _ in range(n_layer))
        else:
            values = tuple(_parse_rows(cur, path, cell_count, "value") for _ in range(n_layer))
        streams.append(
            StreamData(index, cell_count, positions, seq_counts, meta_offset, meta_nbytes, bool(v_trans), keys, values)
        )
    return n_stream, tuple(streams)


def _parse_cells(cur: _Cursor, path: str, cell_count: int, cell_ext: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's position and sequence count; vectorized for the usual one sequence per cell."""
    stride = 12 + (CELL_EXT_BYTES if cell_ext else 0)
    start = cur.pos
    if start + cell_count * stride <= cur.size:
        cells = np.frombuffer(cur.take(cell_count * stride, "the cell metadata"), dtype="<i4").reshape(cell_count, -1)
        if (cells[:, 1] == 1).all():
            return cells[:, 0].astype(np.int32), np.ones(cell_count, dtype=np.int32)
    cur.pos = start  # cells in several sequences (a whole-context session): one at a time
    positions = np.empty(cell_count, dtype=np.int32)
    counts = np.empty(cell_count, dtype=np.int32)
    for i in range(cell_count):
        position, count = cur.i32("a cell position"), cur.u32("a cell's sequence count")
        if count > MAX_SEQ_IDS:
            raise FormatError(f"{path}: a cell in {count} sequences")
        positions[i], counts[i] = position, count
        cur.skip((CELL_EXT_BYTES if cell_ext else 0) + 4 * count, "the cell metadata")
    return positions, counts


def _check_type(path: str, ggml_type: int, what: str) -> tuple[int, int]:
    """``(elements per block, bytes per block)`` of a GGML type id."""
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise FormatError(f"{path}: unknown GGML type {ggml_type} for the {what}s") from None


def _parse_rows(cur: _Cursor, path: str, cell_count: int, what: str) -> LayerData:
    ggml_type, row_bytes = cur.i32(f"a {what} type"), cur.u64(f"a {what} row size")
    block, block_bytes = _check_type(path, ggml_type, what)
    if row_bytes == 0 or row_bytes % block_bytes or row_bytes > MAX_DATA_BYTES:
        raise FormatError(f"{path}: {what} rows of {row_bytes} bytes are not whole blocks of GGML type {ggml_type}")
    nbytes = row_bytes * cell_count
    offset = cur.skip_data(nbytes, f"{what} data")
    return LayerData(ggml_type, offset, nbytes, row_bytes, row_bytes // block_bytes * block)


def _parse_transposed(cur: _Cursor, path: str, cell_count: int) -> LayerData:
    ggml_type, element_bytes, n_embd = cur.i32("a value type"), cur.u32("a value element size"), cur.u32("n_embd_v")
    block, block_bytes = _check_type(path, ggml_type, "value")
    if block != 1 or element_bytes != block_bytes or n_embd == 0:
        raise FormatError(f"{path}: transposed values of GGML type {ggml_type} with {element_bytes}-byte elements")
    nbytes = n_embd * cell_count * element_bytes
    offset = cur.skip_data(nbytes, "value data")
    return LayerData(ggml_type, offset, nbytes, n_embd * element_bytes, n_embd, transposed=True)


def kv_free_bytes(state: LlamaState) -> bytes:
    """Every byte of the file except the K/V data, in file order (the file's "skeleton")."""
    spans = sorted((d.offset, d.nbytes) for s in state.streams for d in (*s.keys, *s.values))
    parts, at = [], 0
    with open(state.path, "rb") as f:
        for offset, nbytes in spans:
            f.seek(at)
            parts.append(f.read(offset - at))
            at = offset + nbytes
        f.seek(at)
        parts.append(f.read())
    return b"".join(parts)


def write_llama_state(out, skeleton: bytes, state: LlamaState, kv_bytes: Callable[[int, str, int], bytes]) -> int:
    """Write a state file: ``skeleton``'s bytes with each layer's K/V data from ``kv_bytes``.

    Args:
        out: a binary file open for writing.
        skeleton: the file's K/V-free bytes (:func:`kv_free_bytes`).
        state: its layout (:func:`state_from_skeleton`).
        kv_bytes: ``(stream index, "key"|"value", layer) -> bytes`` of exactly that layer's
            ``LayerData.nbytes``.

    Returns:
        Bytes written.

    Raises:
        InvalidInputError: a layer's bytes are not the size its type and row size require.
    """
    spans = sorted(
        (data.offset, stream.index, kind, layer, data.nbytes)
        for stream in state.streams
        for kind, layers in (("key", stream.keys), ("value", stream.values))
        for layer, data in enumerate(layers)
    )
    written, at = 0, 0  # ``at``: position in the skeleton
    for offset, stream, kind, layer, nbytes in spans:
        head = offset - written  # skeleton bytes before this span
        out.write(skeleton[at : at + head])
        at, written = at + head, written + head
        payload = kv_bytes(stream, kind, layer)
        if len(payload) != nbytes:
            raise InvalidInputError(
                f"layer {layer} {kind}s are {len(payload)} bytes; the llama.cpp file needs {nbytes} ({kind} type "
                "and row size as saved)"
            )
        out.write(payload)
        written += nbytes
    out.write(skeleton[at:])
    return written + len(skeleton) - at


def with_path(state: LlamaState, path: str) -> LlamaState:
    """``state`` naming another path (a copy's layout)."""
    return replace(state, path=path)
