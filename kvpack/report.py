"""Reports: the size of a file by section kind joined with its error, the error of one cache against another, and what a file holds.

Size: bits per element of the K/V tensors, counting every byte of the file. Each K/V
section is attributed to its kind (codes; scales = scales, zero-points and per-tensor
transform parameters (rotation signs, rotary frequencies); codebooks; outliers = positions
and exact values; exact = protected tokens stored exactly; bitmap = the widths of mixed
precision); everything else in the file (64-byte preamble, JSON header, alignment padding,
lossless tensors such as ``token_ids``) is ``header``, shared among K/V tensors in
proportion to their element counts. So ``total`` bits per element times the K/V element
count is exactly the file size in bits (the accounting of KVQuant, arXiv 2401.18079, App. M).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from kvpack.codecs.base import (
    KIND_ALLOCATION,
    KIND_CODEBOOKS,
    KIND_CODES,
    KIND_DATA,
    KIND_EXACT,
    KIND_OUTLIERS,
    KIND_SCALES,
    KIND_TRANSFORM,
)
from kvpack.dtypes import DTYPE_SIZES, check_finite
from kvpack.errors import InvalidInputError
from kvpack.formats.header import TensorEntry, section_specs
from kvpack.formats.llama_state import is_llama_state
from kvpack.formats.reader import KvpReader, is_kvp_file
from kvpack.formats.safetensors_io import SafetensorsSource
from kvpack.llama_cpp.source import describe_state
from kvpack.metrics import ErrorAccumulator
from kvpack.names import parse_kv_name, tensor_order
from kvpack.restore.profiles import attach_profile
from kvpack.restore.streaming import piece_tokens, verify_entries
from kvpack.sources import CacheSource, open_cache
from kvpack.storage import accepts_storage_options, is_url, local_copy

BIT_COLUMNS = ("codes", "scales", "codebooks", "outliers", "exact", "bitmap", "header")
_KIND_COLUMN = {
    KIND_CODES: "codes",
    KIND_DATA: "codes",
    KIND_SCALES: "scales",
    KIND_TRANSFORM: "scales",
    KIND_CODEBOOKS: "codebooks",
    KIND_OUTLIERS: "outliers",
    KIND_EXACT: "exact",
    KIND_ALLOCATION: "bitmap",
}


@dataclass
class SizeRow:
    """Bytes of K/V sections by column, and the element count they cover."""

    elements: int = 0
    section_bytes: dict[str, float] = field(default_factory=lambda: dict.fromkeys(BIT_COLUMNS, 0))
    dense_bytes: float = 0.0  # the same sections before the entropy stage

    def add_entry(self, entry: TensorEntry, parts: int = 1) -> None:
        """Add an entry, or one of ``parts`` equal shares of it (a layer of a stacked entry)."""
        self.elements += entry.n_elements // parts
        specs = section_specs(entry.shape, entry.dtype, entry.codec, entry.name)
        for name, section in entry.sections.items():
            self.section_bytes[_KIND_COLUMN[specs[name].kind]] += section.length / parts
            self.dense_bytes += section.decoded_length / parts

    def bits_per_element(self, overhead_bytes: float, total_elements: int) -> dict[str, float]:
        """Bits per element by column plus ``total``; ``header`` is this row's share of the overhead."""
        if not self.elements:
            return dict.fromkeys((*BIT_COLUMNS, "total"), 0.0)
        share = overhead_bytes * self.elements / total_elements if total_elements else 0.0
        data = dict(self.section_bytes, header=self.section_bytes["header"] + share)
        bits = {col: data[col] * 8 / self.elements for col in BIT_COLUMNS}
        bits["total"] = sum(bits.values())
        return bits


def size_breakdown(entries: list[TensorEntry], file_size: int) -> dict:
    """Bits per element of keys, values and all K/V tensors, and per layer, from a file's header.

    Args:
        entries: the file's tensor entries.
        file_size: the file's size in bytes.

    Returns:
        ``{"rows": {"key"|"value"|"all": {"elements", "bytes", "bits_per_element": {...},
        "dense_bits_per_element"}}, "layers": [{"layer", "elements", "bytes", "bits_per_element",
        "dense_bits_per_element"}], "kv_elements", "overhead_bytes"}``. ``bits_per_element`` is
        what the file stores (after the entropy stage: the effective bits);
        ``dense_bits_per_element`` is the total with every section densely packed (before it).
    """
    rows = {"key": SizeRow(), "value": SizeRow(), "all": SizeRow()}
    layers: dict[int, SizeRow] = {}
    for entry in entries:
        parsed = parse_kv_name(entry.name)
        if parsed is None and entry.stacked_role is None:
            continue
        role = parsed[1] if parsed else entry.stacked_role
        rows[role].add_entry(entry)
        rows["all"].add_entry(entry)
        if parsed:
            layers.setdefault(parsed[0], SizeRow()).add_entry(entry)
        else:  # groups span the layers: each layer is charged an equal share
            for layer in range(entry.shape[0]):
                layers.setdefault(layer, SizeRow()).add_entry(entry, entry.shape[0])
    total = rows["all"].elements
    overhead = file_size - sum(rows["all"].section_bytes.values())

    def render(row: SizeRow) -> dict:
        bits = row.bits_per_element(overhead, total)
        stored = sum(row.section_bytes.values())
        dense = bits["total"] + (row.dense_bytes - stored) * 8 / row.elements if row.elements else 0.0
        return {
            "elements": row.elements,
            "bytes": bits["total"] * row.elements / 8,
            "bits_per_element": bits,
            "dense_bits_per_element": dense,
        }

    return {
        "rows": {name: render(row) for name, row in rows.items()},
        "layers": [dict(layer=i, **render(layers[i])) for i in sorted(layers)],
        "kv_elements": total,
        "overhead_bytes": overhead,
    }


