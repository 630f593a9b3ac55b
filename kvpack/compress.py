"""The single compress loop: K/V tensors in memory or a safetensors dump on disk -> a ``.kvp`` file.

Every ``layers.{i}.key|value`` tensor is quantized with the codec config, other tensors are
stored losslessly; entries are encoded one at a time (:mod:`kvpack.entry`) and streamed into
the writer, so a cache is never held twice in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from kvpack import __version__
from kvpack.allocation.importance import is_stats_tensor
from kvpack.allocation.plan import allocate_entries
from kvpack.allocation.solver import Allocation
from kvpack.config import CodecConfig
from kvpack.dtypes import check_float_dtype, dtype_name
from kvpack.entry import decode_entry, encode_tensor, entry_layout, stack
from kvpack.errors import InvalidInputError
from kvpack.formats.atomic import check_output_path
from kvpack.formats.entropy import EntropyConfig, section_transposes
from kvpack.formats.header import TensorEntry
from kvpack.formats.reader import is_kvp_file
from kvpack.formats.safetensors_io import SafetensorsSource
from kvpack.formats.writer import KvpWriter
from kvpack.metrics import ErrorAccumulator
from kvpack.names import parse_kv_name, tensor_order
from kvpack.report import build_report
from kvpack.transforms.plan import plan_for
from kvpack.transforms.rope import rope_from_metadata

Progress = Callable[[int, int, str], None]


def compress_tensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    config: CodecConfig | None,
    metadata: dict[str, str] | None = None,
    force: bool = False,
    allocation: Allocation | None = None,
    stats: dict[str, torch.Tensor] | None = None,
    entropy: EntropyConfig | None = None,
) -> list[TensorEntry]:
    """Write a dict of tensors to a ``.kvp``: ``layers.{i}.key|value`` quantized, the rest lossless.

    With ``config=None`` every tensor is stored losslessly in its own dtype. With
    ``config.unrope``, the rotary frequencies come from the config (:meth:`CodecConfig.with_rope`)
    or else from ``metadata`` (what ``kvpack dump`` records). With ``config.stack_layers`` the
    K/V tensors are written as two stacked entries (:func:`entry_layout`). With an
    ``allocation``, groups get their own widths (:func:`allocate_widths`), weighted by the
    attention statistics ``stats`` or by those among ``tensors`` (which are not stored).
    ``entropy`` sets the lossless stage (:class:`kvpack.formats.entropy.EntropyConfig`; default zstd
    level 1 on every section, codes feature-major; ``EntropyConfig.off()`` writes dense sections).

    Raises:
        InvalidInputError, OutputExistsError: see :func:`encode_tensor`, :func:`entry_layout`
            and :class:`KvpWriter`.
    """
    config = with_model_rope(config, metadata or {})
    stats = stats if stats is not None else {n: x for n, x in tensors.items() if is_stats_tensor(n)}
    shapes = {name: (tuple(x.shape), dtype_name(x.dtype)) for name, x in tensors.items() if not is_stats_tensor(name)}
    layout = entry_layout(shapes, config)
    file_metadata = metadata_for_file(metadata or {}, config, allocation)
    entropy = EntropyConfig() if entropy is None else entropy
    mixed = allocate_entries(layout, shapes, tensors.__getitem__, config, allocation, stats, file_metadata, entropy)
    with KvpWriter(path, file_metadata, force=force, entropy=entropy) as writer:
        for entry_name, sources, codec in layout:
            x = tensors[entry_name] if entry_name == sources[0] else stack(tensors, sources)
            codec, widths = mixed.codec_for(entry_name, codec)
            _write_entry(writer, entry_name, x, codec, widths)
        return writer.entries


def _write_entry(
    writer: KvpWriter, name: str, x: torch.Tensor, codec: CodecConfig | None, widths: torch.Tensor | None
) -> tuple[TensorEntry, dict[str, bytes]]:
    """Encode one tensor and add it to ``writer`` (with its entropy stage); returns the entry and the sections."""
    dtype = dtype_name(x.dtype)
    transposes = section_transposes(name, tuple(x.shape), dtype, codec, writer.entropy) if x.numel() else {}
    sections = encode_tensor(name, x, codec, widths, transposes)
    return writer.add_tensor(name, tuple(x.shape), dtype, codec, sections, transposes), sections


def metadata_for_file(
    source: dict[str, str], config: CodecConfig | None, allocation: Allocation | None = None
) -> dict[str, str]:
    meta = dict(source)
    meta["kvpack_version"] = __version__
    meta["codec"] = config.describe() if config is not None else "lossless"
    if allocation is not None and config is not None:
        meta["allocation"] = json.dumps(dataclasses.asdict(allocation), sort_keys=True)
    return meta


def compress_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: CodecConfig,
    force: bool = False,
    progress: Progress | None = None,
    allocation: Allocation | None = None,
    entropy: EntropyConfig | None = None,
) -> dict:
    """Compress a safetensors KV-cache dump into a ``.kvp`` file and measure the result.

    Every ``layers.{i}.key|value`` tensor is quantized with ``config``; other tensors are
    stored losslessly. Each tensor is decoded again from the bytes written, so the error
    statistics are those of the file.

    Returns:
        The report (see :func:`build_report`).

    Raises:
        InvalidInputError: missing input, bad tensor (NaN/Inf, shape), group size that does
            not divide, an input without K/V tensors, or a ``.kvp`` given as input.
        FormatError: the input is not a readable safetensors file.
        OutputExistsError: the output exists and ``force`` is false.
    """
    if is_kvp_file(input_path):
        raise InvalidInputError(f"{input_path} is already a .kvp file; compress takes a safetensors dump")
    errors: dict[str, ErrorAccumulator] = {}
    with SafetensorsSource(input_path) as source:
        config = with_model_rope(config, source.metadata)
        names = sorted((n for n in source.keys() if not is_stats_tensor(n)), key=tensor_order)
        layout = check_compressible(source, config, names)
        check_output_path(output_path, force)
        if Path(input_path).resolve() == Path(output_path).resolve():
            raise InvalidInputError("input and output are the same file")
        shapes = {name: source.shape_dtype(name) for name in names}
        stats = {name: source.get(name) for name in source.keys() if is_stats_tensor(name)}
        # sorted: safetensors hands the metadata over in a different order each run; same input, same bytes
        file_metadata = metadata_for_file(dict(sorted(source.metadata.items())), config, allocation)
        entropy = EntropyConfig() if entropy is None else entropy
        mixed = allocate_entries(layout, shapes, source.get, config, allocation, stats, file_metadata, entropy)
        with KvpWriter(output_path, file_metadata, force=force, entropy=entropy) as writer:
            for index, (entry_name, sources, codec) in enumerate(layout):
                if progress:
                    progress(index, len(layout), entry_name)
                stacked = entry_name != sources[0]
                x = stack(source, sources) if stacked else source.get(entry_name)
                codec, widths = mixed.codec_for(entry_name, codec)
                entry, sections = _write_entry(writer, entry_name, x, codec, widths)
                if codec is not None:
                    decoded = decode_entry(entry, sections)
                    for i, name in enumerate(sources):  # errors per layer, also of a stacked entry
                        errors[name] = ErrorAccumulator()
                        errors[name].add(x[i] if stacked else x, decoded[i] if stacked else decoded)
                del x
            if progress:
                progress(len(layout), len(layout), "")
            entries = writer.entries
        file_size = Path(output_path).stat().st_size
        input_size = source.file_size
    report = build_report(entries, file_size, errors)
    report.update(
        input=str(input_path),
        output=str(output_path),
        input_bytes=input_size,
        ratio_vs_input=input_size / file_size,
        config=config.to_dict(),
    )
    return report


def with_model_rope(config: CodecConfig | None, metadata: dict[str, str]) -> CodecConfig | None:
    """``config`` with the rotary frequencies from a dump's ``metadata`` when it un-RoPEs keys without them.

    Raises:
        InvalidInputError: un-RoPE asked for, and the metadata records no rotary frequencies.
    """
    if config is None or not config.unrope or config.rope_inv_freq is not None:
        return config

    rope = rope_from_metadata(metadata)
    return config.with_rope(rope.inv_freq, rope.attention_scaling)  # keeps the config's rope_offset


def check_compressible(
    source: SafetensorsSource, config: CodecConfig, names: list[str]
) -> list[tuple[str, list[str], CodecConfig | None]]:
    """Check every K/V tensor's shape and dtype against ``config`` before any work (no data read).

    Returns:
        The file's entries (:func:`entry_layout`).

    Raises:
        InvalidInputError: no K/V tensors, a non-float or non-4-D K/V tensor, a group size
            that does not divide a tensor's features, or K/V tensors that cannot be stacked.
    """
    if not any(parse_kv_name(n) for n in names):
        raise InvalidInputError(f"{source.path}: no layers.<i>.key / layers.<i>.value tensors found")
    shapes = {name: source.shape_dtype(name) for name in names}
    layout = entry_layout(shapes, config)
    for entry_name, sources, codec in layout:
        if codec is None:
            continue
        shape, dtype = shapes[sources[0]]
        check_float_dtype(sources[0], dtype)
        if config.stack_layers:
            if len(shape) != 4:
                raise InvalidInputError(
                    f"tensor {sources[0]!r}: a KV tensor must have shape (batch, num_kv_heads, seq_len, head_dim), "
                    f"got {tuple(shape)}"
                )
            shape = (len(sources), *shape)
        try:
            plan_for(tuple(shape), dtype, entry_name, config)
        except InvalidInputError as exc:
            raise InvalidInputError(f"tensor {entry_name!r}: {exc}") from None
    return layout
