"""The transform codec's coefficient coding: rate–distortion steps, uniform quantization, range coding.

A whole K or V tensor of one layer is projected on the layer's PCA basis from a calibration
profile (:mod:`kvpack.transforms.pca` does the projection; KVTC, Staniszewski & Łańcucki, ICLR
2026, arXiv 2511.01815). This module codes the coefficients ``c`` (float32 ``(n, F)``: ``n``
tokens, ``F = num_kv_heads * head_dim`` components):

- **Steps by reverse water-filling.** With each component's error weight ``w_j`` (how much a unit
  squared error on it moves the attention output) and one distortion level ``theta`` for the
  whole file, component ``j`` is kept when ``w_j * var_j > theta`` (``var_j`` its mean square in
  this tensor) and quantized with the uniform step ``sqrt(12 * theta / w_j)``, whose error
  ``step**2 / 12`` weighs ``theta`` for every kept component: the rate–distortion optimum of
  Gaussian components at high rate (Cover & Thomas, §10.3.3). A dropped component decodes to 0.
- **Entropy coding.** Tokens are cut into chunks of ``chunk_tokens``; in each chunk each kept
  component's integers ``q`` are range-coded (``constriction`` 0.5, ``stream.queue.RangeEncoder``:
  32-bit words, 24-bit probabilities) with a two-sided geometric model ``p(k) ∝ r**|k|`` on
  ``[-M, M]`` (``M`` the chunk's largest ``|q|``; a chunk with ``M = 0`` codes nothing), ``r`` the maximum-likelihood value for the
  component's mean ``|q|``, stored as an 8-bit code on a log grid (:func:`scale_code`, :func:`code_mean`). Every model is built
  with IEEE-exact operations only (sqrt, division, sequential products), so a decoder on any
  machine rebuilds the same probabilities (docs/format.md §6.5).
- **Dead zone and centroids.** The zero bin is widened by ``deadzone`` steps on each side; a
  nonzero integer decodes to the centroid of its bin under the Laplace density its chunk's model
  implies (:func:`reconstruction_levels`), not to the bin's middle.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from kvpack.codecs.base import Codec, CodecParams, SectionSpec, option
from kvpack.errors import FormatError, InvalidInputError
from kvpack.grouping import GroupLayout

#: Largest ``|q|`` a chunk may hold (its models have ``2 M + 1`` symbols); steps finer than this
#: allows mean more than 13 bits per coefficient, beyond what the codec is for.
MAX_SUPPORT = 4095
#: Scale codes: code 0 is a chunk column of zeros; code ``c`` from 1 to 255 stands for the mean ``|q|``
#: ``m = 2 ** ((c - SCALE_CODE_ZERO) / SCALE_CODE_STEPS)`` (about 1e-6 to 3,800, 9 % apart).
SCALE_CODE_STEPS = 8
SCALE_CODE_ZERO = 160
MAX_CHUNK_TOKENS = 1 << 20
#: Largest dead-zone (a larger one would round values of 1 step to 0 more often than to 1).
MAX_DEADZONE = 0.5


@dataclass(frozen=True)
class TransformParams(CodecParams):
    chunk_tokens: int = option(1024, "Tokens per range-coding chunk of the transform codec")
    deadzone: float = option(
        0.0, "Transform codec: widen the zero bin by this many steps on each side (0: plain rounding)"
    )
    #: the file's distortion level theta (set by the encoder from --target-bits; 0: not chosen yet)
    distortion: float = option(0.0, "Distortion level theta of the transform codec", cli=False)
    #: this entry's range-coded stream, in bytes (set by the encoder)
    stream_bytes: int = option(0, "Bytes of the entry's range-coded stream", cli=False)
    #: fingerprint of the calibration profile (16 hex digits)
    profile: str = option("", "Fingerprint of the calibration profile", cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.deadzone) and 0 <= self.deadzone < MAX_DEADZONE):
            raise InvalidInputError(f"`deadzone` must be in [0, {MAX_DEADZONE}), got {self.deadzone}")
        if not 1 <= self.chunk_tokens <= MAX_CHUNK_TOKENS:
            raise InvalidInputError(f"`chunk_tokens` must be from 1 to {MAX_CHUNK_TOKENS}, got {self.chunk_tokens}")
        if not (math.isfinite(self.distortion) and 0 <= self.distortion < 1e30):
            raise InvalidInputError(f"`distortion` must be a non-negative number, got {self.distortion}")
        if not 0 <= self.stream_bytes < (1 << 48):
            raise InvalidInputError(f"`stream_bytes` must be a non-negative integer, got {self.stream_bytes}")
        if self.profile and (len(self.profile) != 16 or any(c not in "0123456789abcdef" for c in self.profile)):
            raise InvalidInputError(f"`profile` must be a fingerprint of 16 hex digits, got {self.profile!r}")


class TransformCodec(Codec):
    """PCA transform coding of a whole tensor from a calibration profile (KVTC; see the module docstring).

    Not a grouped codec: :mod:`kvpack.transforms.pca` encodes and decodes its tensors whole, and
    ``bits`` / ``group_size`` of its config are unused.
    """

    name = "transform"
    summary = "PCA of each layer's keys (pre-RoPE) and values from a calibration profile, RD steps, range coding"
    source = "KVTC (Staniszewski & Łańcucki, ICLR 2026, arXiv 2511.01815)"
    Params = TransformParams
    whole_tensor: ClassVar[bool] = True
    default_transforms: ClassVar[dict] = {"keep_first": 1, "unrope": True}

    def section_specs(self, layout: GroupLayout) -> dict[str, SectionSpec]:
        raise InvalidInputError("the transform codec codes whole tensors, not groups")

    def encode(self, groups, layout, inlier_mask):
        raise InvalidInputError("the transform codec codes whole tensors, not groups")

    def decode(self, arrays, layout):
        raise InvalidInputError("the transform codec codes whole tensors, not groups")


def component_steps(theta: float, weight: np.ndarray) -> np.ndarray:
    """Uniform step of each component at distortion level ``theta``: ``sqrt(12 theta / w)`` (float32
    ``(F,)``; ``inf`` where the weight is 0). IEEE-exact, so encoder and decoder agree bit for bit."""
    w = weight.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = np.sqrt(12.0 * float(theta) / w)
    return steps.astype(np.float32)


def kept_components(theta: float, weight: np.ndarray, mean_square: np.ndarray) -> np.ndarray:
    """Reverse water-filling: bool ``(F,)``, the components with ``w * var > theta`` (and a positive weight)."""
    return (weight > 0) & (weight.astype(np.float64) * mean_square > theta)


def scale_code(mean_abs: np.ndarray) -> np.ndarray:
    """uint8 code of a mean ``|q|`` (float ``(...)``): 0 for 0, else the nearest code of the log grid
    (:data:`SCALE_CODE_STEPS` per octave), clamped to 1..255."""
    with np.errstate(divide="ignore"):
        code = np.rint(SCALE_CODE_STEPS * np.log2(mean_abs)) + SCALE_CODE_ZERO
    return np.where(mean_abs > 0, np.clip(code, 1, 255), 0).astype(np.uint8)


def _octave_steps() -> tuple[float, ...]:
    root = math.sqrt(math.sqrt(math.sqrt(2.0)))  # 2 ** (1/8), correctly rounded at each step
    steps = [1.0]
    for _ in range(SCALE_CODE_STEPS - 1):
        steps.append(steps[-1] * root)
    return tuple(steps)


_OCTAVE = _octave_steps()


def code_mean(code: int) -> float:
    """The mean ``|q|`` a scale code stands for: ``ldexp(2 ** (j / 8), e)`` with ``code - 160 = 8 e + j``,
    ``2 ** (j / 8)`` the ``j``-fold product of ``sqrt(sqrt(sqrt(2)))`` (IEEE-exact: the same on every
    machine); 0 for code 0."""
    if code == 0:
        return 0.0
    exponent, index = divmod(code - SCALE_CODE_ZERO, SCALE_CODE_STEPS)
    return math.ldexp(_OCTAVE[index], exponent)


def model_ratio(code: int) -> float:
    """The geometric ratio ``r`` of a scale code: the maximum-likelihood ``r`` for its mean ``|q|`` ``m``
    (:func:`code_mean`), ``r = m / (sqrt(1 + m**2) + 1)`` (0 for code 0)."""
    m = code_mean(code)
    return m / (math.sqrt(1.0 + m * m) + 1.0)


@functools.lru_cache(maxsize=8192)
def _model(code: int, support: int):
    import constriction  # the entropy coder (a core dependency), loaded when a transform entry is coded

    r = model_ratio(code)
    powers = np.concatenate([[1.0], np.cumprod(np.full(support, r, dtype=np.float64))])
    pmf = np.concatenate([powers[:0:-1], powers])
    return constriction.stream.model.Categorical(pmf, perfect=False)


def code_lengths(q_abs_sum: np.ndarray, counts: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Ideal code length in bits of each (chunk, component) under its model: ``-sum log2 p(q)`` from
    the sum of ``|q|`` and the count (float64, the shape of the inputs)."""
    ratios = np.vectorize(model_ratio, otypes=[np.float64])(codes.astype(np.int64)) if codes.size else codes
    r = np.asarray(ratios, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_norm = np.where(r > 0, np.log2((1 - r) / (1 + r)), 0.0)
        log_r = np.where(r > 0, np.log2(np.where(r > 0, r, 1.0)), 0.0)
        bits = -(counts * log_norm + q_abs_sum * log_r)
    return bits


@dataclass
class CodedComponents:
    """The coded coefficients of one tensor: ``support`` int32 ``(chunks,)``, ``scales`` uint8
    ``(chunks, F)`` (0 for dropped components) and the range coder's ``stream`` bytes."""

    support: np.ndarray
    scales: np.ndarray
    stream: bytes


def chunk_bounds(rows: int, chunk_tokens: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk_tokens, rows)) for a in range(0, rows, chunk_tokens)]


