"""The codec base class, its registry, and numeric helpers shared by the codecs.

A codec turns ``(n_groups, group_size)`` float32 groups into named arrays (codes, scales,
zero-points, codebooks) and back. It never sees bytes: packing and the container are done
by :mod:`kvpack.packing` and :mod:`kvpack.formats`. Adding a codec is one new module with
one subclass of :class:`Codec`; defining the class registers it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvpack.errors import InvalidInputError, brief, brief_list, lookup
from kvpack.grouping import GroupLayout

#: Section kinds, used for bits-per-element accounting.
KIND_CODES = "codes"
KIND_SCALES = "scales"  # scales and zero-points
KIND_CODEBOOKS = "codebooks"
KIND_OUTLIERS = "outliers"
KIND_EXACT = "exact"  # protected tokens stored exactly (keep_first / keep_last, channel-axis remainder)
KIND_TRANSFORM = "transform"  # per-tensor parameters of a transform (rotation signs, rotary frequencies)
KIND_ALLOCATION = "allocation"  # the per-group bit-width map of a mixed-precision tensor
KIND_DATA = "data"  # lossless tensors
#: Every section kind, in the order reports list them.
SECTION_KINDS = (
    KIND_CODES,
    KIND_SCALES,
    KIND_CODEBOOKS,
    KIND_OUTLIERS,
    KIND_EXACT,
    KIND_ALLOCATION,
    KIND_TRANSFORM,
    KIND_DATA,
)

#: Section scopes: how a section's values map onto the tensor's groups, so a reader can decode a
#: range of tokens from the sections of their own groups (:mod:`kvpack.restore.streaming`).
SCOPE_GROUP = "group"  # a whole number of values per group, in group order (codes, scales, outliers)
SCOPE_SHARED = "shared"  # serves every group whole (a codebook per head or tensor, rotation signs, rotary frequencies)
SCOPE_EXACT = "exact"  # protected tokens stored exactly (the tensor plan places them)
SCOPE_ENTRY = "entry"  # about the entry as a whole (a width map, lossless data): the entry is decoded whole
SCOPES = (SCOPE_GROUP, SCOPE_SHARED, SCOPE_EXACT, SCOPE_ENTRY)

FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class SectionSpec:
    """What one named array of an encoded tensor is.

    ``dtype`` is ``"code"`` for unsigned codes stored densely packed at ``bits`` bits, else a
    storage dtype name (``"float16"``, ``"float32"``, ...); ``count`` is the number of values;
    ``scope`` one of :data:`SCOPES` (required: whoever declares a section says how it maps onto
    the groups, and streaming cuts pieces by it).

    Raises:
        ValueError: a missing or unknown scope (a bug in the codec or transform declaring it).
    """

    kind: str
    dtype: str
    count: int
    bits: int | None = None
    scope: str = ""

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(
                f"section spec {self.kind}/{self.dtype}: scope must be one of {SCOPES}, got {self.scope!r}"
            )


def option(default: Any, help: str, *, choices: tuple[str, ...] = (), flag: str | None = None, cli: bool = True) -> Any:
    """A field of a codec's :class:`CodecParams`, with what the command line makes of it.

    Each field is one option of ``compress``, ``eval`` and ``dump -o x.kvp`` (a field name several
    codecs share is one option). ``help`` is its text (the command line adds the choices, the
    methods taking it and their defaults); ``choices`` are the only values accepted; ``flag`` is
    the spelling where it is not ``--field-name`` (``--field-name/--no-field-name`` for a bool),
    e.g. ``--symmetric/--asymmetric``; ``cli=False`` marks a value the encoder sets per entry
    (stored in the file, never a flag).
    """
    metadata: dict[str, Any] = {"help": help}
    if not cli:
        metadata["cli"] = False
    if choices:
        metadata["choices"] = tuple(choices)
    if flag is not None:
        metadata["flag"] = flag
    return dataclasses.field(default=default, metadata=metadata)


def symmetric_option() -> Any:
    """The ``symmetric`` field of the codecs with a zero-point (one definition, one CLI option)."""
    return option(False, "No zero-point", flag="--symmetric/--asymmetric")


def field_type(field: dataclasses.Field) -> type:
    """The Python type of a :class:`CodecParams` field (``bool``, ``str``, ``int`` or ``float``)."""
    return _FIELD_TYPES[field.type] if isinstance(field.type, str) else field.type


#: What measures best for the integer and codebook codecs (docs/benchmarks.md, "Codec defaults"):
#: keys grouped per channel (KIVI) before RoPE (KVQuant), every head vector Hadamard-rotated (QuaRot).
RECOMMENDED_GROUPED: dict[str, Any] = {"key_axis": "channel", "unrope": True, "rotate": "hadamard"}
#: Element formats: a Hadamard rotation spreads outliers over the block that shares a scale.
RECOMMENDED_ELEMENTS: dict[str, Any] = {"rotate": "hadamard"}


@dataclass(frozen=True)
class CodecParams:
    """Base of every codec's frozen option dataclass.

    Fields (declared with :func:`option`) with ``metadata={"choices": (...)}`` only accept those
    values. Loaded from a file through :meth:`from_dict`, which accepts only the declared fields
    with their declared types.
    """

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = field_type(field)
            if type(value) is not expected and not (expected is float and type(value) is int):
                raise InvalidInputError(f"option {field.name} must be {expected.__name__}, got {brief(value)}")
            choices = field.metadata.get("choices")
            if choices and value not in choices:
                raise InvalidInputError(f"option {field.name} must be one of {', '.join(choices)}, got {brief(value)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodecParams:
        if not isinstance(data, dict):
            raise InvalidInputError(f"codec options must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(
                f"unknown option(s) {brief_list(unknown)}; accepted: {', '.join(sorted(known)) or 'none'}"
            )
        return cls(**data)


_FIELD_TYPES = {"bool": bool, "str": str, "int": int, "float": float}

#: How the fused kernels (:mod:`kvpack.codecs.kernels`) turn a value ``v`` of group ``g`` into its
#: code: uniform asymmetric ``clamp(rint((v - offset[g]) / scale[g]), 0, top)``; uniform symmetric
#: ``clamp(rint(v / scale[g] + top / 2), 0, top)``; levels: the nearest of the normalized ``levels``
#: to ``(v - offset[g]) / scale[g]``.
FUSED_UNIFORM_ASYMMETRIC, FUSED_UNIFORM_SYMMETRIC, FUSED_LEVELS = 0, 1, 2


@dataclass
class FusedEncoding:
    """What the fused kernels need to code a plain tensor, as its codec decides (:meth:`Codec.fused_encoding`).

    ``offset`` and ``scale`` are float32 ``(n_groups,)`` (scale as stored: it may hold zeros);
    ``arrays`` the codec's sections other than ``codes``, as :meth:`Codec.encode` returns them;
    ``levels`` (mode :data:`FUSED_LEVELS`) float32 ``(books, 2**bits)``, sorted, one book or one
    per kv head (``book_per_head``).
    """

    mode: int
    offset: torch.Tensor
    scale: torch.Tensor
    arrays: dict[str, torch.Tensor]
    levels: torch.Tensor | None = None
    book_per_head: bool = False


class Codec(ABC):
    """A grouped quantizer. Subclasses set ``name``, ``summary``, ``source`` and ``Params``.

    Encoding takes ``groups``, a float32 tensor ``(n_groups, group_size)``, the tensor's
    :class:`GroupLayout`, and an optional boolean ``inlier_mask`` of the same shape (False
    for outliers stored exactly elsewhere, which must not enter the statistics). It returns
    a dict of tensors named and sized as :meth:`section_specs` says; codes are integer
    tensors with values in ``[0, 2**bits - 1]``, other arrays already rounded to their
    storage dtype. Decoding takes those arrays (codes as ``uint8`` ``(n_groups,
    group_size)``, the rest as flat float32 tensors) and returns float32 ``(n_groups,
    group_size)`` reconstructions.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    source: ClassVar[str]
    Params: ClassVar[type[CodecParams]] = CodecParams
    #: Element formats fix their code width (e.g. 4 for mxfp4); ``None``: any of 1 to 8 bits.
    fixed_bits: ClassVar[int | None] = None
    #: Formats whose spec fixes the group (block) size (32 for OCP MX); ``None``: any.
    block_size: ClassVar[int | None] = None
    #: Element formats: the codec of each width of their family (mixed precision); the same
    #: scale section serves every member. ``None``: this codec at any width from 1 to 8.
    family: ClassVar[dict[int, str] | None] = None
    registry: ClassVar[dict[str, type[Codec]]] = {}
    #: Codecs of whole tensors (the transform codec): no groups; :mod:`kvpack.transforms.pca` codes them.
    whole_tensor: ClassVar[bool] = False
    #: Transform settings (:data:`kvpack.config.TRANSFORM_DEFAULTS` keys) this codec uses unless told otherwise.
    default_transforms: ClassVar[dict[str, Any]] = {}
    #: Transform settings a user gets by naming only the method, bits and group size (the CLI,
    #: :meth:`kvpack.config.CodecConfig.build` with ``recommended=True``): what measures best for this
    #: codec through the model (docs/benchmarks.md, "Codec defaults"). An ``unrope`` here applies only
    #: where the cache records rotary parameters kvpack can undo.
    recommended_transforms: ClassVar[dict[str, Any]] = {}
    #: Likewise for the codec's own options (``Params`` fields), when the literal default measures worse.
    recommended_params: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return
        if name in Codec.registry:
            raise TypeError(f"codec name {name!r} is already registered by {Codec.registry[name].__qualname__}")
        Codec.registry[name] = cls

    def __init__(self, bits: int, params: CodecParams) -> None:
        self.bits = bits
        self.params = params

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @classmethod
    def widths(cls) -> tuple[int, ...]:
        """Code widths a group of a mixed-precision tensor may have besides 0."""
        return tuple(sorted(cls.family)) if cls.family else tuple(range(1, 9))

    def at_width(self, bits: int) -> Codec:
        """This codec's counterpart at ``bits`` bits per code (same options; element formats: the
        family member of that width).

        Raises:
            InvalidInputError: an element family has no format of that width.
        """
        if not self.family:
            return type(self)(bits, self.params)
        if bits not in self.family:
            widths = ", ".join(str(w) for w in sorted(self.family))
            raise InvalidInputError(f"method {self.name} mixes widths {widths} (its family), not {bits}")
        codec_class = get_codec_class(self.family[bits])
        return codec_class(bits, codec_class.Params())

    @abstractmethod
    def section_specs(self, layout: GroupLayout) -> dict[str, SectionSpec]:
        """The named arrays this codec stores for a tensor of this layout."""

    @abstractmethod
    def encode(
        self, groups: torch.Tensor, layout: GroupLayout, inlier_mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Quantize ``(n_groups, group_size)`` float32 groups into named arrays."""

    @abstractmethod
    def decode(self, arrays: dict[str, torch.Tensor], layout: GroupLayout) -> torch.Tensor:
        """Reconstruct float32 ``(n_groups, group_size)`` groups from named arrays."""

    def fuses(self) -> bool:
        """Whether this codec, with its options, has a fused path (:mod:`kvpack.fused`); default none."""
        return False

    def fused_encoding(self, lo: torch.Tensor, hi: torch.Tensor, x: torch.Tensor, layout: GroupLayout) -> FusedEncoding:
        """The fused kernels' parameters for a plain tensor ``x`` (float16 / bfloat16 ``(batch,
        num_kv_heads, seq_len, head_dim)``) from each group's min ``lo`` and max ``hi`` (float32
        ``(n_groups,)``, +0.0 for a zero): exactly what :meth:`encode` computes. Called only when
        :meth:`fuses`."""
        raise NotImplementedError

    def fused_levels(self, arrays: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """The levels the decode kernel multiplies by the scale (float32 ``(books, 2**bits)``) from
        the section arrays, and whether there is a book per kv head. Called only when :meth:`fuses`."""
        raise NotImplementedError


def get_codec_class(method: str) -> type[Codec]:
    """The registered codec class called ``method``.

    Raises:
        InvalidInputError: no codec has that name.
    """
    return lookup(Codec.registry, method, "method")


def codes_spec(layout: GroupLayout, bits: int) -> SectionSpec:
    return SectionSpec(KIND_CODES, "code", layout.n_elements, bits, SCOPE_GROUP)


def per_group_spec(layout: GroupLayout) -> SectionSpec:
    return SectionSpec(KIND_SCALES, "float16", layout.n_groups, scope=SCOPE_GROUP)


def scaled_codes_specs(layout: GroupLayout, bits: int, symmetric: bool) -> dict[str, SectionSpec]:
    """``codes``, a float16 ``scale`` per group and, unless ``symmetric``, a float16 ``zero_point``."""
    specs = {"codes": codes_spec(layout, bits), "scale": per_group_spec(layout)}
    if not symmetric:
        specs["zero_point"] = per_group_spec(layout)
    return specs


# --- numeric helpers -------------------------------------------------------------------


def fp16_round_down(x: torch.Tensor) -> torch.Tensor:
    """Largest float16 value <= ``x`` (float32 in, float32 out); ``x`` must be within fp16 range."""
    h = x.to(torch.float16)
    h = torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)
    return h.float()


def fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest float16 value >= ``x`` (float32 in, float32 out); ``x`` must be within fp16 range."""
    h = x.to(torch.float16)
    h = torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def fp16_nearest(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def masked_min_max(groups: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max over the values where ``mask`` is True (all when ``None``).

    A zero result is +0.0: which signed zero a SIMD reduction returns for a group holding both is
    not specified, and the fused kernels (:mod:`kvpack.codecs.kernels`) must give the same bytes.
    """
    if mask is None:
        return groups.amin(dim=1) + 0.0, groups.amax(dim=1) + 0.0
    inf = torch.tensor(float("inf"), dtype=groups.dtype)
    lo = torch.where(mask, groups, inf).amin(dim=1)
    hi = torch.where(mask, groups, -inf).amax(dim=1)
    return lo + 0.0, hi + 0.0


def masked_abs_max(groups: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    values = groups.abs()
    if mask is not None:
        values = torch.where(mask, values, torch.zeros((), dtype=groups.dtype))
    return values.amax(dim=1)


def masked_mean_std(
    groups: torch.Tensor, mask: torch.Tensor | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and (population) standard deviation over the masked values.

    With ``symmetric`` the mean is 0 and the spread is the root mean square.
    """
    weights = torch.ones_like(groups) if mask is None else mask.to(groups.dtype)
    count = weights.sum(dim=1).clamp_min(1)
    if symmetric:
        mean = torch.zeros_like(count)
    else:
        mean = (groups * weights).sum(dim=1) / count
    spread = (((groups - mean[:, None]) ** 2) * weights).sum(dim=1) / count
    return mean, spread.sqrt()


def minmax_from(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`minmax_normalizers` from each group's min and max (float32 ``(n_groups,)``)."""
    if symmetric:
        return torch.zeros_like(lo), fp16_round_up(torch.maximum(lo.abs(), hi.abs()))
    center = fp16_nearest((lo + hi) / 2)
    return center, fp16_round_up(torch.maximum(hi - center, center - lo))


def minmax_normalizers(
    groups: torch.Tensor, mask: torch.Tensor | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group center and half-range (float16 values, float32 tensors) with ``|x - c| <= h``.

    Asymmetric: ``c`` = mid-range rounded to nearest, ``h`` = the larger distance from ``c``
    to the min or max, rounded up. Symmetric: ``c = 0``, ``h`` = max|x| rounded up.
    """
    if symmetric:
        return torch.zeros(groups.shape[0]), fp16_round_up(masked_abs_max(groups, mask))
    lo, hi = masked_min_max(groups, mask)
    center = fp16_nearest((lo + hi) / 2)
    return center, fp16_round_up(torch.maximum(hi - center, center - lo))


def check_fp16_range(groups: torch.Tensor) -> None:
    """Scales and zero-points are stored as float16: refuse values beyond its range."""
    peak = float(groups.abs().max()) if groups.numel() else 0.0
    if peak > FP16_MAX / 2:
        raise InvalidInputError(
            f"values up to {peak:.4g} exceed the float16 range of the scale / zero-point metadata "
            f"(|x| must stay below {FP16_MAX / 2:.0f})"
        )
