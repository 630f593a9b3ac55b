"""Tensor <-> group views of KV-cache tensors, and the outlier split / merge.

A KV-cache tensor has shape ``(batch, num_kv_heads, seq_len, head_dim)`` (the layout of a
transformers cache). Groups run along one of two axes:

- ``token`` (per-token groups): the ``num_kv_heads * head_dim`` values of one token in one
  layer are cut into consecutive groups of ``group_size`` elements. So ``group_size ==
  head_dim`` is one group per head and token (QAQ's head level), ``group_size ==
  num_kv_heads * head_dim`` one group per layer and token (QAQ's layer level).
- ``channel`` (per-channel groups, KIVI / KVQuant keys): each channel of each head is cut
  along the sequence into groups of ``group_size`` consecutive tokens; ``group_size`` must
  divide ``seq_len`` (the caller keeps the remainder tokens out, see :mod:`kvpack.transforms.plan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvpack.errors import InvalidInputError

AXES = ("token", "channel")


@dataclass(frozen=True)
class GroupLayout:
    """How a ``(batch, num_kv_heads, seq_len, head_dim)`` tensor is cut into groups.

    Raises:
        InvalidInputError: the shape is not 4-D with non-negative sizes, or ``group_size``
            does not divide ``num_kv_heads * head_dim`` (token axis) or ``seq_len`` (channel axis).
    """

    shape: tuple[int, int, int, int]
    group_size: int
    axis: str = "token"

    def __post_init__(self) -> None:
        if len(self.shape) != 4 or any(int(s) < 0 for s in self.shape):
            raise InvalidInputError(
                f"a KV tensor must have shape (batch, num_kv_heads, seq_len, head_dim), got {tuple(self.shape)}"
            )
        if self.axis not in AXES:
            raise InvalidInputError(f"group axis must be one of {', '.join(AXES)}, got {self.axis!r}")
        if self.axis == "channel":
            if self.group_size < 1 or self.shape[2] % self.group_size:
                raise InvalidInputError(
                    f"group size {self.group_size} does not divide the {self.shape[2]} tokens of a channel"
                )
            return
        if self.group_size < 1 or self.features % self.group_size:
            raise InvalidInputError(
                f"group size {self.group_size} does not divide the {self.features} features of a token "
                f"(num_kv_heads {self.shape[1]} x head_dim {self.shape[3]}); "
                f"choose a divisor of {self.features}"
            )

    @property
    def features(self) -> int:
        """Values per token and layer: ``num_kv_heads * head_dim``."""
        return self.shape[1] * self.shape[3]

    @property
    def rows(self) -> int:
        """Token rows: ``batch * seq_len``."""
        return self.shape[0] * self.shape[2]

    @property
    def n_elements(self) -> int:
        return self.rows * self.features

    @property
    def n_groups(self) -> int:
        return self.n_elements // self.group_size

    @property
    def num_heads(self) -> int:
        return self.shape[1]

    @property
    def head_dim(self) -> int:
        return self.shape[3]


def to_groups(x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """View ``x`` of shape ``layout.shape`` as ``(n_groups, group_size)`` (a copy when needed).

    Token axis: groups in (batch, token, head, channel) order; channel axis: in (batch, head,
    channel, token) order.
    """
    if layout.axis == "channel":
        return x.permute(0, 1, 3, 2).reshape(layout.n_groups, layout.group_size)
    return x.permute(0, 2, 1, 3).reshape(layout.n_groups, layout.group_size)


def from_groups(groups: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Inverse of :func:`to_groups`: ``(n_groups, group_size)`` -> ``layout.shape`` (contiguous)."""
    batch, heads, seq, dim = layout.shape
    if layout.axis == "channel":
        return groups.reshape(batch, heads, dim, seq).permute(0, 1, 3, 2).contiguous()
    return groups.reshape(batch, seq, heads, dim).permute(0, 2, 1, 3).contiguous()


