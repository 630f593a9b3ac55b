"""Rich rendering of reports: tables on stdout, progress on stderr, JSON output."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.segment import Segments
from rich.table import Table

from kvpack.jsonable import json_safe

#: API option name -> (flag, its negative form, is a flag): set by :mod:`kvpack.cli.app` for the running command.
flag_table: Callable[[], dict[str, tuple[str, str | None, bool]]] | None = None
_OPTION = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")


def cli_terms(message: str) -> str:
    """A library message in the command line's words: the API options it names (``target_bits``,
    ``force=True``; :func:`kvpack.errors.option`) become flags (``--target-bits``, ``--force``)."""
    if flag_table is None or not _OPTION.search(message):  # the table builds every command's options
        return message
    table = flag_table()

    def flag(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        if name not in table:
            return name if value is None else f"{name}={value}"
        long, negative, is_flag = table[name]
        if value is None:
            return long
        if is_flag:
            return long if value == "True" else negative or f"no {long}"
        return f"{long} {value}"

    return _OPTION.sub(flag, message)


console = Console()
err_console = Console(stderr=True)

#: Columns that may wrap (free text) keep at least this many characters per line in a terminal.
FOLD_FLOOR = 16
_UNBOUNDED = 1 << 16


def print_table(table: Table) -> None:
    """Print ``table`` with every cell whole, whatever the terminal's width or when stdout is not one.

    Rich shrinks a table that is wider than the console and cuts cells with an ellipsis
    (``scal…``, ``4.0…``). Here the console is never narrower than the table needs:
    - not a terminal (a pipe, a log): the table's natural width, one line per row;
    - a terminal: its width, or more when the ``no_wrap`` columns (numbers) do not fit in it
      beside the other (text) columns at :data:`FOLD_FLOOR` characters; text columns then
      wrap, at spaces or within a word (``overflow="fold"``), and are never cut either.
    Lines wider than the terminal are left to it to wrap.
    """
    for column in table.columns:
        if not column.no_wrap and column.overflow == "ellipsis":
            column.overflow = "fold"
    width = needed_width(table, wrap=console.is_terminal)
    if width <= console.width:
        console.print(table)
    else:  # rendered wider than the console (Console.print never widens), printed uncropped
        console.print(Segments(console.render(table, console.options.update_width(width))), crop=False)


def needed_width(table: Table, wrap: bool) -> int:
    """Columns of output ``table`` needs to print every cell whole: its natural width, or with
    ``wrap`` the width at which only its text (not ``no_wrap``) columns wrap, down to :data:`FOLD_FLOOR`."""
    options = console.options.update_width(_UNBOUNDED)
    natural = Measurement.get(console, options, table).maximum
    if not wrap:
        return natural
    slack = 0
    for column in table.columns:
        if not column.no_wrap:
            widest = max(Measurement.get(console, options, cell).maximum for cell in (column.header, *column.cells))
            slack += max(0, widest - FOLD_FLOOR)
    return natural - slack


@contextmanager
def progress_bar(description: str) -> Iterator:
    """Yield a ``callback(done, total, label)`` that drives a transient progress bar on stderr."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[label]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=None, label="")

        def update(done: int, total: int, label: str = "") -> None:
            progress.update(task, completed=done, total=total, label=label)

        yield update


def write_json(path: Path, data: dict, force: bool = True) -> None:
    from kvpack.formats.atomic import atomic_output

    with atomic_output(path, force=force) as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=2) + "\n", encoding="utf-8")


def print_json(data: dict) -> None:
    console.print_json(json.dumps(json_safe(data)))


def fmt_sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"


def fmt_num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def bits_table(title: str, rows: list[tuple[str, dict]]) -> Table:
    """Rows of ``(label, row dict)``: bits per element by section kind, total, ratio vs fp16."""
    from kvpack.report import BIT_COLUMNS

    table = Table(title=escape(title), title_justify="left")
    table.add_column("part", no_wrap=True)
    for column in BIT_COLUMNS:
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("total", justify="right", style="bold", no_wrap=True)
    table.add_column("vs fp16", justify="right", no_wrap=True)
    for label, row in rows:
        bits = row["bits_per_element"]
        ratio = row.get("ratio_vs_fp16")
        cells = [escape(label)] + [fmt_num(bits[c]) for c in BIT_COLUMNS]
        cells += [fmt_num(bits["total"]), "-" if ratio is None else f"{ratio:.2f}x"]
        table.add_row(*cells)
    return table


