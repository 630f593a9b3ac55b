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
from pathlib import Path
from typing import Any

from kvpack.codecs import CodecParams, get_codec_class
from kvpack.errors import InvalidInputError, brief, brief_list

MIN_BITS, MAX_BITS = 1, 8
MAX_GROUP_SIZE = 1 << 16
MAX_OUTLIER_RATIO = 0.5
_CONFIG_KEYS = ("method", "bits", "group_size", "outlier_ratio", "params")


@dataclass(frozen=True)
class CodecConfig:
    """How every K and V tensor of a cache is encoded.

    Attributes:
        method: registered codec name (``uniform``, ``normal``, ``adaptive``).
        bits: code width in bits, 1 to 8.
        group_size: elements per group; must divide ``num_kv_heads * head_dim`` of each tensor.
        outlier_ratio: fraction of each group kept exactly (half the lowest, half the
            highest values), in ``[0, 0.5)``.
        params: the codec's option dataclass; ``None`` means its defaults.

    Raises:
        InvalidInputError: any field out of range or of the wrong type.
    """

    method: str
    bits: int = 4
    group_size: int = 64
    outlier_ratio: float = 0.0
    params: CodecParams | None = field(default=None)

    def __post_init__(self) -> None:
        codec_class = get_codec_class(self.method)
        if type(self.bits) is not int or not MIN_BITS <= self.bits <= MAX_BITS:
            raise InvalidInputError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {brief(self.bits)}")
        if type(self.group_size) is not int or not 1 <= self.group_size <= MAX_GROUP_SIZE:
            raise InvalidInputError(
                f"group size must be an integer from 1 to {MAX_GROUP_SIZE}, got {brief(self.group_size)}"
            )
        ratio = self.outlier_ratio
        if type(ratio) not in (int, float) or not 0 <= ratio < MAX_OUTLIER_RATIO:  # NaN and inf fail the range
            raise InvalidInputError(f"outlier ratio must be a number in [0, {MAX_OUTLIER_RATIO}), got {brief(ratio)}")
        object.__setattr__(self, "outlier_ratio", float(ratio))
        if self.params is None:
            object.__setattr__(self, "params", codec_class.Params())
        elif type(self.params) is not codec_class.Params:
            raise InvalidInputError(
                f"options of type {type(self.params).__name__} do not belong to method {self.method!r}"
            )

    @classmethod
    def build(
        cls, method: str, bits: int = 4, group_size: int = 64, outlier_ratio: float = 0.0, **options: Any
    ) -> CodecConfig:
        """Config from flat options; ``options`` go to the codec's parameter dataclass.

        Raises:
            InvalidInputError: unknown method, an option the method does not take, or a bad value.
        """
        codec_class = get_codec_class(method)
        try:
            params = codec_class.Params.from_dict(options)
        except InvalidInputError as exc:
            raise InvalidInputError(f"method {brief(method)}: {exc}") from None
        return cls(method, bits, group_size, outlier_ratio, params)

    def make_codec(self):
        return get_codec_class(self.method)(self.bits, self.params)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "outlier_ratio": self.outlier_ratio,
            "params": self.params.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> CodecConfig:
        """Inverse of :meth:`to_dict`; accepts only known keys and registered methods.

        Raises:
            InvalidInputError: unknown keys, unknown method or a bad value.
        """
        if not isinstance(data, dict) or set(data) != set(_CONFIG_KEYS):
            raise InvalidInputError(f"a codec config needs exactly the keys {', '.join(_CONFIG_KEYS)}")
        if not isinstance(data["method"], str):
            raise InvalidInputError("codec method must be a string")
        params = get_codec_class(data["method"]).Params.from_dict(data["params"])
        return cls(data["method"], data["bits"], data["group_size"], data["outlier_ratio"], params)

    def describe(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.params.to_dict().items())
        text = f"{self.method} {self.bits}-bit, group {self.group_size}"
        if self.outlier_ratio:
            text += f", outliers {self.outlier_ratio:g}"
        return f"{text}" + (f" ({options})" if options else "")


def load_codec_config(path: str | Path) -> CodecConfig:
    """A codec config from a JSON or TOML file.

    Accepted forms: ``{"method", "bits", "group_size", "outlier_ratio", "params"}`` (what
    :meth:`CodecConfig.to_dict` and ``compress --json`` write, also under a ``"config"``
    key), or flat: ``method`` plus any of ``bits``, ``group_size``, ``outlier_ratio`` and
    the codec's options.

    Raises:
        InvalidInputError: missing or unreadable file, invalid JSON/TOML, unknown keys or values.
    """
    import json
    import tomllib

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
    if not isinstance(data, dict) or not isinstance(data.get("method"), str):
        raise InvalidInputError(f"{path}: a codec config needs a string 'method'")
    try:
        if "params" in data:
            return CodecConfig.from_dict({"bits": 4, "group_size": 64, "outlier_ratio": 0.0, **data})
        flat = dict(data)
        method = flat.pop("method")
        options = {f.name for f in dataclasses.fields(get_codec_class(method).Params)}
        unknown = sorted(set(flat) - options - {"bits", "group_size", "outlier_ratio"})
        if unknown:
            raise InvalidInputError(
                f"unknown key(s) {brief_list(unknown)}; accepted: method, bits, group_size, outlier_ratio"
                + (f" and the {method} options {', '.join(sorted(options))}" if options else "")
            )
        main = {key: flat.pop(key) for key in ("bits", "group_size", "outlier_ratio") if key in flat}
        return CodecConfig.build(method, **main, **flat)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: {exc}") from None
    except TypeError as exc:
        raise InvalidInputError(f"{path}: {exc}") from None
