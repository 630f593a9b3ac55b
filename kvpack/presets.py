"""Named recipes from the literature, as codec options (``--preset``; listed by ``kvpack methods``).

A preset is a dict of the options :func:`kvpack.config.CodecConfig.build` takes (plus
``transforms``); options given explicitly next to a preset override it. Where a paper's
recipe needs something a cache file alone cannot give (calibration data, per-channel
thresholds fitted offline), the preset uses the closest data-free setting and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvpack.errors import InvalidInputError, lookup


@dataclass(frozen=True)
class Preset:
    """A named recipe: codec options, a one-line summary and its source."""

    name: str
    summary: str
    source: str
    options: dict[str, Any]


def _kivi(bits: int) -> Preset:
    """KIVI with its residual: ``r128``, the last 128 tokens exact (the baseline ``kivi-B-r0`` keeps none)."""
    return Preset(
        f"kivi-{bits}-r128",
        f"{bits}-bit asym int, keys per channel / values per token, groups of 32, the last 128 tokens exact "
        "(KIVI's full-precision residual)",
        "KIVI, Liu et al. 2024, arXiv 2402.02750 (group size 32, residual length 128)",
        {
            "method": "uniform",
            "bits": bits,
            "group_size": 32,
            "transforms": {"key_axis": "channel", "value_axis": "token", "keep_last": 128},
        },
    )


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        _kivi(2),
        _kivi(4),
        Preset(
            "kvquant-3",
            "3-bit learned codebook (nuq3), pre-RoPE keys per channel, values per token, dense-and-sparse "
            "outliers by magnitude (ratio 0.01: 1 of each group of 64), the first token exact (attention sink)",
            "KVQuant, Hooper et al. 2024, arXiv 2401.18079 (codebooks learned per head from the cache itself, "
            "not offline calibration; groups of 64 tokens instead of whole-sequence channel scaling)",
            {
                "method": "adaptive",
                "bits": 3,
                "group_size": 64,
                "outlier_ratio": 0.01,
                "transforms": {
                    "key_axis": "channel",
                    "value_axis": "token",
                    "unrope": True,
                    "outlier_select": "magnitude",
                    "keep_first": 1,
                },
            },
        ),
        Preset(
            "qaq-uniform",
            "4-bit asym int in groups of 64 (QAQ's head level when head_dim is 64; else add --level head), "
            "outliers kept exactly from both tails (ratio 0.01: the lowest and the highest of each group of 64), "
            "at one fixed width (QAQ's attention-aware widths are the bit allocator's job)",
            "QAQ, Dong et al. 2024, arXiv 2403.04643",
            {"method": "uniform", "bits": 4, "group_size": 64, "outlier_ratio": 0.01},
        ),
        Preset(
            "hadamard-4",
            "4-bit asym int per token in groups of 64 after a seeded Hadamard rotation of each head vector",
            "QuaRot, Ashkboos et al. 2024, arXiv 2404.00456",
            {"method": "uniform", "bits": 4, "group_size": 64, "transforms": {"rotate": "hadamard"}},
        ),
    )
}


RENAMED_KIVI = ("kivi-2", "kivi-4")


def renamed_kivi(name: str, kind: str) -> InvalidInputError:
    """The one-line error for an old, ambiguous KIVI name, giving both new names."""
    preferred, other = (f"{name}-r0", f"{name}-r128") if kind == "baseline" else (f"{name}-r128", f"{name}-r0")
    what = {
        f"{name}-r0": "KIVI's quantizer, no recent tokens in full precision",
        f"{name}-r128": "the last 128 tokens stored exactly, as KIVI's residual",
    }
    other_kind = "preset" if kind == "baseline" else "baseline"
    return InvalidInputError(
        f"{kind} {name!r} was renamed, as the baseline and the preset shared it: use {preferred} "
        f"({what[preferred]}), or the {other_kind} {other} ({what[other]})"
    )


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        InvalidInputError: no such preset, or an old KIVI name (naming the new ones).
    """
    if name in RENAMED_KIVI:
        raise renamed_kivi(name, "preset")
    return lookup(PRESETS, name, "preset", sort=False)


def expand_preset(name: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` options (None = not given) over the preset's; transforms merged key by key."""
    base = dict(get_preset(name).options) if name else {}
    transforms = dict(base.pop("transforms", {}))
    transforms.update({k: v for k, v in given.pop("transforms", {}).items() if v is not None})
    base.update({k: v for k, v in given.items() if v is not None})
    base["transforms"] = transforms
    return base


def flat_options(preset: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """Flat config keys (as :func:`kvpack.config.config_from_flat` takes) of a preset with ``given`` over it."""
    base = dict(get_preset(preset).options) if preset else {}
    base.update(base.pop("transforms", {}))
    base.update(given)
    return base
