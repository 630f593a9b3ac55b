"""Rate control on the written file: the dense budget whose file lands on ``target_bits``, and an
error bound checked on the decoded file.

The solvers (:mod:`kvpack.allocation.solver`) budget densely packed bits: they cannot see what
the entropy stage (zstd, format 1.5) will save on each group's codes, which on SmolLM2 is
8 to 20 % of the file. So a target is met in the file itself: :func:`fit_file_bits` solves with
a dense budget, measures the file those widths make (:mod:`kvpack.allocation.measure`: every
entry encoded, through the entropy stage, header included) and corrects the dense budget,
first by the difference (the entropy stage saves about a fixed number of bits per element
whatever the width), then by secant steps, kept inside the bracket once the target is bracketed,
at most :data:`MAX_FILES` files. :func:`fit_error` likewise tightens the solver's error bound until
the decoded file's error is within the one asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvpack.errors import InvalidInputError

#: The promise of ``target_bits``: the file's bits per element within this fraction of the target.
TOLERANCE = 0.02
#: The search stops as soon as a file is this close to the target.
CLOSE_ENOUGH = 0.005
#: At most this many candidate files are measured (each is one encoding of the cache).
MAX_FILES = 7
#: After a file above ``max_error``, the solver's bound shrinks by the ratio of the two and this factor.
MARGIN = 0.995


@dataclass
class Fitted:
    """The widths rate control chose and what their file is.

    Attributes:
        widths: one int64 ``(n_groups,)`` tensor of widths per allocated entry.
        file_bits: the file's bits per element of K/V (file bytes * 8 / K/V elements).
        dense_bits: the dense budget (bits per element) the widths were solved for.
        files: candidate files measured.
        error: the decoded file's mean relative squared error over the K/V tensors, when measured.
        note: one line on a target the file could not land near, else ``None``.
    """

    widths: list[torch.Tensor]
    file_bits: float | None
    dense_bits: float | None
    files: int
    error: float | None = None
    note: str | None = None


def fit_file_bits(
    target: float,
    solve: Callable[[float], list[torch.Tensor]],
    file_bits: Callable[[list[torch.Tensor]], float],
    lowest: float,
    highest: float,
    narrowest: list[torch.Tensor],
    too_low: Callable[[float], str],
) -> Fitted:
    """The widths whose file lands within :data:`TOLERANCE` of ``target`` bits per element.

    Args:
        target: bits per element of the whole file (every byte, after the entropy stage).
        solve: a dense budget (bits per element) -> widths within it (the dense solvers).
        file_bits: widths -> the bits per element of the file they make (measured).
        lowest, highest: the dense bits per element with every group at its narrowest / widest usable
            width: budgets outside change nothing.
        narrowest: every group at its narrowest usable width (the smallest file).
        too_low: the file bits per element of the narrowest widths -> the message refusing ``target``.

    Returns:
        The closest file within the tolerance; when none is (a target above what the widest widths
        give, or widths in steps too coarse for a tiny cache), the largest file below the target,
        with a :attr:`Fitted.note` saying so.

    Raises:
        InvalidInputError: even the narrowest widths make a file above the target's tolerance.
    """
    points: list[tuple[float, float, list[torch.Tensor]]] = []  # (dense budget, file bits, widths)

    def measure_at(dense: float, widths: list[torch.Tensor] | None = None) -> float:
        widths = solve(dense) if widths is None else widths
        points.append((dense, file_bits(widths), widths))
        return points[-1][1]

    dense = min(max(target, lowest), highest)
    if lowest > target:  # the dense solvers cannot go below: is the file of the narrowest widths small enough?
        smallest = measure_at(lowest, narrowest)
        if smallest > target * (1 + TOLERANCE):
            raise InvalidInputError(too_low(smallest))
        dense = min(lowest + target - smallest, highest) if smallest < target * (1 - CLOSE_ENOUGH) else None
    while dense is not None and len(points) < MAX_FILES:
        got = measure_at(dense)
        if abs(got - target) <= CLOSE_ENOUGH * target:
            break
        dense = _next_budget(points, target, lowest, highest)
    return _choose(points, target, lowest, highest, narrowest, file_bits, too_low)


def _next_budget(
    points: list[tuple[float, float, list[torch.Tensor]]], target: float, lowest: float, highest: float
) -> float | None:
    """The next dense budget to measure, or ``None`` when no budget can do better."""
    below = [(d, f) for d, f, _ in points if f < target]
    above = [(d, f) for d, f, _ in points if f > target]
    low = max(below) if below else None  # the largest budget whose file is below the target
    high = min(above) if above else None
    if low is not None and high is not None:
        if high[0] - low[0] <= 1e-4:  # budgets a ten-thousandth of a bit apart: the widths step over the target
            return None
        step = (target - low[1]) * (high[0] - low[0]) / (high[1] - low[1])
        width = high[0] - low[0]
        return low[0] + min(max(step, 0.1 * width), 0.9 * width)  # secant, kept inside the bracket
    dense, got = points[-1][0], points[-1][1]
    slope = 1.0  # the entropy stage saves about a fixed number of bits per element
    if len(points) >= 2 and points[-2][0] != dense:
        secant = (got - points[-2][1]) / (dense - points[-2][0])
        slope = secant if math.isfinite(secant) and secant > 0.2 else slope
    following = min(max(dense + (target - got) / slope, lowest), highest)
    if any(abs(following - d) <= 1e-9 for d, _, _ in points):  # at a bound already measured
        return None
    return following


def _choose(
    points: list[tuple[float, float, list[torch.Tensor]]],
    target: float,
    lowest: float,
    highest: float,
    narrowest: list[torch.Tensor],
    file_bits: Callable[[list[torch.Tensor]], float],
    too_low: Callable[[float], str],
) -> Fitted:
    """The closest measured file within :data:`TOLERANCE`, else the largest below ``target`` (with a
    note), else the narrowest widths' file when it is within the tolerance; else the refusal."""

    def within() -> list[tuple[float, float, list[torch.Tensor]]]:
        return [p for p in points if abs(p[1] - target) <= TOLERANCE * target]

    if not within() and not any(p[1] <= target for p in points):  # every file is above: the narrowest is left
        smallest = file_bits(narrowest)
        points.append((lowest, smallest, narrowest))
        if smallest > target * (1 + TOLERANCE):
            raise InvalidInputError(too_low(smallest))
    if within():
        dense, got, widths = min(within(), key=lambda p: abs(p[1] - target))
        return Fitted(widths, got, dense, len(points))
    dense, got, widths = max((p for p in points if p[1] <= target), key=lambda p: p[1])
    why = (
        "every group at its widest usable width"
        if dense >= highest
        else "the widths that can occur come in coarse steps on a cache this small"
    )
    note = (
        f"`target_bits={target:g}` is out of reach within {100 * TOLERANCE:g}%: the file holds {got:.3f} bits "
        f"per element, the closest below the target ({why})"
    )
    return Fitted(widths, got, dense, len(points), note=note)


