"""Error metrics and bits-per-element accounting.

Error (accumulated in float64 over any number of tensors): relative MSE
``||x - x_hat||^2 / ||x||^2``, SNR in dB (``-10 log10`` of it), max absolute error, and
the mean cosine similarity of head vectors (the ``head_dim`` vectors along the last axis;
a pair of all-zero vectors counts as 1).

Size: bits per element of the K/V tensors, counting every byte of the file. Each K/V
section is attributed to its kind (codes; scales = scales, zero-points and per-tensor
transform parameters (rotation signs, rotary frequencies); codebooks; outliers = positions
and exact values; exact = protected tokens stored exactly); everything else in the file (64-byte preamble,
JSON header, alignment padding, lossless tensors such as ``token_ids``) is ``header``,
shared among K/V tensors in proportion to their element counts. So ``total`` bits per
element times the K/V element count is exactly the file size in bits (the accounting of
KVQuant, arXiv 2401.18079, App. M).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
from kvpack.formats.header import TensorEntry, section_specs
from kvpack.formats.names import parse_kv_name

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


#: Values per step of :meth:`ErrorAccumulator.add` (float64 temporaries of about 8 bytes each).
ADD_CHUNK_ELEMENTS = 1 << 20


@dataclass
class ErrorAccumulator:
    """Running error statistics over pairs of same-shape tensors (any float dtype)."""

    elements: int = 0
    sum_sq_err: float = 0.0
    sum_sq_ref: float = 0.0
    max_abs_err: float = 0.0
    cosine_sum: float = 0.0
    vectors: int = 0

    def add(self, reference: torch.Tensor, reconstruction: torch.Tensor) -> None:
        """Accumulate one pair; both shaped ``(..., head_dim)``.

        Works through the head vectors :data:`ADD_CHUNK_ELEMENTS` values at a time, so its
        float64 temporaries stay a few tens of MB whatever the tensors' size.
        """
        if not reference.ndim:
            reference, reconstruction = reference.reshape(1, 1), reconstruction.reshape(1, 1)
        width = reference.shape[-1]
        if not reference.numel():  # an empty tensor (e.g. head_dim 0) adds nothing, and cannot be cut into vectors
            return
        vec_ref, vec_rec = reference.reshape(-1, width), reconstruction.reshape(-1, width)
        step = max(1, ADD_CHUNK_ELEMENTS // width)
        for first in range(0, vec_ref.shape[0], step):
            self._add_vectors(vec_ref[first : first + step], vec_rec[first : first + step])

    def _add_vectors(self, reference: torch.Tensor, reconstruction: torch.Tensor) -> None:
        ref = reference.to(torch.float64)
        rec = reconstruction.to(torch.float64)
        diff = ref - rec
        self.elements += ref.numel()
        self.sum_sq_err += float((diff * diff).sum())
        self.sum_sq_ref += float((ref * ref).sum())
        self.max_abs_err = max(self.max_abs_err, float(diff.abs().max()))
        norms = ref.norm(dim=1) * rec.norm(dim=1)
        dots = (ref * rec).sum(dim=1)
        both_zero = (ref.abs().amax(dim=1) == 0) & (rec.abs().amax(dim=1) == 0)
        cosine = torch.where(both_zero, torch.ones_like(dots), dots / norms.clamp_min(1e-300))
        self.cosine_sum += float(cosine.sum())
        self.vectors += cosine.numel()

    def merge(self, other: ErrorAccumulator) -> None:
        self.elements += other.elements
        self.sum_sq_err += other.sum_sq_err
        self.sum_sq_ref += other.sum_sq_ref
        self.max_abs_err = max(self.max_abs_err, other.max_abs_err)
        self.cosine_sum += other.cosine_sum
        self.vectors += other.vectors

    def result(self) -> dict[str, float | None]:
        """``rel_mse``, ``snr_db`` (None when exact), ``max_abs_err``, ``cosine_mean``, ``mse``."""
        rel = self.sum_sq_err / self.sum_sq_ref if self.sum_sq_ref > 0 else (0.0 if self.sum_sq_err == 0 else math.inf)
        return {
            "rel_mse": rel,
            "snr_db": (-10 * math.log10(rel)) if 0 < rel < math.inf else None,
            "max_abs_err": self.max_abs_err,
            "cosine_mean": self.cosine_sum / self.vectors if self.vectors else None,
            "mse": self.sum_sq_err / self.elements if self.elements else 0.0,
        }


def json_safe(value):
    """A copy of nested dicts / lists with non-finite floats replaced by ``None`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


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
