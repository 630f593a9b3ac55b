"""Adaptive grouped quantization: a codebook learned from the data (1-D k-means).

Each group is normalized to ``z = (x - c) / h``: by default (``minmax``) ``c`` is the
group's mid-range and ``h`` its half-range, so ``z`` lies in ``[-1, 1]`` (the KVQuant
normalization); ``meanstd`` uses the mean and standard deviation instead; ``symmetric``
drops ``c`` (``h`` = max|x| or the RMS). ``c`` and ``h`` are stored as float16.

A codebook of ``L = 2**B`` levels is learned with Lloyd's algorithm (1-D k-means, run
from two starts, the quantiles ``(i + 0.5) / L`` of the non-outlier ``z`` and an even grid
over their range, keeping the better), per scope:
``tensor`` (one codebook per tensor), ``head`` (one per layer, key/value and kv head; the
default) or ``group`` (one per group; costs ``L`` float16 values per group). Each element
is weighted by ``h**2`` of its group, so the k-means objective is the squared error in
``x`` rather than in ``z``. Codebooks are stored as float16, sorted; codes are the nearest
stored level; ``x_hat = c + h * codebook[code]``. On the token axis, a codebook that would
see more than ``LLOYD_SAMPLES`` (32,768) values learns from the groups of every k-th token
only (k the smallest step that brings it under the limit); every value is still coded.

Source: non-uniform, data-derived levels as in KVQuant (Hooper et al., arXiv 2401.18079,
sensitivity-weighted k-means "nuqX" datatypes); Lloyd, "Least squares quantization in PCM"
(1982).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpack.codecs.base import (
    FUSED_LEVELS,
    KIND_CODEBOOKS,
    RECOMMENDED_GROUPED,
    SCOPE_GROUP,
    SCOPE_SHARED,
    Codec,
    CodecParams,
    FusedEncoding,
    SectionSpec,
    fp16_nearest,
    masked_mean_std,
    minmax_from,
    minmax_normalizers,
    option,
    scaled_codes_specs,
    symmetric_option,
)
from kvpack.grouping import GroupLayout, from_heads, to_groups, to_heads

LLOYD_MAX_ITERATIONS = 30
#: A codebook learns from at most about this many values: Lloyd's sort and prefix sums cost
#: O(N log N), and 16-256 levels are set well by far fewer samples than a long cache holds.
LLOYD_SAMPLES = 1 << 15
LLOYD_TOLERANCE = 1e-6


@dataclass(frozen=True)
class AdaptiveParams(CodecParams):
    symmetric: bool = symmetric_option()
    normalization: str = option("minmax", "Group normalization", choices=("minmax", "meanstd"))
    codebook_scope: str = option("head", "One codebook per", choices=("tensor", "head", "group"))


class AdaptiveCodec(Codec):
    name = "adaptive"
    recommended_transforms: ClassVar[dict] = RECOMMENDED_GROUPED
    summary = "codebook of 2^B levels learned per kv head by weighted 1-D k-means (Lloyd)"
    source = "data-derived non-uniform levels as in KVQuant (arXiv 2401.18079); Lloyd 1982"
    Params = AdaptiveParams

    def n_codebooks(self, layout: GroupLayout) -> int:
        scope = self.params.codebook_scope
        return 1 if scope == "tensor" else layout.num_heads if scope == "head" else layout.n_groups

    def section_specs(self, layout: GroupLayout) -> dict[str, SectionSpec]:
        specs = scaled_codes_specs(layout, self.bits, self.params.symmetric)
        scope = SCOPE_GROUP if self.params.codebook_scope == "group" else SCOPE_SHARED
        specs["codebook"] = SectionSpec(KIND_CODEBOOKS, "float16", self.n_codebooks(layout) * self.levels, scope=scope)
        return specs

    def encode(self, groups, layout, inlier_mask):
        center, half = self._normalizers(groups, inlier_mask)
        step = sample_step(layout, self.n_codebooks(layout))
        if step > 1:  # learn on every step-th token's groups (token axis only)
            sample = sampled_groups(layout, step)
            mask = None if inlier_mask is None else inlier_mask[sample]
            codebook = self.learn(groups[sample], sampled_layout(layout, step), mask, center[sample], half[sample])
        else:
            codebook = self.learn(groups, layout, inlier_mask, center, half)
        safe_half = torch.where(half > 0, half, torch.ones_like(half))
        z = (groups - center[:, None]) / safe_half[:, None]
        codes = nearest_level(self._to_scope(z, layout), codebook)
        arrays = {
            "codes": self._from_scope(codes, layout).to(torch.uint8),
            "codebook": codebook.reshape(-1),
            "scale": half,
        }
        if not self.params.symmetric:
            arrays["zero_point"] = center
        return arrays

    def learn(self, groups, layout, inlier_mask, center, half) -> torch.Tensor:
        """The codebooks (float32 ``(n_codebooks, L)``, float16 values, sorted) of these groups,
        normalized by ``center`` and ``half`` (float32 ``(n_groups,)``)."""
        safe_half = torch.where(half > 0, half, torch.ones_like(half))
        z = (groups - center[:, None]) / safe_half[:, None]
        weights = (half**2)[:, None].expand_as(groups)
        if inlier_mask is not None:
            weights = weights * inlier_mask
        z_scoped, w_scoped = self._to_scope(z, layout), self._to_scope(weights.contiguous(), layout)
        codebook = lloyd_codebooks(z_scoped, w_scoped, self.levels)
        return fp16_nearest(codebook).sort(dim=1).values

    def decode(self, arrays, layout):
        n_books = self.n_codebooks(layout)
        codes = self._to_scope(arrays["codes"], layout)  # (n_books, samples) uint8
        flat_index = codes.int() + (torch.arange(n_books, dtype=torch.int32) * self.levels)[:, None]
        z = self._from_scope(arrays["codebook"][flat_index], layout)
        x = z * arrays["scale"][:, None]
        if not self.params.symmetric:
            x = x + arrays["zero_point"][:, None]
        return x

    def fuses(self) -> bool:
        return self.params.normalization == "minmax" and self.params.codebook_scope in ("tensor", "head")

    def fused_encoding(self, lo, hi, x, layout):
        center, half = minmax_from(lo, hi, self.params.symmetric)
        step = sample_step(layout, self.n_codebooks(layout))
        if step > 1:  # the same groups the torch path learns from
            index = sampled_groups(layout, step)
            sub = sampled_layout(layout, step)
            codebook = self.learn(
                to_groups(x[:, :, ::step].to(torch.float32), sub), sub, None, center[index], half[index]
            )
        else:
            codebook = self.learn(to_groups(x.to(torch.float32), layout), layout, None, center, half)
        arrays = {"scale": half, "codebook": codebook.reshape(-1)}
        if not self.params.symmetric:
            arrays["zero_point"] = center
        return FusedEncoding(FUSED_LEVELS, center, half, arrays, codebook, self.params.codebook_scope == "head")

    def fused_levels(self, arrays):
        return arrays["codebook"].reshape(-1, self.levels), self.params.codebook_scope == "head"

    def _normalizers(self, groups, mask):
        if self.params.normalization == "meanstd":
            mean, std = masked_mean_std(groups, mask, self.params.symmetric)
            return fp16_nearest(mean), fp16_nearest(std)
        return minmax_normalizers(groups, mask, self.params.symmetric)

    def _to_scope(self, values: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
        scope = self.params.codebook_scope
        if scope == "head":
            return to_heads(values, layout)
        return values.reshape(1, -1) if scope == "tensor" else values

    def _from_scope(self, values: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
        if self.params.codebook_scope == "head":
            return from_heads(values, layout)
        return values.reshape(layout.n_groups, layout.group_size)


def sample_step(layout: GroupLayout, n_codebooks: int) -> int:
    """Learn from every ``step``-th token when a codebook would see more than :data:`LLOYD_SAMPLES`
    values (token axis only; channel-axis groups and per-group codebooks learn from everything)."""
    if layout.axis != "token" or n_codebooks >= layout.n_groups or not layout.n_elements:
        return 1
    per_book = layout.n_elements // max(1, n_codebooks)
    return max(1, -(-per_book // LLOYD_SAMPLES))


def sampled_groups(layout: GroupLayout, step: int) -> torch.Tensor:
    """Indices of the groups of tokens ``0, step, 2·step, …`` of every batch row (token axis)."""
    batch, _, tokens, _ = layout.shape
    per_row = layout.features // layout.group_size
    index = torch.arange(layout.n_groups).reshape(batch, tokens, per_row)
    return index[:, ::step].reshape(-1)


def sampled_layout(layout: GroupLayout, step: int) -> GroupLayout:
    batch, heads, tokens, head_dim = layout.shape
    return GroupLayout((batch, heads, -(-tokens // step), head_dim), layout.group_size, layout.axis)


def nearest_level(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level: ``values (C, N)``, sorted ``codebook (C, L)`` -> int64 ``(C, N)``."""
    midpoints = (codebook[:, 1:] + codebook[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), values.contiguous())


