"""LMCache's serde ``"kvpack"``: LMCache's serializer / deserializer API over :class:`~kvpack.integrations.chunks.ChunkCodec`.

LMCache (``lmcache`` 0.5.6, ``lmcache.v1.distributed.serde``) runs a :class:`Serializer` over each
chunk ``[2, layers, tokens, hidden]`` it stores in an L2 adapter configured with a ``"serde"``, into a
byte buffer of ``estimate_serialized_size`` bytes, and the matching :class:`Deserializer` over each
chunk it loads back. Each chunk becomes one complete ``.kvp`` stream (:mod:`kvpack.integrations.chunks`).

Fixed size (the default): the serializer fills LMCache's whole buffer (the stream, then zeros) and
returns its size, because LMCache 0.5.6's ``fs`` L2 adapter loads an object only when the file fills
the load buffer, which is sized by the same estimate: a shorter object stores but never loads. The
estimate is then what a chunk costs, so the entropy stage is off by default (it cannot shrink the
buffer; the estimate is the dense sections plus a few KB). With ``fixed_size=False`` the serializer
returns the stream's length, LMCache stores only those bytes (zstd then pays), and only adapters that
load a shorter object into the buffer work (``mock`` does; 0.5.6's ``fs`` does not).

Importing this module registers :func:`create_serde` as LMCache's serde ``"kvpack"`` (:func:`register`).
LMCache does not discover serdes, so the process that runs LMCache's storage manager imports this
module first (README, "Using kvpack with LMCache").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kvpack.errors import InvalidInputError, brief
from kvpack.integrations.chunks import ChunkCodec, codec_from_options

#: The LMCache release whose serde API this module implements (the ``lmcache`` extra pins it).
LMCACHE_VERSION = "0.5.6"

try:
    from lmcache.v1.distributed.serde import (
        AsyncSerdeProcessor,
        Deserializer,
        Serializer,
        get_registered_serde_types,
        register_serde_factory,
    )
except ImportError as exc:  # the optional extra
    raise ImportError(
        f"kvpack.integrations.lmcache needs LMCache's serde API (lmcache {LMCACHE_VERSION}): install the "
        f"lmcache extra, pip install 'kvpack[lmcache]' (CPU only: README, 'Using kvpack with LMCache') ({exc})"
    ) from exc

#: The name LMCache's ``"serde": {"type": ...}`` selects kvpack by.
SERDE_NAME = "kvpack"


class KvpackSerializer(Serializer):
    """LMCache serializer: a chunk ``MemoryObj`` ``[2, L, T, hidden]`` -> a ``.kvp`` stream in a byte buffer.

    Args:
        codec: the chunk codec (head dim, codec config, entropy stage).
    """

    def __init__(self, codec: ChunkCodec):
        self.codec = codec

    def serialize(self, src: Any, dst: Any, key: Any) -> int:
        """Write ``src.tensor`` (float16 / bfloat16 / float32 ``[2, L, T, hidden]``) into ``dst.tensor``'s
        bytes; ``key`` is not used (the stream depends only on the values).

        Returns:
            The bytes written (all of ``dst``'s with ``fixed_size``); LMCache then narrows ``dst`` to
            them (``set_used_size``) and stores them.

        Raises:
            InvalidInputError: see :meth:`ChunkCodec.encode_into`; a ``MemoryObj`` without its tensor.
        """
        return self.codec.encode_into(_tensor(src, "source"), _tensor(dst, "destination"))

    def estimate_serialized_size(self, layout_desc: Any) -> int:
        """The bytes to allocate for a chunk of ``layout_desc`` (one shape ``[2, L, T, hidden]`` and its
        dtype): an upper bound on the stream (:meth:`ChunkCodec.size_bound`).

        Raises:
            InvalidInputError: a layout with other than one tensor, or a bad shape.
        """
        if len(layout_desc.shapes) != 1:
            raise InvalidInputError(
                f"the kvpack serde takes chunks of one KV tensor, got a layout of {len(layout_desc.shapes)}"
            )
        return self.codec.size_bound(tuple(layout_desc.shapes[0]), layout_desc.dtypes[0])


class KvpackDeserializer(Deserializer):
    """LMCache deserializer: a byte buffer holding a ``.kvp`` stream -> the chunk ``MemoryObj`` ``[2, L, T, hidden]``.

    Args:
        codec: the chunk codec (decoding reads everything it needs from the stream).
    """

    def __init__(self, codec: ChunkCodec):
        self.codec = codec

    def deserialize(self, src: Any, dst: Any, key: Any) -> None:
        """Decode the stream at the start of ``src.tensor``'s bytes into ``dst.tensor``; ``key`` is not used.

        Raises:
            FormatError, InvalidInputError: see :meth:`ChunkCodec.decode_into`; a ``MemoryObj`` without
                its tensor.
        """
        self.codec.decode_into(_tensor(src, "source"), _tensor(dst, "destination"))


def create_serde(kwargs: Mapping[str, Any]) -> AsyncSerdeProcessor:
    """LMCache's factory of the serde ``"kvpack"``: ``{"type": "kvpack", "head_dim": 64, ...}`` in an L2
    adapter's ``"serde"`` (keys: :func:`codec_from_options`, and ``max_workers``, the threads of
    LMCache's :class:`AsyncSerdeProcessor`, default 1).

    Raises:
        InvalidInputError: see :func:`codec_from_options`; ``max_workers`` not a positive integer.
    """
    options = dict(kwargs)
    workers = options.pop("max_workers", 1)
    if type(workers) is not int or workers < 1:
        raise InvalidInputError(f"`max_workers` must be a positive integer, got {brief(workers)}")
    codec = codec_from_options(options)
    return AsyncSerdeProcessor(KvpackSerializer(codec), KvpackDeserializer(codec), max_workers=workers)


def register() -> None:
    """Register :func:`create_serde` as LMCache's serde ``"kvpack"`` (importing this module does; again is a no-op)."""
    if SERDE_NAME not in get_registered_serde_types():
        register_serde_factory(SERDE_NAME, create_serde)


def _tensor(obj: Any, role: str) -> torch.Tensor:
    tensor = getattr(obj, "tensor", None)
    if tensor is None:
        raise InvalidInputError(f"the {role} MemoryObj has no tensor (freed or invalidated)")
    return tensor


register()