def build_report(
    entries: list[TensorEntry],
    file_size: int,
    errors: dict[str, ErrorAccumulator] | None,
    estimates: dict[str, float | None] | None = None,
) -> dict:
    """Size breakdown (bits per element by section kind) joined with error statistics.

    ``estimates``: each K/V tensor's profile-weighted error (:func:`kvpack.weighted_error.estimated_kl`);
    with it every row gains ``estimated_kl``, the sum over its tensors (``None`` if one could not be weighed).

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
    if estimates is not None:
        for name, row in rows.items():
            row["estimated_kl"] = _summed(v for k, v in estimates.items() if name in ("all", parse_kv_name(k)[1]))
        for row in layers:
            row["estimated_kl"] = _summed(v for k, v in estimates.items() if parse_kv_name(k)[0] == row["layer"])
    return {
        "file_bytes": file_size,
        "kv_elements": sizes["kv_elements"],
        "ratio_vs_fp16": rows["all"]["ratio_vs_fp16"],
        "rows": rows,
        "layers": layers,
    }


def _summed(values) -> float | None:
    values = list(values)
    return None if not values or any(v is None for v in values) else float(sum(values))


def compare_caches(original: str | os.PathLike, reconstructed: str | os.PathLike, profile=None) -> dict:
    """Error statistics of ``reconstructed`` against ``original`` (either format), per K/V.

    Tensor by tensor, each compared in pieces of tokens (:meth:`CacheSource.pieces`), so
    memory stays at about one ``.kvp`` entry's stored bytes plus a few pieces.

    Returns:
        ``{"rows": {"key"|"value"|"all": {...error stats...}}, "layers": [...], "tensors": n}``.

    Raises:
        InvalidInputError: the files hold different K/V tensor names or shapes.
        FormatError: either file is unreadable.
    """

    with open_cache(original, profile) as ref, open_cache(reconstructed, profile) as rec:
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
                    _check_finite(original, name, a[name])
                    _check_finite(reconstructed, name, b[name])
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


def _check_finite(path: str | os.PathLike, name: str, values: torch.Tensor) -> None:
    """Raises InvalidInputError when a compared tensor holds NaN or Inf (no error statistic means anything then)."""
    try:
        check_finite(name, values, consequence="cannot compare it")
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: {exc}") from None


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


@accepts_storage_options
def describe_file(
    path: str | os.PathLike, verify: bool = False, profile=None, model=None, *, storage_options: dict | None = None
) -> dict:
    """What a ``.kvp``, safetensors or llama.cpp state file holds, without decoding any codes.

    With ``verify``, every section of a ``.kvp`` is read and its CRC-32 checked (a
    :class:`~kvpack.errors.ChecksumMismatchError` names the first bad one) and every tensor
    is decoded (a :class:`~kvpack.errors.FormatError` names values no encoder writes); the
    result has ``"verified_sections"``. Safetensors files are read tensor by tensor.

    ``storage_options``: fsspec options (credentials, ``endpoint_url``, ...) for the URLs among the paths
    (:mod:`kvpack.storage`: ``s3://``, ``gs://``, ``memory://`` ...), which any path argument may be.

    Returns:
        For ``.kvp``: ``{"format": "kvp", "version", "file_bytes", "metadata", "tensors": [{"name",
        "shape", "dtype", "codec", "bytes", "bits_per_element"}], "size": build_report(...)}``.
        For safetensors: ``{"format": "safetensors", "file_bytes", "metadata", "tensors": [{"name",
        "shape", "dtype", "bytes"}], "kv_bytes", "seq_len", "kv_bytes_per_token"}``.
        For a llama.cpp state file: :func:`kvpack.llama_cpp.source.describe_state` (``model``: its GGUF).

    Raises:
        InvalidInputError, FormatError: unreadable or invalid file.
    """
    if is_url(path) and not is_kvp_file(path):  # a dump or state file: read from a local copy
        with local_copy(str(path)) as local:
            info = describe_file(local, verify, profile, model)
        return {**info, "path": str(path)}
    if is_llama_state(path):
        return describe_state(path, model)
    if model is not None:
        raise InvalidInputError("a model GGUF (`model`) describes llama.cpp state files; this is not one")
    if is_kvp_file(path):
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
            if verify:
                attach_profile(reader, profile)
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