def lloyd_codebooks(values: torch.Tensor, weights: torch.Tensor, levels: int) -> torch.Tensor:
    """Weighted 1-D k-means, batched over codebooks.

    The samples of each codebook are sorted once; a Lloyd iteration then needs only the
    ``L - 1`` cell boundaries (binary searches of the level midpoints) and prefix sums of
    the weights and weighted values, so it costs ``O(L log N)`` per codebook instead of
    ``O(N log L)``. Cells are assigned as :func:`nearest_level` does (ties to the lower level).
    Lloyd only finds a local optimum, so it runs from two starts, the quantiles
    ``(i + 0.5) / L`` and an even grid over the range of the samples, and each codebook
    keeps the result with the smaller weighted squared error. Samples of weight 0
    (outliers) neither seed a level nor bound the grid.

    Args:
        values: float32 ``(C, N)``, ``N`` samples for each of ``C`` codebooks.
        weights: float32 ``(C, N)``, non-negative sample weights.
        levels: codebook size ``L``.

    Returns:
        float32 ``(C, L)`` sorted codebooks. Levels whose cell receives no weight keep
        their start.
    """
    n_books, n_samples = values.shape
    if n_samples == 0:
        return torch.zeros(n_books, levels)
    ordered, order = values.sort(dim=1)
    sorted_weights = weights.gather(1, order).double()
    ordered64 = ordered.double()
    zeros = torch.zeros(n_books, 1, dtype=torch.float64)
    prefix = {
        "mass": torch.cat([zeros, sorted_weights.cumsum(dim=1)], dim=1),
        "first": torch.cat([zeros, (ordered64 * sorted_weights).cumsum(dim=1)], dim=1),
        "second": torch.cat([zeros, (ordered64**2 * sorted_weights).cumsum(dim=1)], dim=1),
    }
    # positions of the samples that count (positive weight); all samples where none does
    counted = torch.cat([zeros, (sorted_weights > 0).double().cumsum(dim=1)], dim=1)
    n_counted = counted[:, -1:]
    use_all = n_counted == 0
    position = torch.where(use_all, torch.arange(1, n_samples + 1, dtype=torch.float64), counted[:, 1:]).contiguous()
    n_used = torch.where(use_all, torch.full_like(n_counted, float(n_samples)), n_counted)
    fractions = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    quantile_at = torch.searchsorted(position, (fractions * n_used).contiguous()).clamp_max(n_samples - 1)
    lowest = ordered.gather(1, torch.searchsorted(position, torch.full_like(n_used, 0.5)).clamp_max(n_samples - 1))
    highest = ordered.gather(1, torch.searchsorted(position, n_used - 0.5).clamp_max(n_samples - 1))
    grid = lowest + (highest - lowest) * torch.linspace(0, 1, levels)
    candidates = [_lloyd(ordered, prefix, start) for start in (ordered.gather(1, quantile_at), grid)]
    errors = torch.stack([sse for _, sse in candidates])
    best = errors.argmin(dim=0)
    return torch.where((best == 0)[:, None], candidates[0][0], candidates[1][0])


