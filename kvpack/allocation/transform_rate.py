"""Rate control of the transform codec: the one distortion level whose file lands on the target bits.

The transform codec (:mod:`kvpack.transforms.pca`) has a single knob for a whole file, the
distortion level ``theta`` of reverse water-filling (:mod:`kvpack.codecs.transform`). Its file
size falls as ``theta`` grows; this module finds the ``theta`` at which the estimated file —
every section, the header and padding as :mod:`kvpack.formats.layout` lays them out, and each
range-coded stream as the ideal code length of its integers under the models the coder uses
(within bytes of the real stream) — is ``target_bits`` per K/V element, by regula falsi on
``log theta``. The estimate reads at most :data:`SAMPLE_CHUNKS` chunks of tokens per entry
(evenly spaced) and :data:`SAMPLE_ROWS` tokens of each, so its memory does not grow with the cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kvpack.codecs.base import KIND_DATA
from kvpack.codecs.transform import (
    MAX_SUPPORT,
    chunk_bounds,
    chunk_statistics,
    code_lengths,
    component_steps,
    kept_components,
)
from kvpack.config import CodecConfig
from kvpack.dtypes import DTYPE_SIZES, tensor_bytes
from kvpack.errors import InvalidInputError
from kvpack.formats.constants import PREAMBLE_SIZE
from kvpack.formats.entropy import compress_section
from kvpack.formats.header import section_specs, spec_nbytes
from kvpack.formats.layout import header_and_padding
from kvpack.names import parse_kv_name
from kvpack.transforms.pca import coefficient_shift, coefficients

#: Chunks of tokens per entry the estimate reads (evenly spaced); the rest is scaled from them.
SAMPLE_CHUNKS = 8
#: Tokens of each sampled chunk the estimate reads (evenly strided).
SAMPLE_ROWS = 256
SOLVE_STEPS = 60
#: The estimate is solved to this fraction of the budget.
SOLVE_TOLERANCE = 0.002
#: A file this far from its target (relative) is re-encoded once at a corrected level.
TOLERANCE = 0.015


@dataclass
class _EntrySample:
    coefficients: torch.Tensor  # float32 (sampled rows, F)
    weight: np.ndarray
    mean_square: np.ndarray
    scale: float  # rows of the entry / sampled rows
    chunk_tokens: int
    deadzone: float


def _sample(name: str, x: torch.Tensor, config: CodecConfig) -> _EntrySample:
    _, c = coefficients(name, x, config)
    rows = c.shape[0]
    bounds = chunk_bounds(rows, config.params.chunk_tokens)
    picks = np.unique(np.linspace(0, len(bounds) - 1, min(SAMPLE_CHUNKS, len(bounds))).round().astype(int))
    if len(bounds):
        strides = [max(1, -(-(bounds[i][1] - bounds[i][0]) // SAMPLE_ROWS)) for i in picks]
        c = torch.cat([c[bounds[i][0] : bounds[i][1] : step] for i, step in zip(picks, strides, strict=True)])
    c = c - coefficient_shift(c)
    layer, role = parse_kv_name(name)
    weight = config.profile.layer(layer, role).weight
    mean_square = (c.double() ** 2).mean(dim=0).numpy() if c.shape[0] else np.zeros(c.shape[1])
    return _EntrySample(
        c,
        weight,
        mean_square,
        rows / max(c.shape[0], 1),
        min(SAMPLE_ROWS, config.params.chunk_tokens),
        config.params.deadzone,
    )


def _stream_bits(sample: _EntrySample, theta: float) -> float:
    kept = kept_components(theta, sample.weight, sample.mean_square)
    if not kept.any() or not sample.coefficients.shape[0]:
        return 0.0
    steps = torch.from_numpy(component_steps(theta, sample.weight)[kept])
    scaled = sample.coefficients[:, torch.from_numpy(np.flatnonzero(kept))] / steps
    q = torch.sign(scaled) * torch.floor(scaled.abs() + (0.5 - sample.deadzone))
    if float(q.abs().max()) > MAX_SUPPORT:
        return math.inf
    sums, counts, codes = chunk_statistics(q.to(torch.int32).numpy(), sample.chunk_tokens)
    return float(code_lengths(sums, counts, codes).sum()) * sample.scale


def choose_distortion(
    layout: list[tuple[str, list[str], CodecConfig | None]],
    shapes: dict[str, tuple[tuple[int, ...], str]],
    get: Callable[[str], torch.Tensor],
    config: CodecConfig,
    target_bits: float,
    metadata: dict[str, str],
    entropy=None,
    correction: float = 0.0,
) -> float:
    """The distortion level ``theta`` whose file is estimated at ``target_bits`` per K/V element.

    Args:
        layout: the file's entries (:func:`kvpack.entry.entry_layout`).
        shapes: tensor name -> ``(shape, dtype name)``.
        get: reads one tensor by name.
        config: the transform-codec config, with its profile and rotary frequencies.
        target_bits: bits per K/V element of the whole file (every byte counted).
        correction: bits per element to add to the target, when a file written at the first estimate
            missed it by more than :data:`TOLERANCE` (the second pass aims that much off).

    Raises:
        InvalidInputError: the target is below what the file costs with every component dropped.
    """
    samples, fixed_bytes, kv_elements, entries = [], 0, 0, []
    for name, _, codec in layout:
        shape, dtype = shapes[name]
        entries.append((name, shape, dtype, codec))
        if codec is None:  # lossless: as the entropy stage will store it
            raw = math.prod(shape) * DTYPE_SIZES[dtype]
            if entropy is not None and entropy.applies_to(KIND_DATA):
                data = memoryview(tensor_bytes(get(name)))
                raw = min(
                    raw, len(compress_section(data, entropy.level, 0, section_specs(shape, dtype, None, name)["data"]))
                )
            fixed_bytes += raw
            continue
        kv_elements += math.prod(shape)
        fixed_bytes += sum(spec_nbytes(s) for k, s in section_specs(shape, dtype, codec, name).items() if k != "stream")
        samples.append(_sample(name, get(name), codec))
    header, padding = header_and_padding(metadata, entries, entropy)
    fixed_bits = 8 * (fixed_bytes + header + padding + PREAMBLE_SIZE + 8 * len(samples))
    budget = (target_bits + correction) * kv_elements
    if fixed_bits >= budget:
        raise InvalidInputError(
            f"`target_bits={target_bits:g}` is below the {fixed_bits / max(kv_elements, 1):.3f} bits per element this "
            "file costs before any coefficient is coded (exact tokens, scales, header); ask for more bits"
        )

    def total(theta: float) -> float:
        return fixed_bits + sum(_stream_bits(s, theta) for s in samples)

    energy = max((float((s.weight * s.mean_square).max()) for s in samples), default=1.0) or 1.0
    return _solve(
        lambda log_theta: total(math.exp(log_theta)) - budget,
        math.log(energy * 1e-12),
        math.log(energy * 1.01),
        SOLVE_TOLERANCE * budget,
    )


def _solve(excess: Callable[[float], float], lo: float, hi: float, tolerance: float) -> float:
    """``exp(x)`` for the ``x`` in ``[lo, hi]`` where the decreasing ``excess`` crosses 0 (within
    ``tolerance``, or its side at or below 0): regula falsi with the Illinois step, bisection while
    an end is infinite (steps too fine to code)."""
    f_lo, f_hi = excess(lo), excess(hi)
    if f_hi > 0:  # even with every component dropped: the fixed part alone is over budget
        return math.exp(hi)
    side = 0
    for _ in range(SOLVE_STEPS):
        if math.isfinite(f_lo) and f_lo != f_hi:
            x = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        else:
            x = (lo + hi) / 2
        f_x = excess(x)
        if abs(f_x) <= tolerance and f_x <= tolerance:
            return math.exp(x)
        if f_x > 0:
            lo, f_lo = x, f_x
            if side == 1:
                f_hi /= 2
            side = 1
        else:
            hi, f_hi = x, f_x
            if side == -1 and math.isfinite(f_lo):
                f_lo /= 2
            side = -1
    return math.exp(hi)
