"""The allocation solvers: a width per group from the groups' error tables and a budget (bits or error).

``target`` (rate control) takes, for every group, its **measured** error at each width the
codec can code (:func:`kvpack.transforms.mixed.width_errors`: the codec really encodes and decodes
the group at 0, 1, ..., 8 bits, so a uniform grid, Gaussian levels, a learned codebook and an
FP / MX element family each get their own error curve) and chooses the widths that minimize
the total error for a bit budget, or the fewest bits for an error budget.

The choice is a Lagrangian relaxation (Shoham & Gersho, "Efficient bit allocation for an
arbitrary set of quantizers", 1988): for a multiplier ``lam`` every group independently takes
the width minimizing ``error + lam * bits``; the total bits fall as ``lam`` grows, so a
bisection on ``lam`` meets the budget, and a greedy pass then spends what is left on the
upgrades with the best error decrease per bit. Everything is vectorized over all groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvpack.dtypes import DTYPE_SIZES
from kvpack.errors import InvalidInputError
from kvpack.transforms.mixed import candidate_widths, width_errors, width_layout

#: Bisection steps on the multiplier (float64: far below one group's worth of bits).
BISECTION_STEPS = 100
#: Every this many bisection steps, the groups whose choice the bracket has settled are set aside.
SETTLE_EVERY = 4


@dataclass
class WidthTable:
    """The candidate widths of one tensor's groups and what each costs.

    Attributes:
        widths: the candidate widths, ascending, starting at 0.
        errors: float64 ``(n_groups, len(widths))``: weighted squared error of each group at each width.
        bits: float64 ``(len(widths),)``: bits one group's codes (and per-group codebook) take at each width.
        energy: the weighted sum of squares of the tensor's values (for relative errors).
    """

    widths: tuple[int, ...]
    errors: torch.Tensor
    bits: torch.Tensor
    energy: float

    @property
    def n_groups(self) -> int:
        return self.errors.shape[0]


def _stack(tables: list[WidthTable]) -> tuple[torch.Tensor, torch.Tensor]:
    widths = {t.widths for t in tables}
    if len(widths) > 1:
        raise InvalidInputError("every tensor of a file must offer the same candidate widths")
    errors = torch.cat([t.errors for t in tables]) if tables else torch.zeros(0, 1, dtype=torch.float64)
    bits = torch.cat([t.bits.expand(t.n_groups, -1) for t in tables]) if tables else torch.zeros(0, 1)
    return errors, bits.double()


def _split(choice: torch.Tensor, tables: list[WidthTable]) -> list[torch.Tensor]:
    """Per-table widths (int64) from the chosen column of every group."""
    out, start = [], 0
    for table in tables:
        columns = choice[start : start + table.n_groups]
        out.append(torch.tensor(table.widths, dtype=torch.long)[columns])
        start += table.n_groups
    return out


def narrowest_bits(tables: list[WidthTable]) -> float:
    """The bits of codes (and per-group codebooks) with every group at its narrowest allowed width."""
    errors, bits = _stack(tables)
    return float(torch.where(torch.isfinite(errors), bits, torch.full_like(bits, float("inf"))).amin(dim=1).sum())


def _choose(errors: torch.Tensor, bits: torch.Tensor, lam: float) -> torch.Tensor:
    return (errors + lam * bits).argmin(dim=1)


def _bisect(
    errors: torch.Tensor,
    bits: torch.Tensor,
    choose: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
    too_low: Callable[[float, float], bool],
    low: float,
    high: float,
    geometric: bool = False,
    grow_to: float | None = None,
) -> tuple[float, float]:
    """``(low, high)`` narrowed around the parameter ``p`` where ``too_low`` turns False.

    ``choose(errors, bits, p)`` gives every group's column at ``p`` (for any rows of the two
    tables); ``too_low(total bits, total error)`` judges that choice and is monotone in ``p``.
    With ``grow_to``, ``high`` first grows fourfold (up to ``grow_to``) until it is not too low;
    then :data:`BISECTION_STEPS` halvings (of the ratio with ``geometric``).

    Every group's chosen bits move one way as ``p`` grows (the bit price of the Lagrangian choice,
    QAQ's error tolerance) and its widths have distinct bits, so a group whose choice is the same
    at both ends of the bracket keeps it in between: every :data:`SETTLE_EVERY` steps those
    groups' bits and errors are summed once and left out of later steps. The bracket is the one
    evaluating every group at every step gives (the bits of a group are whole numbers: their
    float64 sums are exact in any order), in a fraction of the time.
    """
    settled_bits, settled_error = 0.0, 0.0

    def judged(p: float) -> bool:
        choice = choose(errors, bits, p)
        rows = torch.arange(len(choice))
        return too_low(
            settled_bits + float(bits[rows, choice].sum()), settled_error + float(errors[rows, choice].sum())
        )

    while grow_to is not None and judged(high) and high < grow_to:
        high *= 4.0
    for step in range(BISECTION_STEPS):
        if step and step % SETTLE_EVERY == 0:
            at_high = choose(errors, bits, high)
            settled = choose(errors, bits, low) == at_high
            rows = settled.nonzero().squeeze(1)
            settled_bits += float(bits[rows, at_high[rows]].sum())
            settled_error += float(errors[rows, at_high[rows]].sum())
            errors, bits = errors[~settled], bits[~settled]
        middle = (low * high) ** 0.5 if geometric else (low + high) / 2
        if judged(middle):
            low = middle
        else:
            high = middle
    return low, high


def allocate_bits(tables: list[WidthTable], budget_bits: float) -> list[torch.Tensor]:
    """Widths minimizing the total error with at most ``budget_bits`` bits of codes.

    Args:
        tables: one :class:`WidthTable` per tensor.
        budget_bits: bits available for the groups' codes (and per-group codebooks).

    Returns:
        One int64 ``(n_groups,)`` tensor of widths per table.

    Raises:
        InvalidInputError: the budget is below what every group at width 0 costs.
    """
    errors, bits = _stack(tables)
    rows = torch.arange(len(errors))
    if narrowest_bits(tables) > budget_bits + 1e-6:
        raise InvalidInputError(
            "the bit budget is below what the file needs with every group at its narrowest width "
            "(lower `bits_min` or `recent_tokens`, or give more bits)"
        )
    # the bit price lambda: the budget is reachable (checked above), so a large enough price fits it
    _, high = _bisect(errors, bits, _choose, lambda total, _: total > budget_bits, 0.0, 1.0, grow_to=1e250)
    choice = _choose(errors, bits, high)
    choice = _spend_rest(errors, bits, choice, budget_bits - float(bits[rows, choice].sum()))
    return _split(choice, tables)


def allocate_error(tables: list[WidthTable], max_relative_error: float) -> list[torch.Tensor]:
    """The fewest bits whose total error stays at most ``max_relative_error`` times the total energy.

    Raises:
        InvalidInputError: the error bound is not reachable even at the widest width.
    """
    errors, bits = _stack(tables)
    allowed = max_relative_error * sum(t.energy for t in tables)
    if float(errors.min(dim=1).values.sum()) > allowed:
        raise InvalidInputError(
            f"relative error {max_relative_error:g} is out of reach: the widest widths give "
            f"{float(errors.min(dim=1).values.sum()) / max(sum(t.energy for t in tables), 1e-300):.3g}"
        )
    # the largest bit price whose error still fits: cheaper widths as long as the bound allows
    low, _ = _bisect(errors, bits, _choose, lambda _, error: error <= allowed, 0.0, 1.0, grow_to=1e30)
    return _split(_choose(errors, bits, low), tables)


def _spend_rest(errors: torch.Tensor, bits: torch.Tensor, choice: torch.Tensor, left: float) -> torch.Tensor:
    """Spend the bits left: in rounds, upgrade groups to the affordable width with the best error
    decrease per bit, best ratio first, until nothing more fits."""
    rows = torch.arange(len(errors))
    choice = choice.clone()
    for _ in range(errors.shape[1]):
        if left <= 0 or not len(errors):
            break
        now_error, now_bits = errors[rows, choice], bits[rows, choice]
        extra_bits = bits - now_bits[:, None]
        gain = now_error[:, None] - errors
        usable = (extra_bits > 0) & (gain > 0) & (extra_bits <= left)
        ratio = torch.where(usable, gain / extra_bits.clamp_min(1e-12), torch.zeros_like(gain))
        best = ratio.argmax(dim=1)
        best_ratio, cost = ratio[rows, best], extra_bits[rows, best]
        order = torch.argsort(best_ratio, descending=True)
        order = order[best_ratio[order] > 0]
        if not len(order):
            break
        taken = order[torch.cumsum(cost[order], 0) <= left]
        if not len(taken):
            break
        choice[taken] = best[taken]
        left -= float(cost[taken].sum())
    return choice


ALLOCATORS = ("target", "importance", "qaq")
#: The default narrowest width of ``qaq``: no group is dropped to width 0. With 0 its tolerances
#: (error times attention) leave 43 % of the groups at width 0, and at 3.0 bits per element
#: ΔPPL is +86 % on the standard benchmark instead of +4.3 % (docs/allocation.md).
QAQ_BITS_MIN = 1
#: Flat keys of an allocation (sweep runs, config files).
ALLOCATION_KEYS = ("allocate", "target_bits", "max_error", "target_error", "bits_min", "bits_max", "recent_tokens")


@dataclass(frozen=True)
class Allocation:
    """How a file's bits are spread over its groups.

    Attributes:
        method: ``target`` (rate control on measured errors; more allocators in docs/).
        target_bits: bits per element of K/V of the written file to land on: file bytes * 8 / K/V
            elements, every byte counted (after the entropy stage, header included), within 2 %
            (:mod:`kvpack.allocation.fit`).
        max_error: instead, the largest mean over the file's K/V tensors of the decoded file's
            relative squared error ``||x - x_hat||^2 / ||x||^2`` (what compress reports per tensor).
            The solver spends bits by its own terms (``sum w (x - x_hat)^2 / sum w x^2`` over the
            coded values, with the attention weights ``w`` when there are statistics, else 1) and
            its bound is tightened until the decoded file meets ``max_error``.
        bits_min, bits_max: the narrowest and widest width a group may get (0 to 8). ``bits_min``
            defaults to :data:`QAQ_BITS_MIN` for ``qaq`` (measured: its attention-squared tolerances
            drop 43 % of the groups to width 0 otherwise; docs/allocation.md), 0 for the others.

    Raises:
        InvalidInputError: an unknown method, neither or both budgets, or widths out of range.
    """

    method: str = "target"
    target_bits: float | None = None
    max_error: float | None = None
    target_error: float | None = None
    bits_min: int | None = None
    bits_max: int = 8
    recent_tokens: int = 0

    def __post_init__(self) -> None:
        if self.bits_min is None:
            object.__setattr__(self, "bits_min", self.default_widths()[0])
        for name in ("target_bits", "max_error", "target_error"):
            value = getattr(self, name)
            if value is not None and (type(value) not in (int, float)):
                raise InvalidInputError(f"{name} must be a number, got {value!r}")
        for name in ("bits_min", "bits_max", "recent_tokens"):
            if type(getattr(self, name)) is not int:
                raise InvalidInputError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.method not in ALLOCATORS:
            raise InvalidInputError(f"`allocate` must be one of {', '.join(ALLOCATORS)}, got {self.method!r}")
        budget = self.target_error if self.method == "qaq" else self.max_error
        other = self.max_error if self.method == "qaq" else self.target_error
        flag = "`target_error`" if self.method == "qaq" else "`max_error`"
        if other is not None:
            raise InvalidInputError(
                f"`allocate={self.method}` takes `target_bits` or {flag}, not "
                + ("`max_error`" if self.method == "qaq" else "`target_error`")
            )
        if (self.target_bits is None) == (budget is None):
            raise InvalidInputError(f"`allocate={self.method}` needs exactly one of `target_bits` and {flag}")
        if self.target_error is not None and not 0 < self.target_error < 1e6:
            raise InvalidInputError(f"`target_error` must be a positive number, got {self.target_error}")
        if type(self.recent_tokens) is not int or self.recent_tokens < 0:
            raise InvalidInputError(f"`recent_tokens` must be a non-negative integer, got {self.recent_tokens!r}")
        if self.target_bits is not None and not 0 < self.target_bits <= 64:
            raise InvalidInputError(
                f"`target_bits` must be a number of bits per element above 0, got {self.target_bits}"
            )
        if self.max_error is not None and not 0 < self.max_error < 1:
            raise InvalidInputError(f"`max_error` must be a relative squared error in (0, 1), got {self.max_error}")
        if not 0 <= self.bits_min <= self.bits_max <= 8:
            raise InvalidInputError(
                f"`bits_min` / `bits_max` must satisfy 0 <= min <= max <= 8, got {self.bits_min} / {self.bits_max}"
            )

    def default_widths(self) -> tuple[int, int]:
        """The width range when none is given: ``(QAQ_BITS_MIN, 8)`` for ``qaq``, ``(0, 8)`` otherwise."""
        return (QAQ_BITS_MIN if self.method == "qaq" else 0), 8

    def _budget(self) -> tuple[str, float]:
        """Which budget was given: ``("bits", B)``, ``("error", E)`` (qaq) or ``("maxerr", E)``."""
        if self.target_bits is not None:
            return "bits", self.target_bits
        return ("error", self.target_error) if self.target_error is not None else ("maxerr", self.max_error)

    def _limited(self) -> bool:
        return (self.bits_min, self.bits_max) != self.default_widths()

    def describe(self) -> str:
        """``target 2.5 bits per element`` / ``fewest bits for relative error 0.01``, with the width range."""
        kind, value = self._budget()
        goal = {"bits": f"{value:g} bits per element", "error": f"error tolerance {value:g}"}
        text = f"widths allocated ({self.method}) for " + goal.get(kind, f"relative error {value:g}")
        return text + (f" ({self.bits_min}-{self.bits_max} bits)" if self._limited() else "")

    def label(self) -> str:
        """``target2.5``, ``maxerr0.01``, with ``w1-6`` when the widths are limited."""
        kind, value = self._budget()
        text = self.method + {"bits": "", "error": " err", "maxerr": " maxerr"}[kind] + f"{value:g}"
        text += f" w{self.bits_min}-{self.bits_max}" if self._limited() else ""
        return text + (f" recent{self.recent_tokens}" if self.recent_tokens else "")

    @classmethod
    def from_flat(cls, options: dict, flags: dict[str, str] | None = None) -> Allocation | None:
        """An allocation from the flat keys of :data:`ALLOCATION_KEYS` (popped from ``options``);
        ``None`` when none is given. ``flags`` names the keys in the error (CLI flags).

        Raises:
            InvalidInputError: budgets without ``allocate``, or bad values.
        """
        given = {key: options.pop(key) for key in ALLOCATION_KEYS if key in options}
        if not given:
            return None
        if "allocate" not in given:
            named = [flags[key] for key in given] if flags else sorted(given)
            raise InvalidInputError(f"{', '.join(named)} need {flags['allocate'] if flags else '`allocate`'}")
        return cls(given.pop("allocate"), **given)

    def restrict(self, table: WidthTable) -> WidthTable:
        """``table`` with only the widths in ``[bits_min, bits_max]``.

        Raises:
            InvalidInputError: no width of the codec above 0 is in the range (unless ``bits_max`` is 0:
                every group keeps only its zero-point).
        """
        keep = [i for i, w in enumerate(table.widths) if self.bits_min <= w <= self.bits_max]
        if not any(table.widths[i] for i in keep) and self.bits_max > 0:
            raise InvalidInputError(
                f"no width of this codec ({', '.join(map(str, table.widths[1:]))}) lies in "
                f"[{self.bits_min}, {self.bits_max}]"
            )
        return WidthTable(tuple(table.widths[i] for i in keep), table.errors[:, keep], table.bits[keep], table.energy)


def width_costs(config, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Bits of codes and codebooks at each candidate width: ``(per group, per tensor when the width occurs)``,
    both float64 ``(len(candidate_widths),)``."""

    codec = config.make_codec()

    def bits_of(width: int, n_groups: int) -> float:
        specs = codec.at_width(width).section_specs(width_layout(layout, n_groups))
        return float(
            sum(
                s.count * (s.bits if s.dtype == "code" else 8 * DTYPE_SIZES[s.dtype])
                for name, s in specs.items()
                if name.startswith(("codes", "codebook"))
            )
        )

    per_group, fixed = [], []
    for width in candidate_widths(config):
        one, two = (bits_of(width, 1), bits_of(width, 2)) if width else (0.0, 0.0)
        per_group.append(two - one)
        fixed.append(one - (two - one))  # codebooks shared by the groups of the width
    return torch.tensor(per_group, dtype=torch.float64), torch.tensor(fixed, dtype=torch.float64)


