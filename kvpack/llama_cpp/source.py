"""A llama.cpp state file as a kvpack cache: its K/V rows as ``(1, kv_heads, seq_len, head_dim)`` tensors and back.

A state file (:mod:`kvpack.formats.llama_state`) stores, per layer, one row of ``kv_heads ·
head_dim`` features per cell, head after head, in a GGML type, the values possibly transposed
(``v_trans``). :class:`LlamaStateSource` presents it the way ``compress`` reads a safetensors dump:
``layers.{i}.key`` / ``layers.{i}.value`` (F16 as float16, BF16 as bfloat16, F32 and the block
types, dequantized with ``gguf.quants``, as float32) and every other byte of the file, kept exactly,
as the uint8 tensor ``llama_cpp.state``. Keys of a model whose RoPE rotates adjacent channel pairs
(llama.cpp's NORM type; its converter permutes the key projection) are permuted to transformers'
rotate-half order, so un-RoPE, the calibration profile and the transforms see the channels they
expect; :func:`tensor_to_rows` undoes it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from kvpack.errors import InvalidInputError
from kvpack.formats.llama_state import (
    RAW_PREFIX,
    STATE_TENSOR,
    LayerData,
    LlamaState,
    kv_free_bytes,
    read_llama_state,
)
from kvpack.llama_cpp.gguf_model import GgufModel, read_gguf_model
from kvpack.names import kv_tensor_name, parse_kv_name
from kvpack.transforms.rope import rope_metadata

#: Metadata: the file kind (``seq`` / ``session``) and whether keys were permuted from adjacent pairs.
KIND_KEY, KEY_ORDER_KEY = "llama_cpp_state", "llama_cpp_key_order"
PERMUTED, AS_SAVED = "pairs_to_halves", "as_saved"
#: Metadata: how many channels of each key head were stored as adjacent pairs.
ROPE_DIM_KEY = "llama_cpp_rope_dim"
_EXACT = {
    GGMLQuantizationType.F16: ("float16", "<f2"),
    GGMLQuantizationType.F32: ("float32", "<f4"),
    GGMLQuantizationType.BF16: ("bfloat16", "<u2"),
}


@dataclass(frozen=True)
class RowOrder:
    """How one layer's cached keys or values map to the tensor kvpack codes.

    ``rotation``: llama.cpp stores quantized K/V types Hadamard-rotated (``attn_rot_k`` /
    ``attn_rot_v`` in ``llama-kv-cache.cpp``: each run of ``rotation`` channels of a head multiplied by
    the orthonormal Sylvester-Walsh matrix; 0 for none); undone first. ``permuted``: the first
    ``rope_dim`` channels of each key head come as adjacent pairs (NORM RoPE) and go to rotate-half order.
    """

    permuted: bool = False
    rope_dim: int = 0
    rotation: int = 0

    def to_kvpack(self, x: torch.Tensor) -> torch.Tensor:
        x = _hadamard(x, self.rotation)
        if not self.permuted:
            return x
        r = self.rope_dim
        return torch.cat([x[..., 0:r:2], x[..., 1:r:2], x[..., r:]], dim=-1)

    def to_llama(self, x: torch.Tensor) -> torch.Tensor:
        if self.permuted:
            r, pairs = self.rope_dim, x.clone()
            pairs[..., 0:r:2], pairs[..., 1:r:2] = x[..., : r // 2], x[..., r // 2 : r]
            x = pairs
        return _hadamard(x, self.rotation)


def _hadamard(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` with each run of ``n`` channels multiplied by the orthonormal Sylvester-Walsh matrix
    (symmetric, its own inverse; llama.cpp's ``ggml_gen_hadamard``), in float64, back in float32."""
    if not n:
        return x
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / n**0.5
    runs = x.to(torch.float64).reshape(*x.shape[:-1], x.shape[-1] // n, n)
    return (runs @ h).reshape(x.shape).to(torch.float32)


def cache_rotation(ggml_type: int, head_dim: int, is_key: bool) -> int:
    """The Hadamard size llama.cpp rotates a layer's cached keys or values with (0: none): quantized
    types whose head size is a multiple of 64, unless the environment sets ``LLAMA_ATTN_ROT_DISABLE``
    as llama.cpp reads it; keys by the largest power of two dividing ``head_dim``, values by 64."""
    disabled = os.environ.get("LLAMA_ATTN_ROT_DISABLE", "")
    if GGMLQuantizationType(ggml_type) in _EXACT or head_dim % 64 or (disabled and _atoi(disabled)):
        return 0
    if not is_key:
        return 64
    n = 64
    while head_dim % (2 * n) == 0:
        n *= 2
    return n


def _atoi(text: str) -> int:
    """C's ``atoi``: the leading integer, 0 if none."""
    match = re.match(r"\s*([+-]?\d+)", text)
    return int(match.group(1)) if match else 0


def parse_raw_name(name: str) -> tuple[int, str] | None:
    """``llama_cpp.raw.{i}.key|value`` -> ``(i, "key"|"value")``; ``None`` for other names."""
    if not name.startswith(RAW_PREFIX):
        return None
    layer, _, kind = name[len(RAW_PREFIX) :].partition(".")
    return (int(layer), kind) if layer.isdigit() and len(layer) < 8 and kind in ("key", "value") else None


def _exact(data: LayerData) -> bool:
    return GGMLQuantizationType(data.ggml_type) in _EXACT


def tensor_dtype(data: LayerData) -> str:
    """The dtype a layer's K/V tensor is read as: exact for F16 / BF16 / F32, float32 for block types."""
    exact = _EXACT.get(GGMLQuantizationType(data.ggml_type))
    return exact[0] if exact else "float32"


def rows_to_tensor(raw: np.ndarray, data: LayerData, cells: int, heads: int, order: RowOrder) -> torch.Tensor:
    """One layer's raw bytes (uint8 ``(data.nbytes,)``) as a ``(1, heads, cells, head_dim)`` tensor.

    Raises:
        InvalidInputError: a row that does not hold ``heads`` whole heads.
    """
    if data.n_embd % heads:
        raise InvalidInputError(f"rows of {data.n_embd} features do not split into {heads} kv heads")
    kind = GGMLQuantizationType(data.ggml_type)
    if kind in _EXACT:
        numbers = raw.view(_EXACT[kind][1])
        matrix = numbers.reshape(data.n_embd, cells).T if data.transposed else numbers.reshape(cells, data.n_embd)
        matrix = torch.from_numpy(np.array(matrix))  # a copy: the bytes read are read-only
        if kind == GGMLQuantizationType.BF16:
            matrix = matrix.view(torch.int16).view(torch.bfloat16)
    else:
        matrix = torch.from_numpy(gguf_quants.dequantize(raw.reshape(cells, data.row_bytes), kind).astype(np.float32))
    x = matrix.reshape(cells, heads, data.n_embd // heads).permute(1, 0, 2).unsqueeze(0).contiguous()
    return order.to_kvpack(x)


def tensor_to_rows(x: torch.Tensor, data: LayerData, order: RowOrder) -> bytes:
    """A ``(1, heads, cells, head_dim)`` tensor as the bytes of ``data`` (its GGML type, row size and
    transposition); the inverse of :func:`rows_to_tensor` (exact for F16 / BF16 / F32 tensors of that
    dtype; block types are quantized with ``gguf.quants``).

    Raises:
        InvalidInputError: a shape whose features or cell count differ from the file's.
    """
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] * x.shape[3] != data.n_embd:
        raise InvalidInputError(f"a tensor of shape {tuple(x.shape)} does not fill rows of {data.n_embd} features")
    x = order.to_llama(x)
    cells = x.shape[2]
    matrix = x[0].permute(1, 0, 2).reshape(cells, data.n_embd)
    kind = GGMLQuantizationType(data.ggml_type)
    if kind == GGMLQuantizationType.BF16:
        numbers = matrix.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("<u2")
    elif kind in _EXACT:
        numbers = matrix.to(torch.float32).numpy().astype(_EXACT[kind][1])
    else:
        return gguf_quants.quantize(matrix.to(torch.float32).numpy(), kind).tobytes()
    return np.ascontiguousarray(numbers.T if data.transposed else numbers).tobytes()


def row_order(data: LayerData, kind: str, permuted: bool, rope_dim: int, head_dim: int) -> RowOrder:
    """How one layer's ``kind`` (``key`` / ``value``) rows map to kvpack's tensor (:class:`RowOrder`)."""
    is_key = kind == "key"
    return RowOrder(permuted and is_key, rope_dim if is_key else 0, cache_rotation(data.ggml_type, head_dim, is_key))


class LlamaStateSource:
    """A llama.cpp state file opened as a cache (the interface of ``SafetensorsSource``): one layer's
    keys or values read per :meth:`get`. With ``raw_blocks`` (lossless storage) the layers of block
    types (Q8_0, Q4_0, ...) are their bytes as they are, ``llama_cpp.raw.{i}.key|value`` (uint8), not
    dequantized values.

    Raises:
        InvalidInputError: no ``model`` GGUF given, or one whose layer count, kv heads, head sizes or
            architecture differ from the file's.
        FormatError: see :func:`~kvpack.formats.llama_state.read_llama_state`.
    """

    def __init__(self, path: str | os.PathLike, model: GgufModel | str | os.PathLike | None, raw_blocks: bool = False):
        self.path = os.fspath(path)
        self.state: LlamaState = read_llama_state(path)
        if model is None:
            raise InvalidInputError(
                f"{self.path} is a llama.cpp state file: give the GGUF model it was made with (`model`) for its "
                "kv heads, head_dim and rotary parameters"
            )
        self.model = model if isinstance(model, GgufModel) else read_gguf_model(model)
        self.stream = self.state.only_stream()
        check_against_model(self.state, self.model, self.path)
        self.file_size = self.state.file_size
        self.metadata = dict(sorted(self._metadata().items()))
        self._names = [
            f"{RAW_PREFIX}{i}.{kind}" if raw_blocks and not _exact(data) else kv_tensor_name(i, kind)
            for i in range(len(self.stream.keys))
            for kind, data in (("key", self.stream.keys[i]), ("value", self.stream.values[i]))
        ]

    def _metadata(self) -> dict[str, str]:
        meta = self.model.identity()
        positions = self.stream.positions
        if not np.array_equal(positions, np.arange(positions.size)):
            reason = "the state's cells are not at positions 0, 1, 2, ... (un-RoPE needs a prompt's cache)"
            meta.update(rope_metadata([reason] * len(self.stream.keys)))
        types = sorted({d.type_name for d in (*self.stream.keys, *self.stream.values)})
        meta.update(
            {
                KIND_KEY: self.state.kind,
                KEY_ORDER_KEY: PERMUTED if self.model.permutes_keys else AS_SAVED,
                ROPE_DIM_KEY: str(self.model.rope_dim),
                "llama_cpp_types": ",".join(types),
                "seq_len": str(self.stream.cell_count),
                "dtype": tensor_dtype(self.stream.keys[0]),
            }
        )
        return meta

    def __enter__(self) -> LlamaStateSource:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def keys(self) -> list[str]:
        return [*self._names, STATE_TENSOR]

    def _layer(self, name: str) -> tuple[LayerData, int, str]:
        parsed = parse_raw_name(name) or parse_kv_name(name)
        if parsed is None or parsed[0] >= len(self.stream.keys):
            raise InvalidInputError(f"{self.path}: no tensor {name!r}")
        layer, kind = parsed
        data = (self.stream.keys if kind == "key" else self.stream.values)[layer]
        head_dim = self.model.head_dim_k if kind == "key" else self.model.head_dim_v
        return data, head_dim, kind

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        if name == STATE_TENSOR:
            return (self.file_size - sum(d.nbytes for d in (*self.stream.keys, *self.stream.values)),), "uint8"
        data, head_dim, _ = self._layer(name)
        if name.startswith(RAW_PREFIX):
            return (data.nbytes,), "uint8"
        return (1, self.model.kv_heads, self.stream.cell_count, head_dim), tensor_dtype(data)

    def get(self, name: str) -> torch.Tensor:
        if name == STATE_TENSOR:
            return torch.frombuffer(bytearray(kv_free_bytes(self.state)), dtype=torch.uint8)
        data, head_dim, kind = self._layer(name)
        if name.startswith(RAW_PREFIX):
            return torch.frombuffer(bytearray(self.state.read(data).tobytes()), dtype=torch.uint8)
        order = row_order(data, kind, self.model.permutes_keys, self.model.rope_dim, head_dim)
        return rows_to_tensor(self.state.read(data), data, self.stream.cell_count, self.model.kv_heads, order)

    def get_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name)[:, :, start:stop]


