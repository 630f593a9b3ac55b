"""``kvpack decompress``: restore a ``.kvp`` to safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kvpack.cli.options import Force
from kvpack.cli.render import human_bytes, progress_bar, say
from kvpack.errors import InvalidInputError


def register(app: typer.Typer) -> None:
    app.command("decompress")(decompress)


def decompress(
    input: Annotated[Path, typer.Argument(help="Input .kvp file.", dir_okay=False, metavar="INPUT")],
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output", "-o", help="Output .safetensors (default: INPUT.restored.safetensors).", dir_okay=False
        ),
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option("--dtype", help="dtype of restored K/V: float16 | bfloat16 | float32 (default: as stored)."),
    ] = None,
    force: Force = False,
) -> None:
    """Decode every tensor of a .kvp file and write them (with token ids and metadata) to safetensors.

    Example: kvpack decompress cache.kvp -o restored.safetensors --dtype float32
    """
    from kvpack.api import decompress_file
    from kvpack.dump import DUMP_DTYPES

    if dtype is not None and dtype not in DUMP_DTYPES:
        raise InvalidInputError(f"--dtype must be one of {', '.join(DUMP_DTYPES)}, got {dtype!r}")
    output = output or input.with_suffix(".restored.safetensors")
    with progress_bar("decompress") as update:
        result = decompress_file(input, output, DUMP_DTYPES[dtype] if dtype else None, force=force, progress=update)
    say(f"wrote {output}: {result['tensors']} tensors, {human_bytes(result['output_bytes'])}")
