"""Validated, frozen configuration of a compression run.

A :class:`CodecConfig` names a registered codec (``method``), its code width, group size,
outlier ratio and the codec's own option dataclass. It is validated on construction
(raising :class:`~kvpack.errors.InvalidInputError`, never ``assert``) and serialized into
every ``.kvp`` tensor entry; :meth:`CodecConfig.from_dict` reads it back through the codec
registry and the option dataclasses only, never evaluating anything from the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpack.codecs import CodecParams, get_codec_class
from kvpack.errors import InvalidInputError, brief, brief_list, option
from kvpack.grouping import AXES, OUTLIER_SELECTIONS, outliers_per_group

MIN_BITS, MAX_BITS = 1, 8
MAX_GROUP_SIZE = 1 << 16
MAX_OUTLIER_RATIO = 0.5
MAX_KEPT_TOKENS = 1 << 40
MAX_ROPE_OFFSET = 1 << 40
_CONFIG_KEYS = ("method", "bits", "group_size", "outlier_ratio", "params")
#: Keys added in format 1.2 (the tensor transforms) and 1.3 (``stack_layers``), written only
#: when not at their default, so a file that uses none of them is also a valid 1.1 file's content.
TRANSFORM_DEFAULTS: dict[str, Any] = {
    "key_axis": "token",
    "value_axis": "token",
    "keep_first": 0,
    "keep_last": 0,
    "outlier_select": "tails",
    "rotate": "none",
    "rotate_seed": 0,
    "unrope": False,
    "rope_dim": 0,
    "rope_offset": 0,
    "rope_scaling": 1.0,
    "stack_layers": False,
    "width_counts": (),
}
ROTATIONS = ("none", "hadamard")


@dataclass(frozen=True)
class CodecConfig:
    """How every K and V tensor of a cache is encoded.

    Attributes:
        method: registered codec name (``uniform``, ``normal``, ``adaptive``).
        bits: code width in bits, 1 to 8.
        group_size: elements per group; must divide ``num_kv_heads * head_dim`` of each tensor.
        outlier_ratio: fraction of each group kept exactly, in ``[0, 0.5)``.
        params: the codec's option dataclass; ``None`` means its defaults.
        key_axis, value_axis: ``token`` (groups along each token's features) or ``channel``
            (groups of ``group_size`` consecutive tokens of one channel; KIVI, arXiv 2402.02750;
            KVQuant, arXiv 2401.18079). Key settings apply to ``layers.{i}.key`` tensors and
            ``layers.all.key``, value settings to every other quantized tensor.
        keep_first, keep_last: tokens at the start (attention sinks) and end (most recent)
            of every K/V tensor stored exactly in the tensor's dtype (KIVI, KVQuant).
        outlier_select: ``tails`` (half the lowest, half the highest values; QAQ) or
            ``magnitude`` (largest ``|x|``; KVQuant's dense-and-sparse).
        rotate: ``none`` or ``hadamard`` (normalized Walsh-Hadamard times a random sign per
            channel, seeded by ``rotate_seed``, applied to each head vector; QuaRot, arXiv
            2404.00456).
        unrope: keys are rotated back to before the rotary position embedding before
            quantizing, and re-rotated when decoding (KVQuant's pre-RoPE keys). Needs the
            model's rotary frequencies (``rope_inv_freq``, not serialized: stored as a section;
            :meth:`with_rope` sets it), ``rope_dim`` (rotated channels per head, ``2 *
            len(rope_inv_freq)``; 0 until the frequencies are known), ``rope_offset`` (position
            of the first token) and ``rope_scaling`` (the factor on cos / sin).
        stack_layers: every layer's keys are one entry ``layers.all.key`` of shape ``(num_layers,
            batch, num_kv_heads, seq_len, head_dim)``, values likewise, so a token group can
            span all layers (QAQ's token level, arXiv 2403.04643, with ``group_size ==
            num_layers * num_kv_heads * head_dim``; format 1.3). Readers return the layers
            one by one as ``layers.{i}.key|value``.
        width_counts: mixed precision (format 1.4): how many groups of the tensor have each
            code width 0 to 8 (9 counts; empty: every group has ``bits``). Which group has
            which width is stored in the tensor's ``bit_widths`` section. Set per tensor by
            the allocators (:mod:`kvpack.allocation.solver`).

    Raises:
        InvalidInputError: any field out of range or of the wrong type.
    """

    method: str
    bits: int | None = None
    group_size: int | None = None
    outlier_ratio: float = 0.0
    params: CodecParams | None = field(default=None)
    key_axis: str = "token"
    value_axis: str = "token"
    keep_first: int = 0
    keep_last: int = 0
    outlier_select: str = "tails"
    rotate: str = "none"
    rotate_seed: int = 0
    unrope: bool = False
    rope_dim: int = 0
    rope_offset: int = 0
    rope_scaling: float = 1.0
    stack_layers: bool = False
    width_counts: tuple[int, ...] = ()
    rope_inv_freq: tuple[float, ...] | None = field(default=None, compare=False, repr=False)
    #: the calibration profile of the transform codec (:mod:`kvpack.profile`; not serialized: the
    #: file names it by ``params.profile``, :meth:`with_profile` sets both)
    profile: Any = field(default=None, compare=False, repr=False)
    #: ``unrope`` came from the codec's recommended settings, not the user: a cache whose model
    #: records no rotary parameters kvpack can undo is compressed without it (not serialized)
    unrope_optional: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        codec_class = get_codec_class(self.method)
        if self.bits is None:
            object.__setattr__(self, "bits", codec_class.fixed_bits or 4)
        if self.group_size is None:
            object.__setattr__(self, "group_size", codec_class.block_size or 64)
        if type(self.bits) is not int or not MIN_BITS <= self.bits <= MAX_BITS:
            raise InvalidInputError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {brief(self.bits)}")
        if codec_class.fixed_bits is not None and self.bits != codec_class.fixed_bits:
            raise InvalidInputError(
                f"method {self.method} has {codec_class.fixed_bits}-bit elements, but {self.bits} bits were asked for "
                f"(by `bits` or a preset); leave bits unset or use {codec_class.fixed_bits}"
            )
        if type(self.group_size) is not int or not 1 <= self.group_size <= MAX_GROUP_SIZE:
            raise InvalidInputError(
                f"group size must be an integer from 1 to {MAX_GROUP_SIZE}, got {brief(self.group_size)}"
            )
        if codec_class.block_size is not None and self.group_size != codec_class.block_size:
            raise InvalidInputError(
                f"method {self.method} uses blocks of {codec_class.block_size} elements (its spec fixes them), but "
                f"group size {self.group_size} was asked for (by `group_size` or a preset); leave it unset or use "
                f"{codec_class.block_size}"
            )
        ratio = self.outlier_ratio
        if type(ratio) not in (int, float) or not 0 <= ratio < MAX_OUTLIER_RATIO:  # NaN and inf fail the range
            raise InvalidInputError(f"outlier ratio must be a number in [0, {MAX_OUTLIER_RATIO}), got {brief(ratio)}")
        object.__setattr__(self, "outlier_ratio", float(ratio))
        self._check_transforms()
        if codec_class.whole_tensor:
            extra = [
                name
                for name in ("outlier_ratio", "key_axis", "value_axis", "rotate", "stack_layers", "width_counts")
                if getattr(self, name) != {**TRANSFORM_DEFAULTS, "outlier_ratio": 0.0}[name]
            ]
            if extra:
                raise InvalidInputError(
                    f"method {self.method} codes whole tensors; {', '.join(option(n) for n in extra)} do not apply to it"
                )
        if self.params is None:
            object.__setattr__(self, "params", codec_class.Params())
        elif type(self.params) is not codec_class.Params:
            raise InvalidInputError(
                f"options of type {type(self.params).__name__} do not belong to method {self.method!r}"
            )

    def _check_transforms(self) -> None:
        choices = {
            "key_axis": AXES,
            "value_axis": AXES,
            "outlier_select": OUTLIER_SELECTIONS,
            "rotate": ROTATIONS,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise InvalidInputError(f"{option(name)} must be one of {', '.join(allowed)}, got {brief(value)}")
        for name, limit in (
            ("keep_first", MAX_KEPT_TOKENS),
            ("keep_last", MAX_KEPT_TOKENS),
            ("rope_offset", MAX_ROPE_OFFSET),
            ("rope_dim", MAX_GROUP_SIZE),
            ("rotate_seed", 1 << 63),
        ):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < limit:
                raise InvalidInputError(f"{option(name)} must be an integer from 0 to {limit - 1}, got {brief(value)}")
        if self.rotate == "none" and self.rotate_seed:
            raise InvalidInputError("`rotate_seed` only applies with `rotate=hadamard`")
        if self.outlier_select != "tails" and not self.outlier_ratio:
            raise InvalidInputError("`outlier_select` only applies with an outlier ratio (`outlier_ratio`) above 0")
        counts = self.width_counts
        if isinstance(counts, list):
            counts = tuple(counts)
            object.__setattr__(self, "width_counts", counts)
        if not isinstance(counts, tuple) or (
            counts and (len(counts) != 9 or not all(type(c) is int and 0 <= c < (1 << 48) for c in counts))
        ):
            raise InvalidInputError(
                f"width_counts must be 9 non-negative integers (widths 0 to 8), got {brief(counts)}"
            )
        for name in ("unrope", "stack_layers"):
            if type(getattr(self, name)) is not bool:
                raise InvalidInputError(f"{name} must be true or false, got {brief(getattr(self, name))}")
        if self.rope_dim % 2:
            raise InvalidInputError(f"rope_dim must be even, got {self.rope_dim}")
        scaling = self.rope_scaling
        if type(scaling) not in (int, float) or not 0 < scaling < 1e6:  # NaN fails too
            raise InvalidInputError(f"rope_scaling must be a positive number, got {brief(scaling)}")
        object.__setattr__(self, "rope_scaling", float(scaling))
        if self.rope_inv_freq is not None:
            object.__setattr__(self, "rope_inv_freq", tuple(float(f) for f in self.rope_inv_freq))

    def axis_for(self, role: str) -> str:
        """Group axis of a ``key`` or ``value`` tensor."""
        return self.key_axis if role == "key" else self.value_axis

    @classmethod
    def build(
        cls,
        method: str,
        bits: int | None = None,
        group_size: int | None = None,
        outlier_ratio: float = 0.0,
        transforms: dict[str, Any] | None = None,
        recommended: bool = False,
        **options: Any,
    ) -> CodecConfig:
        """Config from flat options; ``options`` go to the codec's parameter dataclass.

        ``bits`` / ``group_size`` default to the codec's fixed element width / block size,
        else 4 / 64; ``transforms`` holds any of :data:`TRANSFORM_DEFAULTS`' keys. With
        ``recommended``, transforms not given take the codec's measured best settings
        (``recommended_transforms``: keys per channel, un-RoPE where the cache allows, a Hadamard
        rotation, ...) and options not given the codec's ``recommended_params`` (normal's min/max
        normalization), instead of the literal defaults; what the CLI does unless a preset is named.

        Raises:
            InvalidInputError: unknown method, an option the method does not take, or a bad value.
        """
        codec_class = get_codec_class(method)
        if recommended:
            options = {**codec_class.recommended_params, **options}
        try:
            params = codec_class.Params.from_dict(options)
        except InvalidInputError as exc:
            raise InvalidInputError(f"method {brief(method)}: {exc}") from None
        given = dict(transforms or {})
        suggested = codec_class.recommended_transforms if recommended else {}
        transforms = {**codec_class.default_transforms, **suggested, **given}
        unknown = sorted(set(transforms) - set(TRANSFORM_DEFAULTS))
        if unknown:
            raise InvalidInputError(f"unknown option(s) {brief_list(unknown)}")
        optional = bool(transforms.get("unrope")) and "unrope" in suggested and "unrope" not in given
        return cls(method, bits, group_size, outlier_ratio, params, **transforms, unrope_optional=optional)

    def transforms(self) -> dict[str, Any]:
        """The transform settings (format 1.2+) that differ from their defaults (what a file's
        ``required`` lists, except the informative ``rotate_seed``)."""
        return {k: getattr(self, k) for k, v in TRANSFORM_DEFAULTS.items() if getattr(self, k) != v}

    def with_rope(self, inv_freq: tuple[float, ...], scaling: float, offset: int | None = None) -> CodecConfig:
        """This config with the model's rotary parameters un-RoPE needs (``inv_freq``: ``rope_dim / 2``
        values; ``scaling``: the factor on cos / sin); ``offset`` (position of the first token)
        defaults to the config's ``rope_offset``."""
        return dataclasses.replace(
            self,
            rope_inv_freq=tuple(inv_freq),
            rope_dim=2 * len(inv_freq),
            rope_scaling=scaling,
            rope_offset=self.rope_offset if offset is None else offset,
        )

    def with_profile(self, profile: Any) -> CodecConfig:
        """This config with a calibration profile (:class:`kvpack.profile.Profile`), named in its params.

        Raises:
            InvalidInputError: the method takes no profile.
        """
        if "profile" not in self.params.to_dict():
            raise InvalidInputError(f"method {self.method} takes no calibration profile (`profile`)")
        params = dataclasses.replace(self.params, profile=profile.fingerprint)
        return dataclasses.replace(self, params=params, profile=profile)

    def with_params(self, **changes: Any) -> CodecConfig:
        """This config with some codec options changed (the transform codec's per-entry values)."""
        return dataclasses.replace(self, params=dataclasses.replace(self.params, **changes))

    @property
    def whole_tensor(self) -> bool:
        """Whether the codec codes whole tensors (:mod:`kvpack.transforms.pca`) instead of groups."""
        return get_codec_class(self.method).whole_tensor

    def with_widths(self, widths: torch.Tensor | tuple[int, ...]) -> CodecConfig:
        """This config for a mixed-precision tensor whose groups have ``widths`` (int64 ``(n_groups,)``,
        0 to 8) or, given as a tuple, these counts of groups per width 0..8 (``width_counts``, format 1.4)."""
        counts = widths if isinstance(widths, tuple) else tuple(torch.bincount(widths, minlength=9).tolist())
        return dataclasses.replace(self, width_counts=counts)

    def make_codec(self):
        return get_codec_class(self.method)(self.bits, self.params)

    def to_dict(self) -> dict[str, Any]:
        """The five base keys plus the transform keys not at their defaults (JSON-ready)."""
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "outlier_ratio": self.outlier_ratio,
            "params": self.params.to_dict(),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in self.transforms().items()},
        }

    @classmethod
    def from_dict(cls, data: Any) -> CodecConfig:
        """Inverse of :meth:`to_dict`; accepts only known keys and registered methods.

        Raises:
            InvalidInputError: missing or unknown keys, unknown method or a bad value.
        """
        if not isinstance(data, dict) or not set(_CONFIG_KEYS) <= set(data):
            raise InvalidInputError(f"a codec config needs the keys {', '.join(_CONFIG_KEYS)}")
        unknown = sorted(set(data) - set(_CONFIG_KEYS) - set(TRANSFORM_DEFAULTS))
        if unknown:
            raise InvalidInputError(f"unknown codec config key(s) {brief_list(unknown)}")
        if not isinstance(data["method"], str):
            raise InvalidInputError("codec method must be a string")
        if type(data["bits"]) is not int or type(data["group_size"]) is not int:
            raise InvalidInputError("bits and group_size must be integers")
        params = get_codec_class(data["method"]).Params.from_dict(data["params"])
        transforms = {k: data[k] for k in TRANSFORM_DEFAULTS if k in data}
        return cls(data["method"], data["bits"], data["group_size"], data["outlier_ratio"], params, **transforms)

    def label(self) -> str:
        """Short label such as ``uniform-4 g64``, ``uniform-3 g128 sym`` or ``adaptive-3 g64 o0.01 meanstd``.

        ``all-layers`` marks stacked layers (``stack_layers``). Transforms follow (``o0.01m``
        magnitude outliers, ``Kch/Vto`` axes, ``unrope``, ``hadamard``, ``keep1/128`` protected
        tokens), then options that differ from the codec's
        defaults: ``sym`` / ``asym`` for ``symmetric``, the value for a choice, ``name=value`` otherwise.
        """
        if self.whole_tensor:
            text = self.method + (" unrope" if self.unrope else "")
            if self.keep_first or self.keep_last:
                text += f" keep{self.keep_first}/{self.keep_last}"
            return text
        defaults = get_codec_class(self.method).Params().to_dict()
        options = []
        for key, value in self.params.to_dict().items():
            if defaults.get(key) == value:
                continue
            if key == "symmetric":
                options.append("sym" if value else "asym")
            elif isinstance(value, str):
                options.append(value)
            else:
                options.append(f"{key}={value}")
        text = f"{self.method}-{self.bits} g{self.group_size}" + (" all-layers" if self.stack_layers else "")
        if self.width_counts:
            text += " mixed"
        if self.outlier_ratio:
            text += f" o{self.outlier_ratio:g}" + ("m" if self.outlier_select == "magnitude" else "")
        if self.key_axis != "token" or self.value_axis != "token":
            text += f" K{self.key_axis[:2]}/V{self.value_axis[:2]}"
        if self.unrope:
            text += " unrope"
        if self.rotate != "none":
            text += f" {self.rotate}" + (f"@{self.rotate_seed}" if self.rotate_seed else "")
        if self.keep_first or self.keep_last:
            text += f" keep{self.keep_first}/{self.keep_last}"
        return " ".join([text, *options])

    def describe(self) -> str:
        if self.whole_tensor:
            text = "transform coding: PCA per layer from a calibration profile, RD steps, range coding"
            if self.params.profile:
                text += f" (profile {self.params.profile})"
            if self.keep_first or self.keep_last:
                text += f", exact first {self.keep_first} / last {self.keep_last} tokens"
            return text + (", pre-RoPE keys" if self.unrope else "")
        options = ", ".join(f"{k}={v}" for k, v in self.params.to_dict().items())
        text = f"{self.method} {self.bits}-bit, group {self.group_size}"
        if self.stack_layers:
            text += " (K and V of all layers in one entry each)"
        if self.outlier_ratio:
            try:
                kept = outliers_per_group(self.outlier_ratio, self.group_size, self.outlier_select)
                text += (
                    f", outliers {self.outlier_ratio:g} ({kept} of {self.group_size} per group, {self.outlier_select})"
                )
            except InvalidInputError:
                text += f", outliers {self.outlier_ratio:g} ({self.outlier_select})"
        if self.key_axis != "token" or self.value_axis != "token":
            text += f", keys per {self.key_axis}, values per {self.value_axis}"
        if self.keep_first or self.keep_last:
            text += f", exact first {self.keep_first} / last {self.keep_last} tokens"
        if self.rotate != "none":
            text += f", {self.rotate} rotation"
        if self.unrope:
            text += ", pre-RoPE keys"
        return f"{text}" + (f" ({options})" if options else "")
