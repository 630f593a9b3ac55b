"""``kvpack decompress``: restore a ``.kvp`` (or a selection of it) to safetensors, or to the llama.cpp state file it was made from."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvpack.cli.options import Force, GgufModelPath, JsonOut, ProfilePath, check_json_path, command, json_only
from kvpack.cli.render import human_bytes, print_json, progress_bar, say, write_json
from kvpack.errors import InvalidInputError, brief
from kvpack.storage import location, with_suffix


def register(app: typer.Typer) -> None:
    command(app, "decompress")(decompress)


def decompress(
    input: Annotated[str, typer.Argument(help="Input .kvp file (a path or a URL).", metavar="INPUT", parser=location)],
    output: Annotated[
        Optional[str],
        typer.Option(
            "--output",
            "-o",
            help="Output file, a path or a URL (default: INPUT.restored.safetensors; --format llama-cpp: "
            "INPUT.restored.bin).",
            parser=location,
        ),
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option("--dtype", help="dtype of restored K/V: float16 | bfloat16 | float32 (default: as stored)."),
    ] = None,
    layers: Annotated[
        Optional[str],
        typer.Option(
            "--layers", help="Only the K/V tensors of these layers: numbers and ranges, e.g. 0,3-5 (token_ids stays)."
        ),
    ] = None,
    tensors: Annotated[
        Optional[str],
        typer.Option("--tensors", help="Only these tensors, comma-separated: e.g. layers.0.key,token_ids."),
    ] = None,
    tokens: Annotated[
        Optional[str],
        typer.Option(
            "--tokens", help="Only tokens A to B-1 of every K/V tensor and of token_ids: A:B, A: or :B (from 0)."
        ),
    ] = None,
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="safetensors | llama-cpp (the llama.cpp slot or session file a .kvp was made from, which "
            "llama_state_seq_load_file / llama_state_load_file and llama-server's slot restore load).",
        ),
    ] = "safetensors",
    model: GgufModelPath = None,
    profile: ProfilePath = None,
    json_path: JsonOut = None,
    force: Force = False,
) -> None:
    """Decode a .kvp file, or part of it, and write it (with token ids and metadata) to safetensors.

    With --format llama-cpp: the llama.cpp state file a .kvp was made from (`kvpack compress SLOT
    --model MODEL.gguf`), every non-K/V byte as it was and K/V in their original GGML types; with
    --model, a cache made for another model is refused before anything is written.

    Writes as it decodes: memory stays about one tensor's stored bytes, whatever the cache size.
    --layers, --tensors and --tokens each narrow what is restored; only the selected tensors'
    data is read.

    The --json report: input, output, tensors (count), output_bytes, dtype (null: as stored) and
    selection (layers, names, tokens; null where not narrowed).

    Example: kvpack decompress cache.kvp -o part.safetensors --layers 0,3-5 --tokens 0:512
    """
    from kvpack.model.dump import DUMP_DTYPES
    from kvpack.restore.files import decompress_file

    if output_format == "llama-cpp":
        _to_llama_cpp(input, output, dtype, layers, tensors, tokens, model, profile, json_path, force)
        return
    if output_format != "safetensors":
        raise InvalidInputError(f"--format must be safetensors or llama-cpp, got {brief(output_format)}")
    if model is not None:
        raise InvalidInputError("--model goes with --format llama-cpp")
    if dtype is not None and dtype not in DUMP_DTYPES:
        raise InvalidInputError(f"--dtype must be one of {', '.join(DUMP_DTYPES)}, got {dtype!r}")
    output = output or with_suffix(input, ".restored.safetensors")
    selection = {
        "layers": None if layers is None else parse_layers(layers),
        "names": None if tensors is None else parse_names(tensors),
        "tokens": None if tokens is None else parse_tokens(tokens),
    }
    check_json_path(json_path, force, input, output)
    with progress_bar("decompress") as update:
        result = decompress_file(
            input,
            output,
            DUMP_DTYPES[dtype] if dtype else None,
            force=force,
            progress=update,
            profile=profile,
            **selection,
        )
    report = {
        **{k: str(v) if isinstance(v, Path) else v for k, v in result.items()},
        "dtype": dtype,
        "selection": {**selection, "tokens": None if tokens is None else list(selection["tokens"])},
    }
    if json_only(json_path):
        print_json(report)
        return
    say(f"wrote {output}: {result['tensors']} tensors, {human_bytes(result['output_bytes'])}")
    if json_path is not None:
        write_json(json_path, report, force=force)


def _to_llama_cpp(input, output, dtype, layers, tensors, tokens, model, profile, json_path, force) -> None:
    from kvpack.llama_cpp.restore import write_llama_cpp

    narrowed = [
        flag
        for flag, value in (("--dtype", dtype), ("--layers", layers), ("--tensors", tensors), ("--tokens", tokens))
        if value is not None
    ]
    if narrowed:
        raise InvalidInputError(
            f"--format llama-cpp restores the whole state in its own types; drop {', '.join(narrowed)}"
        )
    output = output or with_suffix(input, ".restored.bin")
    check_json_path(json_path, force, input, output)
    with progress_bar("decompress") as update:
        result = write_llama_cpp(input, output, model=model, force=force, profile=profile, progress=update)
    if json_only(json_path):
        print_json(result)
        return
    say(
        f"wrote {output}: llama.cpp {'sequence state' if result['kind'] == 'seq' else 'session'} file, "
        f"{result['tokens']} tokens, {result['layers']} layers ({'/'.join(result['types'])}), "
        f"{human_bytes(result['output_bytes'])}"
    )
    if json_path is not None:
        write_json(json_path, result, force=force)


_LAYER_ITEM = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_TOKEN_RANGE = re.compile(r"([0-9]*):([0-9]*)")
#: A range of layers wider than this is a typo (no model has a million layers).
_MAX_LAYER_RANGE = 1 << 20


def parse_layers(text: str) -> list[int]:
    """``0,3-5`` -> ``[0, 3, 4, 5]``: layer numbers and inclusive ranges, comma-separated.

    Raises:
        InvalidInputError: anything else, or a reversed range.
    """
    layers: list[int] = []
    for item in text.split(","):
        match = _LAYER_ITEM.fullmatch(item.strip())
        if not match:
            raise InvalidInputError(
                f"--layers {brief(text)}: {brief(item.strip())} is not a layer number or a range A-B (e.g. 0,3-5)"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise InvalidInputError(f"--layers: range {first}-{last} is reversed; write {last}-{first}")
        if last - first > _MAX_LAYER_RANGE:
            raise InvalidInputError(f"--layers: range {first}-{last} is far wider than any model's layer count")
        layers.extend(range(first, last + 1))
    return layers


def parse_names(text: str) -> list[str]:
    """``layers.0.key,token_ids`` -> the names (the tensor names hold no commas).

    Raises:
        InvalidInputError: an empty name.
    """
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise InvalidInputError(f"--tensors {brief(text)}: an empty name; give names separated by commas")
    return names


def parse_tokens(text: str) -> tuple[int | None, int | None]:
    """``A:B`` -> ``(A, B)``, ``A:`` -> ``(A, None)``, ``:B`` -> ``(None, B)``: a half-open range.

    Raises:
        InvalidInputError: another syntax, no bound, or an empty or reversed range.
    """
    from kvpack.restore.streaming import token_bounds

    match = _TOKEN_RANGE.fullmatch(text.strip())
    if not match or not (match.group(1) or match.group(2)):
        raise InvalidInputError(
            f"--tokens {brief(text)}: expected A:B, A: or :B with token positions from 0 (e.g. 0:512)"
        )
    start, stop = (int(g) if g else None for g in match.groups())
    return token_bounds((start, stop))