def check_against_model(state: LlamaState, model: GgufModel, path: str) -> None:
    """Refuse a state whose layers, row sizes or architecture are not ``model``'s (what llama.cpp checks
    when it loads one, plus the heads it cannot check).

    Raises:
        InvalidInputError: a mismatch, named in one line.
    """
    where = f"{path} does not fit {os.path.basename(model.path)} ({model.arch}, {model.num_layers} layers, " + (
        f"{model.kv_heads} kv heads × {model.head_dim_k})"
    )
    if state.arch and state.arch != model.arch:
        raise InvalidInputError(f"{where}: the state was saved by a {state.arch!r} model")
    for stream in state.streams:
        if len(stream.keys) != model.num_layers:
            raise InvalidInputError(f"{where}: the state holds {len(stream.keys)} layers")
        for layer, (k, v) in enumerate(zip(stream.keys, stream.values, strict=True)):
            if k.n_embd != model.kv_heads * model.head_dim_k or v.n_embd != model.kv_heads * model.head_dim_v:
                raise InvalidInputError(
                    f"{where}: layer {layer} holds {k.n_embd} key and {v.n_embd} value features per cell"
                )


def describe_state(path: str | os.PathLike, model: GgufModel | str | os.PathLike | None = None) -> dict:
    """What a llama.cpp state file holds, without reading K/V data.

    Returns:
        ``{"format": "llama-cpp", "kind", "version", "file_bytes", "tokens", "arch", "n_stream",
        "cells", "v_trans", "layers", "key_types", "value_types", "kv_bytes", "kv_bytes_per_token",
        "other_bytes"}``; with ``model`` also ``"model"`` (its name, fingerprint, kv heads and head
        sizes) and ``"tensors"`` (the K/V tensors compress reads: name, shape, dtype).

    Raises:
        FormatError: see :func:`~kvpack.formats.llama_state.read_llama_state`.
        InvalidInputError: a ``model`` the state does not fit.
    """
    source = LlamaStateSource(path, model) if model is not None else None
    state = source.state if source is not None else read_llama_state(path)  # the file is parsed once
    layers = [d for s in state.streams for d in (*s.keys, *s.values)]
    kv_bytes = sum(d.nbytes for d in layers)
    cells = sum(s.cell_count for s in state.streams)
    info = {
        "format": "llama-cpp",
        "path": os.fspath(path),
        "kind": state.kind,
        "version": state.version,
        "file_bytes": state.file_size,
        "tokens": int(state.token_ids.size),
        "arch": state.arch,
        "n_stream": state.n_stream,
        "cells": cells,
        "v_trans": [s.v_trans for s in state.streams],
        "layers": max((len(s.keys) for s in state.streams), default=0),
        "key_types": sorted({d.type_name for s in state.streams for d in s.keys}),
        "value_types": sorted({d.type_name for s in state.streams for d in s.values}),
        "kv_bytes": kv_bytes,
        "kv_bytes_per_token": kv_bytes / cells if cells else 0.0,
        "other_bytes": state.file_size - kv_bytes,
    }
    if source is not None:
        info["model"] = {
            "name": source.model.name,
            "gguf_fingerprint": source.model.fingerprint,
            "kv_heads": source.model.kv_heads,
            "head_dim": source.model.head_dim_k,
            "head_dim_v": source.model.head_dim_v,
        }
        info["tensors"] = [
            {"name": name, "shape": list(source.shape_dtype(name)[0]), "dtype": source.shape_dtype(name)[1]}
            for name in source.keys()
        ]
    return info
