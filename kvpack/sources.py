"""A KV cache file of either format (``.kvp`` or safetensors), read one tensor or one piece at a time."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from kvpack.errors import InvalidInputError
from kvpack.formats.llama_state import is_llama_state, refuse_raw_blocks
from kvpack.formats.reader import KvpReader, is_kvp_file
from kvpack.formats.safetensors_io import SafetensorsSource
from kvpack.llama_cpp.source import LlamaStateSource
from kvpack.names import parse_kv_name, stacked_name, tensor_order
from kvpack.restore.decode import EntryDecoder
from kvpack.restore.profiles import attach_profile
from kvpack.restore.streaming import select_outputs, tensor_pieces
from kvpack.storage import accepts_storage_options, is_url, local_copy, location, name_of, named_as


class CacheSource:
    """A KV cache file of either format, read one tensor (or one piece of a tensor) at a time (``.kvp`` decoded)."""

    def __init__(self, path: str | os.PathLike, profile=None):
        self.path = location(path)
        self._copy = contextlib.ExitStack()
        self._local = None  # the local copy of a dump at a URL, which errors name by the URL
        if is_url(self.path) and not is_kvp_file(self.path):  # a dump from a URL: read from a local copy
            try:
                self._local = self._copy.enter_context(local_copy(str(self.path)))
                with self._named():
                    self._open(self._local, profile)
            except BaseException:
                self._copy.close()
                raise
        else:
            self._open(self.path, profile)

    def _open(self, path, profile) -> None:
        if is_kvp_file(path):
            self.kind = "kvp"
            self._kvp = KvpReader(path)
            try:
                attach_profile(self._kvp, profile)
            except BaseException:
                self._kvp.close()
                raise
            self._decoder = EntryDecoder(self._kvp)
            try:
                refuse_raw_blocks(self._kvp.keys(), self.path)
            except BaseException:
                self._kvp.close()
                raise
            self.metadata = dict(self._kvp.metadata)
            self._keys = self._kvp.tensor_names()
        elif is_llama_state(path):
            raise InvalidInputError(
                f"{self.path} is a llama.cpp state file: compress it (`kvpack compress {name_of(self.path)} --model "
                "MODEL.gguf`; with --lossless an F16/BF16/F32 cache's exact reference) and compare the .kvp files"
            )
        else:
            self.kind = "safetensors"
            self._st = SafetensorsSource(path)
            self.metadata = self._st.metadata
            self._keys = self._st.keys()

    def __enter__(self) -> CacheSource:
        return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "kind", None) == "kvp":
            self._kvp.close()
        self._copy.close()

    def keys(self) -> list[str]:
        return list(self._keys)

    def _named(self):
        """Errors raised in the block name the URL, not its local copy."""
        return contextlib.nullcontext() if self._local is None else named_as(self._local, str(self.path))

    def get(self, name: str) -> torch.Tensor:
        if self.kind == "kvp":
            return self._decoder.read_tensor(name)
        with self._named():
            return self._st.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` (no data read).

        Raises:
            InvalidInputError: no such tensor.
        """
        if self.kind == "kvp":
            return select_outputs(self._kvp, names=[name])[0].shape
        if name not in self._keys:
            raise InvalidInputError(f"{self.path}: no tensor named {name!r}")
        return self._st.shape_dtype(name)[0]

    def entry_of(self, name: str) -> str:
        """What holds tensor ``name`` in the file: its ``.kvp`` entry (``layers.all.key`` for a layer
        of a stacked entry), or ``name`` itself."""
        if self.kind == "kvp" and name not in self._kvp.keys() and parse_kv_name(name):
            return stacked_name(parse_kv_name(name)[1])
        return name

    def pieces(self, names: list[str], step: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Tensors ``names`` in their stored dtype, together, a piece at a time: ``(first token,
        {name: piece})`` for consecutive pieces of ``step`` tokens along the sequence axis of 4-D
        K/V tensors ``(batch, num_kv_heads, seq_len, head_dim)`` (the last may be shorter; give
        names of one token count); any other tensor as one piece ``(0, {name: tensor})``. Both
        formats cut at the same tokens. A ``.kvp`` entry is read once and decoded once, piece by
        piece, for all its layers asked for (:func:`kvpack.restore.streaming.tensor_pieces`); safetensors
        tensors are read a slice at a time.

        Raises:
            InvalidInputError: no such tensor.
            FormatError: unreadable data.
        """
        if self.kind == "kvp":
            yield from tensor_pieces(self._kvp, names, step)
            return
        shapes = {name: self.shape(name) for name in names}
        if any(not parse_kv_name(n) or len(s) != 4 for n, s in shapes.items()):
            yield 0, {name: self.get(name) for name in names}
            return
        tokens = max(s[2] for s in shapes.values())
        for begin in range(0, tokens, step):
            with self._named():
                piece = {n: self._st.get_slice(n, begin, min(begin + step, s[2])) for n, s in shapes.items()}
            yield begin, piece


@accepts_storage_options
def open_cache(path: str | os.PathLike, profile=None, *, storage_options: dict | None = None) -> CacheSource:
    """Open a ``.kvp`` or safetensors cache for reading one tensor at a time; use with ``with``
    (``profile``: the calibration profile of a transform-coded ``.kvp``, :mod:`kvpack.restore.profiles`).

    ``storage_options``: fsspec options (credentials, ``endpoint_url``, ...) for the URLs among the paths
    (:mod:`kvpack.storage`: ``s3://``, ``gs://``, ``memory://`` ...), which any path argument may be.

    Raises:
        InvalidInputError, FormatError: missing or invalid file.
    """
    return CacheSource(path, profile)


def open_dump(path: str | os.PathLike, model: str | os.PathLike | None = None, lossless: bool = False):
    """The cache ``compress`` reads, one tensor at a time: a safetensors dump
    (:class:`~kvpack.formats.safetensors_io.SafetensorsSource`) or a llama.cpp state file
    (:class:`~kvpack.llama_cpp.source.LlamaStateSource`, which needs the ``model`` GGUF; ``lossless``: its
    block-type layers as their bytes); use with ``with``.

    A URL ``path`` (:mod:`kvpack.storage`) is streamed to a local temporary copy first (every tensor
    is read anyway; memory stays bounded), removed when the block ends; errors name the URL.

    Raises:
        InvalidInputError: a ``.kvp`` given, a llama.cpp state file without ``model``, or a ``model``
            for a safetensors dump (which records its own); an unreadable URL.
        FormatError: an unreadable file.
    """
    if is_url(path):
        return _staged_dump(str(path), model, lossless)
    if is_kvp_file(path):
        raise InvalidInputError(f"{path} is already a .kvp file; compress takes a safetensors dump or llama.cpp state")
    if is_llama_state(path):
        return LlamaStateSource(path, model, raw_blocks=lossless)
    if model is not None:
        raise InvalidInputError(
            f"{path}: a model GGUF (`model`) goes with llama.cpp state files; a safetensors dump names its own"
        )
    return SafetensorsSource(path)


@contextlib.contextmanager
def _staged_dump(url: str, model, lossless: bool):
    """:func:`open_dump` of a local copy of ``url``, for the length of a ``with`` block."""
    with local_copy(url) as local, open_dump(local, model, lossless) as source:
        yield source


def kv_dims(path: str | os.PathLike, model: str | os.PathLike | None = None) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a dump or llama.cpp state file (no data read): the
    layer count and the shape of the first 4-D K/V tensor.

    Raises:
        InvalidInputError, FormatError: unreadable file or no 4-D K/V tensor (see :func:`open_dump`).
    """
    with open_dump(path, model) as source:
        layers = {parse_kv_name(name)[0] for name in source.keys() if parse_kv_name(name)}
        for name in sorted(source.keys(), key=tensor_order):
            shape, _ = source.shape_dtype(name)
            if parse_kv_name(name) and len(shape) == 4:
                return len(layers), int(shape[1]), int(shape[3])
    raise InvalidInputError(f"{path}: no layers.<i>.key / layers.<i>.value tensors found")
