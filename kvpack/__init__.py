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
    "build_report": "kvpack.report",
    "compare_caches": "kvpack.report",
    "compress_file": "kvpack.compress",
    "compress_tensors": "kvpack.compress",
    "compress_on_dask": "kvpack.batch_dask",
    "decode_entry": "kvpack.entry",
    "decompress_file": "kvpack.restore.files",
    "describe_file": "kvpack.report",
    "encode_tensor": "kvpack.entry",
    "load_kvp": "kvpack.restore.files",
    "open_cache": "kvpack.sources",
    "PromptCache": "kvpack.model.cache",
    "continue_generation": "kvpack.model.cache",
    "load_cache": "kvpack.model.cache",
    "save_cache": "kvpack.model.cache",
    "EvalMethod": "kvpack.evaluation.evaluate",
    "EvalProtocol": "kvpack.evaluation.evaluate",
    "KvpReader": "kvpack.formats.reader",
    "open_kvp": "kvpack.restore.decode",
    "KvpWriter": "kvpack.formats.writer",
    "storage_options": "kvpack.storage",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvpack' has no attribute {name!r}")
