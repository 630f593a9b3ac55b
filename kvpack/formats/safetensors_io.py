"""KV-cache dumps as safetensors files.

A dump holds ``layers.{i}.key`` and ``layers.{i}.value`` for every layer, shape
``(batch, num_kv_heads, seq_len, head_dim)`` as the model's cache holds them (layers may
differ in shape), ``token_ids`` (int64, ``(batch, seq_len)``), and string metadata
(model, num_layers, num_kv_heads, head_dim, seq_len, dtype, versions).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kvpack.errors import FormatError
from kvpack.formats.names import KV_NAME, kv_tensor_name, parse_kv_name, parse_stacked_name, stacked_name  # noqa: F401
from kvpack.formats.reader import open_input
from kvpack.formats.writer import atomic_output


class SafetensorsSource:
    """A safetensors file opened lazily (one tensor at a time). Use as a context manager.

    Raises:
        InvalidInputError: missing or unreadable file.
        FormatError: not a valid safetensors file (also raised by :meth:`get` for a
            tensor whose data is cut off).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        open_input(self.path).close()
        if self.path.stat().st_size == 0:
            raise FormatError(f"{self.path}: empty file")
        try:
            self._handle = safe_open(str(self.path), framework="pt")
            self.metadata = dict(self._handle.metadata() or {})
            self._keys = list(self._handle.keys())
        except Exception as exc:  # safetensors raises its own error types for every malformed file
            if self.path.suffix.lower() == ".kvp":  # named as ours: say what it lacks
                raise FormatError(
                    f"{self.path}: not a kvpack file (it does not start with the .kvp magic bytes)"
                ) from None
            raise FormatError(f"{self.path}: not a readable safetensors file ({_first_line(exc)})") from None
        self.file_size = self.path.stat().st_size

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc) -> None:
        self._handle = None

    def keys(self) -> list[str]:
        return list(self._keys)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except Exception as exc:
            raise FormatError(f"{self.path}: cannot read tensor {name!r} ({_first_line(exc)})") from None

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        info = self._handle.get_slice(name)
        return tuple(info.get_shape()), _dtype_name(info.get_dtype())


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str], force: bool = False
) -> int:
    """Write ``tensors`` atomically (temp file + rename). Returns the file size in bytes.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
    """
    with atomic_output(path, force) as tmp:
        try:
            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                str(tmp),
                metadata={k: str(v) for k, v in metadata.items()},
            )
        except SafetensorError as exc:  # I/O failures come back as text: "... (os error 28)"
            code = re.search(r"os error (\d+)", str(exc))
            if code:
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
            raise
        size = tmp.stat().st_size
    return size


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _dtype_name(code: str) -> str:
    return _SAFETENSORS_DTYPES.get(code, code.lower())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
