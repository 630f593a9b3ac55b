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

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from kvpack.codecs.base import KIND_DATA, SCOPE_ENTRY, SectionSpec
from kvpack.config import CodecConfig
from kvpack.dtypes import DTYPE_SIZES, FLOAT_DTYPES
from kvpack.errors import FormatError, HeaderLimitError, InvalidInputError, UnsupportedVersionError, brief, brief_list
from kvpack.formats.constants import (
    FORMAT_MAJOR,
    FORMAT_MINOR,
    HEADER_TOKENS_PER_FILE_BYTE,
    KNOWN_REQUIRED_KEYS,
    MAX_DIMS,
    MAX_ELEMENTS,
    MAX_METADATA_ENTRIES,
    MAX_TENSORS,
    MIN_HEADER_TOKEN_LIMIT,
    SECTION_ALIGNMENT,
    SECTION_ENCODINGS,
)
from kvpack.formats.entropy import EXPANSION_SLACK, MAX_EXPANSION
from kvpack.names import parse_kv_name, parse_stacked_name
from kvpack.packing import packed_nbytes
from kvpack.transforms.pca import transform_specs
from kvpack.transforms.plan import TensorPlan, plan_for


@dataclass(frozen=True)
class SectionEntry:
    """Where one section lies in the file (absolute ``offset`` and stored ``length`` in bytes).

    ``encoding`` is ``"zstd"`` when the stored bytes are a zstd frame of the section's
    ``raw_length`` bytes (format 1.5), else ``None`` (stored as is: ``raw_length == length``);
    ``transpose`` is the row length ``K`` of feature-major codes, 0 when in group order.
    """

    offset: int
    length: int
    crc32: int
    padding: int = 0  # zero bytes between the previous section (or the preamble) and this one
    raw_length: int = -1  # the derived length; -1: the same as length
    encoding: str | None = None
    transpose: int = 0

    @property
    def decoded_length(self) -> int:
        """Bytes of the section once its encoding is undone (its derived length)."""
        return self.length if self.raw_length < 0 else self.raw_length


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
    def plan(self) -> TensorPlan:
        """How the quantized tensor is laid out (:class:`kvpack.transforms.plan.TensorPlan`)."""
        if self.codec is None or self.codec.whole_tensor:
            raise InvalidInputError(f"tensor {self.name!r} has no group layout")
        return plan_for(self.shape, self.dtype, self.name, self.codec)

    @property
    def stacked_role(self) -> str | None:
        """``key`` / ``value`` for a stacked entry (``stack_layers``, all layers of one role), else ``None``."""
        return parse_stacked_name(self.name) if self.codec is not None and self.codec.stack_layers else None

    @property
    def stored_bytes(self) -> int:
        return sum(s.length for s in self.sections.values())

    @property
    def dense_bytes(self) -> int:
        """Bytes of the sections before the entropy stage (densely packed)."""
        return sum(s.decoded_length for s in self.sections.values())


def section_specs(shape: tuple[int, ...], dtype: str, codec: CodecConfig | None, name: str) -> dict[str, SectionSpec]:
    """The sections tensor ``name`` of this shape, dtype and codec stores, in file order.

    Raises:
        InvalidInputError: the shape does not fit the codec (e.g. group size does not divide).
    """
    if codec is None:
        return {"data": SectionSpec(KIND_DATA, dtype, math.prod(shape), scope=SCOPE_ENTRY)}
    if codec.whole_tensor:
        _check_whole_tensor(shape, codec, name)
        return transform_specs(shape, dtype, codec, name)
    return plan_for(shape, dtype, name, codec).section_specs()


