"""The public Python API: compress / decompress tensors and files, compare caches.

Tensors are KV-cache tensors of shape ``(batch, num_kv_heads, seq_len, head_dim)`` named
``layers.{i}.key`` / ``layers.{i}.value``; any other tensor (``token_ids``) is stored
losslessly. Work is done one tensor at a time so a cache is never held twice in memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvpack import __version__, fastpath
from kvpack.allocation import Allocation
from kvpack.codecs.base import KIND_CODEBOOKS, KIND_CODES, KIND_SCALES, SectionSpec
from kvpack.config import CodecConfig
from kvpack.entropy import EntropyConfig, transpose_width, transposed, untransposed
from kvpack.errors import FormatError, InvalidInputError
from kvpack.formats.constants import DTYPE_SIZES, FLOAT_DTYPES, PREAMBLE_SIZE, SECTION_ALIGNMENT
from kvpack.formats.header import TensorEntry, section_specs, spec_nbytes
from kvpack.formats.reader import KvpReader, is_kvp_file
from kvpack.formats.safetensors_io import (
    SafetensorsSource,
    kv_tensor_name,
    parse_kv_name,
    safetensors_writer,
    stacked_name,
)
from kvpack.formats.writer import KvpWriter, check_output_path
from kvpack.importance import is_stats_tensor
from kvpack.packing import pack, unpack
from kvpack.pipeline import plan_for, stacked_view, unstacked_view
from kvpack.stats import ErrorAccumulator, size_breakdown

Progress = Callable[[int, int, str], None]

TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
ROLES = ("key", "value")


def check_finite(name: str, values: torch.Tensor, stacked: bool = False) -> None:
    """Raises InvalidInputError when tensor ``name`` holds NaN or Inf (naming the layer of a stacked one)."""
    if not torch.isfinite(values).all():
        bad = ~torch.isfinite(values)
        where = f" (layer {int(bad.flatten(1).any(1).nonzero()[0])})" if stacked else ""
        raise InvalidInputError(
            f"tensor {name!r}{where} holds {int(bad.sum())} NaN or Inf values; refusing to quantize it"
        )


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InvalidInputError(f"unsupported tensor dtype {dtype}; supported: {', '.join(TORCH_DTYPES)}") from None


# --- one tensor ------------------------------------------------------------------------


def encode_tensor(
    name: str,
    x: torch.Tensor,
    config: CodecConfig | None,
    widths: torch.Tensor | None = None,
    transposes: dict[str, int] | None = None,
) -> dict[str, bytes]:
    """Serialize one tensor into the sections of a ``.kvp`` entry.

    Args:
        name: tensor name (for messages).
        x: with a codec, a float16 / bfloat16 / float32 tensor ``(batch, num_kv_heads,
            seq_len, head_dim)``, or ``(num_layers, batch, num_kv_heads, seq_len, head_dim)``
            with ``config.stack_layers``; without (``config=None``), any supported tensor,
            stored as is.
        config: the codec config, or ``None`` for lossless storage.
        widths: with ``config.width_counts`` (mixed precision), the code width of every group
            (int64 ``(n_groups,)``, 0 to 8), as an allocator chose it (:mod:`kvpack.allocation`).
        transposes: code sections to pack feature-major, with their row length
            (:func:`section_transposes`; format 1.5, docs/format.md §6.3); default none.

    Returns:
        Section name -> bytes, in the order :func:`kvpack.formats.header.section_specs` gives.

    Raises:
        InvalidInputError: wrong shape or dtype, NaN/Inf values, values beyond the float16
            metadata range, or a group size that does not divide the features.
    """
    dtype = dtype_name(x.dtype)
    if config is None:
        return {"data": _tensor_bytes(x)}
    if x.numel() and dtype not in FLOAT_DTYPES:
        raise InvalidInputError(
            f"tensor {name!r}: dtype {dtype} cannot be quantized (expected {', '.join(FLOAT_DTYPES)})"
        )
    try:
        plan = plan_for(tuple(x.shape), dtype, name, config)
        specs = plan.section_specs()
    except InvalidInputError as exc:
        raise InvalidInputError(f"tensor {name!r}: {exc}") from None
    if x.numel() == 0:  # nothing to quantize: every section is its declared size of zeros
        return {section: bytes(spec_nbytes(spec)) for section, spec in specs.items()}
    values = x.detach().to("cpu")
    transposes = transposes or {}
    if fastpath.can_encode(values, config, plan, transposes):  # fused kernels, the same bytes
        arrays = fastpath.encode(name, values, config, plan)
        return {
            section: arrays[section]
            if spec.dtype == "code"
            else _tensor_bytes(arrays[section].to(TORCH_DTYPES[spec.dtype]))
            for section, spec in specs.items()
        }
    check_finite(name, values, config.stack_layers)
    if config.stack_layers:
        values = stacked_view(values)
    try:
        arrays = plan.encode(values, widths)
    except InvalidInputError as exc:
        raise InvalidInputError(f"tensor {name!r}: {exc}") from None
    out = {}
    for section, spec in specs.items():
        if spec.dtype == "code":
            codes = arrays[section].reshape(-1)
            if transposes.get(section):
                codes = transposed(codes, transposes[section])
            out[section] = pack(codes.numpy(), spec.bits).tobytes()
        else:
            out[section] = _tensor_bytes(arrays[section].to(TORCH_DTYPES[spec.dtype]))
    return out


def decode_entry(
    entry: TensorEntry, sections: dict[str, bytes | np.ndarray], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Rebuild a tensor from its header entry and section bytes.

    Args:
        entry: the tensor's header entry (shape, dtype, codec).
        sections: section name -> raw bytes (as read from the file).
        dtype: output dtype; default the stored dtype.

    Returns:
        Tensor of ``entry.shape``.

    Raises:
        FormatError: a section has the wrong size (only possible if not read through the reader).
    """
    specs = section_specs(entry.shape, entry.dtype, entry.codec, entry.name)
    out_dtype = dtype or TORCH_DTYPES[entry.dtype]
    try:
        if entry.codec is None:
            return _from_bytes(sections["data"], entry.dtype).reshape(entry.shape).to(out_dtype)
        plan = entry.plan
        layout = plan.layout
        fast = entry.n_elements > 0 and fastpath.can_decode(entry, out_dtype)
        arrays = {
            section: section_array(
                entry.name, section, spec, sections[section], layout.group_size, transpose_of(entry, section)
            )
            for section, spec in specs.items()
            if not (fast and section == "codes")  # the kernel reads the packed codes itself
        }
        if entry.n_elements == 0:  # the sections were still checked: a tensor-scope codebook exists
            return torch.empty(entry.shape, dtype=out_dtype)
        if fast:  # fused kernel, the same values
            return fastpath.decode(entry, _as_uint8(sections["codes"]), arrays, out_dtype)
        decoded = plan.decode(arrays).to(out_dtype)
        return unstacked_view(decoded, entry.shape) if entry.codec.stack_layers else decoded
    except InvalidInputError as exc:
        raise FormatError(f"tensor {entry.name!r}: {exc}") from None