def to_heads(groups: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Rearrange ``(n_groups, group_size)`` values as ``(num_kv_heads, n_elements / num_kv_heads)``."""
    if layout.axis == "channel":
        return groups.reshape(layout.shape[0], layout.num_heads, -1).permute(1, 0, 2).reshape(layout.num_heads, -1)
    return groups.reshape(layout.rows, layout.num_heads, layout.head_dim).permute(1, 0, 2).reshape(layout.num_heads, -1)


def from_heads(values: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Inverse of :func:`to_heads`."""
    if layout.axis == "channel":
        return (
            values.reshape(layout.num_heads, layout.shape[0], -1)
            .permute(1, 0, 2)
            .reshape(layout.n_groups, layout.group_size)
        )
    return (
        values.reshape(layout.num_heads, layout.rows, layout.head_dim)
        .permute(1, 0, 2)
        .reshape(layout.n_groups, layout.group_size)
    )


def outliers_per_side(outlier_ratio: float, group_size: int) -> int:
    """How many of the lowest and of the highest values of each group are kept exactly.

    ``k = max(1, floor(outlier_ratio * group_size / 2 + 0.5))`` (float64 arithmetic) when
    ``outlier_ratio > 0``: the nearest whole number of values per side, and at least one, so
    a non-zero ratio always keeps outliers; 0 when ``outlier_ratio == 0``.

    Raises:
        InvalidInputError: fewer than two values of a group would remain for the statistics.
    """
    if outlier_ratio <= 0:
        return 0
    per_side = max(1, math.floor(outlier_ratio * group_size / 2 + 0.5))
    if group_size - 2 * per_side < 2:
        raise InvalidInputError(
            f"outlier ratio {outlier_ratio} keeps {2 * per_side} of {group_size} values per group exactly, "
            "leaving fewer than 2 for the statistics; use a smaller ratio or a larger group size"
        )
    return per_side


def outliers_per_group(outlier_ratio: float, group_size: int, select: str = "tails") -> int:
    """How many values of each group are kept exactly.

    ``tails``: ``2 * outliers_per_side(...)`` (as many lowest as highest). ``magnitude``:
    ``k = max(1, floor(outlier_ratio * group_size + 0.5))`` when ``outlier_ratio > 0``
    (float64), so 1% of a group of 64 keeps one value, not two.

    Raises:
        InvalidInputError: fewer than two values of a group would remain for the statistics.
    """
    if select != "magnitude":
        return 2 * outliers_per_side(outlier_ratio, group_size)
    if outlier_ratio <= 0:
        return 0
    count = max(1, math.floor(outlier_ratio * group_size + 0.5))
    if group_size - count < 2:
        raise InvalidInputError(
            f"outlier ratio {outlier_ratio} keeps {count} of {group_size} values per group exactly, "
            "leaving fewer than 2 for the statistics; use a smaller ratio or a larger group size"
        )
    return count


OUTLIER_SELECTIONS = ("tails", "magnitude")


def split_outliers(
    groups: torch.Tensor, count: int, select: str = "tails"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Find the ``count`` outliers of every group (:func:`outliers_per_group`).

    ``tails`` (QAQ): the ``count / 2`` lowest and the ``count / 2`` highest values; positions
    are the lowest first (ascending by value), then the highest (descending). With ties
    (e.g. a constant group) a position can be listed twice; merging is still exact.
    ``magnitude`` (KVQuant's dense-and-sparse split): the ``count`` values of largest
    ``|x|``, descending (ties: the lower position first), always distinct positions.

    Args:
        groups: ``(n_groups, group_size)`` float tensor.
        count: values per group (``> 0``; even for ``tails``).
        select: ``tails`` or ``magnitude``.

    Returns:
        A triple ``(positions, values, inlier_mask)``: positions ``(n_groups, count)``
        int64, their values (same dtype as ``groups``), and the boolean
        ``(n_groups, group_size)`` mask of the values left for the statistics.
    """
    if select == "magnitude":
        # a stable sort: among equal |x| the lower position comes first, on every torch version
        positions = torch.sort(groups.abs(), dim=1, descending=True, stable=True).indices[:, :count]
    else:
        per_side = count // 2
        low = torch.topk(groups, per_side, dim=1, largest=False, sorted=True).indices
        high = torch.topk(groups, per_side, dim=1, largest=True, sorted=True).indices
        positions = torch.cat([low, high], dim=1)
    values = torch.gather(groups, 1, positions)
    inlier_mask = torch.ones_like(groups, dtype=torch.bool)
    inlier_mask.scatter_(1, positions, False)
    return positions, values, inlier_mask


def merge_outliers(groups: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write the exact outlier ``values`` back at their ``positions`` (in place; returns ``groups``)."""
    return groups.scatter_(1, positions, values.to(groups.dtype))
