"""Codecs: grouped quantizers registered by name (see :mod:`kvpack.codecs.base`)."""

from kvpack.codecs import adaptive, elements, normal, transform, uniform  # noqa: F401  (defining a codec registers it)
from kvpack.codecs.base import Codec, CodecParams, SectionSpec, get_codec_class

__all__ = ["Codec", "CodecParams", "SectionSpec", "get_codec_class"]
