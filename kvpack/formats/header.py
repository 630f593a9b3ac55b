"""The ``.kvp`` JSON header: objects <-> JSON and validation. Pure: no file access.

Header (UTF-8 JSON object)::

    {"metadata": {str: str, ...},
     "tensors": {name: {"shape": [int, ...], "dtype": str,
                        "codec": null | CodecConfig.to_dict(),
                        "sections": {section: {"offset": int, "length": int, "crc32": int}}}}}

A tensor with ``"codec": null`` is lossless and has one section ``data``. Otherwise the
sections are exactly those the codec declares (plus ``outlier_index`` / ``outlier_value``
when the codec config keeps outliers); their kinds, dtypes and element counts are derived
from the codec and shape, never read from the file, and every length must match.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from kvpack.codecs.base import KIND_DATA, KIND_OUTLIERS, SectionSpec
from kvpack.config import CodecConfig
from kvpack.errors import FormatError, HeaderLimitError, InvalidInputError
from kvpack.formats.constants import (
    DTYPE_SIZES,
    FLOAT_DTYPES,
    MAX_DIMS,
    MAX_ELEMENTS,
    MAX_METADATA_ENTRIES,
    MAX_TENSORS,
)
from kvpack.grouping import GroupLayout, outliers_per_side
from kvpack.packing import packed_nbytes


@dataclass(frozen=True)
class SectionEntry:
    """Where one section lies in the file (absolute ``offset`` and ``length`` in bytes)."""

    offset: int
    length: int
    crc32: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    codec: CodecConfig | None
    sections: dict[str, SectionEntry]

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def layout(self) -> GroupLayout:
        if self.codec is None:
            raise InvalidInputError(f"tensor {self.name!r} is stored losslessly and has no group layout")
        return GroupLayout(tuple(self.shape), self.codec.group_size)

    @property
    def stored_bytes(self) -> int:
        return sum(s.length for s in self.sections.values())


def section_specs(shape: tuple[int, ...], dtype: str, codec: CodecConfig | None) -> dict[str, SectionSpec]:
    """The sections a tensor of this shape, dtype and codec stores, in file order.

    Raises:
        InvalidInputError: the shape does not fit the codec (e.g. group size does not divide).
    """
    if codec is None:
        return {"data": SectionSpec(KIND_DATA, dtype, math.prod(shape))}
    layout = GroupLayout(tuple(shape), codec.group_size)
    specs = dict(codec.make_codec().section_specs(layout))
    per_side = outliers_per_side(codec.outlier_ratio, codec.group_size)
    if per_side:
        count = layout.n_groups * 2 * per_side
        index_bits = max(1, (codec.group_size - 1).bit_length())
        specs["outlier_index"] = SectionSpec(KIND_OUTLIERS, "code", count, index_bits)
        specs["outlier_value"] = SectionSpec(KIND_OUTLIERS, dtype, count)
    return specs


def spec_nbytes(spec: SectionSpec) -> int:
    if spec.dtype == "code":
        return packed_nbytes(spec.count, spec.bits)
    return spec.count * DTYPE_SIZES[spec.dtype]


def encode_header(metadata: dict[str, str], tensors: list[TensorEntry]) -> bytes:
    body = {
        "metadata": metadata,
        "tensors": {
            t.name: {
                "shape": list(t.shape),
                "dtype": t.dtype,
                "codec": None if t.codec is None else t.codec.to_dict(),
                "sections": {
                    name: {"offset": s.offset, "length": s.length, "crc32": s.crc32} for name, s in t.sections.items()
                },
            }
            for t in tensors
        },
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def decode_header(raw: bytes, data_start: int, data_end: int, path: str) -> tuple[dict[str, str], list[TensorEntry]]:
    """Parse and validate a header whose sections must lie within ``[data_start, data_end)``.

    Checks types, the tensor count, shapes against their codecs, every section's length
    against the length derived from shape and codec, and that sections are in bounds,
    aligned to nothing less than their order, and non-overlapping.

    Raises:
        FormatError: anything malformed, naming the file and the offending field.
        HeaderLimitError: more tensors, dimensions or metadata entries than the limits.
    """

    def fail(message: str) -> FormatError:
        return FormatError(f"{path}: corrupted header: {message}")

    try:
        text = raw.decode("utf-8")
        body = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise fail(f"not valid UTF-8 JSON ({exc})") from None
    except RecursionError:
        raise fail("JSON nested too deeply") from None
    if not isinstance(body, dict) or set(body) != {"metadata", "tensors"}:
        raise fail("expected an object with exactly the keys 'metadata' and 'tensors'")
    metadata, tensors_raw = body["metadata"], body["tensors"]
    if not isinstance(metadata, dict) or not all(is_text(k) and is_text(v) for k, v in metadata.items()):
        raise fail("'metadata' must map strings to strings (valid Unicode)")
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise HeaderLimitError(f"{path}: header has {len(metadata)} metadata entries (limit {MAX_METADATA_ENTRIES})")
    if not isinstance(tensors_raw, dict):
        raise fail("'tensors' must be an object")
    if len(tensors_raw) > MAX_TENSORS:
        raise HeaderLimitError(f"{path}: header declares {len(tensors_raw)} tensors (limit {MAX_TENSORS})")

    entries = []
    for name, item in tensors_raw.items():
        entries.append(_decode_tensor(name, item, fail))

    spans = sorted((s.offset, s.offset + s.length, f"{t.name}/{sec}") for t in entries for sec, s in t.sections.items())
    position = data_start
    for start, end, label in spans:
        if start < position:
            raise fail(f"section {label} at offset {start} overlaps the one before it or the preamble")
        if end > data_end:
            raise fail(f"section {label} ends at byte {end}, past the end of the data region ({data_end})")
        position = end
    return metadata, entries


def check_tensor_name(name: Any) -> None:
    """Raises InvalidInputError for a name that cannot be stored (empty, reserved, not valid Unicode)."""
    if not is_text(name) or not name or name == "__metadata__":
        raise InvalidInputError(f"invalid tensor name {name!r}")


def is_text(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
        return False
    return True


def _decode_tensor(name: str, item: Any, fail) -> TensorEntry:
    where = f"tensor {name!r}"
    try:
        check_tensor_name(name)
    except InvalidInputError as exc:
        raise fail(str(exc)) from None
    if not isinstance(item, dict) or set(item) != {"shape", "dtype", "codec", "sections"}:
        raise fail(f"{where}: expected the keys shape, dtype, codec, sections")
    shape = item["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and 0 <= d < (1 << 48) for d in shape)
    ):
        raise fail(f"{where}: shape must be a list of at most {MAX_DIMS} non-negative integers, got {shape!r}")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise HeaderLimitError(f"{where}: shape {shape} exceeds the limit of {MAX_ELEMENTS} elements")
    dtype = item["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise fail(f"{where}: unsupported dtype {dtype!r}")
    try:
        codec = None if item["codec"] is None else CodecConfig.from_dict(item["codec"])
        if codec is not None and dtype not in FLOAT_DTYPES:
            raise InvalidInputError(f"a quantized tensor must have a float dtype, not {dtype}")
        specs = section_specs(tuple(shape), dtype, codec)
    except InvalidInputError as exc:
        raise fail(f"{where}: {exc}") from None
    sections_raw = item["sections"]
    if not isinstance(sections_raw, dict) or set(sections_raw) != set(specs):
        found = sorted(sections_raw) if isinstance(sections_raw, dict) else sections_raw
        raise fail(f"{where}: expected sections {sorted(specs)}, found {found}")
    sections = {}
    for sec_name, spec in specs.items():
        raw = sections_raw[sec_name]
        if not isinstance(raw, dict) or set(raw) != {"offset", "length", "crc32"}:
            raise fail(f"{where}, section {sec_name}: expected the keys offset, length, crc32")
        offset, length, crc = raw["offset"], raw["length"], raw["crc32"]
        if not all(type(v) is int and v >= 0 for v in (offset, length, crc)) or crc >= (1 << 32):
            raise fail(f"{where}, section {sec_name}: offset, length and crc32 must be non-negative integers")
        expected = spec_nbytes(spec)
        if length != expected:
            raise fail(f"{where}, section {sec_name}: length {length} bytes, but shape {shape} needs {expected}")
        sections[sec_name] = SectionEntry(offset, length, crc)
    return TensorEntry(name, tuple(shape), dtype, codec, sections)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")