def _check_whole_tensor(shape: tuple[int, ...], codec: CodecConfig, name: str) -> None:
    """What a transform-codec entry needs besides a valid config (docs/format.md §6.4, §6.5): a per-layer
    K/V name (the profile's layer and role come from it), the profile's fingerprint, and for
    un-RoPE'd keys a rotary dimension within the head."""
    parsed = parse_kv_name(name)
    if parsed is None:
        raise InvalidInputError(f"method {codec.method} codes layers.<i>.key|value tensors, not {brief(name)}")
    fingerprint = getattr(codec.params, "profile", "")
    if not (len(fingerprint) == 16 and all(c in "0123456789abcdef" for c in fingerprint)):
        raise InvalidInputError(f"method {codec.method} needs the profile's fingerprint (16 hex digits) in `profile`")
    if getattr(codec.params, "stream_bytes", 0) % 4:
        raise InvalidInputError(
            f"`stream_bytes` must be a whole number of 32-bit words, got {codec.params.stream_bytes}"
        )
    if codec.unrope and parsed[1] == "key" and len(shape) == 4 and not 2 <= codec.rope_dim <= shape[3]:
        raise InvalidInputError(f"un-RoPE needs a rotary dimension from 2 to head_dim {shape[3]}, got {codec.rope_dim}")


def spec_nbytes(spec: SectionSpec) -> int:
    if spec.dtype == "code":
        return packed_nbytes(spec.count, spec.bits)
    return spec.count * DTYPE_SIZES[spec.dtype]


