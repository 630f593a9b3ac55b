"""Reading a ``.kvp`` a piece at a time: selections of tensors and tokens, in bounded memory.

Every reader of a whole cache here (``decompress``, ``load_kvp``, ``inspect --verify``,
``stats``) goes entry by entry: it reads the sections of one entry (checking each CRC-32),
then decodes that entry in *pieces* along its token axis and hands each piece on before
decoding the next. Peak memory is then about the stored bytes of the largest entry plus one
piece's temporaries, whatever the length of the cache.

- A quantized entry whose groups run along the token axis with one code width and codes in
  group order (``--no-transpose`` or ``--zstd-level 0``, and files before format 1.5) is decoded
  piece by piece: a piece of tokens ``[a, b)`` needs only the codes, scales,
  zero-points, outliers (and group-scope codebooks) of its own groups, sliced from the
  sections already read, and the shared ones (head- or tensor-scope codebooks, rotation
  signs, rotary frequencies); its tokens kept exactly come from the ``kept`` section. The
  result is bit for bit what decoding the whole entry gives (every step works per group or
  per token; un-RoPE is given the piece's first position).
- Any other quantized entry (codes stored feature-major, the 1.5 default, where a token range
  lies in every feature's stretch of the stream; groups along the channel axis; mixed
  precision) and every lossless entry is decoded whole, then cut into pieces: its peak is one
  decoded entry (one layer's key or value; the fused kernel of :mod:`kvpack.fused` writes
  it in the output dtype without float32 temporaries).
- A stacked entry (``layers.all.key|value``, ``--level token``) holds every layer of one
  role: it is read and decoded once, each piece giving every selected layer its part
  (``stats`` compares all the layers of such an entry together, :func:`tensor_pieces`).

A *selection* (``layers``, ``names``, ``tokens``) restores part of a cache. Only the
sections of the entries holding selected tensors are read (for a layer of a stacked entry,
that whole entry). A token range ``[a, b)`` cuts every K/V tensor along its sequence axis
and ``token_ids`` along its last axis; a quantized token-axis entry then decodes only the
pieces that overlap the range, other entries are decoded whole and cut.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from kvpack.codecs.base import SCOPE_EXACT, SCOPE_GROUP, SCOPE_SHARED
from kvpack.dtypes import DTYPE_SIZES, TORCH_DTYPES
from kvpack.dtypes import from_bytes as _from_bytes
from kvpack.entry import codes_array, decode_entry, values_array
from kvpack.errors import FormatError, InvalidInputError, brief, brief_list
from kvpack.formats.header import TensorEntry
from kvpack.formats.reader import KvpReader
from kvpack.names import parse_kv_name, stacked_name
from kvpack.packing import unpack_range
from kvpack.transforms.plan import TensorPlan, unstacked_view

#: Values per decoded piece: its float32 temporaries stay at a few tens of MB.
PIECE_ELEMENTS = 1 << 20
#: The section scopes a piece of a token-axis entry can be cut from (a section of any other scope:
#: the entry is decoded whole). Each section declares its scope (:class:`kvpack.codecs.base.SectionSpec`).
_PIECEWISE_SCOPES = frozenset((SCOPE_GROUP, SCOPE_SHARED, SCOPE_EXACT))

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class OutputTensor:
    """One tensor a (selective) read restores.

    Attributes:
        name: the restored name (``layers.{i}.key``, ``token_ids``, ...).
        entry: the file entry holding it (``layers.all.key`` for a layer of a stacked entry).
        layer: its index in a stacked entry, else ``None``.
        shape: the restored shape, token range applied.
        dtype: the restored dtype name.
        token_axis: the axis a token range cuts (2 for K/V tensors, the last axis of
            ``token_ids``), or ``None`` when it has none (restored whole).
        tokens: ``(start, stop)`` along ``token_axis`` (the whole axis without a range).
    """

    name: str
    entry: str
    layer: int | None
    shape: tuple[int, ...]
    dtype: str
    token_axis: int | None
    tokens: tuple[int, int] | None


def token_bounds(tokens: tuple[int | None, int | None] | slice | None) -> tuple[int | None, int | None] | None:
    """``(start, stop)`` of a token range given as a pair or a ``slice`` (``None``: open end).

    Raises:
        InvalidInputError: not a pair / step-less slice, a bound that is not a non-negative
            integer, both bounds open, or an empty or reversed range.
    """
    if tokens is None:
        return None
    if isinstance(tokens, slice):
        if tokens.step not in (None, 1):
            raise InvalidInputError(f"token range {tokens!r}: a step is not supported")
        tokens = (tokens.start, tokens.stop)
    if not isinstance(tokens, (tuple, list)) or len(tokens) != 2:
        raise InvalidInputError(f"token range must be (start, stop), got {brief(tokens)}")
    start, stop = tokens
    for bound in (start, stop):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 0):
            raise InvalidInputError(f"token range {_show(start, stop)}: bounds are non-negative integers")
    if start is None and stop is None:
        raise InvalidInputError("token range: give a start, a stop or both (A:B, A: or :B)")
    if start is not None and stop is not None and start >= stop:
        raise InvalidInputError(
            f"token range {_show(start, stop)} is {'empty' if start == stop else 'reversed'}: it needs start < stop"
        )
    return start, stop


def _show(start: int | None, stop: int | None) -> str:
    return f"{'' if start is None else start}:{'' if stop is None else stop}"


def select_outputs(
    reader: KvpReader,
    dtype: str | None = None,
    layers: Iterable[int] | None = None,
    names: Iterable[str] | None = None,
    tokens: tuple[int | None, int | None] | slice | None = None,
) -> list[OutputTensor]:
    """The tensors a read of ``reader`` restores, in the file's tensor order
    (:meth:`KvpReader.tensor_names`). Each given option narrows the selection.

    Args:
        dtype: dtype name of the restored K/V tensors; default the stored dtype.
        layers: keep the K/V tensors of these layers (other tensors such as ``token_ids`` stay).
        names: keep only these tensors (restored names: ``layers.{i}.key``, ``token_ids`` ...).
        tokens: ``(start, stop)`` (or a ``slice``), half-open, ``None`` for an open end: cut
            the K/V tensors along their sequence axis and ``token_ids`` along its last axis;
            other tensors are restored whole.

    Raises:
        InvalidInputError: an unknown name, a layer out of range, a token range that is
            empty, reversed or beyond a selected tensor's tokens, or a selection with no tensor.
    """
    available = reader.tensor_names()
    chosen = list(available)
    if names is not None:
        wanted = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in wanted if n not in available]
        if unknown:
            raise InvalidInputError(
                f"{reader.path}: no tensor named {brief(unknown[0])}; it holds {brief_list(available)}"
            )
        if not wanted:
            raise InvalidInputError("the tensor selection is empty: name at least one tensor")
        keep = set(wanted)
        chosen = [n for n in chosen if n in keep]
    if layers is not None:
        wanted_layers = set()
        count = 1 + max((parse_kv_name(n)[0] for n in available if parse_kv_name(n)), default=-1)
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise InvalidInputError(f"layers are integers, got {brief(layer)}")
            if not 0 <= layer < count:
                held = f"layers 0 to {count - 1}" if count else "no K/V layers"
                raise InvalidInputError(f"layer {layer} is out of range: {reader.path} holds {held}")
            wanted_layers.add(layer)
        if not wanted_layers:
            raise InvalidInputError("the layer selection is empty: give at least one layer")
        chosen = [n for n in chosen if not parse_kv_name(n) or parse_kv_name(n)[0] in wanted_layers]
    if not chosen:
        raise InvalidInputError(f"{reader.path}: the selection holds no tensor (the options have none in common)")
    bounds = token_bounds(tokens)
    entries = set(reader.keys())
    outputs = []
    for name in chosen:
        parsed = parse_kv_name(name)
        if name in entries:
            entry, layer = reader.entry(name), None
            shape = entry.shape
        else:  # a layer of a stacked entry
            entry, layer = reader.entry(stacked_name(parsed[1])), parsed[0]
            shape = entry.shape[1:]
        out_dtype = dtype if dtype is not None and parsed else entry.dtype
        axis = (
            2
            if parsed and len(shape) == 4
            else len(shape) - 1
            if name == "token_ids" and len(shape) in (1, 2)
            else None
        )
        span = None
        if axis is not None:
            length = shape[axis]
            start, stop = (
                (0, length) if bounds is None else (bounds[0] or 0, length if bounds[1] is None else bounds[1])
            )
            if bounds is not None and (stop > length or start >= stop):
                raise InvalidInputError(
                    f"token range {_show(*bounds)} is beyond the {length} tokens of tensor {name!r}"
                )
            span = (start, stop)
            shape = (*shape[:axis], stop - start, *shape[axis + 1 :])
        outputs.append(OutputTensor(name, entry.name, layer, tuple(shape), out_dtype, axis, span))
    return outputs


def by_entry(outputs: list[OutputTensor]) -> list[tuple[str, list[OutputTensor]]]:
    """The outputs grouped by the entry holding them, in order of first appearance."""
    groups: dict[str, list[OutputTensor]] = {}
    for output in outputs:
        groups.setdefault(output.entry, []).append(output)
    return list(groups.items())


def piece_tokens(shape: tuple[int, ...], axis: int | None) -> int:
    """Tokens per piece of an entry of ``shape`` cut along ``axis``: about :data:`PIECE_ELEMENTS`
    values, a multiple of 8 tokens (at least 8)."""
    if axis is None:
        return 1
    per_token = max(1, math.prod(shape) // max(shape[axis], 1))
    return max(8, PIECE_ELEMENTS // per_token // 8 * 8)


def iter_outputs(
    reader: KvpReader, outputs: list[OutputTensor], progress: Progress | None = None
) -> Iterator[tuple[OutputTensor, int, torch.Tensor]]:
    """Decode the selected tensors piece by piece: ``(output, start, piece)`` where ``piece`` is the
    part of ``output`` from index ``start`` of its token axis (relative to its token range), in
    its dtype; ``start`` is 0 and ``piece`` the whole tensor when it has no token axis. Entry
    by entry; within an entry in token order, every output of the entry served per piece.

    Raises:
        FormatError: a checksum, the padding or a decoded value is wrong (naming the file).
    """

    grouped = by_entry(outputs)
    for index, (entry_name, group) in enumerate(grouped):
        if progress:
            progress(index, len(grouped), entry_name)
        entry = reader.entry(entry_name)
        sections = reader.read_sections(entry_name)
        first = group[0]
        stacked = first.layer is not None
        axis = None if first.token_axis is None else first.token_axis + (1 if stacked else 0)
        start, stop = first.tokens if first.tokens is not None else (0, 0)
        pieces = iter_entry(reader, entry, sections, TORCH_DTYPES[first.dtype], axis, start, stop)
        for begin, piece in pieces:
            for output in group:
                part = piece[output.layer] if stacked else piece
                yield output, begin - start, part
        del sections
    if progress:
        progress(len(grouped), len(grouped), "")


def iter_entry(
    reader: KvpReader,
    entry: TensorEntry,
    sections: dict,
    dtype: torch.dtype,
    axis: int | None,
    start: int = 0,
    stop: int = 0,
    step: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Decode one entry in pieces along ``axis``: ``(first token, piece)`` for consecutive pieces of
    ``step`` tokens (default :func:`piece_tokens`; the last may be shorter) covering ``[start, stop)``.
    With ``axis=None`` one piece, the whole entry.

    Args:
        entry, sections: the entry and its sections as :meth:`KvpReader.read_sections` returns them.
        dtype: the dtype of the pieces.
        axis: the token axis of the entry (2 for a 4-D K/V entry, 3 for a stacked one).

    Raises:
        FormatError: a decoded value no encoder writes (naming the file and tensor).
    """
    try:
        yield from _entry_pieces(entry, sections, dtype, axis, start, stop, step)
    except FormatError as exc:
        raise type(exc)(f"{reader.path}: {exc}") from None
    except InvalidInputError as exc:
        raise FormatError(f"{reader.path}: tensor {brief(entry.name)}: {exc}") from None
    except (RuntimeError, ValueError, IndexError, TypeError, OverflowError) as exc:
        # Every size was validated; what remains are values no encoder writes.
        raise FormatError(f"{reader.path}: tensor {brief(entry.name)} cannot be decoded ({exc})") from None