@dataclass
class GroupStats:
    """The attention statistics of one tensor's groups (:mod:`kvpack.allocation.importance`), in group order.

    Attributes:
        role: ``key`` or ``value``.
        attention: float32 ``(n_groups,)``: the largest ``a_t`` of the group's tokens.
        logit_gain: float32 ``(n_groups,)``: ``scale * |q|`` of the group's heads (largest): the
            standard deviation of a logit's change per unit of RMS key error.
        weights: float32 ``(n_groups, group_size)``: importance of each value.
        min_attention: the floor of ``attention`` (``1 / seq_len``: uniform attention).
    """

    role: str
    attention: torch.Tensor
    logit_gain: torch.Tensor
    weights: torch.Tensor
    min_attention: float


def entry_table(
    allocation: Allocation,
    config,
    groups: torch.Tensor,
    layout,
    mask: torch.Tensor | None,
    stats: GroupStats | None,
) -> tuple[WidthTable, torch.Tensor]:
    """One tensor's :class:`WidthTable` for ``allocation.method`` (before :meth:`Allocation.restrict`),
    and the per-tensor codebook bits of each width.

    - ``target``: the measured squared error of each group at each width, weighted by the
      importance of each value when statistics are given, relative to the tensor's (weighted) energy.
    - ``importance``: a model: ``I_g * G * var_g * e(w)``, the group's variance times its mean
      importance ``I_g`` times the codec's measured error per unit of variance at width ``w`` over
      the whole tensor (``e(w)`` is about ``4^-w`` for a uniform grid at high rate; measuring it
      keeps a 1-bit uniform grid, worse than width 0, from being handed out), relative to the
      tensor's weighted energy.
    - ``qaq``: the measured largest error ``|x - x_hat|`` of each group at each width, over the
      group's tolerance unit (QAQ, arXiv 2403.04643): values ``rms(v) / a_g``, keys ``1 / (a_g *
      logit_gain_g)``; a group gets the narrowest width whose ratio is within the error ``E``. A
      width whose squared error over the tensor is above a narrower width's is left out.

    Raises:
        InvalidInputError: ``importance`` or ``qaq`` without attention statistics.
    """

    if allocation.method != "target" and stats is None:
        raise InvalidInputError(
            f"`allocate={allocation.method}` needs attention statistics: make the dump with them "
            "(kvpack dump --attention-stats, or dump_cache(attention_stats=N); kvpack eval computes them itself)"
        )
    per_group, per_tensor = width_costs(config, layout)
    inlier = torch.ones_like(groups) if mask is None else mask.to(groups.dtype)
    if allocation.method == "target":
        weights = None if stats is None else stats.weights
        widths, errors, _ = width_errors(config, groups, layout, mask, weights)
        energy = float(((groups.double() ** 2) * (1 if weights is None else weights) * inlier).sum())
        errors = errors / max(energy, 1e-300)
    elif allocation.method == "importance":
        widths, measured, _ = width_errors(config, groups, layout, mask)
        count = inlier.sum(dim=1).clamp_min(1)
        mean = (groups * inlier).sum(dim=1) / count
        spread = (((groups - mean[:, None]) ** 2) * inlier).sum(dim=1).double()  # G * variance
        profile = measured.sum(dim=0) / spread.sum().clamp_min(1e-300)  # the codec's error per unit variance
        importance = ((stats.weights * inlier).sum(dim=1) / count).double()
        errors = (importance * spread)[:, None] * profile[None, :]
        errors = errors / max(float((stats.weights.double() * groups.double() ** 2 * inlier).sum()), 1e-300)
    else:
        widths, squared, largest = width_errors(config, groups, layout, mask, max_abs=True)
        # a width whose squared error over the tensor is above a narrower width's (a 1-bit
        # asymmetric grid against the mean) is never handed out: its largest error is smaller, its error is not
        profile = squared.sum(dim=0)
        best_narrower = torch.cat([profile.new_full((1,), float("inf")), torch.cummin(profile, dim=0).values[:-1]])
        dominated = profile > best_narrower
        attention = stats.attention.clamp_min(stats.min_attention).double()
        if stats.role == "value":
            rms = float(((groups.double() ** 2) * inlier).sum() / inlier.sum().clamp_min(1))
            unit = rms**0.5 / attention
        else:
            unit = 1.0 / (attention * stats.logit_gain.double().clamp_min(1e-30))
        errors = torch.where(largest > 0, largest / unit.clamp_min(1e-300)[:, None], torch.zeros_like(largest))
        errors[:, dominated] = float("inf")
    return WidthTable(widths, errors, per_group, 1.0), per_tensor


