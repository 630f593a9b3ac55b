"""The fused error pass (numba): sums of squared errors, squared values, max error and cosines of two caches.

One pass over a pair of float16 / bfloat16 tensors on every core, in float64, with the terms of
:class:`kvpack.metrics.ErrorAccumulator`: squared error, squared reference, absolute error, and
the cosine of each head vector (``width`` values; a pair of all-zero vectors counts as 1).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: Head vectors one task sums (its partial sums are added in task order: the same result on any core count).
VECTORS_PER_TASK = 4096


def error_sums(
    ref: np.ndarray, ref_table: np.ndarray, rec: np.ndarray, rec_table: np.ndarray, width: int
) -> np.ndarray:
    """Per task, float64 ``(tasks, 4)``: the sum of squared errors, of squared reference values,
    the max absolute error and the sum of head-vector cosines, of two flat uint16 arrays of
    float16 / bfloat16 bits (``ref_table`` / ``rec_table``: float32 value of each bit pattern)."""
    vectors = ref.shape[0] // width
    out = np.zeros(((vectors + VECTORS_PER_TASK - 1) // VECTORS_PER_TASK, 4))
    _error_sums(ref, ref_table, rec, rec_table, width, out)
    return out


@njit(parallel=True, cache=True)
def _error_sums(ref, ref_table, rec, rec_table, width, out):
    vectors = ref.shape[0] // width
    for task in prange(out.shape[0]):
        first = task * VECTORS_PER_TASK
        last = min(vectors, first + VECTORS_PER_TASK)
        sq_err = 0.0
        sq_ref = 0.0
        peak = 0.0
        cosines = 0.0
        for v in range(first, last):
            dot = 0.0
            norm_ref = 0.0
            norm_rec = 0.0
            zero = True
            for k in range(v * width, (v + 1) * width):
                a = np.float64(ref_table[ref[k]])
                b = np.float64(rec_table[rec[k]])
                d = a - b
                sq_err += d * d
                norm_ref += a * a
                norm_rec += b * b
                dot += a * b
                if abs(d) > peak:
                    peak = abs(d)
                if a != 0.0 or b != 0.0:
                    zero = False
            sq_ref += norm_ref
            cosines += 1.0 if zero else dot / max(np.sqrt(norm_ref) * np.sqrt(norm_rec), 1e-300)
        out[task, 0] = sq_err
        out[task, 1] = sq_ref
        out[task, 2] = peak
        out[task, 3] = cosines
