"""Mixed precision: the groups of one tensor coded at different widths (0 to 8 bits).

A mixed tensor (codec config ``width_counts``, format 1.4) stores:

- ``bit_widths``: the width of every group, 4-bit codes in group order (counted in the
  file's bits, column ``bitmap``);
- the codec's per-group sections (``scale``, ``zero_point``) for every group, as a
  fixed-width tensor would;
- for each width ``w`` that occurs, the codes of the groups of that width in group order,
  packed at ``w`` bits (section ``codes_{w}``), and for the adaptive codec their codebooks
  (``codebook_{w}``).

A group of width 0 has no codes: it is reconstructed as its zero-point (the group mean,
for codecs that store one) or as zeros (symmetric codecs and element formats).

Each width class is coded by the codec at that width (:meth:`Codec.at_width`; element
formats switch to the member of their family, e.g. mxfp4 / mxfp6 / mxfp8), so the real
error of every group at every candidate width can be measured (:func:`width_errors`) for
the codec actually used.
"""

from __future__ import annotations

import torch

from kvpack.codecs.base import (
    KIND_ALLOCATION,
    KIND_CODEBOOKS,
    KIND_CODES,
    KIND_SCALES,
    SCOPE_ENTRY,
    SectionSpec,
    fp16_nearest,
    masked_mean_std,
)
from kvpack.config import CodecConfig
from kvpack.errors import InvalidInputError
from kvpack.grouping import GroupLayout

#: Bits of one entry of the ``bit_widths`` map (widths 0 to 8).
WIDTH_CODE_BITS = 4
MAX_WIDTH = 8


def width_layout(layout: GroupLayout, n_groups: int) -> GroupLayout:
    """The layout of ``n_groups`` groups of ``layout``'s size taken out as one tensor of their own."""
    return GroupLayout((1, 1, n_groups, layout.group_size), layout.group_size, "token")


def has_zero_point(config: CodecConfig, layout: GroupLayout) -> bool:
    """Whether the codec stores a zero-point per group (what a width-0 group decodes to)."""
    return "zero_point" in config.make_codec().section_specs(layout)


def candidate_widths(config: CodecConfig) -> tuple[int, ...]:
    """0 and the widths the config's codec can code (1 to 8; an element family's members)."""
    return (0, *config.make_codec().widths())


def codec_specs(config: CodecConfig, layout: GroupLayout) -> dict[str, SectionSpec]:
    """The codec's sections of a tensor: fixed width, or (``width_counts``) the mixed layout above.

    Raises:
        InvalidInputError: ``width_counts`` that do not add up to the tensor's groups, or a
            width the codec cannot code.
    """
    codec = config.make_codec()
    counts = config.width_counts
    if not counts:
        return dict(codec.section_specs(layout))
    if sum(counts) != layout.n_groups:
        raise InvalidInputError(f"width_counts add up to {sum(counts)} groups, the tensor has {layout.n_groups}")
    allowed = set(candidate_widths(config))
    used = [w for w, count in enumerate(counts) if count]
    if not set(used) <= allowed:
        raise InvalidInputError(f"method {config.method} cannot code width(s) {sorted(set(used) - allowed)}")
    specs = {"bit_widths": SectionSpec(KIND_ALLOCATION, "code", layout.n_groups, WIDTH_CODE_BITS, SCOPE_ENTRY)}
    specs.update({n: s for n, s in codec.section_specs(layout).items() if s.kind == KIND_SCALES})
    for width in used:
        if width:
            sub = width_layout(layout, counts[width])
            for name, spec in codec.at_width(width).section_specs(sub).items():
                if spec.kind in (KIND_CODES, KIND_CODEBOOKS):
                    specs[f"{name}_{width}"] = spec
    return specs