def section_transposes(
    name: str, shape: tuple[int, ...], dtype: str, config: CodecConfig | None, entropy: EntropyConfig
) -> dict[str, int]:
    """The code sections of a tensor that ``entropy`` stores feature-major, and their row length."""
    if config is None or not entropy.enabled or not entropy.transpose or KIND_CODES not in entropy.kinds:
        return {}
    plan = plan_for(tuple(shape), dtype, name, config)
    widths = {section: transpose_width(plan, section, spec) for section, spec in plan.section_specs().items()}
    return {section: width for section, width in widths.items() if width}


def section_array(
    name: str, section: str, spec: SectionSpec, raw: bytes | np.ndarray, group_size: int, transpose: int = 0
) -> torch.Tensor:
    """The array a codec decodes from one section's bytes, as read from the file (``transpose``:
    the section's feature-major row length, format 1.5 §6.3; 0 for group order).

    Returns:
        See :func:`codes_array` (``spec.dtype == "code"``) and :func:`values_array`.

    Raises:
        FormatError: scales or codebooks that are NaN or infinite.
        InvalidInputError: a length that does not match ``spec`` (only without the reader's checks).
    """
    if spec.dtype == "code":
        codes = unpack(_as_uint8(raw), spec.bits, spec.count)
        if transpose:
            codes = untransposed(codes, transpose)
        return codes_array(spec, codes, group_size)
    return values_array(name, section, spec, raw)


def transpose_of(entry: TensorEntry, section: str) -> int:
    """The feature-major row length of a section of ``entry`` (0: group order)."""
    where = entry.sections.get(section)
    return where.transpose if where is not None else 0


def codes_array(spec: SectionSpec, codes: np.ndarray, group_size: int) -> torch.Tensor:
    """Unpacked codes as a codec takes them: the codes of groups (kind ``codes``) as uint8
    ``(groups, group_size)``; other codes (outlier positions, rotation signs) as int64 ``(count,)``."""
    codes = torch.from_numpy(codes)
    if spec.kind == KIND_CODES:
        return codes.reshape(-1, group_size)
    return codes.long()  # scatter indices, signs


def values_array(name: str, section: str, spec: SectionSpec, raw: bytes | np.ndarray) -> torch.Tensor:
    """The values of a section that is not packed codes, as float32 ``(count,)`` (the count
    ``raw`` holds: all of the section or a piece of it).

    Raises:
        FormatError: scales or codebooks that are NaN or infinite; a length that is not a
            whole number of values.
    """
    values = _from_bytes(raw, spec.dtype).to(torch.float32)
    if spec.kind in (KIND_SCALES, KIND_CODEBOOKS) and not bool(torch.isfinite(values).all()):
        raise FormatError(f"tensor {name!r}: section {section} holds NaN or infinite values")
    return values


def _tensor_bytes(x: torch.Tensor) -> bytes:
    return x.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _as_uint8(data: bytes | np.ndarray) -> np.ndarray:
    return (
        np.frombuffer(data, dtype=np.uint8)
        if isinstance(data, (bytes, bytearray, memoryview))
        else np.asarray(data, np.uint8)
    )


def _from_bytes(data: bytes | np.ndarray, dtype: str) -> torch.Tensor:
    raw = _as_uint8(data)
    if raw.size == 0:
        return torch.empty(0, dtype=TORCH_DTYPES[dtype])
    if raw.size % DTYPE_SIZES[dtype]:
        raise FormatError(f"{raw.size} bytes is not a whole number of {dtype} values")
    if dtype == "bool" and int(raw.max()) > 1:
        raise FormatError("a bool tensor holds bytes other than 0 and 1")
    return torch.from_numpy(raw.copy()).view(TORCH_DTYPES[dtype])


