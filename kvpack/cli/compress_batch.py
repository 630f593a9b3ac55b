"""The batch form of ``kvpack compress`` (several inputs, a directory or a pattern): a progress bar
over files, one ``error: <file>: <message>`` line per failing file, a summary table and a total."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from kvpack.allocation.solver import Allocation
from kvpack.batch import Expansion, Job, plan_outputs, record, run_jobs, same_file_key, skip_verified
from kvpack.cli.option_groups import SharedOptions
from kvpack.cli.options import json_only
from kvpack.cli.render import (
    cli_terms,
    err_console,
    fmt_num,
    fmt_sci,
    human_bytes,
    print_json,
    print_table,
    progress_bar,
    say,
)
from kvpack.config import CodecConfig
from kvpack.errors import InvalidInputError, KvpackError, error_message
from kvpack.formats.entropy import EntropyConfig


def compress_many(
    expansion: Expansion,
    output_dir: Path | None,
    shared: SharedOptions,
    config: CodecConfig,
    allocation: Allocation | None,
    workers: int,
    json_path: Path | None,
    force: bool,
    entropy: EntropyConfig | None = None,
    engine: str = "local",
    scheduler: str | None = None,
) -> None:
    """Compress every file of ``expansion`` with ``config`` (per file when ``--level`` needs its dims),
    in the local process pool or, with ``engine="dask"``, on a Dask cluster (``scheduler``, else a
    local one). An output that already exists and verifies is skipped (a rerun resumes).

    Raises:
        InvalidInputError: ``-o`` is not a directory, two files would share an output, or the
            ``--json`` file is an input or an output (all before any file is read).
        typer.Exit: code 2 when any file or argument failed.
    """
    from kvpack.formats.atomic import check_output_path
    from kvpack.sources import kv_dims
    from kvpack.storage import current_options, name_of

    outputs = plan_outputs(expansion.files, output_dir)
    json_to_stdout = json_only(json_path)
    if json_path is not None and not json_to_stdout:
        check_output_path(json_path, force)
        taken = {same_file_key(p) for p in [*expansion.files, *outputs]}
        if same_file_key(json_path) in taken:
            raise InvalidInputError(f"--json {json_path} must differ from the inputs and the outputs")

    start = time.perf_counter()
    results: list[dict] = [record(argument, None, error=message) for argument, message in expansion.errors]
    slots: list[dict | None] = []
    jobs: list[tuple[int, Job]] = []
    for path, output in zip(expansion.files, outputs, strict=True):
        try:  # --level: the group size follows each file's head count and head_dim
            file_config = config if shared["level"] is None else shared.codec(kv_dims(path))
        except (KvpackError, OSError) as exc:
            slots.append(record(path, output, error=error_message(exc)))
            continue
        job = Job(path, output, file_config, allocation, force, entropy, current_options() or None)
        done = skip_verified(job)
        if done is None:
            jobs.append((len(slots), job))
        slots.append(done)
    for failed in [*results, *(s for s in slots if s is not None and not s["ok"])]:
        _error_line(failed)

    finished = 0
    with progress_bar("compress") as update:
        update(0, len(jobs), "")

        def on_result(index: int, result: dict) -> None:
            nonlocal finished
            finished += 1
            slots[jobs[index][0]] = result
            if not result["ok"]:
                _error_line(result)
            update(finished, len(jobs), name_of(result["input"]))

        if engine == "dask":
            from kvpack.batch_dask import run_jobs_dask

            run_jobs_dask([job for _, job in jobs], scheduler=scheduler, workers=workers, on_result=on_result)
        else:
            run_jobs([job for _, job in jobs], workers, on_result)
    results += slots
    wall = time.perf_counter() - start

    if json_to_stdout:
        print_json(results)
    else:
        print_table(_summary_table(results))
        say(_total_line(results, wall))
        if json_path is not None:
            from kvpack.cli.render import write_json

            write_json(json_path, results, force=force)
    if any(not r["ok"] for r in results):
        raise typer.Exit(2)


def _error_line(result: dict) -> None:
    """``error: <file>: <message>`` on stderr, on one line (the file is not repeated when the message starts with it)."""
    where, message = result["input"], result["error"]
    message = cli_terms(message)
    line = f"error: {message}" if message.startswith(f"{where}: ") else f"error: {where}: {message}"
    err_console.print(line, soft_wrap=True, markup=False, highlight=False)


def _summary_table(results: list[dict]) -> Table:
    from rich import box

    table = Table(
        title="files (bits per element: every byte of the output counted)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,  # fits 80 columns
    )
    table.add_column("file", min_width=16, overflow="fold")
    for column in ("status", "input", "output", "bits", "vs fp16", "rel MSE", "s"):
        table.add_column(column, justify="left" if column == "status" else "right", no_wrap=True)
    for r in results:
        report = r["report"]
        if r.get("skipped"):
            table.add_row(escape(r["input"]), "skipped", *["-"] * 6)
            continue
        if report is None:
            table.add_row(escape(r["input"]), "error", *["-"] * 5, fmt_num(r["seconds"], 1) if r["seconds"] else "-")
            continue
        ratio = report["ratio_vs_fp16"]
        table.add_row(
            escape(r["input"]),
            "ok",
            human_bytes(report["input_bytes"]),
            human_bytes(report["file_bytes"]),
            fmt_num(report["rows"]["all"]["bits_per_element"]["total"]),
            "-" if ratio is None else f"{ratio:.2f}x",
            fmt_sci(report["rows"]["all"]["rel_mse"]),
            fmt_num(r["seconds"], 1),
        )
    return table


def _total_line(results: list[dict], wall: float) -> str:
    reports = [r["report"] for r in results if r["ok"] and not r.get("skipped")]
    skipped = sum(1 for r in results if r.get("skipped"))
    failed = [r["input"] for r in results if not r["ok"]]
    bytes_in = sum(report["input_bytes"] for report in reports)
    bytes_out = sum(report["file_bytes"] for report in reports)
    fp16_bytes = 2 * sum(report["kv_elements"] for report in reports)
    line = f"{len(reports)} ok, " + (f"{skipped} skipped (outputs there and verified), " if skipped else "")
    line += f"{len(failed)} failed"
    if failed:
        line += " (" + ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "") + ")"
    if bytes_out:
        ratio = bytes_in / bytes_out
        size = f"{ratio:.2f}x smaller than the inputs" if ratio >= 1 else f"{1 / ratio:.2f}x larger than the inputs"
        vs_fp16 = f", {fp16_bytes / bytes_out:.2f}x vs fp16" if fp16_bytes else ""
        line += f"; {human_bytes(bytes_in)} -> {human_bytes(bytes_out)} ({size}{vs_fp16})"
    return line + f"; {wall:.1f} s, {bytes_in / 1e6 / wall if wall > 0 else 0.0:.1f} MB/s of input"