def encode_header(metadata: dict[str, str], tensors: list[TensorEntry]) -> bytes:
    required = sorted(
        {key for t in tensors if t.codec is not None for key in t.codec.transforms() if key != "rotate_seed"}
        | {"encoding" for t in tensors for s in t.sections.values() if s.encoding}
        | {"transpose" for t in tensors for s in t.sections.values() if s.transpose}
    )
    body = {
        **({"required": required} if required else {}),
        "metadata": metadata,
        "tensors": {
            t.name: {
                "shape": list(t.shape),
                "dtype": t.dtype,
                "codec": None if t.codec is None else t.codec.to_dict(),
                "sections": {name: _section_json(s) for name, s in t.sections.items()},
            }
            for t in tensors
        },
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _section_json(section: SectionEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"offset": section.offset, "length": section.length, "crc32": section.crc32}
    if section.encoding:
        out["encoding"] = section.encoding
    if section.transpose:
        out["transpose"] = section.transpose
    return out


def header_token_limit(file_size: int) -> int:
    """How many structural JSON characters a header of a file of ``file_size`` bytes may hold."""
    return max(int(file_size * HEADER_TOKENS_PER_FILE_BYTE), MIN_HEADER_TOKEN_LIMIT)


def decode_header(
    raw: bytes,
    data_start: int,
    data_end: int,
    path: str,
    version: tuple[int, int] = (FORMAT_MAJOR, FORMAT_MINOR),
    file_size: int | None = None,
) -> tuple[dict[str, str], list[TensorEntry], list[tuple[str, SectionEntry]]]:
    """Parse and validate the header of a file of format ``version``; sections fill ``[data_start, data_end)``.

    Checks types, the tensor count, shapes against their codecs, every section's length
    against the length derived from shape and codec, and the layout: sections follow each
    other in header order, each at the next multiple of 8 bytes, the last one ending at
    ``data_end``; no tensor is also a layer of a stacked entry. Keys this reader does not know
    are ignored unless the top-level ``required`` list names them (docs/format.md, "Versions").

    Returns:
        ``(metadata, tensors, extra_sections)``: ``extra_sections`` are the sections with
        names this reader does not know, as ``(label, entry)``; they take part in the layout
        and checksum checks but are not decoded.

    ``file_size`` (default: ``data_end + len(raw)``) sets the limit on structural JSON
    characters, checked before parsing (:func:`header_token_limit`).

    Raises:
        UnsupportedVersionError: a newer file needs a key, codec or option this reader lacks.
        FormatError: anything malformed, naming the file and the offending field.
        HeaderLimitError: more tensors, dimensions or metadata entries than the limits.
    """
    file_version = "{}.{}".format(*version)
    reader_version = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"

    def fail(message: str) -> FormatError:
        return FormatError(f"{path}: corrupted header: {message}")

    def unknown(message: str) -> FormatError:
        if version > (FORMAT_MAJOR, FORMAT_MINOR):
            return UnsupportedVersionError(
                f"{path}: {message}: the file is format {file_version}, this kvpack reads up to "
                f"{reader_version}; upgrade kvpack"
            )
        return fail(message)

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"not valid UTF-8 ({exc})") from None
    tokens = sum(text.count(c) for c in "{[:,")
    limit = header_token_limit(data_end + len(raw) if file_size is None else file_size)
    if tokens > limit:
        raise HeaderLimitError(
            f"{path}: header JSON has {tokens} structural characters, more than {limit} for a file of this size"
        )
    try:
        body = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError, duplicate keys, NaN/Infinity
        raise fail(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise fail("JSON nested too deeply") from None
    if not isinstance(body, dict) or not {"metadata", "tensors"} <= set(body):
        raise fail("expected an object with the keys 'metadata' and 'tensors'")
    required = body.get("required", [])
    if not isinstance(required, list) or not all(is_text(k) for k in required):
        raise fail("'required' must be a list of strings")
    missing = sorted(set(required) - KNOWN_REQUIRED_KEYS)
    if missing:
        raise unknown(f"the file requires unknown header key(s) {brief_list(missing)}")
    metadata, tensors_raw = body["metadata"], body["tensors"]
    if not isinstance(metadata, dict) or not all(is_text(k) and is_text(v) for k, v in metadata.items()):
        raise fail("'metadata' must map strings to strings (valid Unicode)")
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise HeaderLimitError(f"{path}: header has {len(metadata)} metadata entries (limit {MAX_METADATA_ENTRIES})")
    if not isinstance(tensors_raw, dict):
        raise fail("'tensors' must be an object")
    if len(tensors_raw) > MAX_TENSORS:
        raise HeaderLimitError(f"{path}: header declares {len(tensors_raw)} tensors (limit {MAX_TENSORS})")

    entries, extra, position = [], [], data_start
    for name, item in tensors_raw.items():
        entry, spans = _decode_tensor(name, item, fail, unknown)
        placed = {}
        for sec_name, section in spans:  # file order = header order
            label = f"tensor {brief(name)}, section {brief(sec_name)}"
            expected = position + (-position % SECTION_ALIGNMENT)
            if section.offset != expected:
                raise fail(f"{label} at offset {section.offset}, expected {expected} (the next 8-byte boundary)")
            if section.offset + section.length > data_end:
                raise fail(f"{label} ends at byte {section.offset + section.length}, past the data ({data_end})")
            section = dataclasses.replace(section, padding=section.offset - position)
            position = section.offset + section.length
            if sec_name in entry.sections:
                placed[sec_name] = section
            else:
                extra.append((label, section))
        entries.append(dataclasses.replace(entry, sections=placed))
    if position != data_end:
        raise fail(f"the sections end at byte {position}, but the header starts at {data_end}")
    stacks = {e.stacked_role: e for e in entries if e.stacked_role}
    for entry in entries:  # §4: a layer is restored from one entry only
        parsed = parse_kv_name(entry.name)
        if parsed and parsed[1] in stacks and parsed[0] < stacks[parsed[1]].shape[0]:
            raise fail(f"tensor {entry.name!r} is also layer {parsed[0]} of {stacks[parsed[1]].name!r}")
    return metadata, entries, extra


def check_tensor_name(name: Any) -> None:
    """Raises InvalidInputError for a name that cannot be stored (empty, reserved, not valid Unicode)."""
    if not is_text(name) or not name or name == "__metadata__":
        raise InvalidInputError(f"invalid tensor name {brief(name)}")


def is_text(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
        return False
    return True


def _decode_tensor(name: str, item: Any, fail, unknown) -> tuple[TensorEntry, list[tuple[str, SectionEntry]]]:
    """One tensor entry, and all of its sections (known and extra) in header order."""
    where = f"tensor {brief(name)}"
    try:
        check_tensor_name(name)
    except InvalidInputError as exc:
        raise fail(str(exc)) from None
    if not isinstance(item, dict) or not {"shape", "dtype", "codec", "sections"} <= set(item):
        raise fail(f"{where}: expected the keys shape, dtype, codec, sections")
    shape = item["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and 0 <= d < (1 << 48) for d in shape)
    ):
        raise fail(f"{where}: shape must be a list of at most {MAX_DIMS} non-negative integers, got {brief(shape)}")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise HeaderLimitError(f"{where}: shape {shape} exceeds the limit of {MAX_ELEMENTS} elements")
    dtype = item["dtype"]
    if not isinstance(dtype, str):
        raise fail(f"{where}: dtype must be a string, got {brief(dtype)}")
    if dtype not in DTYPE_SIZES:
        raise unknown(f"{where}: unsupported dtype {brief(dtype)}")
    codec_raw = item["codec"]
    try:
        codec = None if codec_raw is None else CodecConfig.from_dict(codec_raw)
    except InvalidInputError as exc:  # a later minor version may add codecs, options and values
        raise unknown(f"{where}: {exc}") from None
    try:
        if codec is not None and dtype not in FLOAT_DTYPES:
            raise InvalidInputError(f"a quantized tensor must have a float dtype, not {dtype}")
        specs = section_specs(tuple(shape), dtype, codec, name)
    except InvalidInputError as exc:
        raise fail(f"{where}: {exc}") from None
    sections_raw = item["sections"]
    if not isinstance(sections_raw, dict) or not set(specs) <= set(sections_raw):
        found = sorted(sections_raw) if isinstance(sections_raw, dict) else sections_raw
        raise fail(f"{where}: expected sections {sorted(specs)}, found {brief(found)}")
    known, spans = {}, []
    for sec_name, raw in sections_raw.items():
        if not isinstance(raw, dict) or not {"offset", "length", "crc32"} <= set(raw):
            raise fail(f"{where}, section {brief(sec_name)}: expected the keys offset, length, crc32")
        offset, length, crc = raw["offset"], raw["length"], raw["crc32"]
        if not all(type(v) is int and 0 <= v < (1 << 63) for v in (offset, length, crc)) or crc >= (1 << 32):
            raise fail(f"{where}, section {brief(sec_name)}: offset, length and crc32 must be non-negative integers")
        spec = specs.get(sec_name)
        label = f"{where}, section {brief(sec_name)}"
        encoding, transpose = _section_encoding(raw, spec, label, fail, unknown)
        if spec is not None and codec is not None and codec.whole_tensor and (encoding or transpose):
            raise fail(f"{label}: the sections of a transform entry are stored as they are (no encoding, transpose)")
        if spec is not None:
            derived = spec_nbytes(spec)
            if encoding is None and length != derived:
                raise fail(f"{label}: length {length} bytes, but shape {shape} needs {derived}")
            if encoding is not None and not (
                0 < length < derived and derived <= MAX_EXPANSION * length + EXPANSION_SLACK
            ):
                raise fail(
                    f"{label}: a zstd section of {length} bytes for {derived} bytes (it must be shorter, and expand at "
                    f"most {MAX_EXPANSION}x)"
                )
        elif encoding is not None and length == 0:
            raise fail(f"{label}: an empty zstd section")
        section = SectionEntry(
            offset,
            length,
            crc,
            raw_length=-1 if spec is None else spec_nbytes(spec),
            encoding=encoding,
            transpose=transpose,
        )
        spans.append((sec_name, section))
        if spec is not None:
            known[sec_name] = section
    return TensorEntry(name, tuple(shape), dtype, codec, known), spans


def _section_encoding(raw: dict, spec: SectionSpec | None, label: str, fail, unknown) -> tuple[str | None, int]:
    """The optional 1.5 keys ``encoding`` and ``transpose`` of a section entry, validated."""
    encoding = raw.get("encoding")
    if "encoding" in raw:
        if not isinstance(encoding, str):
            raise fail(f"{label}: encoding must be a string, got {brief(encoding)}")
        if encoding not in SECTION_ENCODINGS:
            raise unknown(f"{label}: unknown encoding {brief(encoding)}")
    transpose = raw.get("transpose", 0)
    if spec is None:  # an optional section this reader does not know: never decoded, its transpose not used
        return encoding, 0
    if "transpose" in raw:
        if type(transpose) is not int or transpose < 2:
            raise fail(f"{label}: transpose must be an integer of at least 2, got {brief(transpose)}")
        if spec.dtype != "code" or not 1 <= (spec.bits or 0) <= 8:
            raise fail(f"{label}: only sections of 1- to 8-bit codes can be transposed")
        if spec.count % transpose:
            raise fail(f"{label}: transpose {transpose} does not divide its {spec.count} codes")
    return encoding, transpose


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {brief(key)}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")
