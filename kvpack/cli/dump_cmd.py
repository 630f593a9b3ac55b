"""``kvpack dump``: run a model over a text and write its KV cache to safetensors or ``.kvp``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kvpack.cli.option_groups import CODEC, SharedOptions, with_options
from kvpack.cli.options import (
    Device,
    DumpDtype,
    Force,
    GgufFile,
    JsonOut,
    ModelName,
    check_json_path,
    command,
    json_only,
)
from kvpack.cli.render import err_console, human_bytes, print_json, progress_bar, say, write_json
from kvpack.errors import InvalidInputError
from kvpack.names import parse_kv_name
from kvpack.storage import location, name_of, size_of


def register(app: typer.Typer) -> None:
    command(app, "dump")(dump)


@with_options(CODEC)
def dump(
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="Output file, a path or a URL: .safetensors, or .kvp to compress in the same step.",
            parser=location,
        ),
    ],
    model: ModelName = None,
    gguf_file: GgufFile = None,
    text_file: Annotated[
        Optional[Path], typer.Option("--text-file", help="UTF-8 text to run the model on.", dir_okay=False)
    ] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Text given inline.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Keep at most this many tokens.")] = None,
    dtype: DumpDtype = "float16",
    device: Device = "cpu",
    *,
    shared: SharedOptions,
    lossless: Annotated[
        bool, typer.Option("--lossless", help=".kvp output: store K/V exactly (in --dtype), no codec.")
    ] = False,
    attention_stats: Annotated[
        bool,
        typer.Option(
            "--attention-stats",
            help="Also record what bit allocation uses: the largest attention weight each token receives from "
            "the last N queries, and the queries' channel mean squares and norms (per layer and kv head).",
        ),
    ] = False,
    last_n_queries: Annotated[
        int, typer.Option("--last-n-queries", help="N for --attention-stats: the last query positions.")
    ] = 64,
    json_path: JsonOut = None,
    force: Force = False,
) -> None:
    """Run a causal LM over a text and write its KV cache (and token ids) to safetensors or .kvp.

    Without --text-file or --prompt, uses the bundled WikiText-2 passage (CC BY-SA 3.0).
    With a .kvp output the cache is compressed in the same step (codec options as for
    `kvpack compress`), or stored exactly with --lossless; `kvpack generate` continues from it.

    The --json report: output, format (safetensors | kvp), model, num_layers, seq_len,
    text_tokens, dtype, file_bytes, kv_bytes_per_token (before compression), codec (the codec
    config, null for safetensors or --lossless), lossless, bits_per_element (.kvp: every byte
    counted; null for safetensors) and the metadata written.

    Examples: kvpack dump --text-file doc.txt --max-tokens 2048 -o cache.safetensors;
    kvpack dump --prompt "You are ..." -o prompt.kvp --method uniform --bits 4
    """
    from kvpack.formats.atomic import check_output_path
    from kvpack.formats.safetensors_io import write_safetensors
    from kvpack.model.dump import DUMP_DTYPES, bundled_text, cache_dims, check_codec_fits, dump_cache, load_model

    if text_file is not None and prompt is not None:
        raise InvalidInputError("give either --text-file or --prompt, not both")
    if dtype not in DUMP_DTYPES:
        raise InvalidInputError(f"--dtype must be one of {', '.join(DUMP_DTYPES)}, got {dtype!r}")
    to_kvp = name_of(output).lower().endswith(".kvp")
    given = shared.given("codec") + (["--lossless"] if lossless else [])
    config = None
    if not to_kvp and given:
        verb = "applies" if len(given) == 1 else "apply"
        raise InvalidInputError(f"{', '.join(given)} only {verb} to a .kvp output (-o NAME.kvp)")
    if lossless and len(given) > 1:
        raise InvalidInputError("--lossless stores K/V exactly; drop the codec options")
    if to_kvp and not lossless:
        config = shared.codec()  # every flag checked before the model loads
    if attention_stats and to_kvp:
        raise InvalidInputError(
            "--attention-stats needs a .safetensors output: a .kvp file stores no statistics "
            "(dump to safetensors, then `kvpack compress --allocate ...`)"
        )
    if attention_stats and last_n_queries < 1:
        raise InvalidInputError(f"--last-n-queries must be at least 1, got {last_n_queries}")
    check_output_path(output, force)
    check_json_path(json_path, force, output, text_file, what="the output and the text file")
    if text_file is not None:
        text = read_text_file(text_file)
    elif prompt is not None:
        text = prompt
    else:
        text = bundled_text()
        err_console.print("no --text-file or --prompt: using the bundled WikiText-2 passage")
    with err_console.status("loading model"):
        loaded = load_model(model, gguf_file, device)
    if config is not None:
        if shared["level"] is not None:
            config = shared.codec(cache_dims(loaded.model))
        config = check_codec_fits(loaded.model, config)
    with progress_bar("prefill tokens") as update:
        tensors, metadata = dump_cache(
            loaded,
            text,
            max_tokens,
            dtype,
            progress=lambda done, total: update(done, total),
            attention_stats=last_n_queries if attention_stats else None,
        )
    seq_len = int(metadata["seq_len"])
    kv_bytes = sum(t.numel() * t.element_size() for n, t in tensors.items() if parse_kv_name(n))
    report = {
        "output": str(output),
        "format": "kvp" if to_kvp else "safetensors",
        "model": metadata.get("model"),
        "num_layers": int(metadata["num_layers"]) if metadata.get("num_layers", "").isdigit() else None,
        "seq_len": seq_len,
        "text_tokens": int(metadata["text_tokens"]),
        "dtype": dtype,
        "file_bytes": None,
        "kv_bytes_per_token": kv_bytes / seq_len if seq_len else None,
        "codec": None if config is None else config.to_dict(),
        "lossless": to_kvp and config is None,
        "bits_per_element": None,
        "metadata": metadata,
    }
    if to_kvp:
        from kvpack.compress import compress_tensors
        from kvpack.names import tensor_order
        from kvpack.report import build_report

        ordered = {name: tensors[name] for name in sorted(tensors, key=tensor_order)}
        entries = compress_tensors(ordered, output, config, metadata, force=force)
        size = size_of(output)
        bits = build_report(entries, size, None)["rows"]["all"]["bits_per_element"]["total"]
        report.update(file_bytes=size, bits_per_element=bits)
        if json_only(json_path):
            print_json(report)
            return
        codec = config.describe() if config is not None else f"lossless {dtype}"
        say(
            f"wrote {output}: {metadata['num_layers']} layers, {seq_len} tokens, {codec}, "
            f"{human_bytes(size)} ({bits:.3f} bits per K/V element, {kv_bytes / seq_len:,.0f} bytes of "
            f"{dtype} K/V per token before compression)"
        )
        if json_path is not None:
            write_json(json_path, report, force=force)
        return
    size = write_safetensors(output, tensors, metadata, force=force)
    report["file_bytes"] = size
    if json_only(json_path):
        print_json(report)
        return
    say(
        f"wrote {output}: {metadata['num_layers']} layers, {seq_len} tokens"
        + (
            f" (the first {seq_len} of the text's {metadata['text_tokens']})"
            if int(metadata["text_tokens"]) > seq_len
            else ""
        )
        + f", {dtype}, "
        f"{human_bytes(size)} ({kv_bytes / seq_len:,.0f} bytes of K/V per token)"
    )
    if json_path is not None:
        write_json(json_path, report, force=force)


def read_text_file(path: Path) -> str:
    """A UTF-8 text file given on the command line.

    Raises:
        InvalidInputError: missing, unreadable or not UTF-8.
    """
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot be read ({exc.strerror})") from None