def quantize(coefficients: torch.Tensor, steps: np.ndarray, kept: np.ndarray, deadzone: float) -> np.ndarray:
    """int32 ``(n, K)``: ``sign(c) floor(|c| / step + 1/2 - deadzone)`` of the kept components
    (float32 ``(n, F)`` in): uniform bins, the zero bin widened by ``deadzone`` steps on each side
    (a dead-zone quantizer: at low rates the values near 0 cost more bits than their error).

    Raises:
        InvalidInputError: a coefficient more than :data:`MAX_SUPPORT` steps from 0.
    """
    index = torch.from_numpy(np.flatnonzero(kept))
    c = coefficients.index_select(1, index)
    scaled = c / torch.from_numpy(steps[kept])
    q = torch.sign(scaled) * torch.floor(scaled.abs() + (0.5 - deadzone))
    peak = float(q.abs().max()) if q.numel() else 0.0
    if peak > MAX_SUPPORT:
        raise InvalidInputError(
            f"the transform codec's steps are too fine for these values ({peak:.0f} steps from 0, at most "
            f"{MAX_SUPPORT}): ask for fewer bits"
        )
    return q.to(torch.int32).numpy()


def encode_components(q: np.ndarray, kept: np.ndarray, chunk_tokens: int) -> CodedComponents:
    """Range-code the kept components' integers ``q`` (int32 ``(n, K)``), chunk by chunk."""
    import constriction

    features = kept.shape[0]
    bounds = chunk_bounds(q.shape[0], chunk_tokens)
    support = np.zeros(len(bounds), dtype=np.int32)
    scales = np.zeros((len(bounds), features), dtype=np.uint8)
    kept_index = np.flatnonzero(kept)
    encoder = constriction.stream.queue.RangeEncoder()
    for chunk, (a, b) in enumerate(bounds):
        block = q[a:b]
        if not block.size:
            continue
        peak = int(np.abs(block).max())
        codes = scale_code(np.abs(block).mean(axis=0))
        support[chunk] = peak
        scales[chunk, kept_index] = codes
        if peak == 0:  # every integer of the chunk is 0: nothing to code
            continue
        shifted = np.ascontiguousarray((block + peak).T)
        for column, code in zip(shifted, codes.tolist(), strict=True):
            encoder.encode(column, _model(code, peak))
    return CodedComponents(support, scales, encoder.get_compressed().astype("<u4").tobytes())