def _entry_pieces(
    entry: TensorEntry, sections: dict, dtype: torch.dtype, axis: int | None, start: int, stop: int, step: int | None
) -> Iterator[tuple[int, torch.Tensor]]:

    if axis is None:
        yield 0, decode_entry(entry, sections, dtype)
        return
    step = step or piece_tokens(entry.shape, axis)
    if entry.codec is not None and _piecewise(entry):
        yield from _token_pieces(entry, sections, dtype, start, stop, step)
        return
    whole = decode_entry(entry, sections, dtype)
    for begin in range(start, stop, step):
        yield begin, whole.narrow(axis, begin, min(step, stop - begin))


def _piecewise(entry: TensorEntry) -> bool:
    """Whether a quantized entry can be decoded a range of tokens at a time (see the module docs)."""
    if entry.codec.whole_tensor:  # range-coded chunks: decoded whole
        return False
    plan = entry.plan
    return (
        plan.axis == "token"
        and plan.layout.n_elements > 0
        and all(spec.scope in _PIECEWISE_SCOPES for spec in plan.section_specs().values())
        # feature-major codes (format 1.5) hold a token range in every feature's stretch: decoded whole
        and not any(section.transpose for section in entry.sections.values())
    )


def _token_pieces(
    entry: TensorEntry, sections: dict, dtype: torch.dtype, start: int, stop: int, step: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Pieces of a token-axis quantized entry, decoded from the groups of their own tokens."""

    plan = entry.plan
    batch, heads, tokens, head_dim = plan.shape
    first, coded = plan.kept_first, plan.coded_tokens
    kept = None
    if plan.kept_tokens:
        kept = _from_bytes(sections["kept"], plan.dtype).reshape(batch, heads, plan.kept_tokens, head_dim)
    for begin in range(start, stop, step):
        end = min(begin + step, stop)
        parts = []
        if begin < first:  # protected tokens at the start
            parts.append(kept[:, :, begin : min(end, first)].to(torch.float32))
        a, b = max(begin, first), min(end, first + coded)
        if a < b:
            parts.append(_decode_coded(entry, plan, sections, a - first, b - first))
        if end > first + coded:  # protected tokens at the end
            a = max(begin, first + coded) - coded
            parts.append(kept[:, :, a : end - coded].to(torch.float32))
        piece = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)).to(dtype)
        if entry.codec.stack_layers:
            layers = entry.shape[0]
            piece = unstacked_view(piece, (layers, batch, heads // layers, end - begin, head_dim))
        yield begin, piece


def _decode_coded(entry: TensorEntry, plan: TensorPlan, sections: dict, c0: int, c1: int) -> torch.Tensor:
    """Float32 ``(batch, heads, c1 - c0, head_dim)``: coded tokens ``c0 .. c1 - 1`` (counted from the
    first coded token) of a token-axis entry, decoded from their groups alone."""

    config, layout = plan.config, plan.layout
    batch, heads, _, head_dim = plan.shape
    groups_per_row = layout.features // layout.group_size
    # the piece is a tensor of its own: its first token at its place for un-RoPE, nothing kept
    sub_config = dataclasses.replace(
        config, keep_first=0, keep_last=0, rope_offset=config.rope_offset + plan.kept_first + c0
    )
    sub = TensorPlan((1, heads, c1 - c0, head_dim), plan.dtype, plan.role, sub_config)
    full_specs, sub_specs = plan.section_specs(), sub.section_specs()
    out = []
    for b in range(batch):
        g0 = (b * plan.coded_tokens + c0) * groups_per_row
        g1 = (b * plan.coded_tokens + c1) * groups_per_row
        arrays = {}
        for section, spec in sub_specs.items():
            full = full_specs[section]
            if full.scope == SCOPE_GROUP:
                per = full.count // layout.n_groups
                lo, hi = g0 * per, g1 * per
            else:
                lo, hi = 0, full.count
            if hi - lo != spec.count:  # the slicing rules above and the codec's sections disagree
                raise RuntimeError(f"piece of section {section}: {hi - lo} values, the codec expects {spec.count}")
            raw = sections[section]
            if full.dtype == "code":
                arrays[section] = codes_array(spec, unpack_range(raw, full.bits, full.count, lo, hi), layout.group_size)
            else:
                size = DTYPE_SIZES[full.dtype]
                arrays[section] = values_array(entry.name, section, full, raw[lo * size : hi * size])
        out.append(sub.decode(arrays))
    return out[0] if batch == 1 else torch.cat(out, dim=0)


def verify_entries(reader: KvpReader) -> int:
    """Read every section of every entry (checksums, padding) and decode every entry piece by
    piece, discarding the values. Returns the number of sections checked (the sections of
    header keys this reader ignores included).

    Raises:
        TruncatedFileError, ChecksumMismatchError, FormatError: the first bad section or value.
    """
    checked = 0
    for entry in reader.entries():
        sections = reader.read_sections(entry.name)
        axis = _entry_token_axis(entry)
        stop = entry.shape[axis] if axis is not None else 0
        for _ in iter_entry(reader, entry, sections, _stored_dtype(entry), axis, 0, stop):
            pass
        checked += len(sections)
    return checked + reader.verify_extra_sections()


def tensor_pieces(reader: KvpReader, names: list[str], step: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Restored tensors ``names`` (entries, or layers of a stacked entry) in their stored dtype,
    together, a piece at a time: ``(first token, {name: piece})`` for consecutive pieces of
    ``step`` tokens along the sequence axis of 4-D K/V tensors (give names of one token count);
    any other tensor comes whole, as one piece. Each entry is read once and decoded once, however
    many of its layers are asked for; the entries of ``names`` are read together (their stored
    bytes are held at the same time).

    Raises:
        InvalidInputError: an unknown name.
        FormatError: see :func:`iter_entry`.
    """
    outputs = select_outputs(reader, names=names)
    streams = []
    for entry_name, group in by_entry(outputs):
        entry = reader.entry(entry_name)
        axis = _entry_token_axis(entry)
        streams.append((entry, group, _lazy_entry(reader, entry, axis, step)))
    for pieces in zip(*(stream for _, _, stream in streams), strict=True):
        begin, out = pieces[0][0], {}
        for (_, group, _), (_, piece) in zip(streams, pieces, strict=True):
            for output in group:
                out[output.name] = piece[output.layer] if output.layer is not None else piece
        yield begin, out


def _lazy_entry(
    reader: KvpReader, entry: TensorEntry, axis: int | None, step: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`iter_entry` over a whole entry, its sections read at the first piece."""
    sections = reader.read_sections(entry.name)
    stop = entry.shape[axis] if axis is not None else 0
    yield from iter_entry(reader, entry, sections, _stored_dtype(entry), axis, 0, stop, step)


def _entry_token_axis(entry: TensorEntry) -> int | None:
    if entry.codec is not None:
        return 3 if entry.codec.stack_layers else 2
    return 2 if parse_kv_name(entry.name) and len(entry.shape) == 4 else None


def _stored_dtype(entry: TensorEntry) -> torch.dtype:

    return TORCH_DTYPES[entry.dtype]
