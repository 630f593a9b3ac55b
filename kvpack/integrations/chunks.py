"""LMCache's KV chunks ``[2, layers, tokens, hidden]`` <-> complete, checksummed ``.kvp`` streams (no LMCache import).

LMCache keeps a chunk (256 tokens by default) as one tensor ``[2, num_layers, num_tokens,
num_kv_heads * head_dim]`` (keys at index 0, values at 1; each token's features head after head, as
vLLM pages them). kvpack stores it as the tensors ``layers.{i}.key|value`` of shape ``(1,
num_kv_heads, num_tokens, head_dim)`` in a ``.kvp`` stream written by
:func:`kvpack.compress.compress_tensors` and read by :func:`kvpack.restore.files.load_kvp` (codec,
sections, entropy stage, checksums: those of every ``.kvp`` file), through a scratch file in memory
(``/dev/shm``), so a chunk decodes bit for bit as the same tensors do from a ``.kvp`` file. The
stream's length is in its preamble: bytes after it in a buffer are never read.

Un-RoPE is not available: a chunk does not carry its tokens' positions. The grouped codecs' recommended
un-RoPE is dropped (as for a dump without rotary parameters); an explicit ``unrope`` and the transform
codec (a calibration profile of pre-RoPE keys) are refused. :mod:`kvpack.integrations.lmcache` wraps
:class:`ChunkCodec` in LMCache's serde API (and says why streams are fixed-size by default).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kvpack.compress import compress_tensors, metadata_for_file
from kvpack.config import CodecConfig
from kvpack.config_files import config_from_flat
from kvpack.dtypes import check_finite, check_float_dtype, dtype_name
from kvpack.entry import entry_layout
from kvpack.errors import FormatError, InvalidInputError, KvpackError, TruncatedFileError, brief
from kvpack.formats.constants import MAGIC, PREAMBLE, PREAMBLE_SIZE, SECTION_ALIGNMENT
from kvpack.formats.entropy import EntropyConfig
from kvpack.formats.header import section_specs, spec_nbytes
from kvpack.formats.layout import header_and_padding
from kvpack.names import ROLES, kv_tensor_name
from kvpack.presets import flat_options
from kvpack.restore.files import load_kvp

#: Metadata key of a serialized chunk: its LMCache shape ``[2, layers, tokens, hidden]`` (JSON).
CHUNK_KEY = "lmcache_chunk"
#: Bytes a stream may hold per section beyond its densely packed size in :meth:`ChunkCodec.size_bound`:
#: the alignment padding, and the checksum digits the header's stand-ins may lack (10 at most).
SECTION_SLACK = SECTION_ALIGNMENT - 1 + 16
#: Bytes beyond the header :func:`~kvpack.formats.layout.header_and_padding` sizes: a quarter more, plus this.
HEADER_SLACK = 1024
_LABEL = "serialized chunk"


def default_config() -> CodecConfig:
    """The serde's codec without options: uniform, 4 bits, groups of 64, with the codec's measured best
    settings (keys per channel, Hadamard rotation; un-RoPE dropped, see above), as ``kvpack compress
    --method uniform`` applies them. Not ``kvpack compress``'s adaptive: on 256-token chunks of SmolLM2
    it serializes 7x slower for 13-15 % less relative MSE at the same size (docs/benchmarks.md, "LMCache")."""
    return CodecConfig.build("uniform", 4, 64, recommended=True)


def chunk_dims(shape: tuple[int, ...], head_dim: int) -> tuple[int, int, int]:
    """``(num_layers, num_tokens, num_kv_heads)`` of an LMCache chunk of ``shape``.

    Raises:
        InvalidInputError: not ``[2, layers, tokens, hidden]`` with at least one layer and token, or a
            ``hidden`` that is not a multiple of ``head_dim``.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 4 or shape[0] != 2 or min(shape) < 1:
        raise InvalidInputError(
            f"an LMCache KV chunk has shape [2, layers, tokens, hidden] (keys, values), got {list(shape)}"
        )
    if shape[3] % head_dim:
        raise InvalidInputError(
            f"the chunk's hidden size {shape[3]} (kv heads x head dim) is not a multiple of `head_dim={head_dim}`"
        )
    return shape[1], shape[2], shape[3] // head_dim