# --- dicts of tensors ------------------------------------------------------------------


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
    ``entropy`` sets the lossless stage (:class:`kvpack.entropy.EntropyConfig`; default zstd
    level 1 on every section, codes feature-major; ``EntropyConfig.off()`` writes dense sections).

    Raises:
        InvalidInputError, OutputExistsError: see :func:`encode_tensor`, :func:`entry_layout`
            and :class:`KvpWriter`.
    """
    config = with_model_rope(config, metadata or {})
    stats = stats if stats is not None else {n: x for n, x in tensors.items() if is_stats_tensor(n)}
    shapes = {name: (tuple(x.shape), dtype_name(x.dtype)) for name, x in tensors.items() if not is_stats_tensor(name)}
    layout = entry_layout(shapes, config)
    file_metadata = _file_metadata(metadata or {}, config, allocation)
    entropy = EntropyConfig() if entropy is None else entropy
    mixed = _allocate(layout, shapes, tensors.__getitem__, config, allocation, stats, file_metadata, entropy)
    with KvpWriter(path, file_metadata, force=force, entropy=entropy) as writer:
        for entry_name, sources, codec in layout:
            x = tensors[entry_name] if entry_name == sources[0] else stack(tensors, sources)
            codec, widths = mixed.get(entry_name, (codec, None))
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


def _allocate(
    layout: list[tuple[str, list[str], CodecConfig | None]],
    shapes: dict[str, tuple[tuple[int, ...], str]],
    get: Callable[[str], torch.Tensor],
    config: CodecConfig | None,
    allocation: Allocation | None,
    stats: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
    entropy: EntropyConfig | None = None,
) -> dict[str, tuple[CodecConfig, torch.Tensor]]:
    if allocation is None or config is None:
        return {}
    return allocate_widths(layout, shapes, get, config, allocation, stats, metadata or {}, entropy)


def header_and_padding(
    metadata: dict[str, str],
    entries: list[tuple[str, tuple[int, ...], str, CodecConfig | None]],
    entropy: EntropyConfig | None = None,
) -> tuple[int, int]:
    """The bytes of the compressed header, and of the alignment padding between sections, of a
    file holding ``entries`` (name, shape, dtype, codec) in this order, laid out as the writer lays
    them out; checksums are stand-ins of the same size and entropy (rate control uses this before
    anything is written). With an ``entropy`` stage, every section it may apply to is listed with
    its ``encoding`` (and ``transpose``) keys, an upper bound on the header; the padding is that of
    dense sections."""
    import zlib

    import zstandard

    from kvpack.formats.constants import HEADER_ZSTD_LEVEL
    from kvpack.formats.header import SectionEntry, TensorEntry, encode_header, section_specs

    position, padding, tensors = PREAMBLE_SIZE, 0, []
    for name, shape, dtype, codec in entries:
        sections = {}
        transposes = section_transposes(name, shape, dtype, codec, entropy) if entropy is not None else {}
        for section, spec in section_specs(shape, dtype, codec, name).items():
            pad = -position % SECTION_ALIGNMENT
            position, padding = position + pad, padding + pad
            length = spec_nbytes(spec)
            encoded = "zstd" if entropy is not None and length and entropy.applies_to(spec.kind) else None
            crc = zlib.crc32(f"{name}/{section}".encode())
            sections[section] = SectionEntry(position, length, crc, pad, -1, encoded, transposes.get(section, 0))
            position += length
        tensors.append(TensorEntry(name, tuple(shape), dtype, codec, sections))
    text = encode_header(metadata, tensors)
    return len(zstandard.ZstdCompressor(level=HEADER_ZSTD_LEVEL, write_content_size=True).compress(text)), padding


def entry_layout(
    shapes: dict[str, tuple[tuple[int, ...], str]], config: CodecConfig | None
) -> list[tuple[str, list[str], CodecConfig | None]]:
    """Which entries a file of these tensors holds: ``(entry name, source tensor names, codec)``.

    Each tensor is its own entry (K/V quantized with ``config``, the rest lossless), except with
    ``config.stack_layers``: then ``layers.all.key`` stacks ``layers.0.key`` ... ``layers.{L-1}.key``
    (shape ``(L, batch, num_kv_heads, seq_len, head_dim)``) and ``layers.all.value`` the values,
    first in the file.

    Args:
        shapes: tensor name -> ``(shape, dtype name)``.

    Raises:
        InvalidInputError: stacking a cache whose K/V tensors are not exactly layers 0 to L-1
            with a key and a value each, the keys of one shape and dtype and the values of one,
            or that already holds a tensor named ``layers.all.key|value``.
    """
    if config is None or not config.stack_layers:
        return [(name, [name], config if config is not None and parse_kv_name(name) else None) for name in shapes]
    kv = {name: parse_kv_name(name) for name in shapes if parse_kv_name(name)}
    taken = [stacked_name(role) for role in ROLES if stacked_name(role) in shapes]
    if taken:
        raise InvalidInputError(f"the cache holds a tensor named {taken[0]!r}, the name of a stacked entry")
    layers = 1 + max((layer for layer, _ in kv.values()), default=-1)
    missing = [kv_tensor_name(i, role) for i in range(layers) for role in ROLES if kv_tensor_name(i, role) not in kv]
    if not kv or missing:
        raise InvalidInputError(
            "groups across layers (--level token) need every layer's key and value, layers 0 to L-1"
            + (f"; missing {', '.join(missing[:3])}" if missing else "")
        )
    for name in sorted(kv, key=tensor_order):
        first = kv_tensor_name(0, kv[name][1])
        if shapes[name] != shapes[first]:
            raise InvalidInputError(
                f"groups across layers (--level token) need the layers' {kv[name][1]}s to have one shape and dtype: "
                f"{name!r} is {shapes[name][0]} {shapes[name][1]}, {first} {shapes[first][0]} {shapes[first][1]}"
            )
    stacked = [(stacked_name(role), [kv_tensor_name(i, role) for i in range(layers)], config) for role in ROLES]
    return stacked + [(name, [name], None) for name in shapes if name not in kv]


def stack(tensors: Any, names: list[str]) -> torch.Tensor:
    """``(len(names), *shape)``: the named tensors (from a dict, a :class:`SafetensorsSource` or a
    name -> tensor function) stacked."""
    if callable(tensors):
        get = tensors
    else:
        get = tensors.get if isinstance(tensors, SafetensorsSource) else tensors.__getitem__
    return torch.stack([get(name) for name in names])


def allocate_widths(
    layout: list[tuple[str, list[str], CodecConfig | None]],
    shapes: dict[str, tuple[tuple[int, ...], str]],
    get: Callable[[str], torch.Tensor],
    config: CodecConfig,
    allocation: Allocation,
    stats: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
    entropy: EntropyConfig | None = None,
) -> dict[str, tuple[CodecConfig, torch.Tensor]]:
    """Per quantized entry, its mixed-precision config and group widths (:mod:`kvpack.allocation`).

    Reads every K/V tensor once (``get``) and measures each group's error at every width.

    Args:
        layout: the file's entries (:func:`entry_layout`).
        shapes: tensor name -> ``(shape, dtype name)``.
        get: tensor name -> tensor.
        metadata: the file's metadata (its header is counted).
        entropy: the file's entropy stage (its header keys are counted; the budget is of dense sections).
        stats: attention statistics (:mod:`kvpack.importance`); ``target`` weights each value's
            error by what it costs the attention output with them, and counts every tensor's
            relative error alike without; ``importance`` and ``qaq`` need them.

    Raises:
        InvalidInputError: a budget out of reach, or an allocator that needs missing statistics.
    """
    from kvpack.allocation import (
        WidthTable,
        allocate_bits,
        allocate_error,
        allocate_qaq,
        entry_table,
        keep_recent_widest,
        narrowest_bits,
    )

    kv_elements = sum(math.prod(shapes[n][0]) for _, sources, codec in layout if codec is not None for n in sources)
    if not kv_elements:
        raise InvalidInputError("bit allocation needs K/V values: the cache holds none")
    tables, tensor_costs, fixed_bits, entries = {}, {}, 0.0, {}
    for entry_name, sources, codec in layout:
        if codec is None:
            shape, dtype = shapes[entry_name]
            entries[entry_name] = (entry_name, shape, dtype, None)
            fixed_bits += 8 * math.prod(shape) * DTYPE_SIZES[dtype]
            continue
        x = get(sources[0]) if entry_name == sources[0] else stack(get, sources)
        check_finite(entry_name, x, config.stack_layers)
        entries[entry_name] = (entry_name, tuple(x.shape), dtype_name(x.dtype), None)
        plan = plan_for(tuple(x.shape), dtype_name(x.dtype), entry_name, config)
        _, groups, mask = plan.prepare(stacked_view(x) if config.stack_layers else x)
        group_stats = _group_stats(plan, sources, stats or {}, config)
        table, per_tensor = entry_table(allocation, config, groups, plan.layout, mask, group_stats)
        all_widths = table.widths
        table = allocation.restrict(table)
        if allocation.recent_tokens:
            table = keep_recent_widest(table, _recent_groups(plan, sources, allocation.recent_tokens))
        tables[entry_name] = table
        tensor_costs[entry_name] = per_tensor[[all_widths.index(w) for w in table.widths]]
        # everything but codes and codebooks: as a file with every group at one width stores it
        full = dataclasses.replace(config, width_counts=_counts_at(plan.layout.n_groups, table.widths[-1]))
        specs = plan_for(tuple(x.shape), dtype_name(x.dtype), entry_name, full).section_specs()
        fixed_bits += sum(8 * spec_nbytes(s) for n, s in specs.items() if not n.startswith(("codes", "codebook")))
    fixed_bits += 8 * PREAMBLE_SIZE
    names = list(tables)
    ordered = [tables[n] for n in names]

    def with_widths(chosen: list[torch.Tensor]) -> dict[str, tuple[CodecConfig, torch.Tensor]]:
        return {
            n: (dataclasses.replace(config, width_counts=tuple(torch.bincount(w, minlength=9).tolist())), w)
            for n, w in zip(names, chosen, strict=True)
        }

    def present_cost(present: list[torch.Tensor], chosen: list[torch.Tensor] | None = None) -> float:
        """Bits that depend on which widths occur (bool masks over each table's widths): shared
        codebooks, and the header with a section per width (sized with the counts of ``chosen``
        when given, else with stand-in counts)."""
        listed = []
        for name, shape, dtype, _ in entries.values():
            codec = None
            if name in tables:
                index = names.index(name)
                if chosen is not None:
                    counts = torch.bincount(chosen[index], minlength=9).tolist()
                else:
                    counts = [0] * 9
                    for width, used in zip(tables[name].widths, present[index].tolist(), strict=True):
                        counts[width] = int(used)
                    if 1 in counts:  # the rest of the groups at the narrowest width present
                        counts[counts.index(1)] += tables[name].n_groups - sum(counts)
                codec = dataclasses.replace(config, width_counts=tuple(counts))
            listed.append((name, shape, dtype, codec))
        shared = sum(float(tensor_costs[n][m].sum()) for n, m in zip(names, present, strict=True))
        return shared + 8.0 * sum(header_and_padding(metadata or {}, listed, entropy))

    if allocation.target_bits is not None:
        available = allocation.target_bits * kv_elements - fixed_bits
        usable = [torch.isfinite(t.errors) for t in ordered]
        narrowest = [u.to(torch.int8).argmax(dim=1) for u in usable]  # column of each group's narrowest width
        needed_mask = [torch.bincount(c, minlength=len(t.widths)) > 0 for c, t in zip(narrowest, ordered, strict=True)]
        narrowest_widths = [torch.tensor(t.widths)[c] for c, t in zip(narrowest, ordered, strict=True)]
        if present_cost(needed_mask, narrowest_widths) + narrowest_bits(ordered) > available:
            needed = (fixed_bits + present_cost(needed_mask, narrowest_widths) + narrowest_bits(ordered)) / kv_elements
            if not math.isfinite(needed):
                raise InvalidInputError(
                    f"no width in [{allocation.bits_min}, {allocation.bits_max}] is usable for every group "
                    "(qaq leaves out a width whose error is above a narrower one's): widen --bits-min / --bits-max"
                )
            needed = math.ceil(needed * 1000) / 1000
            raise InvalidInputError(
                f"--target-bits {allocation.target_bits:g} is below the {needed:.3f} bits per element this file "
                f"needs with every group at its narrowest usable width (--bits-min {allocation.bits_min}"
                + (f", --recent-tokens {allocation.recent_tokens}" if allocation.recent_tokens else "")
                + "): give more bits, lower --bits-min or use larger groups"
            )
        # Shared codebooks and the header's sections cost bits per width that occurs, which the
        # per-group allocators do not see. Rounds charge a set of widths and allocate the rest of
        # the budget: (1) growing rounds charge every width chosen so far, from the narrowest,
        # until a round chooses only widths charged (it then fits); (2) shrinking rounds allow
        # and charge only the widths the last round chose, to spend what unused widths were
        # charged. The fullest allocation within budget wins.
        allocate = allocate_qaq if allocation.method == "qaq" else allocate_bits

        def widths_in(chosen: list[torch.Tensor]) -> list[torch.Tensor]:
            return [torch.isin(torch.tensor(t.widths), w) for w, t in zip(chosen, ordered, strict=True)]

        def total(chosen: list[torch.Tensor]) -> float:
            codes = sum(
                float(t.bits[torch.searchsorted(torch.tensor(t.widths), w)].sum())
                for w, t in zip(chosen, ordered, strict=True)
            )
            return present_cost(widths_in(chosen), chosen) + codes

        def subset(used: list[torch.Tensor], present: list[torch.Tensor]) -> bool:
            return all(bool((u <= m).all()) for u, m in zip(used, present, strict=True))

        candidates = []
        present = needed_mask
        for _ in range(max(len(t.widths) for t in ordered) + 1):
            chosen = allocate(ordered, max(available - present_cost(present), narrowest_bits(ordered)))
            candidates.append((total(chosen), chosen))
            used = widths_in(chosen)
            if subset(used, present):
                break
            present = [u | m for u, m in zip(used, present, strict=True)]
        for _ in range(3):
            present = widths_in(min(candidates, key=lambda c: abs(available - c[0]))[1])
            allowed = [
                WidthTable(t.widths, t.errors.masked_fill(~m[None, :], float("inf")), t.bits, t.energy)
                for t, m in zip(ordered, present, strict=True)
            ]
            chosen = allocate(allowed, max(available - present_cost(present), narrowest_bits(allowed)))
            candidates.append((total(chosen), chosen))
            if all(bool((u == m).all()) for u, m in zip(widths_in(chosen), present, strict=True)):
                break
        fitting = [c for c in candidates if c[0] <= available + 1e-6]
        chosen = max(fitting, key=lambda c: c[0])[1] if fitting else candidates[-1][1]
    elif allocation.method == "qaq":
        chosen = allocate_qaq(ordered, None, allocation.target_error)
    else:
        chosen = allocate_error(ordered, allocation.max_error)  # each table's energy is 1: the mean over the tensors
    return with_widths(chosen)


def _group_view(
    plan: Any, sources: list[str], per_layer: Callable[[int, str, tuple], torch.Tensor | None]
) -> torch.Tensor | None:
    """A per-value quantity of an entry (``per_layer(layer, role, shape)`` gives it for one layer's
    ``(batch, num_kv_heads, seq_len, head_dim)`` tensor) in group layout ``(n_groups, group_size)``."""
    from kvpack.grouping import to_groups

    values = []
    for name in sources:
        layer, role = parse_kv_name(name)
        shape = plan.shape if len(sources) == 1 else (plan.shape[0], plan.shape[1] // len(sources), *plan.shape[2:])
        value = per_layer(layer, role, shape)
        if value is None:
            return None
        values.append(value)
    whole = values[0] if len(values) == 1 else stacked_view(torch.stack(values))
    start = plan.kept_first
    return to_groups(whole[:, :, start : start + plan.coded_tokens].contiguous(), plan.layout)


def _group_stats(plan: Any, sources: list[str], stats: dict[str, torch.Tensor], config: CodecConfig) -> Any:
    """The :class:`~kvpack.allocation.GroupStats` of an entry, or ``None`` without statistics."""
    from kvpack.allocation import GroupStats
    from kvpack.importance import importance_weights, layer_statistics

    def weights(layer: int, role: str, shape: tuple) -> torch.Tensor | None:
        rope_dim = config.rope_dim if config.unrope and role == "key" else 0
        return importance_weights(stats, layer, role, shape, config.rotate == "hadamard", rope_dim)

    def attention(layer: int, role: str, shape: tuple) -> torch.Tensor | None:
        found = layer_statistics(stats, layer, shape)
        return None if found is None else found[0]

    def logit_gain(layer: int, role: str, shape: tuple) -> torch.Tensor | None:
        found = layer_statistics(stats, layer, shape)
        return None if found is None else found[1] * found[2]

    group_weights = _group_view(plan, sources, weights)
    if group_weights is None:
        return None
    return GroupStats(
        role=parse_kv_name(sources[0])[1],
        attention=_group_view(plan, sources, attention).amax(dim=1),
        logit_gain=_group_view(plan, sources, logit_gain).amax(dim=1),
        weights=group_weights,
        min_attention=1.0 / max(plan.shape[2], 1),
    )


def _recent_groups(plan: Any, sources: list[str], recent: int) -> torch.Tensor:
    """Bool ``(n_groups,)``: the group holds one of the last ``recent`` tokens."""

    def tokens(layer: int, role: str, shape: tuple) -> torch.Tensor:
        return torch.arange(shape[2], dtype=torch.float32)[None, None, :, None].expand(shape)

    return _group_view(plan, sources, tokens).amax(dim=1) >= plan.shape[2] - recent


def _counts_at(n_groups: int, width: int) -> tuple[int, ...]:
    return tuple(n_groups if w == width else 0 for w in range(9))


def load_kvp(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    layers: Iterable[int] | None = None,
    names: Iterable[str] | None = None,
    tokens: tuple[int | None, int | None] | slice | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read the tensors of a ``.kvp`` (decoded), or a selection of them, and its metadata.

    Entry by entry (:mod:`kvpack.streaming`): the memory beyond the returned tensors is about one
    entry's sections plus one decoded entry (feature-major codes, the 1.5 default, are decoded
    whole) or one piece (codes in group order, decoded in pieces).

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

    Returns:
        ``(tensors, metadata)``: name -> tensor in the file's tensor order, and the file's
        string metadata (unchanged by a selection).

    Raises:
        InvalidInputError: an unknown name, a layer out of range, an empty, reversed or too
            long token range, or a selection with no tensor.
        FormatError: see :class:`KvpReader`.
    """
    from kvpack.streaming import iter_outputs, select_outputs

    with KvpReader(path) as reader:
        outputs = select_outputs(reader, _dtype_label(dtype), layers, names, tokens)
        tensors = {o.name: torch.empty(o.shape, dtype=TORCH_DTYPES[o.dtype]) for o in outputs}
        for output, start, piece in iter_outputs(reader, outputs):
            target = tensors[output.name]
            if output.token_axis is None:
                target.copy_(piece.reshape(target.shape))
            else:
                target.narrow(output.token_axis, start, piece.shape[output.token_axis]).copy_(piece)
        return tensors, dict(reader.metadata)


def _dtype_label(dtype: torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    name = dtype_name(dtype)
    if name not in FLOAT_DTYPES:
        raise InvalidInputError(f"K/V tensors are restored as {', '.join(FLOAT_DTYPES)}, not {name}")
    return name


def _file_metadata(
    source: dict[str, str], config: CodecConfig | None, allocation: Allocation | None = None
) -> dict[str, str]:
    meta = dict(source)
    meta["kvpack_version"] = __version__
    meta["codec"] = config.describe() if config is not None else "lossless"
    if allocation is not None and config is not None:
        meta["allocation"] = json.dumps(dataclasses.asdict(allocation), sort_keys=True)
    return meta


# --- files -----------------------------------------------------------------------------


class CacheSource:
    """A KV cache file of either format, read one tensor (or one piece of a tensor) at a time (``.kvp`` decoded)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if is_kvp_file(self.path):
            self.kind = "kvp"
            self._kvp = KvpReader(self.path)
            self.metadata = dict(self._kvp.metadata)
            self._keys = self._kvp.tensor_names()
        else:
            self.kind = "safetensors"
            self._st = SafetensorsSource(self.path)
            self.metadata = self._st.metadata
            self._keys = self._st.keys()

    def __enter__(self) -> CacheSource:
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "kvp":
            self._kvp.close()

    def keys(self) -> list[str]:
        return list(self._keys)

    def get(self, name: str) -> torch.Tensor:
        if self.kind == "kvp":
            return self._kvp.read_tensor(name)
        return self._st.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` (no data read).

        Raises:
            InvalidInputError: no such tensor.
        """
        if self.kind == "kvp":
            from kvpack.streaming import select_outputs

            return select_outputs(self._kvp, names=[name])[0].shape
        if name not in self._keys:
            raise InvalidInputError(f"{self.path}: no tensor named {name!r}")
        return self._st.shape_dtype(name)[0]

    def entry_of(self, name: str) -> str:
        """What holds tensor ``name`` in the file: its ``.kvp`` entry (``layers.all.key`` for a layer
        of a stacked entry), or ``name`` itself."""
        if self.kind == "kvp" and name not in self._kvp.keys() and parse_kv_name(name):
            return stacked_name(parse_kv_name(name)[1])
        return name

    def pieces(self, names: list[str], step: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Tensors ``names`` in their stored dtype, together, a piece at a time: ``(first token,
        {name: piece})`` for consecutive pieces of ``step`` tokens along the sequence axis of 4-D
        K/V tensors ``(batch, num_kv_heads, seq_len, head_dim)`` (the last may be shorter; give
        names of one token count); any other tensor as one piece ``(0, {name: tensor})``. Both
        formats cut at the same tokens. A ``.kvp`` entry is read once and decoded once, piece by
        piece, for all its layers asked for (:func:`kvpack.streaming.tensor_pieces`); safetensors
        tensors are read a slice at a time.

        Raises:
            InvalidInputError: no such tensor.
            FormatError: unreadable data.
        """
        if self.kind == "kvp":
            from kvpack.streaming import tensor_pieces

            yield from tensor_pieces(self._kvp, names, step)
            return
        shapes = {name: self.shape(name) for name in names}
        if any(not parse_kv_name(n) or len(s) != 4 for n, s in shapes.items()):
            yield 0, {name: self._st.get(name) for name in names}
            return
        tokens = max(s[2] for s in shapes.values())
        for begin in range(0, tokens, step):
            yield begin, {n: self._st.get_slice(n, begin, min(begin + step, s[2])) for n, s in shapes.items()}


def open_cache(path: str | os.PathLike) -> CacheSource:
    """Open a ``.kvp`` or safetensors cache for reading one tensor at a time; use with ``with``.

    Raises:
        InvalidInputError, FormatError: missing or invalid file.
    """
    return CacheSource(path)


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
        file_metadata = _file_metadata(dict(sorted(source.metadata.items())), config, allocation)
        entropy = EntropyConfig() if entropy is None else entropy
        mixed = _allocate(layout, shapes, source.get, config, allocation, stats, file_metadata, entropy)
        with KvpWriter(output_path, file_metadata, force=force, entropy=entropy) as writer:
            for index, (entry_name, sources, codec) in enumerate(layout):
                if progress:
                    progress(index, len(layout), entry_name)
                stacked = entry_name != sources[0]
                x = stack(source, sources) if stacked else source.get(entry_name)
                codec, widths = mixed.get(entry_name, (codec, None))
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
    from kvpack.rope import rope_from_metadata

    rope = rope_from_metadata(metadata)
    return config.with_rope(rope.inv_freq, rope.attention_scaling)  # keeps the config's rope_offset


def kv_dims(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a safetensors dump (no data read): the layer
    count and the shape of the first 4-D K/V tensor.

    Raises:
        InvalidInputError, FormatError: unreadable file or no 4-D K/V tensor.
    """
    if is_kvp_file(path):
        raise InvalidInputError(f"{path} is already a .kvp file; compress takes a safetensors dump")
    with SafetensorsSource(path) as source:
        layers = {parse_kv_name(name)[0] for name in source.keys() if parse_kv_name(name)}
        for name in sorted(source.keys(), key=tensor_order):
            shape, _ = source.shape_dtype(name)
            if parse_kv_name(name) and len(shape) == 4:
                return len(layers), int(shape[1]), int(shape[3])
    raise InvalidInputError(f"{path}: no layers.<i>.key / layers.<i>.value tensors found")


def tensor_order(name: str) -> tuple:
    """Sort key: K/V tensors by layer (numerically), key before value, then other tensors by name."""
    parsed = parse_kv_name(name)
    return (0, parsed[0], parsed[1] != "key", "") if parsed else (1, 0, False, name)


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
        if dtype not in FLOAT_DTYPES:
            raise InvalidInputError(
                f"tensor {sources[0]!r}: dtype {dtype} cannot be quantized (expected {', '.join(FLOAT_DTYPES)})"
            )
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


def build_report(entries: list[TensorEntry], file_size: int, errors: dict[str, ErrorAccumulator] | None) -> dict:
    """Size breakdown (bits per element by section kind) joined with error statistics.

    Returns:
        ``{"file_bytes", "kv_elements", "ratio_vs_fp16", "rows": {"key"|"value"|"all": {...}},
        "layers": [...]}``; each row has ``elements``, ``bytes``, ``bits_per_element``
        (codes, scales, codebooks, outliers, header, total), ``ratio_vs_fp16`` and, when
        ``errors`` is given, ``rel_mse``, ``snr_db``, ``max_abs_err``, ``cosine_mean``.
    """
    sizes = size_breakdown(entries, file_size)
    grouped: dict[str, ErrorAccumulator] = {
        "key": ErrorAccumulator(),
        "value": ErrorAccumulator(),
        "all": ErrorAccumulator(),
    }
    per_layer: dict[int, ErrorAccumulator] = {}
    for name, acc in (errors or {}).items():
        layer, role = parse_kv_name(name)
        for target in (grouped[role], grouped["all"], per_layer.setdefault(layer, ErrorAccumulator())):
            target.merge(acc)

    def finish(row: dict, acc: ErrorAccumulator | None) -> dict:
        total = row["bits_per_element"]["total"]
        row["ratio_vs_fp16"] = 16 / total if total else None
        if errors is not None and acc is not None:
            row.update(acc.result())
        return row

    rows = {name: finish(row, grouped[name]) for name, row in sizes["rows"].items()}
    layers = [finish(row, per_layer.get(row["layer"])) for row in sizes["layers"]]
    return {
        "file_bytes": file_size,
        "kv_elements": sizes["kv_elements"],
        "ratio_vs_fp16": rows["all"]["ratio_vs_fp16"],
        "rows": rows,
        "layers": layers,
    }


def decompress_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    force: bool = False,
    progress: Progress | None = None,
    layers: Iterable[int] | None = None,
    names: Iterable[str] | None = None,
    tokens: tuple[int | None, int | None] | slice | None = None,
) -> dict:
    """Restore a ``.kvp`` (or a selection of it) to a safetensors file with the same tensor names and metadata.

    Streams: the safetensors header (names, shapes, dtypes, byte offsets, metadata) is computed
    from the ``.kvp`` header alone and written first, then each entry is decoded in pieces
    (:mod:`kvpack.streaming`) and written in place, so peak memory is about the stored bytes of
    the largest entry plus one piece, whatever the size of the cache. The output goes to a
    temporary file renamed at the end: any error leaves no output and no temporary file.

    Args:
        dtype: dtype of the restored K/V tensors (float16 / bfloat16 / float32); default the
            stored dtype. The metadata's ``dtype`` then names it.
        layers, names, tokens: restore only a selection, see :func:`load_kvp`. The output
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
    from kvpack.streaming import iter_outputs, select_outputs, token_bounds

    check_output_path(output_path, force)
    if Path(output_path).resolve() == Path(input_path).resolve():
        raise InvalidInputError("input and output are the same file")
    with KvpReader(input_path) as reader:
        outputs = select_outputs(reader, _dtype_label(dtype), layers, names, tokens)
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


def compare_caches(original: str | os.PathLike, reconstructed: str | os.PathLike) -> dict:
    """Error statistics of ``reconstructed`` against ``original`` (either format), per K/V.

    Tensor by tensor, each compared in pieces of tokens (:meth:`CacheSource.pieces`), so
    memory stays at about one ``.kvp`` entry's stored bytes plus a few pieces.

    Returns:
        ``{"rows": {"key"|"value"|"all": {...error stats...}}, "layers": [...], "tensors": n}``.

    Raises:
        InvalidInputError: the files hold different K/V tensor names or shapes.
        FormatError: either file is unreadable.
    """
    from kvpack.streaming import piece_tokens

    with open_cache(original) as ref, open_cache(reconstructed) as rec:
        ref_kv = [n for n in ref.keys() if parse_kv_name(n)]
        rec_kv = {n for n in rec.keys() if parse_kv_name(n)}
        if not ref_kv:
            raise InvalidInputError(f"{original}: no layers.<i>.key / layers.<i>.value tensors found")
        if set(ref_kv) != rec_kv:
            missing = sorted(set(ref_kv) ^ rec_kv)[:3]
            raise InvalidInputError(f"the two caches hold different K/V tensors (e.g. {', '.join(missing)})")
        rows = {"key": ErrorAccumulator(), "value": ErrorAccumulator(), "all": ErrorAccumulator()}
        layers: dict[int, ErrorAccumulator] = {}
        shapes = {}
        for name in ref_kv:
            shapes[name] = ref.shape(name)
            if shapes[name] != rec.shape(name):
                raise InvalidInputError(f"tensor {name!r}: shape {tuple(shapes[name])} vs {tuple(rec.shape(name))}")
        accs = {name: ErrorAccumulator() for name in ref_kv}
        for names in _read_together(ref_kv, ref, rec):
            step = piece_tokens(shapes[names[0]], 2 if len(shapes[names[0]]) == 4 else None)
            for (_, a), (_, b) in zip(ref.pieces(names, step), rec.pieces(names, step), strict=True):
                for name in names:
                    accs[name].add(a[name], b[name])
        for name, acc in accs.items():  # in file order, however the tensors were read: the same sums
            layer, role = parse_kv_name(name)
            for target in (rows[role], rows["all"], layers.setdefault(layer, ErrorAccumulator())):
                target.merge(acc)
    return {
        "original": str(original),
        "reconstructed": str(reconstructed),
        "tensors": len(ref_kv),
        "rows": {name: dict(elements=acc.elements, **acc.result()) for name, acc in rows.items()},
        "layers": [dict(layer=i, elements=layers[i].elements, **layers[i].result()) for i in sorted(layers)],
    }


def _read_together(names: list[str], *sources: CacheSource) -> list[list[str]]:
    """``names`` in groups that share a ``.kvp`` entry in either source (the layers of a stacked
    entry, ``--level token``), so that entry is decoded once for all of them; other names alone.
    Groups in the order of their first name."""
    groups: list[tuple[set, list[str]]] = []  # (entries holding them, names)
    for name in names:
        holders = {(index, source.entry_of(name)) for index, source in enumerate(sources)}
        joined = [g for g in groups if g[0] & holders]
        groups = [g for g in groups if not g[0] & holders]
        merged = (set().union(holders, *(g[0] for g in joined)), [n for g in joined for n in g[1]] + [name])
        groups.append(merged)
    ordered = [sorted(group, key=names.index) for _, group in groups]
    return sorted(ordered, key=lambda group: names.index(group[0]))


def describe_file(path: str | os.PathLike, verify: bool = False) -> dict:
    """What a ``.kvp`` or safetensors file holds, without decoding any codes.

    With ``verify``, every section of a ``.kvp`` is read and its CRC-32 checked (a
    :class:`~kvpack.errors.ChecksumMismatchError` names the first bad one) and every tensor
    is decoded (a :class:`~kvpack.errors.FormatError` names values no encoder writes); the
    result has ``"verified_sections"``. Safetensors files are read tensor by tensor.

    Returns:
        For ``.kvp``: ``{"format": "kvp", "version", "file_bytes", "metadata", "tensors": [{"name",
        "shape", "dtype", "codec", "bytes", "bits_per_element"}], "size": build_report(...)}``.
        For safetensors: ``{"format": "safetensors", "file_bytes", "metadata", "tensors": [{"name",
        "shape", "dtype", "bytes"}], "kv_bytes", "seq_len", "kv_bytes_per_token"}``.

    Raises:
        InvalidInputError, FormatError: unreadable or invalid file.
    """
    if is_kvp_file(path):
        from kvpack.streaming import verify_entries

        with KvpReader(path) as reader:
            entries = reader.entries()
            tensors = [
                {
                    "name": e.name,
                    "shape": list(e.shape),
                    "dtype": e.dtype,
                    "codec": None if e.codec is None else e.codec.to_dict(),
                    "bytes": e.stored_bytes,
                    "bits_per_element": e.stored_bytes * 8 / e.n_elements if e.n_elements else 0.0,
                }
                for e in entries
            ]
            # checksums, padding, and every value a decoder would refuse
            verified = verify_entries(reader) if verify else None
            return {
                "verified_sections": verified,
                "format": "kvp",
                "path": str(path),
                "version": f"{reader.version[0]}.{reader.version[1]}",
                "file_bytes": reader.file_size,
                "header_bytes": reader.header_bytes,
                "metadata": dict(reader.metadata),
                "tensors": tensors,
                "size": build_report(entries, reader.file_size, None),
            }
    with SafetensorsSource(path) as source:
        tensors = []
        for name in sorted(source.keys(), key=tensor_order):
            shape, dtype = source.shape_dtype(name)
            count = int(np.prod(shape)) if shape else 1
            tensors.append(
                {"name": name, "shape": list(shape), "dtype": dtype, "bytes": count * DTYPE_SIZES.get(dtype, 0)}
            )
        if verify:
            for name in source.keys():
                source.get(name)
        kv = [t for t in tensors if parse_kv_name(t["name"])]
        seq_len = max((t["shape"][2] for t in kv if len(t["shape"]) == 4), default=0)
        kv_bytes = sum(t["bytes"] for t in kv)
        return {
            "format": "safetensors",
            "path": str(path),
            "file_bytes": source.file_size,
            "metadata": dict(source.metadata),
            "tensors": tensors,
            "kv_tensors": len(kv),
            "kv_bytes": kv_bytes,
            "seq_len": seq_len,
            "kv_bytes_per_token": kv_bytes / seq_len if seq_len else None,
        }
