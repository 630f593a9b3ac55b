"""A model's calibration profile: per layer, the PCA basis and error weights of its keys and values.

The transform codec (:mod:`kvpack.codecs.transform`; KVTC, Staniszewski & Łańcucki, ICLR 2026,
arXiv 2511.01815) projects every token's keys (before RoPE) and values, all kv heads together
(``F = num_kv_heads * head_dim`` features), onto a basis learned once per model by ``kvpack
calibrate``. A profile is a safetensors file holding, for each layer ``i`` and role ``key`` /
``value``:

- ``layers.{i}.{role}.mean``: float32 ``(F,)``, the calibration mean;
- ``layers.{i}.{role}.basis``: float16 ``(F, F)``, orthonormal columns (components), by
  decreasing variance;
- ``layers.{i}.{role}.variance``: float32 ``(F,)``, each component's calibration variance;
- ``layers.{i}.{role}.weight``: float32 ``(F,)``, how much a unit squared error on the component
  moves the attention output (keys: the queries' second moments, SQuat / SMAQ's query-covariance
  view; values: the output projection's sensitivity), in one unit across layers and roles so
  one rate–distortion trade-off serves the whole cache.

Its metadata names the model (``weights_fingerprint`` and the dump's identity keys) and the
profile's own content ``fingerprint`` (16 hex digits of a SHA-256 over every tensor). This module
is torch-free: numpy arrays in, bytes out; it reads untrusted files with bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvpack.errors import FormatError, InvalidInputError, brief
from kvpack.storage import is_url, open_read

PROFILE_FORMAT = "kvpack-profile-1"
ROLES = ("key", "value")
PARTS = ("mean", "basis", "variance", "weight")
_DTYPES = {"mean": np.float32, "basis": np.float16, "variance": np.float32, "weight": np.float32}
#: Limits a profile file is checked against before anything is allocated.
MAX_PROFILE_BYTES = 16 << 30
MAX_LAYERS = 1 << 12
MAX_FEATURES = 1 << 15
#: Columns of a stored basis are orthonormal to float16 precision; beyond this it is not a basis.
ORTHONORMAL_TOLERANCE = 2e-2
#: Environment variable naming the profile directory.
PROFILES_ENV = "KVPACK_PROFILES"
_NAME = re.compile(r"^layers\.(0|[1-9][0-9]*)\.(key|value)\.(mean|basis|variance|weight)$", re.ASCII)
#: The safetensors dtypes a profile holds (anything else is refused before the tensors are read).
_STORED_DTYPES = {"F32", "F16"}
_HEX16 = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class LayerBasis:
    """One layer's keys or values: ``mean`` (F,), ``basis`` (F, F) float32 from float16, ``variance``
    and ``weight`` (F,) float32 (see the module docstring)."""

    mean: np.ndarray
    basis: np.ndarray
    variance: np.ndarray
    weight: np.ndarray

    @property
    def features(self) -> int:
        return int(self.mean.shape[0])


@dataclass(frozen=True)
class Profile:
    """A calibration profile: ``layers[i][role]`` -> :class:`LayerBasis`, plus string ``metadata``.

    ``metadata`` holds at least ``format``, ``fingerprint`` (the content hash), ``weights_fingerprint``
    (the model's), ``model``, ``num_layers``, ``num_kv_heads``, ``head_dim`` and ``keys`` (``pre_rope``
    when keys were un-RoPE'd, ``as_cached`` for models without rotary embeddings).
    """

    layers: list[dict[str, LayerBasis]]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.metadata["fingerprint"]

    @property
    def model_fingerprint(self) -> str:
        return self.metadata.get("weights_fingerprint", "")

    @property
    def model_fingerprints(self) -> tuple[str, ...]:
        """Every fingerprint that names this profile's model: its weights' and, calibrated from a GGUF
        file, the GGUF's (what llama.cpp state files are named by)."""
        return tuple(f for f in (self.model_fingerprint, self.metadata.get("gguf_fingerprint", "")) if f)

    @property
    def label(self) -> str:
        """``profile 0123abcd… of model NAME (weights 89ab…)`` for messages."""
        return (
            f"profile {self.fingerprint} of model {self.metadata.get('model', '?')} (weights {self.model_fingerprint})"
        )

    def layer(self, index: int, role: str) -> LayerBasis:
        """The basis of one layer's keys or values.

        Raises:
            InvalidInputError: the profile has no such layer (it was made for another model).
        """
        if not 0 <= index < len(self.layers):
            raise InvalidInputError(f"{self.label} has {len(self.layers)} layers, not layer {index}")
        return self.layers[index][role]

    def tensors(self) -> dict[str, np.ndarray]:
        """The profile's arrays by safetensors name, in their stored dtypes."""
        return {
            f"layers.{i}.{role}.{part}": np.ascontiguousarray(getattr(layer[role], part), dtype=_DTYPES[part])
            for i, layer in enumerate(self.layers)
            for role in ROLES
            for part in PARTS
        }

    def to_bytes(self) -> bytes:
        """The profile as a safetensors file (metadata includes the content ``fingerprint``), the same
        bytes for the same profile: tensors and metadata in sorted order (the safetensors library's
        own writer orders its metadata differently each run)."""
        tensors = self.tensors()
        header: dict = {"__metadata__": dict(sorted(self.metadata.items()))}
        offset = 0
        for name in sorted(tensors):
            array = tensors[name]
            dtype = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[array.dtype]
            header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
            offset += array.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        body = b"".join(
            np.ascontiguousarray(tensors[name]).astype(tensors[name].dtype.newbyteorder("<")).tobytes()
            for name in sorted(tensors)
        )
        return len(text).to_bytes(8, "little") + text + body

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors().values())