def split_chunk(chunk: torch.Tensor, head_dim: int, check: bool = True) -> dict[str, torch.Tensor]:
    """An LMCache chunk ``[2, L, T, H * head_dim]`` as kvpack's K/V tensors (``check``: refuse NaN / Inf
    here; the codecs' encoder refuses them too, the lossless path does not).

    Returns:
        ``layers.{i}.key`` and ``layers.{i}.value``, layer by layer: ``(1, H, T, head_dim)`` in the
        chunk's dtype, on the CPU, contiguous (copies).

    Raises:
        InvalidInputError: a bad shape (:func:`chunk_dims`), a dtype other than float16 / bfloat16 /
            float32, or with ``check`` NaN / Inf values (naming the layer).
    """
    layers, tokens, heads = chunk_dims(tuple(chunk.shape), head_dim)
    check_float_dtype("LMCache chunk", dtype_name(chunk.dtype))
    per_head = chunk.detach().to("cpu").reshape(2, layers, tokens, heads, head_dim).transpose(2, 3)
    tensors = {}
    for layer in range(layers):
        for index, role in enumerate(ROLES):
            name = kv_tensor_name(layer, role)
            tensors[name] = per_head[index, layer].unsqueeze(0).contiguous()
            if check:
                check_finite(name, tensors[name], consequence="refusing to serialize the chunk")
    return tensors


