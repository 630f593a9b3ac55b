"""Writing a ``.kvp`` made from a llama.cpp state file back as a state file llama.cpp loads.

The ``.kvp`` keeps every non-K/V byte of the original file (``llama_cpp.state``,
:mod:`kvpack.llama_cpp.source`); the decoded K/V tensors are put back in their places, in the
GGML type and row layout the original had (F16 / BF16 / F32 exactly as decoded, block types
re-quantized with ``gguf.quants``). Before anything is written the file is checked the way
llama.cpp checks it when loading (layer count, types, row sizes, ``v_trans``, stream count) and,
with the model's GGUF, against that model, so llama.cpp never sees a file it would half-load.
"""

from __future__ import annotations

import os

import torch

from kvpack.errors import InvalidInputError
from kvpack.formats.atomic import atomic_output
from kvpack.formats.llama_state import (
    RAW_PREFIX,
    STATE_TENSOR,
    LlamaState,
    state_from_skeleton,
    write_llama_state,
)
from kvpack.formats.reader import KvpReader
from kvpack.llama_cpp.gguf_model import GgufModel, read_gguf_model
from kvpack.llama_cpp.source import (
    KEY_ORDER_KEY,
    PERMUTED,
    ROPE_DIM_KEY,
    check_against_model,
    row_order,
    tensor_dtype,
    tensor_to_rows,
)
from kvpack.names import kv_tensor_name
from kvpack.profile import Profile
from kvpack.restore.decode import EntryDecoder
from kvpack.restore.profiles import attach_profile
from kvpack.storage import accepts_storage_options, same_location


@accepts_storage_options
def write_llama_cpp(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    model: GgufModel | str | os.PathLike | None = None,
    force: bool = False,
    profile: Profile | str | os.PathLike | None = None,
    progress=None,
    *,
    storage_options: dict | None = None,
) -> dict:
    """Restore a ``.kvp`` made from a llama.cpp state file to a state file (``ggsq`` / ``ggsn``).

    Decodes one layer's keys or values at a time (memory: one layer), writes to a temporary file
    renamed at the end (any error leaves no output).

    ``storage_options``: fsspec options (credentials, ``endpoint_url``, ...) for the URLs among the paths
    (:mod:`kvpack.storage`: ``s3://``, ``gs://``, ``memory://`` ...), which any path argument may be.

    Args:
        model: the GGUF the file will be loaded with; when given, a state made for another model
            (architecture, layer count, kv heads, head sizes, weights fingerprint) is refused.
        profile: the calibration profile of a transform-coded file (see :func:`kvpack.load_kvp`).

    Returns:
        ``{"input", "output", "output_bytes", "kind", "tokens", "layers", "types"}``.

    Raises:
        InvalidInputError: the ``.kvp`` was not made from a llama.cpp state file, a model mismatch,
            decoded tensors whose shape does not fill the original rows, input and output the same.
        FormatError: a corrupted ``.kvp`` or stored state.
        OutputExistsError: the output exists and ``force`` is false.
    """
    if same_location(output_path, input_path):
        raise InvalidInputError("input and output are the same file")
    with KvpReader(input_path) as reader:
        attach_profile(reader, profile)
        decoder = EntryDecoder(reader)
        if STATE_TENSOR not in reader.keys():
            raise InvalidInputError(
                f"{input_path} was not made from a llama.cpp state file (no {STATE_TENSOR!r}); "
                "--format llama-cpp writes back what `kvpack compress SLOT --model MODEL.gguf` read"
            )
        skeleton = decoder.read_tensor(STATE_TENSOR).numpy().tobytes()
        state = state_from_skeleton(skeleton, f"{input_path}: the stored llama.cpp state")
        metadata = dict(reader.metadata)
        check_state_entries(state, reader, str(input_path))
        if model is not None:
            gguf = model if isinstance(model, GgufModel) else read_gguf_model(model)
            check_against_model(state, gguf, f"{input_path} (a {metadata.get('model', '?')} cache)")
            made_with = metadata.get("gguf_fingerprint")
            if made_with and made_with != gguf.fingerprint:
                raise InvalidInputError(
                    f"{input_path} was made with GGUF {metadata.get('gguf_file', '?')} (fingerprint {made_with}), "
                    f"not {os.path.basename(gguf.path)} ({gguf.fingerprint})"
                )
        stream = state.only_stream()
        permuted, rope_dim = metadata.get(KEY_ORDER_KEY) == PERMUTED, _rope_dim(metadata)
        total = 2 * len(stream.keys)

        def kv_bytes(_stream: int, kind: str, layer: int) -> bytes:
            data = (stream.keys if kind == "key" else stream.values)[layer]
            if progress:
                progress(2 * layer + (kind == "value"), total, kv_tensor_name(layer, kind))
            raw = f"{RAW_PREFIX}{layer}.{kind}"
            if raw in reader.keys():  # a lossless file's block-type layer: its bytes as they were
                return decoder.read_tensor(raw).numpy().tobytes()
            x = decoder.read_tensor(kv_tensor_name(layer, kind), _TORCH[tensor_dtype(data)])
            return tensor_to_rows(x, data, row_order(data, kind, permuted, rope_dim, x.shape[-1]))

        with atomic_output(output_path, force) as tmp, open(tmp, "wb") as out:
            written = write_llama_state(out, skeleton, state, kv_bytes)
        if progress:
            progress(total, total, "")
    return {
        "input": str(input_path),
        "output": str(output_path),
        "output_bytes": written,
        "kind": state.kind,
        "tokens": int(state.token_ids.size),
        "layers": len(stream.keys),
        "types": sorted({d.type_name for d in (*stream.keys, *stream.values)}),
    }


_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _rope_dim(metadata: dict[str, str]) -> int:
    """Channels of each key head that llama.cpp stores as adjacent pairs (the GGUF's rope dimension)."""
    value = metadata.get(ROPE_DIM_KEY, "")
    head_dim = int(metadata.get("head_dim", "0") or 0)
    return int(value) if value.isdigit() else head_dim


def check_state_entries(state: LlamaState, reader: KvpReader, where: str) -> None:
    """Refuse a ``.kvp`` whose K/V tensors do not fill the stored state's rows (what llama.cpp would
    reject as a row-size or layer-count mismatch, or half-load).

    Raises:
        InvalidInputError: a missing layer, or a tensor whose cell count or features differ.
    """
    stream = state.only_stream()
    for kind, layers in (("key", stream.keys), ("value", stream.values)):
        for layer, data in enumerate(layers):
            raw = f"{RAW_PREFIX}{layer}.{kind}"
            if raw in reader.keys():
                if tuple(reader.entry(raw).shape) != (data.nbytes,):
                    raise InvalidInputError(f"{where}: {raw} does not hold the {data.nbytes} bytes of its layer")
                continue
            name = kv_tensor_name(layer, kind)
            if name not in reader.tensor_names():
                raise InvalidInputError(f"{where}: the stored state has {len(layers)} layers but no {name!r}")
            stacked = name not in reader.keys()  # a layer of ``layers.all.key|value`` (level token)
            shape = tuple(reader.stacked_entry(kind).shape[1:] if stacked else reader.entry(name).shape)
            if len(shape) != 4 or shape[0] != 1 or shape[2] != stream.cell_count or shape[1] * shape[3] != data.n_embd:
                raise InvalidInputError(
                    f"{where}: {name} has shape {tuple(shape)}, the state's rows hold {stream.cell_count} cells of "
                    f"{data.n_embd} features"
                )
