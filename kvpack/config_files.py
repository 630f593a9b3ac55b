"""Codec configs from files (JSON / TOML) and from flat keys with presets: what ``--config`` and sweep runs read.

Only declared keys are accepted and every value goes through :class:`~kvpack.config.CodecConfig`'s
validation; nothing read from a file is evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

from kvpack.codecs import get_codec_class
from kvpack.config import TRANSFORM_DEFAULTS, CodecConfig
from kvpack.errors import InvalidInputError, brief_list
from kvpack.presets import flat_options


def load_codec_config(path: str | Path) -> CodecConfig:
    """A codec config from a JSON or TOML file.

    Accepted forms: ``{"method", "bits", "group_size", "outlier_ratio", "params", ...transforms}``
    (what :meth:`CodecConfig.to_dict` and ``compress --json`` write, also under a ``"config"``
    key), or flat: ``method`` and/or ``preset`` plus any of ``bits``, ``group_size``,
    ``outlier_ratio``, the transform keys (``key_axis``, ``keep_first``, ``rotate``,
    ``unrope``, ...) and the codec's options (given keys override the preset's).

    Raises:
        InvalidInputError: missing or unreadable file, invalid JSON/TOML, unknown keys or values.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInputError(
            f"{path}: not a valid {path.suffix.lstrip('.') or 'JSON'} codec config ({exc})"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if isinstance(data, dict) and "preset" in data and "params" not in data:
        rest = {k: v for k, v in data.items() if k != "preset"}
        try:
            data = flat_options(data["preset"] if isinstance(data["preset"], str) else repr(data["preset"]), rest)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("method"), str):
        raise InvalidInputError(f"{path}: a codec config needs a string 'method' (or a 'preset')")
    try:
        if "params" in data:
            codec_class = get_codec_class(data["method"])
            defaults = {"bits": codec_class.fixed_bits or 4, "group_size": codec_class.block_size or 64}
            return CodecConfig.from_dict({**defaults, "outlier_ratio": 0.0, **data})
        return config_from_flat(data)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: {exc}") from None
    except TypeError as exc:
        raise InvalidInputError(f"{path}: {exc}") from None


def config_from_flat(data: dict[str, Any], recommended: bool = False) -> CodecConfig:
    """A config from flat keys: ``method`` plus any of ``bits``, ``group_size``,
    ``outlier_ratio``, the transform keys and the codec's options; literal, or with
    ``recommended`` the codec's measured best settings for what is not given (as the command
    line without a preset, :meth:`CodecConfig.build`).

    Raises:
        InvalidInputError: a missing method, unknown keys or a bad value.
    """
    flat = dict(data)
    method = flat.pop("method", None)
    if not isinstance(method, str):
        raise InvalidInputError("a codec config needs a string 'method'")
    options = {f.name for f in dataclasses.fields(get_codec_class(method).Params)}
    unknown = sorted(set(flat) - options - {"bits", "group_size", "outlier_ratio"} - set(TRANSFORM_DEFAULTS))
    if unknown:
        raise InvalidInputError(
            f"unknown key(s) {brief_list(unknown)}; accepted: method, bits, group_size, outlier_ratio, "
            f"{', '.join(TRANSFORM_DEFAULTS)}"
            + (f" and the {method} options {', '.join(sorted(options))}" if options else "")
        )
    main = {key: flat.pop(key) for key in ("bits", "group_size", "outlier_ratio") if key in flat}
    transforms = {key: flat.pop(key) for key in TRANSFORM_DEFAULTS if key in flat}
    try:
        return CodecConfig.build(method, **main, transforms=transforms, recommended=recommended, **flat)
    except TypeError as exc:
        raise InvalidInputError(str(exc)) from None