def encode_mixed(
    config: CodecConfig,
    groups: torch.Tensor,
    layout: GroupLayout,
    mask: torch.Tensor | None,
    widths: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Arrays of :func:`codec_specs` for groups coded at ``widths`` (int64 ``(n_groups,)``, 0 to 8)."""
    codec = config.make_codec()
    arrays: dict[str, torch.Tensor] = {"bit_widths": widths.to(torch.uint8)}
    per_group = {
        name: torch.zeros(layout.n_groups)
        for name, spec in codec.section_specs(layout).items()
        if spec.kind == KIND_SCALES
    }
    for width in widths.unique().tolist():
        index = (widths == width).nonzero().squeeze(1)
        chosen, chosen_mask = groups[index], None if mask is None else mask[index]
        if width == 0:
            if "zero_point" in per_group:
                per_group["zero_point"][index] = fp16_nearest(_masked_mean(chosen, chosen_mask))
            continue
        coded = codec.at_width(width).encode(chosen, width_layout(layout, len(index)), chosen_mask)
        for name, value in coded.items():
            if name in per_group:
                per_group[name][index] = value.float()
            else:
                arrays[f"{name}_{width}"] = value
    arrays.update(per_group)
    return arrays


def decode_mixed(config: CodecConfig, arrays: dict[str, torch.Tensor], layout: GroupLayout) -> torch.Tensor:
    """Float32 ``(n_groups, group_size)`` groups of a mixed tensor.

    Raises:
        InvalidInputError: a width above 8, or a map whose widths do not match ``width_counts``.
    """
    codec = config.make_codec()
    widths = arrays["bit_widths"].long()
    if widths.numel() and int(widths.max()) > MAX_WIDTH:
        raise InvalidInputError(f"a group width above {MAX_WIDTH} bits in the bit-width map")
    if torch.bincount(widths, minlength=MAX_WIDTH + 1).tolist() != list(config.width_counts):
        raise InvalidInputError("the bit-width map does not hold the widths width_counts declares")
    per_group = [name for name, spec in codec.section_specs(layout).items() if spec.kind == KIND_SCALES]
    groups = torch.zeros(layout.n_groups, layout.group_size)
    for width, count in enumerate(config.width_counts):
        if not count:
            continue
        index = (widths == width).nonzero().squeeze(1)
        if width == 0:
            if "zero_point" in arrays:
                groups[index] = arrays["zero_point"][index][:, None]
            continue
        sub = width_layout(layout, count)
        chosen = {name: arrays[name][index] for name in per_group}
        for name in codec.at_width(width).section_specs(sub):
            if name not in chosen:
                chosen[name] = arrays[f"{name}_{width}"]
        chosen["codes"] = chosen["codes"].reshape(count, layout.group_size)
        groups[index] = codec.at_width(width).decode(chosen, sub)
    return groups


def width_errors(
    config: CodecConfig,
    groups: torch.Tensor,
    layout: GroupLayout,
    mask: torch.Tensor | None,
    weights: torch.Tensor | None = None,
    max_abs: bool = False,
) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor | None]:
    """The measured error of every group at every candidate width, for this config's codec.

    Args:
        groups: float32 ``(n_groups, group_size)``.
        mask: False at outliers (stored exactly: no error), or ``None``.
        weights: non-negative importance of each value, ``(n_groups, group_size)``, or ``None`` (1).

    Returns:
        ``(widths, squared, largest)``: the candidate widths, float64 ``(n_groups, len(widths))``
        sums of ``weight * (x - x_hat)^2`` over each group, and with ``max_abs`` the largest
        ``|x - x_hat|`` of each group over the values of non-zero weight (else ``None``).
    """
    widths = candidate_widths(config)
    codec = config.make_codec()
    weight = torch.ones_like(groups) if weights is None else weights
    if mask is not None:
        weight = weight * mask
    errors = torch.empty(layout.n_groups, len(widths), dtype=torch.float64)
    largest = torch.empty_like(errors) if max_abs else None
    for column, width in enumerate(widths):
        if width == 0:
            mean = (
                fp16_nearest(_masked_mean(groups, mask)) if has_zero_point(config, layout) else torch.zeros(len(groups))
            )
            approx = mean[:, None].expand_as(groups)
        else:
            at_width = codec.at_width(width)
            approx = at_width.decode(_as_decoded(at_width.encode(groups, layout, mask)), layout)
        difference = groups.double() - approx.double()
        errors[:, column] = (weight.double() * difference**2).sum(dim=1)
        if largest is not None:
            largest[:, column] = (difference.abs() * (weight > 0)).amax(dim=1)
    return widths, errors, largest


def _as_decoded(arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder output as a decoder takes it: codes uint8, the rest float32 after their storage rounding."""
    return {name: v.to(torch.uint8) if name == "codes" else v.float() for name, v in arrays.items()}


def _masked_mean(groups: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return masked_mean_std(groups, mask, symmetric=False)[0]
