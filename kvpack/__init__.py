"""kvpack: compress the KV caches of large language models.

Public API::

    from kvpack import CodecConfig, compress_file, decompress_file, compress_tensors, load_kvp, open_kvp
"""

__version__ = "0.1.0"

from kvpack.api import (  # noqa: E402
    build_report,
    compare_caches,
    compress_file,
    compress_tensors,
    decode_entry,
    decompress_file,
    encode_tensor,
    load_kvp,
    open_cache,
)
from kvpack.config import CodecConfig  # noqa: E402
from kvpack.formats.reader import KvpReader, open_kvp  # noqa: E402
from kvpack.formats.writer import KvpWriter  # noqa: E402

__all__ = [
    "CodecConfig",
    "KvpReader",
    "KvpWriter",
    "__version__",
    "build_report",
    "compare_caches",
    "compress_file",
    "compress_tensors",
    "decode_entry",
    "decompress_file",
    "encode_tensor",
    "load_kvp",
    "open_cache",
    "open_kvp",
]