def _lloyd(
    ordered: torch.Tensor, prefix: dict[str, torch.Tensor], start: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations on sorted samples from ``start (C, L)``; returns (codebook, weighted SSE per row)."""
    n_books, n_samples = ordered.shape
    first = torch.zeros(n_books, 1, dtype=torch.long)
    last = torch.full((n_books, 1), n_samples, dtype=torch.long)

    def cells(codebook: torch.Tensor) -> dict[str, torch.Tensor]:
        midpoints = ((codebook[:, 1:] + codebook[:, :-1]) / 2).contiguous()
        bounds = torch.cat([first, torch.searchsorted(ordered, midpoints, right=True), last], dim=1)
        return {k: v.gather(1, bounds[:, 1:]) - v.gather(1, bounds[:, :-1]) for k, v in prefix.items()}

    codebook = start.sort(dim=1).values.contiguous()
    for _ in range(LLOYD_MAX_ITERATIONS):
        sums = cells(codebook)
        mass = sums["mass"]
        updated = torch.where(mass > 0, sums["first"] / mass.clamp_min(1e-300), codebook.double()).float()
        updated = updated.sort(dim=1).values.contiguous()
        shift = (updated - codebook).abs().max()
        codebook = updated
        if float(shift) < LLOYD_TOLERANCE:
            break
    sums = cells(codebook)
    level = codebook.double()
    sse = (sums["second"] - 2 * level * sums["first"] + level**2 * sums["mass"]).sum(dim=1)
    return codebook, sse
