"""Restoring a ``.kvp``: decoded tensors in memory (:func:`load_kvp`) or a safetensors file (:func:`decompress_file`).

Both read entry by entry through :mod:`kvpack.restore.streaming`, so memory stays bounded by
one entry's stored bytes plus one decoded piece, and both take the same selection of layers,
tensors and tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

import torch

from kvpack.dtypes import TORCH_DTYPES, dtype_name, restore_dtype
from kvpack.errors import InvalidInputError
from kvpack.formats.atomic import check_output_path
from kvpack.formats.llama_state import refuse_raw_blocks
from kvpack.formats.reader import KvpReader
from kvpack.formats.safetensors_io import safetensors_writer
from kvpack.names import parse_kv_name
from kvpack.profile import Profile
from kvpack.restore.profiles import attach_profile
from kvpack.restore.streaming import iter_outputs, select_outputs, token_bounds
from kvpack.storage import accepts_storage_options, same_location

Progress = Callable[[int, int, str], None]


@accepts_storage_options
def load_kvp(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    layers: Iterable[int] | None = None,
    names: Iterable[str] | None = None,
    tokens: tuple[int | None, int | None] | slice | None = None,
    profile: Profile | str | os.PathLike | None = None,
    *,
    storage_options: dict | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read the tensors of a ``.kvp`` (decoded), or a selection of them, and its metadata.

    Entry by entry (:mod:`kvpack.restore.streaming`): the memory beyond the returned tensors is about one
    entry's sections plus one decoded entry (feature-major codes, the 1.5 default, are decoded
    whole) or one piece (codes in group order, decoded in pieces).

    ``storage_options``: fsspec options (credentials, ``endpoint_url``, ...) for the URLs among the paths
    (:mod:`kvpack.storage`: ``s3://``, ``gs://``, ``memory://`` ...), which any path argument may be.

    Args:
        path: the ``.kvp`` file.
        dtype: dtype of the K/V tensors (float16 / bfloat16 / float32); default the stored one.
            Other tensors keep their own.
        layers: only the K/V tensors of these layers (other tensors such as ``token_ids`` stay).
        names: only these tensors (``layers.{i}.key``, ``token_ids`` ...).
        tokens: ``(start, stop)`` or a ``slice``, half-open, ``None`` for an open end: only these
            tokens, along the sequence axis of the K/V tensors ``(batch, num_kv_heads, seq_len,
            head_dim)`` and the last axis of ``token_ids`` ``(batch, seq_len)``; other tensors
            whole. Only the sections of the selected tensors' entries are read (all layers of a
            stacked entry, ``--level token``, are one entry); a token range decodes only the
            pieces of a token-axis entry that hold those tokens, and decodes other entries
            (channel axis, mixed precision, lossless) whole before cutting them.
        profile: the calibration profile of a transform-coded file (a :class:`Profile` or a path);
            default the embedded one, else the profile directory's (:mod:`kvpack.restore.profiles`).

    Returns:
        ``(tensors, metadata)``: name -> tensor in the file's tensor order, and the file's
        string metadata (unchanged by a selection).

    Raises:
        InvalidInputError: an unknown name, a layer out of range, an empty, reversed or too
            long token range, or a selection with no tensor.
        FormatError: see :class:`KvpReader`.
    """

    with KvpReader(path) as reader:
        refuse_raw_blocks(reader.keys(), path)
        attach_profile(reader, profile)
        outputs = select_outputs(reader, restore_dtype(dtype), layers, names, tokens)
        tensors = {o.name: torch.empty(o.shape, dtype=TORCH_DTYPES[o.dtype]) for o in outputs}
        for output, start, piece in iter_outputs(reader, outputs):
            target = tensors[output.name]
            if output.token_axis is None:
                target.copy_(piece.reshape(target.shape))
            else:
                target.narrow(output.token_axis, start, piece.shape[output.token_axis]).copy_(piece)
        return tensors, dict(reader.metadata)


@accepts_storage_options
def decompress_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    force: bool = False,
    progress: Progress | None = None,
    layers: Iterable[int] | None = None,
    names: Iterable[str] | None = None,
    tokens: tuple[int | None, int | None] | slice | None = None,
    profile: Profile | str | os.PathLike | None = None,
    *,
    storage_options: dict | None = None,
) -> dict:
    """Restore a ``.kvp`` (or a selection of it) to a safetensors file with the same tensor names and metadata.

    Streams: the safetensors header (names, shapes, dtypes, byte offsets, metadata) is computed
    from the ``.kvp`` header alone and written first, then each entry is decoded in pieces
    (:mod:`kvpack.restore.streaming`) and written in place, so peak memory is about the stored bytes of
    the largest entry plus one piece, whatever the size of the cache. The output goes to a
    temporary file renamed at the end: any error leaves no output and no temporary file.

    ``storage_options``: fsspec options (credentials, ``endpoint_url``, ...) for the URLs among the paths
    (:mod:`kvpack.storage`: ``s3://``, ``gs://``, ``memory://`` ...), which any path argument may be.

    Args:
        dtype: dtype of the restored K/V tensors (float16 / bfloat16 / float32); default the
            stored dtype. The metadata's ``dtype`` then names it.
        layers, names, tokens: restore only a selection, see :func:`load_kvp`.
        profile: the calibration profile of a transform-coded file, see :func:`load_kvp`. The output
            metadata then has ``kvpack_selection`` (JSON: the layers, tensors and token range
            asked for) and, with a token range, ``seq_len`` is the restored token count.

    Returns:
        ``{"input", "output", "tensors", "output_bytes"}``.

    Raises:
        FormatError: the input is not a valid ``.kvp`` (truncated, corrupted, checksum).
        InvalidInputError: input and output are the same file; a bad selection (see :func:`load_kvp`).
        OutputExistsError: the output exists and ``force`` is false.
        OSError: the disk is full or the file too large for a limit (nothing is left behind).
    """

    check_output_path(output_path, force)
    if same_location(output_path, input_path):
        raise InvalidInputError("input and output are the same file")
    with KvpReader(input_path) as reader:
        refuse_raw_blocks(reader.keys(), input_path)
        attach_profile(reader, profile)
        outputs = select_outputs(reader, restore_dtype(dtype), layers, names, tokens)
        metadata = dict(reader.metadata)
        if dtype is not None and "dtype" in metadata:
            metadata["dtype"] = dtype_name(dtype)
        if layers is not None or names is not None or tokens is not None:
            bounds = token_bounds(tokens)
            asked = {
                "layers": None if layers is None else sorted(set(layers)),
                "tensors": None if names is None else [o.name for o in outputs],
                "tokens": None if bounds is None else list(bounds),
            }
            metadata["kvpack_selection"] = json.dumps({k: v for k, v in asked.items() if v is not None})
            spans = [o.shape[o.token_axis] for o in outputs if o.token_axis is not None and parse_kv_name(o.name)]
            if bounds is not None and spans and "seq_len" in metadata:
                metadata["seq_len"] = str(max(spans))
        specs = [(o.name, o.shape, o.dtype) for o in outputs]
        with safetensors_writer(output_path, specs, metadata, force=force) as stream:
            for output, start, piece in iter_outputs(reader, outputs, progress):
                stream.write(output.name, piece, output.token_axis or 0, start)
        size = stream.layout.size
    return {"input": str(input_path), "output": str(output_path), "tensors": len(outputs), "output_bytes": size}
