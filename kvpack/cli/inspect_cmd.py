"""``kvpack inspect``: what a ``.kvp`` or safetensors file holds (no decoding)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kvpack.cli.options import (
    ForceJson,
    GgufModelPath,
    JsonOut,
    PerLayer,
    ProfilePath,
    check_json_path,
    command,
    json_only,
)
from kvpack.cli.render import (
    bits_table,
    entropy_summary,
    human_bytes,
    print_json,
    print_table,
    report_rows,
    say,
    write_json,
)
from kvpack.storage import location


def register(app: typer.Typer) -> None:
    command(app, "inspect")(inspect)


def inspect(
    path: Annotated[
        str,
        typer.Argument(
            help="A .kvp, .safetensors or llama.cpp state file (a path or a URL).", metavar="FILE", parser=location
        ),
    ],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Also read every section, check its checksum and decode every tensor.")
    ] = False,
    per_layer: PerLayer = False,
    model: GgufModelPath = None,
    profile: ProfilePath = None,
    json_path: JsonOut = None,
    force: ForceJson = False,
) -> None:
    """Show the format version, source metadata, codecs, shapes and bits-per-element breakdown.

    A llama.cpp slot or session file: its kind, tokens, layers, GGML types and bytes per token; with
    --model MODEL.gguf also the K/V tensors kvpack reads from it (and a mismatch with that model).

    Examples: kvpack inspect cache.kvp --tensors; kvpack inspect cache.kvp --json; kvpack inspect slot.bin --model M.gguf
    """
    from kvpack.report import describe_file

    check_json_path(json_path, force, path, what="the file inspected")
    info = describe_file(path, verify=verify, profile=profile, model=model)
    if json_only(json_path):
        print_json(info)
        return
    _print_info(path, info, tensors, verify, per_layer)
    if json_path is not None:
        write_json(json_path, info, force=force)


def _print_llama_state(path: Path, info: dict, tensors: bool) -> None:
    kind = "sequence state (slot)" if info["kind"] == "seq" else "session"
    say(
        f"{path}: llama.cpp {kind} file, version {info['version']}, {human_bytes(info['file_bytes'])}, "
        f"{info['tokens']} tokens, {info['cells']} cells, {info['layers']} layers"
        + (f", model architecture {info['arch']}" if info["arch"] else "")
    )
    say(
        f"keys {'/'.join(info['key_types'])}, values {'/'.join(info['value_types'])}"
        f"{' (transposed)' if any(info['v_trans']) else ''}; {info['kv_bytes_per_token']:,.0f} bytes of K/V per token, "
        f"{human_bytes(info['other_bytes'])} of other data"
    )
    if "model" in info:
        m = info["model"]
        say(f"model {m['name']} (GGUF {m['gguf_fingerprint']}): {m['kv_heads']} kv heads x head_dim {m['head_dim']}")
    else:
        say("give --model MODEL.gguf to see the K/V tensors kvpack reads (heads, head_dim)")
    if tensors and "tensors" in info:
        table = Table(title="tensors compress reads", title_justify="left")
        for column in ("name", "shape", "dtype"):
            table.add_column(column)
        for t in info["tensors"]:
            table.add_row(escape(t["name"]), str(tuple(t["shape"])), t["dtype"])
        print_table(table)


def _print_info(path: Path, info: dict, tensors: bool, verify: bool, per_layer: bool) -> None:
    if info["format"] == "llama-cpp":
        _print_llama_state(path, info, tensors)
        return
    if info["format"] == "kvp":
        say(
            f"{path}: kvpack container, format {info['version']}, {human_bytes(info['file_bytes'])} "
            f"(header {info['header_bytes']:,} bytes), {len(info['tensors'])} tensors"
        )
    else:
        per_token = info["kv_bytes_per_token"]
        say(
            f"{path}: safetensors, {human_bytes(info['file_bytes'])}, {len(info['tensors'])} tensors, "
            f"{info['kv_tensors']} K/V tensors, {info['seq_len']} tokens, "
            + (f"{per_token:,.0f} bytes of K/V per token" if per_token else "no K/V tensors")
        )
    if verify and info["format"] == "kvp":
        say(f"verified: all {info['verified_sections']} sections match their checksums and every tensor decodes")
    elif verify:
        say("verified: every tensor reads")
    print_table(_metadata_table(info["metadata"]))
    if tensors:
        print_table(_tensor_table(info))
    else:
        print_table(_shape_summary(info))
    if info["format"] == "kvp":
        print_table(
            bits_table("bits per element (every byte of the file counted)", report_rows(info["size"], per_layer))
        )
        if entropy_summary(info["size"]["rows"]["all"]):
            say(entropy_summary(info["size"]["rows"]["all"]))
        widths = width_histograms(info["tensors"])
        if widths:
            print_table(_width_table(widths, per_tensor=tensors))


def width_histograms(tensors: list[dict]) -> dict[str, list[int]]:
    """Groups at each code width 0 to 8 of the mixed-precision tensors: per tensor, per layer (``layer N``,
    keys and values together; a stacked entry counts for all its layers at once) and in all."""
    from kvpack.names import parse_kv_name

    out: dict[str, list[int]] = {}
    total = [0] * 9
    for t in tensors:
        counts = (t.get("codec") or {}).get("width_counts")
        if not counts:
            continue
        out[t["name"]] = list(counts)
        parsed = parse_kv_name(t["name"])
        if parsed:
            layer = out.setdefault(f"layer {parsed[0]}", [0] * 9)
            out[f"layer {parsed[0]}"] = [a + b for a, b in zip(layer, counts, strict=True)]
        total = [a + b for a, b in zip(total, counts, strict=True)]
    if out:
        out["all"] = total
    return out


def _width_table(widths: dict[str, list[int]], per_tensor: bool) -> Table:
    table = Table(title="groups by code width (mixed precision)", title_justify="left")
    for column in ("part", *map(str, range(9)), "mean bits"):
        table.add_column(column, justify="left" if column == "part" else "right", no_wrap=True)
    for name, counts in widths.items():
        if not per_tensor and name.startswith("layers."):
            continue
        n = sum(counts)
        mean = sum(w * c for w, c in enumerate(counts)) / n if n else 0.0
        table.add_row(escape(name), *(f"{c:,}" if c else "·" for c in counts), f"{mean:.2f}")
    return table


def _metadata_table(metadata: dict) -> Table:
    table = Table(title="metadata", title_justify="left")
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in sorted(metadata.items()):
        table.add_row(escape(key), escape(value))
    return table


def _describe_codec(codec: dict | None) -> str:
    """Short form, e.g. ``adaptive-4 g64``, with the transforms and the options that differ from the defaults."""
    if codec is None:
        return "lossless"
    from kvpack.config import CodecConfig

    return CodecConfig.from_dict(codec).label()


def _shape_summary(info: dict) -> Table:
    counts = Counter(
        (tuple(t["shape"]), t["dtype"], _describe_codec(t.get("codec")) if info["format"] == "kvp" else "")
        for t in info["tensors"]
    )
    table = Table(title="tensors by shape (use --tensors to list each)", title_justify="left")
    is_kvp = info["format"] == "kvp"
    for column in ("count", "shape", "dtype"):
        table.add_column(column, no_wrap=True)
    if is_kvp:
        table.add_column("codec", overflow="fold")
    for (shape, dtype, codec), count in counts.items():
        table.add_row(str(count), str(list(shape)), escape(dtype), *((escape(codec),) if is_kvp else ()))
    return table


def _tensor_table(info: dict) -> Table:
    table = Table(title="tensors", title_justify="left")
    columns = ["name", "shape", "dtype", "bytes"] + (["codec", "bits/el"] if info["format"] == "kvp" else [])
    for column in columns:
        if column == "codec":
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, justify="right" if column in ("bytes", "bits/el") else "left", no_wrap=True)
    for t in info["tensors"]:
        cells = [escape(t["name"]), str(t["shape"]), t["dtype"], f"{t['bytes']:,}"]
        if info["format"] == "kvp":
            cells += [_describe_codec(t["codec"]), f"{t['bits_per_element']:.3f}"]
        table.add_row(*cells)
    return table