def join_chunk(tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
    """Write kvpack's K/V tensors ``layers.{i}.key|value`` ``(1, H, T, D)`` into an LMCache chunk
    ``out`` ``[2, L, T, H * D]`` (inverse of :func:`split_chunk`; ``out`` keeps its dtype and device).

    Raises:
        InvalidInputError: the tensors are not the chunk's layers, tokens and hidden size.
    """
    layers, tokens, hidden = int(out.shape[1]), int(out.shape[2]), int(out.shape[3])
    expected = [kv_tensor_name(layer, role) for layer in range(layers) for role in ROLES]
    if sorted(tensors) != sorted(expected):
        raise InvalidInputError(
            f"the {_LABEL} holds {len(tensors)} tensors, the destination chunk {list(out.shape)} takes "
            f"{len(expected)} (layers.0.key to layers.{layers - 1}.value)"
        )
    for layer in range(layers):
        for index, role in enumerate(ROLES):
            x = tensors[kv_tensor_name(layer, role)]
            if x.dim() != 4 or x.shape[0] != 1 or x.shape[2] != tokens or x.shape[1] * x.shape[3] != hidden:
                raise InvalidInputError(
                    f"tensor {kv_tensor_name(layer, role)!r} of the {_LABEL} is {tuple(x.shape)}, which does not "
                    f"fill the destination chunk {list(out.shape)}"
                )
            out[index, layer].copy_(x[0].transpose(0, 1).reshape(tokens, hidden))


class ChunkCodec:
    """LMCache chunks <-> ``.kvp`` streams with one codec (what :class:`KvpackSerializer` and
    :class:`KvpackDeserializer` share).

    Args:
        head_dim: channels per attention head; a chunk's ``hidden`` is ``num_kv_heads * head_dim``.
        config: the codec of every K/V tensor (any grouped codec; default :func:`default_config`).
        lossless: store K/V exactly in their dtype (only the entropy stage; ``config`` must be unset;
            saves bytes only with ``fixed_size=False``).
        fixed_size: every stream fills the buffer :meth:`size_bound` sizes (zeros after the stream;
            why LMCache needs it: :mod:`kvpack.integrations.lmcache`), else it is as long as it is.
        entropy: the lossless stage (:class:`~kvpack.formats.entropy.EntropyConfig`); default off with
            ``fixed_size``, else zstd level 1 on every section.

    Raises:
        InvalidInputError: ``head_dim`` not a positive integer, ``lossless`` with a ``config``, or a
            config that un-RoPEs by request or is the transform codec.
    """

    def __init__(
        self,
        head_dim: int,
        config: CodecConfig | None = None,
        lossless: bool = False,
        fixed_size: bool = True,
        entropy: EntropyConfig | None = None,
    ):
        if type(head_dim) is not int or head_dim < 1:
            raise InvalidInputError(f"`head_dim` must be a positive integer, got {brief(head_dim)}")
        if lossless and config is not None:
            raise InvalidInputError("`lossless=True` stores the chunk exactly: give no codec `config` with it")
        self.head_dim = head_dim
        self.config = None if lossless else chunk_config(config if config is not None else default_config())
        self.fixed_size = bool(fixed_size)
        self.entropy = entropy if entropy is not None else EntropyConfig(level=0) if fixed_size else EntropyConfig()
        self._bounds: dict[tuple[tuple[int, ...], torch.dtype], int] = {}  # LMCache asks once per store

    def __repr__(self) -> str:
        codec = "lossless" if self.config is None else self.config.describe()
        size = "fixed size" if self.fixed_size else "stream length"
        return f"ChunkCodec(head_dim={self.head_dim}, {codec}, {size}, zstd level {self.entropy.level})"

    def encode_into(self, chunk: torch.Tensor, out: torch.Tensor) -> int:
        """Write ``chunk`` ``[2, L, T, hidden]`` (float16 / bfloat16 / float32) as a ``.kvp`` stream at
        the start of ``out`` (any contiguous tensor, taken as its bytes), and with ``fixed_size`` zeros
        after it to the end of ``out``.

        Returns:
            The bytes written: all of ``out``'s with ``fixed_size``, else the stream's length.

        Raises:
            InvalidInputError: a bad chunk (:func:`split_chunk`), a group size that does not divide, or
                an ``out`` too small for the stream (size it with :meth:`size_bound`).
        """
        tensors = split_chunk(chunk, self.head_dim, check=self.config is None)  # a codec checks for itself
        target = byte_view(out)
        with _scratch() as folder:
            path = Path(folder) / "chunk.kvp"
            try:
                compress_tensors(tensors, path, self.config, self._metadata(tuple(chunk.shape)), entropy=self.entropy)
            except KvpackError as exc:
                raise _relabeled(exc, path) from None
            size = path.stat().st_size
            if size > target.numel():
                raise InvalidInputError(
                    f"the {_LABEL} takes {size} bytes, its buffer holds {target.numel()} "
                    "(size the buffer with `estimate_serialized_size`)"
                )
            _read_into(path, target[:size])
        if not self.fixed_size:
            return size
        target[size:].zero_()
        return target.numel()

    def encode(self, chunk: torch.Tensor) -> bytes:
        """``chunk`` ``[2, L, T, hidden]`` as the bytes of a ``.kvp`` stream (see :meth:`encode_into`)."""
        out = torch.empty(self.size_bound(tuple(chunk.shape), chunk.dtype), dtype=torch.uint8)
        return out[: self.encode_into(chunk, out)].numpy().tobytes()

    def decode_into(self, data: torch.Tensor | bytes, out: torch.Tensor) -> None:
        """Decode the ``.kvp`` stream at the start of ``data`` into ``out`` ``[2, L, T, hidden]``.

        ``data`` may run on past the stream (only the length its preamble gives is read); ``out``
        takes the decoded values in its own dtype (float16 / bfloat16 / float32).

        Raises:
            FormatError: no ``.kvp`` stream at the start of ``data``, a stream longer than ``data``, or a
                corrupted one (:class:`~kvpack.errors.ChecksumMismatchError`, ...; every section's
                checksum is checked before it is decoded).
            InvalidInputError: a stream whose tensors are not ``out``'s layers, tokens and hidden size.
        """
        source = byte_view(torch.frombuffer(bytearray(data), dtype=torch.uint8) if isinstance(data, bytes) else data)
        size = stream_length(source)
        with _scratch() as folder:
            path = Path(folder) / "chunk.kvp"
            with open(path, "wb") as handle:
                handle.write(memoryview(source[:size].cpu().numpy()))
            try:
                tensors, metadata = load_kvp(path, dtype=out.dtype)
            except KvpackError as exc:
                raise _relabeled(exc, path) from None
        stored = metadata.get(CHUNK_KEY)
        if stored is not None and json.loads(stored) != list(out.shape):
            raise InvalidInputError(
                f"the {_LABEL} is a chunk of shape {stored}, the destination chunk has shape {list(out.shape)}"
            )
        join_chunk(tensors, out)

    def size_bound(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """An upper bound on the bytes of the stream of a chunk of ``shape`` ``[2, L, T, hidden]`` and
        ``dtype`` (with ``fixed_size``, the bytes of every stream): preamble, every section densely packed (the entropy stage keeps a section only where
        it is smaller), :data:`SECTION_SLACK` per section, and the header of those sections listed as the
        entropy stage may list them (:func:`~kvpack.formats.layout.header_and_padding`) plus a quarter
        and :data:`HEADER_SLACK`.

        Raises:
            InvalidInputError: a bad shape (:func:`chunk_dims`) or a group size that does not divide.
        """
        known = self._bounds.get((tuple(shape), dtype))
        if known is not None:
            return known
        layers, tokens, heads = chunk_dims(shape, self.head_dim)
        name = dtype_name(dtype)
        shapes = {
            kv_tensor_name(layer, role): ((1, heads, tokens, self.head_dim), name)
            for layer in range(layers)
            for role in ROLES
        }
        entries = []
        for entry, sources, codec in entry_layout(shapes, self.config):
            single = shapes[sources[0]][0]
            entries.append((entry, single if entry == sources[0] else (len(sources), *single), name, codec))
        metadata = metadata_for_file(self._metadata(shape), self.config)
        header, _ = header_and_padding(metadata, entries, self.entropy)
        specs = [spec for e, s, d, c in entries for spec in section_specs(s, d, c, e).values()]
        bound = (
            PREAMBLE_SIZE + sum(map(spec_nbytes, specs)) + SECTION_SLACK * len(specs) + header * 5 // 4 + HEADER_SLACK
        )
        self._bounds[(tuple(shape), dtype)] = bound
        return bound

    def _metadata(self, shape: tuple[int, ...]) -> dict[str, str]:
        return {CHUNK_KEY: json.dumps([int(n) for n in shape]), "head_dim": str(self.head_dim)}


def chunk_config(config: CodecConfig) -> CodecConfig:
    """``config`` as a chunk is coded with: without an un-RoPE it only recommended (a chunk has no positions).

    Raises:
        InvalidInputError: ``config`` un-RoPEs by request, or is the transform codec.
    """
    if config.whole_tensor:
        raise InvalidInputError(
            f"method {config.method} codes keys before RoPE with a calibration profile, and an LMCache chunk does "
            "not carry its tokens' positions; choose a grouped codec (uniform, normal, adaptive, an element format)"
        )
    if config.unrope and config.unrope_optional:
        return dataclasses.replace(config, unrope=False, unrope_optional=False)
    if config.unrope:
        raise InvalidInputError(
            "an LMCache chunk does not carry its tokens' positions, so its keys cannot be un-RoPE'd; leave `unrope` unset"
        )
    return config


def byte_view(x: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as a flat ``uint8`` view (no copy).

    Raises:
        InvalidInputError: ``x`` is not contiguous.
    """
    if not x.is_contiguous():
        raise InvalidInputError(f"a serde buffer must be contiguous, got a {x.dtype} tensor of strides {x.stride()}")
    return x.reshape(-1).view(torch.uint8)


def stream_length(data: torch.Tensor) -> int:
    """The length in bytes of the ``.kvp`` stream at the start of ``data`` (flat ``uint8``), read from its
    preamble (whose checksum the reader then checks with the rest of the stream).

    Raises:
        FormatError: ``data`` does not start with the ``.kvp`` magic bytes.
        TruncatedFileError: the preamble or the stream it declares runs past the end of ``data``.
    """
    head = data[:PREAMBLE_SIZE].cpu().numpy().tobytes()
    if head[: len(MAGIC)] != MAGIC:
        raise FormatError(
            f"the {_LABEL} does not start with the .kvp magic bytes (not written by the kvpack serde, or overwritten)"
        )
    if len(head) < PREAMBLE_SIZE:
        raise TruncatedFileError(f"the {_LABEL} is {len(head)} bytes, shorter than the 64-byte preamble")
    _, _, _, _, header_offset, header_length, _, _ = PREAMBLE.unpack(head)
    size = header_offset + header_length
    if size > data.numel():
        raise TruncatedFileError(f"the {_LABEL} declares {size} bytes, its buffer holds {data.numel()}")
    return size


def codec_from_options(options: Mapping[str, Any]) -> ChunkCodec:
    """A :class:`ChunkCodec` from the flat options of LMCache's ``"serde"`` JSON (``type`` removed).

    Keys: ``head_dim`` (required); ``fixed_size`` (bool, default true; :class:`ChunkCodec`); ``lossless``
    (bool); ``zstd_level`` (0-22; default 0 with ``fixed_size``, else 1); ``preset`` (a kvpack
    preset, literal as ``--preset``); else ``method`` (default ``uniform``), ``bits``, ``group_size``,
    ``outlier_ratio``, the transform keys and the codec's options, with the codec's recommended
    settings for what is not given (as ``kvpack compress``; :func:`kvpack.config_files.config_from_flat`).

    Raises:
        InvalidInputError: a missing ``head_dim``, an unknown key or a bad value.
    """
    options = dict(options)
    head_dim = options.pop("head_dim", None)
    lossless = options.pop("lossless", False)
    fixed_size = options.pop("fixed_size", True)
    level = options.pop("zstd_level", None)
    preset = options.pop("preset", None)
    if head_dim is None:
        raise InvalidInputError("the kvpack serde needs `head_dim` (channels per attention head, e.g. 64 or 128)")
    for flag, value in (("lossless", lossless), ("fixed_size", fixed_size)):
        if type(value) is not bool:
            raise InvalidInputError(f"`{flag}` must be true or false, got {brief(value)}")
    if lossless and (options or preset is not None):
        raise InvalidInputError(f"`lossless` stores chunks exactly and takes no codec options, got {sorted(options)}")
    config = None
    if preset is not None:
        config = config_from_flat(flat_options(str(preset), options))
    elif options:
        config = config_from_flat({"method": "uniform", **options}, recommended=True)
    entropy = None if level is None else EntropyConfig(level=level)
    return ChunkCodec(head_dim, config, lossless=lossless, fixed_size=fixed_size, entropy=entropy)


def _scratch() -> tempfile.TemporaryDirectory:
    """A private folder for one stream, in memory (``/dev/shm``) where there is one."""
    shm = Path("/dev/shm")
    folder = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return tempfile.TemporaryDirectory(prefix="kvpack-lmcache-", dir=folder)


def _read_into(path: Path, target: torch.Tensor) -> None:
    """Read the whole file ``path`` into the flat ``uint8`` tensor ``target`` (its length)."""
    with open(path, "rb") as handle:
        if target.device.type != "cpu":
            target.copy_(torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8))
            return
        view, done = memoryview(target.numpy()), 0
        while done < len(view):
            read = handle.readinto(view[done:])
            if not read:
                raise TruncatedFileError(f"the {_LABEL} shrank while it was copied")
            done += read


def _relabeled(exc: KvpackError, path: Path) -> KvpackError:
    """The same error, naming the serialized chunk instead of the scratch file it passed through."""
    return type(exc)(str(exc).replace(str(path), _LABEL))
