"""kvpack: compress the KV caches of large language models.

Public API (imported on first use, so ``kvpack --help`` does not load torch)::

    from kvpack import CodecConfig, compress_file, decompress_file, compress_tensors, load_kvp, open_kvp
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CodecConfig": "kvpack.config",
    "build_report": "kvpack.api",
    "compare_caches": "kvpack.api",
    "compress_file": "kvpack.api",
    "compress_tensors": "kvpack.api",
    "decode_entry": "kvpack.api",
    "decompress_file": "kvpack.api",
    "describe_file": "kvpack.api",
    "encode_tensor": "kvpack.api",
    "load_kvp": "kvpack.api",
    "open_cache": "kvpack.api",
    "PromptCache": "kvpack.cache_io",
    "continue_generation": "kvpack.cache_io",
    "load_cache": "kvpack.cache_io",
    "save_cache": "kvpack.cache_io",
    "EvalMethod": "kvpack.evaluate",
    "EvalProtocol": "kvpack.evaluate",
    "KvpReader": "kvpack.formats.reader",
    "open_kvp": "kvpack.formats.reader",
    "KvpWriter": "kvpack.formats.writer",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvpack' has no attribute {name!r}")