def decode_components(coded: CodedComponents, kept: np.ndarray, rows: int, chunk_tokens: int) -> np.ndarray:
    """Inverse of :func:`encode_components`: int32 ``(rows, K)``.

    Raises:
        FormatError: a support beyond :data:`MAX_SUPPORT`, or a stream the models cannot decode.
    """
    import constriction

    kept_index = np.flatnonzero(kept)
    out = np.zeros((rows, kept_index.size), dtype=np.int32)
    if len(coded.stream) % 4:
        raise FormatError("the transform stream is not a whole number of 32-bit words")
    words = np.frombuffer(coded.stream, dtype="<u4").astype(np.uint32)
    decoder = constriction.stream.queue.RangeDecoder(words)
    for chunk, (a, b) in enumerate(chunk_bounds(rows, chunk_tokens)):
        peak = int(coded.support[chunk])
        if not 0 <= peak <= MAX_SUPPORT:
            raise FormatError(f"chunk {chunk}: support {peak} beyond {MAX_SUPPORT}")
        if peak == 0:
            continue
        for k, code in enumerate(coded.scales[chunk, kept_index].tolist()):
            out[a:b, k] = decoder.decode(_model(code, peak), b - a).astype(np.int32) - peak
    return out


def chunk_statistics(q: np.ndarray, chunk_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (chunk, kept component): the sum of ``|q|``, the count and the scale code (for rate estimates)."""
    bounds = chunk_bounds(q.shape[0], chunk_tokens)
    if not bounds:
        empty = np.zeros((0, q.shape[1]))
        return empty, empty, empty.astype(np.uint8)
    starts = np.array([a for a, _ in bounds])
    counts = np.array([b - a for a, b in bounds], dtype=np.float64)[:, None]
    sums = np.add.reduceat(np.abs(q).astype(np.float64), starts, axis=0)
    return sums, np.broadcast_to(counts, sums.shape), scale_code(sums / counts)


def _centroid_offsets() -> np.ndarray:
    """float64 ``(256,)``: for each scale code, where the centroid of a nonzero bin lies from its
    lower edge, in steps (Laplace density of the code's ratio within the bin)."""
    out = np.full(256, 0.5)
    for code in range(1, 256):
        r = model_ratio(code)
        if 0 < r < 1:
            a = -math.log(r)
            out[code] = 1.0 / a - 1.0 / math.expm1(a) if a > 1e-6 else 0.5 - a / 12
    return out


_CENTROIDS = _centroid_offsets()


def reconstruction_levels(q: np.ndarray, codes: np.ndarray, chunk_tokens: int, deadzone: float) -> torch.Tensor:
    """float32 ``(rows, K)``: each integer's reconstruction in steps: 0 for 0, else the centroid of
    its bin ``[|q| - 1/2 + deadzone, |q| + 1/2 + deadzone)`` under the Laplace density of its chunk's
    scale code (``codes``: uint8 ``(chunks, K)``), ``sign(q) (|q| - 1/2 + deadzone + centroid(code))``."""
    out = np.empty(q.shape, dtype=np.float32)
    table = (_CENTROIDS + (deadzone - 0.5)).astype(np.float32)  # level of |q| = |q| + table[code]
    for chunk, (a, b) in enumerate(chunk_bounds(q.shape[0], chunk_tokens)):  # float32, one chunk at a time
        block = q[a:b]
        level = np.abs(block).astype(np.float32) + table[codes[chunk]]
        out[a:b] = np.where(block == 0, np.float32(0), np.copysign(level, block.astype(np.float32)))
    return torch.from_numpy(out)