def fit_error(
    bound: float,
    solve: Callable[[float], list[torch.Tensor]],
    file_error: Callable[[list[torch.Tensor]], float],
    widest: list[torch.Tensor],
    out_of_reach: Callable[[float], str],
) -> Fitted:
    """The widths of the fewest bits the solver finds whose decoded file's error is within ``bound``.

    Args:
        bound: the mean over the K/V tensors of the decoded file's relative squared error to stay within.
        solve: an error bound (in the solver's terms: attention-weighted with statistics, over the
            coded values) -> the widths of the fewest bits within it; raises InvalidInputError when
            no widths reach it.
        file_error: widths -> the decoded file's mean relative squared error (measured).
        widest: every group at its widest usable width (the smallest error).
        out_of_reach: the widest widths' error -> the message refusing ``bound``.

    Returns:
        The first widths whose file is within ``bound``: after each miss the solver's bound is
        tightened by the ratio of ``bound`` to the measured error, times :data:`MARGIN`; after
        :data:`MAX_FILES` misses, every group at its widest width.

    Raises:
        InvalidInputError: even the widest widths give a file above ``bound``.
    """
    asked, files = bound, 0
    while files < MAX_FILES - 1:
        try:
            widths = solve(asked)
        except InvalidInputError:
            break
        files += 1
        measured = file_error(widths)
        if measured <= bound:
            return Fitted(widths, None, None, files, error=measured)
        asked *= MARGIN * min(1.0, bound / measured)  # the error follows the solver's bound about in proportion
    measured = file_error(widest)
    if measured > bound:
        raise InvalidInputError(out_of_reach(measured))
    return Fitted(widest, None, None, files + 1, error=measured)