def error_table(title: str, rows: list[tuple[str, dict]]) -> Table:
    """Rows of ``(label, row dict)``: element count, stored bytes (when known) and error statistics."""
    with_bytes = all("bytes" in row for _, row in rows)
    weighted = any("estimated_kl" in row for _, row in rows)
    table = Table(title=escape(title), title_justify="left")
    columns = ["part", "elements"] + (["bytes"] if with_bytes else []) + ["rel MSE", "SNR dB", "max|err|", "cosine"]
    columns += ["est. KL"] if weighted else []
    for column in columns:
        table.add_column(column, justify="left" if column == "part" else "right", no_wrap=True)
    for label, row in rows:
        cells = [escape(label), f"{row['elements']:,}"] + ([human_bytes(row["bytes"])] if with_bytes else [])
        cells += [
            fmt_sci(row["rel_mse"]),
            fmt_num(row["snr_db"], 2),
            fmt_num(row["max_abs_err"], 4),
            fmt_num(row["cosine_mean"], 5),
        ]
        cells += [fmt_sci(row.get("estimated_kl"))] if weighted else []
        table.add_row(*cells)
    return table


def report_rows(report: dict, per_layer: bool) -> list[tuple[str, dict]]:
    rows = [(name, report["rows"][name]) for name in ("key", "value", "all")]
    if per_layer:
        rows += [(f"layer {row['layer']}", row) for row in report["layers"]]
    return rows


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return str(n)


def say(text: str) -> None:
    """One line of plain output on stdout (not wrapped, so it can be grepped)."""
    console.print(text, soft_wrap=True, highlight=False, markup=False)


def quality_table(title: str, results: list[dict], pareto: bool = False) -> Table:
    """One row per evaluated method: bits per element (dense, and after the entropy stage), PPL, ΔPPL %, KL,
    top-1, attention error."""
    from rich import box

    table = Table(title=escape(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("method", "bits", "eff.", "PPL", "ΔPPL%", "KL", "top1%", "attn"):
        if column == "method":
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, justify="right", no_wrap=True)
    for r in results:
        label = ("* " if r.get("pareto") else "  ") + r["label"] if pareto else r["label"]
        table.add_row(
            escape(label),
            fmt_num(r["bits_per_element"]),
            fmt_num(r.get("effective_bits_per_element", r["bits_per_element"])),
            fmt_num(r["ppl"], 2),
            f"{r['delta_ppl_pct']:+.2f}",
            f"{r['kl_mean']:.4f}",
            fmt_num(r["top1_agreement_pct"], 1),
            fmt_num(r["attention_error_mean"], 4),
        )
    return table


def entropy_summary(row: dict) -> str | None:
    """One line on what the entropy stage saved for a size row (``rows.all`` of a report), or None."""
    dense, stored = row.get("dense_bits_per_element", 0.0), row["bits_per_element"]["total"]
    if not row["elements"] or dense <= stored:
        return None
    return (
        f"entropy stage: {dense:.3f} -> {stored:.3f} bits per element "
        f"({100 * (1 - stored / dense):.1f}% fewer than dense packing)"
    )


def allocation_summary(reached: dict) -> list[str]:
    """What rate control reached (a report's ``allocation``): the file's bits per element of K/V beside
    ``--target-bits`` (or the decoded file's error beside ``--max-error``), then a ``warning:`` line
    when the target was out of reach."""
    files = f"{reached['files_measured']} candidate file{'s' if reached['files_measured'] != 1 else ''} measured"
    if reached.get("target_bits") is not None:
        line = (
            f"rate control: the file holds {reached['file_bits_per_element']:.3f} bits per element of K/V for "
            f"--target-bits {reached['target_bits']:g} ({files}; dense budget {reached['dense_bits_per_element']:.3f})"
        )
    else:
        line = (
            f"rate control: the decoded file's mean relative error over the K/V tensors is "
            f"{reached['mean_rel_mse']:.4g} for --max-error {reached['max_error']:g} ({files})"
        )
    return [line] + ([f"warning: {cli_terms(reached['note'])}"] if reached.get("note") else [])