def keep_recent_widest(table: WidthTable, recent: torch.Tensor) -> WidthTable:
    """``table`` with the ``recent`` groups (bool ``(n_groups,)``) held at its widest width (QAQ keeps
    the most recent tokens at full width)."""
    if bool(recent.any()):
        table.errors[recent, :-1] = float("inf")
    return table


def allocate_qaq(
    tables: list[WidthTable], budget_bits: float | None, target_error: float | None = None
) -> list[torch.Tensor]:
    """QAQ's rule: each group the narrowest width whose error ratio is at most ``E``; ``E`` is
    ``target_error``, or the smallest one whose widths fit ``budget_bits``."""
    errors, bits = _stack(tables)
    rows = torch.arange(len(errors))

    def choose_in(errors: torch.Tensor, bits: torch.Tensor, error: float) -> torch.Tensor:
        feasible = errors <= error
        first = feasible.double().argmax(dim=1)  # first True; 0 when none is
        widest_usable = (torch.isfinite(errors).long() * torch.arange(errors.shape[1])).argmax(dim=1)  # never left-out
        return torch.where(feasible.any(dim=1), first, widest_usable)

    def choose(error: float) -> torch.Tensor:
        return choose_in(errors, bits, error)

    if target_error is not None:
        return _split(choose(target_error), tables)
    if narrowest_bits(tables) > budget_bits + 1e-6:
        raise InvalidInputError(
            "the bit budget is below what the narrowest widths need (lower `bits_min` or `recent_tokens`, "
            "or give more bits)"
        )
    positive = errors[torch.isfinite(errors) & (errors > 0)]
    low = float(positive.min()) / 2 if positive.numel() else 1e-30
    high = float(positive.max()) * 2 if positive.numel() else 1.0
    if float(bits[rows, choose(low)].sum()) <= budget_bits:
        return _split(choose(low), tables)
    _, high = _bisect(errors, bits, choose_in, lambda total, _: total > budget_bits, low, high, geometric=True)
    return _split(choose(high), tables)
