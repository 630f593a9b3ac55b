"""The option groups codec commands share (codec choice and Params fields, transforms, allocation, entropy), built from the codec registry."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import typer

from kvpack.cli.options import (
    LEVELS,
    OPTION_GROUPS,
    Allocate,
    BitsMax,
    BitsMin,
    KeepFirst,
    KeepLast,
    KeyAxis,
    Level,
    MaxError,
    MaybeBits,
    MaybeGroupSize,
    MaybeMethod,
    MaybeOutlierRatio,
    NoTranspose,
    OutlierSelect,
    PresetName,
    RecentTokens,
    Rotate,
    RotateSeed,
    TargetBits,
    TargetError,
    Unrope,
    ValueAxis,
    ZstdKinds,
    ZstdLevel,
)
from kvpack.errors import InvalidInputError

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
            if field.metadata.get("cli", True) is False:  # set by the encoder per entry, never a flag
                continue
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
        setattr(function, OPTION_GROUPS, lambda: command_function(function, groups, into))  # built on first use
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
        """A :class:`~kvpack.config.CodecConfig` from the codec options, a preset under them, and the defaults:
        without a preset, the codec's recommended transforms (:meth:`CodecConfig.build`, ``recommended``).

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
            for axis in ("key_axis", "value_axis"):  # a level sizes token groups: no recommended channel axis
                transforms.setdefault(axis, "token")
        # a preset is a literal recipe; otherwise what the user left unset takes the codec's measured best
        recommended = flags["preset"] is None
        return CodecConfig.build(options.pop("method", "adaptive"), recommended=recommended, **options)

    def allocation(self):
        """The :class:`~kvpack.allocation.solver.Allocation` of the allocation options, or ``None``.

        Raises:
            InvalidInputError: budgets or widths without --allocate, or bad values.
        """
        from kvpack.allocation.solver import Allocation

        names = self.groups["allocation"]
        given = {name: self.values[name] for name in names if self.values[name] is not None}
        method = self.values.get("method")
        if set(given) == {"target_bits"} and method is not None and _whole_tensor(method):
            given["allocate"] = "target"  # the transform codec's one knob: no allocator to choose
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


def _whole_tensor(method: str) -> bool:
    from kvpack.codecs import Codec

    codec_class = Codec.registry.get(method)
    return codec_class is not None and codec_class.whole_tensor


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