def content_fingerprint(tensors: dict[str, np.ndarray]) -> str:
    """16 hex digits of a SHA-256 over every tensor's name, dtype, shape and bytes (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def make_profile(layers: list[dict[str, LayerBasis]], metadata: dict[str, str]) -> Profile:
    """A profile from computed layers: arrays rounded to their stored dtypes, fingerprint set."""
    rounded = [
        {
            role: LayerBasis(*(np.asarray(getattr(layer[role], p), dtype=_DTYPES[p]).astype(np.float32) for p in PARTS))
            for role in ROLES
        }
        for layer in layers
    ]
    profile = Profile(rounded, {**metadata, "format": PROFILE_FORMAT, "fingerprint": ""})
    meta = {**profile.metadata, "fingerprint": content_fingerprint(profile.tensors())}
    return Profile(rounded, meta)


def profile_from_bytes(data: bytes, where: str = "profile") -> Profile:
    """Parse and validate a profile (see :func:`load_profile`) from the bytes of its file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    if len(data) > MAX_PROFILE_BYTES:
        raise FormatError(f"{where}: {len(data)} bytes, more than a profile may hold ({MAX_PROFILE_BYTES})")
    try:
        header_len = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
        if not 0 < header_len <= min(len(data) - 8, 100 << 20):
            raise ValueError("truncated or not a safetensors file")
        header = json.loads(data[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
        dtypes = {name: entry.get("dtype") for name, entry in header.items() if name != "__metadata__"}
        odd = sorted(name for name, dtype in dtypes.items() if dtype not in _STORED_DTYPES)
        if odd:
            raise ValueError(f"tensor {brief(odd[0])} is {brief(dtypes[odd[0]])}, not F32 or F16")
        tensors = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise FormatError(f"{where}: not a kvpack profile ({exc})") from None
    except RecursionError:
        raise FormatError(f"{where}: not a kvpack profile (JSON nested too deeply)") from None
    return _validated(tensors, metadata, where)


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile file.

    Checks the format, every layer's four arrays (shapes, dtypes, finite values, non-negative
    variances and weights, orthonormal bases) and that the content matches its fingerprint.

    ``path`` may be a URL (:mod:`kvpack.storage`): the profile is read in one ranged request.

    Raises:
        InvalidInputError: the file does not exist (or cannot be read from its storage).
        FormatError: a truncated, corrupted or foreign file, naming what is wrong.
    """
    if is_url(path):
        with open_read(str(path)) as handle:
            if handle.size > MAX_PROFILE_BYTES:
                raise FormatError(f"{path}: {handle.size} bytes, more than a profile may hold ({MAX_PROFILE_BYTES})")
            data = handle.read()
        return profile_from_bytes(data, str(path))
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"profile {path} does not exist")
    size = path.stat().st_size
    if size > MAX_PROFILE_BYTES:
        raise FormatError(f"{path}: {size} bytes, more than a profile may hold ({MAX_PROFILE_BYTES})")
    return profile_from_bytes(path.read_bytes(), str(path))


def _validated(tensors: dict[str, np.ndarray], metadata: dict[str, str], where: str) -> Profile:
    def fail(message: str) -> FormatError:
        return FormatError(f"{where}: not a valid kvpack profile: {message}")

    if metadata.get("format") != PROFILE_FORMAT:
        raise fail(f"format {brief(metadata.get('format'))}, expected {PROFILE_FORMAT}")
    found: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    for name, array in tensors.items():
        match = _NAME.match(name)
        if not match:
            raise fail(f"unexpected tensor {brief(name)}")
        layer = int(match.group(1))
        if layer >= MAX_LAYERS:
            raise fail(f"layer {layer} beyond the limit of {MAX_LAYERS}")
        found.setdefault(layer, {}).setdefault(match.group(2), {})[match.group(3)] = array
    if not found or sorted(found) != list(range(len(found))):
        raise fail("the layers must be numbered 0 to L-1, each with a key and a value basis")
    layers = []
    for index in range(len(found)):
        layer = {}
        for role in ROLES:
            parts = found[index].get(role, {})
            missing = [p for p in PARTS if p not in parts]
            if missing:
                raise fail(f"layer {index} {role}: missing {', '.join(missing)}")
            layer[role] = _checked_basis(parts, f"layer {index} {role}", fail)
        layers.append(layer)
    fingerprint = metadata.get("fingerprint", "")
    if not _HEX16.match(fingerprint):
        raise fail(f"fingerprint {brief(fingerprint)} is not 16 hex digits")
    profile = Profile(layers, dict(metadata))
    actual = content_fingerprint(profile.tensors())
    if actual != fingerprint:
        raise fail(f"its content hashes to {actual}, not its fingerprint {fingerprint} (corrupted)")
    return profile


def _checked_basis(parts: dict[str, np.ndarray], label: str, fail) -> LayerBasis:
    mean = parts["mean"]
    features = mean.shape[0] if mean.ndim == 1 else -1
    if not 0 < features <= MAX_FEATURES:
        raise fail(f"{label}: mean must be a vector of 1 to {MAX_FEATURES} values")
    shapes = {"mean": (features,), "basis": (features, features), "variance": (features,), "weight": (features,)}
    for part, shape in shapes.items():
        if parts[part].shape != shape or parts[part].dtype != _DTYPES[part]:
            raise fail(
                f"{label}: {part} must be {np.dtype(_DTYPES[part]).name} {shape}, got "
                f"{parts[part].dtype} {parts[part].shape}"
            )
        if not np.isfinite(parts[part]).all():
            raise fail(f"{label}: {part} holds NaN or infinite values")
    values = {part: parts[part].astype(np.float32) for part in PARTS}
    if (values["variance"] < 0).any() or (values["weight"] < 0).any():
        raise fail(f"{label}: negative variance or weight")
    gram = values["basis"].T.astype(np.float64) @ values["basis"].astype(np.float64)
    if np.abs(gram - np.eye(features)).max() > ORTHONORMAL_TOLERANCE:
        raise fail(f"{label}: the basis is not orthonormal")
    return LayerBasis(values["mean"], values["basis"], values["variance"], values["weight"])


def profile_directory() -> Path:
    """Where profiles are found by fingerprint: ``$KVPACK_PROFILES``, else ``kvpack/profiles`` under
    the user's cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    override = os.environ.get(PROFILES_ENV)
    if override:
        return Path(override)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "kvpack" / "profiles"


def model_key(metadata: dict[str, str]) -> str | None:
    """The fingerprint a cache's metadata names its model by: ``weights_fingerprint`` (a transformers
    dump) or ``gguf_fingerprint`` (a llama.cpp state file); ``None`` for neither."""
    return metadata.get("weights_fingerprint") or metadata.get("gguf_fingerprint") or None


def default_profile_path(model_fingerprint: str) -> Path:
    """The profile directory's file for a model (by its ``weights_fingerprint``; a GGUF-calibrated
    profile is also found under its ``gguf_fingerprint``, :func:`link_aliases`)."""
    if not _HEX16.match(model_fingerprint or ""):
        raise InvalidInputError(f"a model fingerprint is 16 hex digits, got {brief(model_fingerprint)}")
    return profile_directory() / f"{model_fingerprint}.safetensors"


def find_profile(
    model_fingerprint: str | None = None, fingerprint: str | None = None, model: str = "", path=None
) -> Profile:
    """The profile a cache or a file needs: ``path`` if given, else the profile directory's profile of
    the model ``model_fingerprint``. With ``fingerprint``, the profile must be that one.

    Raises:
        InvalidInputError: none found, or a different profile than the one asked for (naming the
            fingerprint, the model and the ``kvpack calibrate`` command that makes it).
        FormatError: the profile file is corrupted.
    """
    wanted = f"profile {fingerprint}" if fingerprint else "a profile"
    of_model = f" of model {model or '?'} (weights {model_fingerprint or '?'})"
    if path is None:
        if not model_fingerprint:
            raise InvalidInputError(f"{wanted}{of_model} is needed: pass --profile PATH (`profile=`)")
        path = default_profile_path(model_fingerprint)
        if not path.is_file():
            raise InvalidInputError(
                f"no {wanted.replace('a profile', 'profile')}{of_model} in {profile_directory()}: make it with "
                f"`kvpack calibrate --model MODEL -o {path}` (a GGUF: --model DIR --gguf-file NAME.gguf; "
                "or pass --profile PATH)"
            )
    profile = load_profile(path)
    if fingerprint and profile.fingerprint != fingerprint:
        raise InvalidInputError(
            f"{path} is profile {profile.fingerprint}, but this needs {wanted}{of_model}; "
            "pass the profile the file was made with"
        )
    if model_fingerprint and profile.model_fingerprints and model_fingerprint not in profile.model_fingerprints:
        raise InvalidInputError(
            f"{path} is {profile.label}, but the cache is{of_model}: calibrate a profile for that model"
        )
    return profile


def link_aliases(path: Path, profile: Profile) -> list[Path]:
    """In the profile directory, make ``profile`` (written at ``path``) findable under each of its
    other model fingerprints (:attr:`Profile.model_fingerprints`) with a symbolic link, replaced
    atomically. Returns the links."""
    links = []
    for fingerprint in profile.model_fingerprints:
        link = default_profile_path(fingerprint)
        if link == path:
            continue
        temporary = link.with_name(f".{link.name}.link")
        temporary.unlink(missing_ok=True)
        os.symlink(path.name if path.parent == link.parent else path, temporary)
        os.replace(temporary, link)
        links.append(link)
    return links
