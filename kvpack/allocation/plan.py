"""The per-file bit allocation plan: every group's error at every width, handed to the solver.

Reads each K/V entry once, measures its groups (:mod:`kvpack.transforms.mixed`), weights them
by attention statistics where the dump has them (:mod:`kvpack.allocation.importance`), and asks
the solver (:mod:`kvpack.allocation.solver`) for a width per group within a dense budget, counting
the header and shared codebooks as the file will store them (:mod:`kvpack.formats.layout`). Rate
control (:mod:`kvpack.allocation.fit`) then moves that dense budget until the written file, after
the entropy stage, lands on ``target_bits``, and checks ``max_error`` on the decoded file
(:mod:`kvpack.allocation.measure`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpack.allocation.fit import Fitted, fit_error, fit_file_bits
from kvpack.allocation.importance import importance_weights, layer_statistics
from kvpack.allocation.measure import FileMeasure
from kvpack.allocation.solver import (
    Allocation,
    GroupStats,
    WidthTable,
    allocate_bits,
    allocate_error,
    allocate_qaq,
    entry_table,
    keep_recent_widest,
    narrowest_bits,
)
from kvpack.config import CodecConfig
from kvpack.dtypes import DTYPE_SIZES, check_finite, dtype_name
from kvpack.entry import stack
from kvpack.errors import InvalidInputError
from kvpack.formats.constants import PREAMBLE_SIZE
from kvpack.formats.entropy import EntropyConfig
from kvpack.formats.header import spec_nbytes
from kvpack.formats.layout import header_and_padding
from kvpack.grouping import to_groups
from kvpack.names import parse_kv_name
from kvpack.transforms.plan import plan_for, stacked_view


@dataclass(frozen=True)
class WidthMap:
    """The allocator's output: the code width of every group (int64 ``(n_groups,)``, 0 to 8) of each
    quantized entry it allocated; other entries keep the file's fixed width. ``summary`` says what
    rate control reached (:func:`_summary`; empty without a bits or ``max_error`` budget)."""

    widths: dict[str, torch.Tensor] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def codec_for(self, name: str, codec: CodecConfig | None) -> tuple[CodecConfig | None, torch.Tensor | None]:
        """The codec config entry ``name`` is written with (mixed precision where allocated) and its group widths."""
        widths = self.widths.get(name)
        if widths is None or codec is None:
            return codec, None
        return codec.with_widths(widths), widths


def allocate_entries(
    layout: list[tuple[str, list[str], CodecConfig | None]],
    shapes: dict[str, tuple[tuple[int, ...], str]],
    get: Callable[[str], torch.Tensor],
    config: CodecConfig | None,
    allocation: Allocation | None,
    stats: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
    entropy: EntropyConfig | None = None,
) -> WidthMap:
    """The :class:`WidthMap` of a file (empty without an allocation); see :func:`allocate_widths`."""
    if allocation is None or config is None:
        return WidthMap()
    return allocate_widths(layout, shapes, get, config, allocation, stats, metadata or {}, entropy)


def allocate_widths(
    layout: list[tuple[str, list[str], CodecConfig | None]],
    shapes: dict[str, tuple[tuple[int, ...], str]],
    get: Callable[[str], torch.Tensor],
    config: CodecConfig,
    allocation: Allocation,
    stats: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
    entropy: EntropyConfig | None = None,
) -> WidthMap:
    """Per quantized entry, the width of every group (:mod:`kvpack.allocation.solver`).

    Reads every K/V tensor once (``get``) and measures each group's error at every width; then
    encodes the file a few times (:mod:`kvpack.allocation.fit`, each time reading the tensors again):

    - ``target_bits``: the file written with ``metadata`` and ``entropy`` (every byte, header
      included, after the entropy stage) lands within 2 % of ``target_bits`` bits per element of
      K/V; when no widths can (a target above the widest widths, or widths in coarse steps on a
      tiny cache), on the closest size below it, and :attr:`WidthMap.summary` says so in ``note``;
    - ``max_error``: the decoded file's mean over the K/V tensors of ``||x - x_hat||^2 / ||x||^2``
      is at most ``max_error`` (the solver's bound is tightened until it is).

    Args:
        layout: the file's entries (:func:`entry_layout`).
        shapes: tensor name -> ``(shape, dtype name)``.
        get: tensor name -> tensor.
        metadata: the file's metadata, exactly as the writer gets it (its header is counted).
        entropy: the file's entropy stage (default: :class:`EntropyConfig`'s).
        stats: attention statistics (:mod:`kvpack.allocation.importance`); ``target`` weights each value's
            error by what it costs the attention output with them, and counts every tensor's
            relative error alike without; ``importance`` and ``qaq`` need them.

    Raises:
        InvalidInputError: a target below the file of the narrowest usable widths, an error bound
            the widest widths miss, or an allocator that needs missing statistics.
    """

    kv_elements = sum(math.prod(shapes[n][0]) for _, sources, codec in layout if codec is not None for n in sources)
    if not kv_elements:
        raise InvalidInputError("bit allocation needs K/V values: the cache holds none")
    metadata, entropy = metadata or {}, EntropyConfig() if entropy is None else entropy  # as the writer takes them
    tables, tensor_costs, fixed_bits, entries, codecs = {}, {}, 0.0, {}, {}
    for entry_name, sources, codec in layout:
        if codec is None:
            shape, dtype = shapes[entry_name]
            entries[entry_name] = (entry_name, shape, dtype, None)
            fixed_bits += 8 * math.prod(shape) * DTYPE_SIZES[dtype]
            continue
        x = get(sources[0]) if entry_name == sources[0] else stack(get, sources)
        check_finite(entry_name, x, config.stack_layers)
        entries[entry_name] = (entry_name, tuple(x.shape), dtype_name(x.dtype), None)
        codecs[entry_name] = codec  # the run's config, with the entry's own rotary parameters
        plan = plan_for(tuple(x.shape), dtype_name(x.dtype), entry_name, codec)
        _, groups, mask = plan.prepare(stacked_view(x) if config.stack_layers else x)
        group_stats = _group_stats(plan, sources, stats or {}, codec)
        table, per_tensor = entry_table(allocation, codec, groups, plan.layout, mask, group_stats)
        all_widths = table.widths
        table = allocation.restrict(table)
        if allocation.recent_tokens:
            table = keep_recent_widest(table, _recent_groups(plan, sources, allocation.recent_tokens))
        tables[entry_name] = table
        tensor_costs[entry_name] = per_tensor[[all_widths.index(w) for w in table.widths]]
        # everything but codes and codebooks: as a file with every group at one width stores it
        full = codec.with_widths(_counts_at(plan.layout.n_groups, table.widths[-1]))
        specs = plan_for(tuple(x.shape), dtype_name(x.dtype), entry_name, full).section_specs()
        fixed_bits += sum(8 * spec_nbytes(s) for n, s in specs.items() if not n.startswith(("codes", "codebook")))
    fixed_bits += 8 * PREAMBLE_SIZE
    names = list(tables)
    ordered = [tables[n] for n in names]

    def present_cost(present: list[torch.Tensor], chosen: list[torch.Tensor] | None = None) -> float:
        """Bits that depend on which widths occur (bool masks over each table's widths): shared
        codebooks, and the header with a section per width (sized with the counts of ``chosen``
        when given, else with stand-in counts)."""
        listed = []
        for name, shape, dtype, _ in entries.values():
            codec = None
            if name in tables:
                index = names.index(name)
                if chosen is not None:
                    counts = torch.bincount(chosen[index], minlength=9).tolist()
                else:
                    counts = [0] * 9
                    for width, used in zip(tables[name].widths, present[index].tolist(), strict=True):
                        counts[width] = int(used)
                    if 1 in counts:  # the rest of the groups at the narrowest width present
                        counts[counts.index(1)] += tables[name].n_groups - sum(counts)
                codec = codecs[name].with_widths(tuple(counts))
            listed.append((name, shape, dtype, codec))
        shared = sum(float(tensor_costs[n][m].sum()) for n, m in zip(names, present, strict=True))
        return shared + 8.0 * sum(header_and_padding(metadata, listed, entropy))

    measure = FileMeasure(layout, get, metadata, entropy)

    def file_bits(chosen: list[torch.Tensor]) -> float:
        return 8 * measure.measure(dict(zip(names, chosen, strict=True)))[0] / kv_elements

    def file_error(chosen: list[torch.Tensor]) -> float:
        return measure.measure(dict(zip(names, chosen, strict=True)), errors=True)[1]

    usable = [torch.isfinite(t.errors) for t in ordered]
    if allocation.target_bits is not None:
        narrowest = [u.to(torch.int8).argmax(dim=1) for u in usable]  # column of each group's narrowest width
        needed_mask = [torch.bincount(c, minlength=len(t.widths)) > 0 for c, t in zip(narrowest, ordered, strict=True)]
        narrowest_widths = [torch.tensor(t.widths)[c] for c, t in zip(narrowest, ordered, strict=True)]
        lowest = (fixed_bits + present_cost(needed_mask, narrowest_widths) + narrowest_bits(ordered)) / kv_elements
        if not math.isfinite(lowest):
            raise InvalidInputError(
                f"no width in [{allocation.bits_min}, {allocation.bits_max}] is usable for every group "
                "(qaq leaves out a width whose error is above a narrower one's): widen `bits_min` / `bits_max`"
            )
        allocate = allocate_qaq if allocation.method == "qaq" else allocate_bits

        def widths_in(chosen: list[torch.Tensor]) -> list[torch.Tensor]:
            return [torch.isin(torch.tensor(t.widths), w) for w, t in zip(chosen, ordered, strict=True)]

        def total(chosen: list[torch.Tensor]) -> float:
            codes = sum(
                float(t.bits[torch.searchsorted(torch.tensor(t.widths), w)].sum())
                for w, t in zip(chosen, ordered, strict=True)
            )
            return present_cost(widths_in(chosen), chosen) + codes

        def subset(used: list[torch.Tensor], present: list[torch.Tensor]) -> bool:
            return all(bool((u <= m).all()) for u, m in zip(used, present, strict=True))

        def solve(dense: float) -> list[torch.Tensor]:
            """Widths within ``dense`` bits per element of densely packed file (estimated before writing).

            Shared codebooks and the header's sections cost bits per width that occurs, which the
            per-group allocators do not see. Rounds charge a set of widths and allocate the rest of
            the budget: (1) growing rounds charge every width chosen so far, from the narrowest,
            until a round chooses only widths charged (it then fits); (2) shrinking rounds allow
            and charge only the widths the last round chose, to spend what unused widths were
            charged. The fullest allocation within budget wins."""
            available = dense * kv_elements - fixed_bits
            candidates = []
            present = needed_mask
            for _ in range(max(len(t.widths) for t in ordered) + 1):
                chosen = allocate(ordered, max(available - present_cost(present), narrowest_bits(ordered)))
                candidates.append((total(chosen), chosen))
                used = widths_in(chosen)
                if subset(used, present):
                    break
                present = [u | m for u, m in zip(used, present, strict=True)]
            for _ in range(3):
                present = widths_in(min(candidates, key=lambda c: abs(available - c[0]))[1])
                allowed = [
                    WidthTable(t.widths, t.errors.masked_fill(~m[None, :], float("inf")), t.bits, t.energy)
                    for t, m in zip(ordered, present, strict=True)
                ]
                chosen = allocate(allowed, max(available - present_cost(present), narrowest_bits(allowed)))
                candidates.append((total(chosen), chosen))
                if all(bool((u == m).all()) for u, m in zip(widths_in(chosen), present, strict=True)):
                    break
            fitting = [c for c in candidates if c[0] <= available + 1e-6]
            return max(fitting, key=lambda c: c[0])[1] if fitting else candidates[-1][1]

        def too_low(smallest: float) -> str:
            needed = math.ceil(smallest * 1000) / 1000
            return (
                f"`target_bits={allocation.target_bits:g}` is below the {needed:.3f} bits per element this file "
                f"needs with every group at its narrowest usable width (`bits_min={allocation.bits_min}`"
                + (f", `recent_tokens={allocation.recent_tokens}`" if allocation.recent_tokens else "")
                + "): give more bits, lower `bits_min` or use larger groups"
            )

        widest = _widest(ordered, usable)
        highest = (fixed_bits + total(widest)) / kv_elements
        fitted = fit_file_bits(allocation.target_bits, solve, file_bits, lowest, highest, narrowest_widths, too_low)
    else:
        if allocation.method == "qaq":
            chosen = allocate_qaq(ordered, None, allocation.target_error)
            return WidthMap(dict(zip(names, chosen, strict=True)))

        def out_of_reach(smallest: float) -> str:
            return (
                f"`max_error={allocation.max_error:g}` is out of reach: with every group at its widest usable width "
                f"(`bits_max={allocation.bits_max}`) the file's mean relative error is {smallest:.3g}"
            )

        # each table's energy is 1: the solver's bound is the mean over the tensors
        fitted = fit_error(
            allocation.max_error,
            lambda bound: allocate_error(ordered, bound),
            file_error,
            _widest(ordered, usable),
            out_of_reach,
        )
    return WidthMap(dict(zip(names, fitted.widths, strict=True)), _summary(allocation, fitted))


def _group_view(
    plan: Any, sources: list[str], per_layer: Callable[[int, str, tuple], torch.Tensor | None]
) -> torch.Tensor | None:
    """A per-value quantity of an entry (``per_layer(layer, role, shape)`` gives it for one layer's
    ``(batch, num_kv_heads, seq_len, head_dim)`` tensor) in group layout ``(n_groups, group_size)``."""

    values = []
    for name in sources:
        layer, role = parse_kv_name(name)
        shape = plan.shape if len(sources) == 1 else (plan.shape[0], plan.shape[1] // len(sources), *plan.shape[2:])
        value = per_layer(layer, role, shape)
        if value is None:
            return None
        values.append(value)
    whole = values[0] if len(values) == 1 else stacked_view(torch.stack(values))
    start = plan.kept_first
    return to_groups(whole[:, :, start : start + plan.coded_tokens].contiguous(), plan.layout)


def _group_stats(plan: Any, sources: list[str], stats: dict[str, torch.Tensor], config: CodecConfig) -> Any:
    """The :class:`~kvpack.allocation.solver.GroupStats` of an entry, or ``None`` without statistics."""

    def weights(layer: int, role: str, shape: tuple) -> torch.Tensor | None:
        rope_dim = config.rope_dim if config.unrope and role == "key" else 0
        return importance_weights(stats, layer, role, shape, config.rotate == "hadamard", rope_dim)

    def attention(layer: int, role: str, shape: tuple) -> torch.Tensor | None:
        found = layer_statistics(stats, layer, shape)
        return None if found is None else found[0]

    def logit_gain(layer: int, role: str, shape: tuple) -> torch.Tensor | None:
        found = layer_statistics(stats, layer, shape)
        return None if found is None else found[1] * found[2]

    group_weights = _group_view(plan, sources, weights)
    if group_weights is None:
        return None
    return GroupStats(
        role=parse_kv_name(sources[0])[1],
        attention=_group_view(plan, sources, attention).amax(dim=1),
        logit_gain=_group_view(plan, sources, logit_gain).amax(dim=1),
        weights=group_weights,
        min_attention=1.0 / max(plan.shape[2], 1),
    )


def _recent_groups(plan: Any, sources: list[str], recent: int) -> torch.Tensor:
    """Bool ``(n_groups,)``: the group holds one of the last ``recent`` tokens."""

    def tokens(layer: int, role: str, shape: tuple) -> torch.Tensor:
        return torch.arange(shape[2], dtype=torch.float32)[None, None, :, None].expand(shape)

    return _group_view(plan, sources, tokens).amax(dim=1) >= plan.shape[2] - recent


def _widest(tables: list[WidthTable], usable: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every group at its widest usable width (a finite error), per table."""
    return [
        torch.tensor(t.widths)[(u.long() * torch.arange(len(t.widths))).argmax(dim=1)]
        for t, u in zip(tables, usable, strict=True)
    ]


def _summary(allocation: Allocation, fitted: Fitted) -> dict[str, Any]:
    """What rate control reached, for the report: ``target_bits`` and ``file_bits_per_element`` (the
    file's bits per element of K/V), or ``max_error`` and ``mean_rel_mse`` (the decoded file's mean
    over the K/V tensors); ``dense_bits_per_element`` (the dense budget solved for), ``files_measured``
    and ``note`` (a target out of reach, else ``None``)."""
    if allocation.target_bits is not None:
        reached = {"target_bits": allocation.target_bits, "file_bits_per_element": fitted.file_bits}
        reached["dense_bits_per_element"] = fitted.dense_bits
    else:
        reached = {"max_error": allocation.max_error, "mean_rel_mse": fitted.error}
    return {"method": allocation.method, **reached, "files_measured": fitted.files, "note": fitted.note}


def _counts_at(n_groups: int, width: int) -> tuple[int, ...]:
    return tuple(n_groups if w == width else 0 for w in range(9))
