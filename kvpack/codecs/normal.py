"""Normal-quantile grouped quantization (levels fixed by the Gaussian, not stored).

Per group: mean ``mu`` and population standard deviation ``sigma`` (with ``symmetric``:
``mu = 0`` and ``sigma`` = root mean square), both stored as float16 (rounded to
nearest). With ``L = 2**B``, bin edges are the standard normal quantiles
``t_i = Phi^-1(i / L)`` (``scipy.special.ndtri``, what ``scipy.stats.norm.ppf`` computes), so every bin holds probability ``1/L``
under N(0, 1); bin ``i`` is reconstructed at its conditional mean
``E[Z | t_i < Z < t_{i+1}] = L * (phi(t_i) - phi(t_{i+1}))``. Codes are the bin of
``(x - mu) / sigma``; ``x_hat = mu + sigma * level[code]``. A group with ``sigma == 0``
decodes to ``mu``.

With ``normalization="minmax"`` the group is instead mapped to ``[-1, 1]`` by its
mid-range and half-range (as the adaptive codec does), the same levels are scaled so the
outermost are +-1, and each value takes the nearest level (NF4-style absmax scaling;
the standard-deviation normalization clips the heavy outliers of key channels).

Source: NormalFloat levels of QLoRA (Dettmers et al., arXiv 2305.14314) with the optimal
(Lloyd–Max centroid) reconstruction points of a Gaussian source; the "normal" codec of
the QAQ-style design. Note: normalization by the standard deviation clips the heavy
outliers of key channels (see docs/benchmarks.md for what that costs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch
from scipy.special import ndtri

from kvpack.codecs.base import (
    FUSED_LEVELS,
    RECOMMENDED_GROUPED,
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
from kvpack.grouping import GroupLayout


@lru_cache(maxsize=None)
def gaussian_bins(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner bin edges ``(2**bits - 1,)`` and reconstruction levels ``(2**bits,)`` (float32)."""
    levels = 1 << bits
    edges = ndtri(np.arange(levels + 1) / levels)  # -inf .. inf
    density = np.exp(-(edges**2) / 2.0) / np.sqrt(2 * np.pi)  # the standard normal pdf, as scipy.stats computes it
    centroids = levels * (density[:-1] - density[1:])
    return torch.tensor(edges[1:-1], dtype=torch.float32), torch.tensor(centroids, dtype=torch.float32)


@dataclass(frozen=True)
class NormalParams(CodecParams):
    symmetric: bool = symmetric_option()
    normalization: str = option("meanstd", "Group normalization", choices=("meanstd", "minmax"))


class NormalCodec(Codec):
    name = "normal"
    recommended_transforms: ClassVar[dict] = RECOMMENDED_GROUPED
    #: mean/std normalization clips the keys' outlier channels (docs/benchmarks.md, "Codec defaults")
    recommended_params: ClassVar[dict] = {"normalization": "minmax"}
    summary = "Gaussian-quantile levels per group, normalized by mean/std (or min/max)"
    source = "NormalFloat levels (QLoRA, arXiv 2305.14314) with Gaussian centroid reconstruction"
    Params = NormalParams

    def section_specs(self, layout: GroupLayout) -> dict[str, SectionSpec]:
        return scaled_codes_specs(layout, self.bits, self.params.symmetric)

    def levels_for(self) -> torch.Tensor:
        """Reconstruction levels in normalized units: the Gaussian centroids, or (``minmax``)
        the same scaled so the outermost are +-1."""
        _, centroids = gaussian_bins(self.bits)
        if self.params.normalization == "minmax":
            return centroids / centroids.abs().max()
        return centroids

    def encode(self, groups, layout, inlier_mask):
        if self.params.normalization == "minmax":
            center, spread = minmax_normalizers(groups, inlier_mask, self.params.symmetric)
        else:
            center, spread = masked_mean_std(groups, inlier_mask, self.params.symmetric)
            center, spread = fp16_nearest(center), fp16_nearest(spread)
        safe_spread = torch.where(spread > 0, spread, torch.ones_like(spread))
        z = (groups - center[:, None]) / safe_spread[:, None]
        if self.params.normalization == "minmax":  # nearest level (the grid is not equiprobable any more)
            levels = self.levels_for()
            codes = torch.bucketize(z, (levels[1:] + levels[:-1]) / 2)
        else:  # equiprobable Gaussian bins
            codes = torch.bucketize(z, gaussian_bins(self.bits)[0])
        arrays = {"codes": codes.to(torch.uint8), "scale": spread}
        if not self.params.symmetric:
            arrays["zero_point"] = center
        return arrays

    def fuses(self) -> bool:
        return self.params.normalization == "minmax"

    def fused_encoding(self, lo, hi, x, layout):
        center, spread = minmax_from(lo, hi, self.params.symmetric)
        arrays = {"scale": spread} if self.params.symmetric else {"scale": spread, "zero_point": center}
        return FusedEncoding(FUSED_LEVELS, center, spread, arrays, self.levels_for()[None, :])

    def fused_levels(self, arrays):
        return self.levels_for()[None, :], False

    def decode(self, arrays, layout):
        x = self.levels_for()[arrays["codes"].int()] * arrays["scale"][:, None]
        if not self.params.symmetric:
            x = x + arrays["zero_point"][:, None]
        return x
