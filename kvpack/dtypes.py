"""The one dtype table: names stored in ``.kvp`` and safetensors files, their torch dtypes and sizes.

Every module that turns a dtype name into bytes, a torch dtype or a safetensors code asks
this table; nothing else lists dtypes. Names are those of ``docs/format.md`` §5 (``float16``,
``bfloat16`` ...); safetensors codes those of the safetensors header (``F16``, ``BF16`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvpack.errors import FormatError, InvalidInputError


@dataclass(frozen=True)
class DType:
    """One storable dtype: its file name, torch dtype, bytes per element and safetensors code."""

    name: str
    torch: torch.dtype
    size: int
    safetensors: str
    is_float: bool


_TABLE = (
    DType("float64", torch.float64, 8, "F64", True),
    DType("float32", torch.float32, 4, "F32", True),
    DType("float16", torch.float16, 2, "F16", True),
    DType("bfloat16", torch.bfloat16, 2, "BF16", True),
    DType("int64", torch.int64, 8, "I64", False),
    DType("int32", torch.int32, 4, "I32", False),
    DType("int16", torch.int16, 2, "I16", False),
    DType("int8", torch.int8, 1, "I8", False),
    DType("uint8", torch.uint8, 1, "U8", False),
    DType("bool", torch.bool, 1, "BOOL", False),
)

#: name -> torch dtype, for every dtype a file may store (lossless tensors, metadata arrays).
TORCH_DTYPES = {d.name: d.torch for d in _TABLE}
#: torch dtype -> name.
DTYPE_NAMES = {d.torch: d.name for d in _TABLE}
#: name -> bytes per element.
DTYPE_SIZES = {d.name: d.size for d in _TABLE}
#: safetensors header code -> name.
SAFETENSORS_NAMES = {d.safetensors: d.name for d in _TABLE}
#: name -> safetensors header code.
SAFETENSORS_CODES = {d.name: d.safetensors for d in _TABLE}
#: The dtypes K/V tensors may have to be quantized, and may be restored as (float64 is stored, never coded).
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def dtype_name(dtype: torch.dtype) -> str:
    """The file name of a torch dtype.

    Raises:
        InvalidInputError: a dtype no file stores (complex, float8 ...).
    """
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InvalidInputError(f"unsupported tensor dtype {dtype}; supported: {', '.join(TORCH_DTYPES)}") from None


def check_float_dtype(name: str, dtype: str) -> None:
    """Raises InvalidInputError unless tensor ``name`` of dtype ``dtype`` (a file name) can be quantized."""
    if dtype not in FLOAT_DTYPES:
        raise InvalidInputError(
            f"tensor {name!r}: dtype {dtype} cannot be quantized (expected {', '.join(FLOAT_DTYPES)})"
        )


def restore_dtype(dtype: torch.dtype | None) -> str | None:
    """The file name of a dtype K/V tensors are restored as (``None``: the stored one).

    Raises:
        InvalidInputError: not one of :data:`FLOAT_DTYPES`.
    """
    if dtype is None:
        return None
    name = dtype_name(dtype)
    if name not in FLOAT_DTYPES:
        raise InvalidInputError(f"K/V tensors are restored as {', '.join(FLOAT_DTYPES)}, not {name}")
    return name


def check_finite(
    name: str, values: torch.Tensor, stacked: bool = False, consequence: str = "refusing to quantize it"
) -> None:
    """Raises InvalidInputError when tensor ``name`` holds NaN or Inf (naming the layer of a stacked one,
    ``(layers, ...)``, and saying the ``consequence``)."""
    if not torch.isfinite(values).all():
        bad = ~torch.isfinite(values)
        where = f" (layer {int(bad.flatten(1).any(1).nonzero()[0])})" if stacked else ""
        raise InvalidInputError(f"tensor {name!r}{where} holds {int(bad.sum())} NaN or Inf values; {consequence}")


def tensor_bytes(x: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, C order."""
    return x.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def as_uint8(data: bytes | np.ndarray) -> np.ndarray:
    """Bytes (or a uint8 array) as a uint8 array, without a copy where possible."""
    return (
        np.frombuffer(data, dtype=np.uint8)
        if isinstance(data, (bytes, bytearray, memoryview))
        else np.asarray(data, np.uint8)
    )


def from_bytes(data: bytes | np.ndarray, dtype: str) -> torch.Tensor:
    """A 1-D tensor of ``dtype`` (a file name) from its raw bytes (a copy).

    Raises:
        FormatError: a length that is not a whole number of values; bool bytes other than 0 and 1.
    """
    raw = as_uint8(data)
    if raw.size == 0:
        return torch.empty(0, dtype=TORCH_DTYPES[dtype])
    if raw.size % DTYPE_SIZES[dtype]:
        raise FormatError(f"{raw.size} bytes is not a whole number of {dtype} values")
    if dtype == "bool" and int(raw.max()) > 1:
        raise FormatError("a bool tensor holds bytes other than 0 and 1")
    return torch.from_numpy(raw.copy()).view(TORCH_DTYPES[dtype])
