"""Error metrics of a reconstruction: relative MSE, SNR, max absolute error, cosine similarity.

Error (accumulated in float64 over any number of tensors): relative MSE
``||x - x_hat||^2 / ||x||^2``, SNR in dB (``-10 log10`` of it), max absolute error, and
the mean cosine similarity of head vectors (the ``head_dim`` vectors along the last axis;
a pair of all-zero vectors counts as 1).

Pairs of float16 / bfloat16 tensors (what a dump and its reconstruction hold) are summed by one
fused pass on every core (numba, compiled on first use); other dtypes through torch in float64
pieces. Both accumulate float64 sums of the same terms; only the order of the additions differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: Values per step of :meth:`ErrorAccumulator.add` (float64 temporaries of about 8 bytes each).
ADD_CHUNK_ELEMENTS = 1 << 20
_HALF_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
#: float32 value of every float16 / bfloat16 bit pattern.
_HALF_TABLES = {
    torch.float16: _HALF_BITS.view(np.float16).astype(np.float32),
    torch.bfloat16: (_HALF_BITS.astype(np.uint32) << 16).view(np.float32),
}


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
        if reference.dtype in _HALF_TABLES and reconstruction.dtype in _HALF_TABLES:
            self._add_half(reference, reconstruction, width)
            return
        vec_ref, vec_rec = reference.reshape(-1, width), reconstruction.reshape(-1, width)
        step = max(1, ADD_CHUNK_ELEMENTS // width)
        for first in range(0, vec_ref.shape[0], step):
            self._add_vectors(vec_ref[first : first + step], vec_rec[first : first + step])

    def _add_half(self, reference: torch.Tensor, reconstruction: torch.Tensor, width: int) -> None:
        """The fused pass over float16 / bfloat16 pairs (no float64 temporaries)."""
        from kvpack import metrics_kernel  # first use of numba: commands that compare nothing never load it

        ref, rec = (
            x.detach().contiguous().reshape(-1).view(torch.int16).numpy().view(np.uint16)
            for x in (reference, reconstruction)
        )
        out = metrics_kernel.error_sums(
            ref, _HALF_TABLES[reference.dtype], rec, _HALF_TABLES[reconstruction.dtype], width
        )
        vectors = ref.shape[0] // width
        self.elements += ref.shape[0]
        self.sum_sq_err += float(out[:, 0].sum())
        self.sum_sq_ref += float(out[:, 1].sum())
        self.max_abs_err = max(self.max_abs_err, float(out[:, 2].max(initial=0.0)))
        self.cosine_sum += float(out[:, 3].sum())
        self.vectors += vectors

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
