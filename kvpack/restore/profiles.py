"""The calibration profile a ``.kvp`` of the transform codec decodes with: given, embedded, or found by fingerprint.

A file names its profile in each transform entry (``params.profile``, 16 hex digits) and in its
metadata (``profile``, ``profile_model``: the model's ``weights_fingerprint``). Decoding needs
exactly that profile: the one passed (``--profile`` / ``profile=``), else the one embedded in the
file (entry ``kvpack.profile``, ``--embed-profile``), else the profile directory's
(:func:`kvpack.profile.find_profile`). Anything else is a one-line error naming the fingerprint and
the model, never a wrong decode.
"""

from __future__ import annotations

import os

from kvpack.entry import decode_entry
from kvpack.errors import FormatError, InvalidInputError
from kvpack.formats.reader import KvpReader
from kvpack.profile import Profile, find_profile, model_key, profile_from_bytes

#: The lossless entry an embedded profile is stored in (its safetensors bytes, uint8).
PROFILE_TENSOR = "kvpack.profile"


def attach_profile(reader: KvpReader, profile: Profile | str | os.PathLike | None = None) -> Profile | None:
    """Give every transform entry of ``reader`` its profile; returns it (``None``: the file needs none).

    Raises:
        InvalidInputError: no profile found, or one other than the file's (naming both fingerprints
            and the model).
        FormatError: a corrupted profile (file or embedded).
    """
    entries = [e for e in reader.entries() if e.codec is not None and e.codec.whole_tensor]
    if not entries:
        return None
    wanted = {e.codec.params.profile for e in entries}
    if len(wanted) != 1:
        raise InvalidInputError(f"{reader.path}: its entries name several profiles ({', '.join(sorted(wanted))})")
    (fingerprint,) = wanted
    metadata = reader.metadata
    model = metadata.get("model", "")
    model_fingerprint = metadata.get("profile_model") or model_key(metadata)
    if isinstance(profile, Profile):
        found = profile
    elif profile is None and PROFILE_TENSOR in reader.keys():
        entry = reader.entry(PROFILE_TENSOR)
        if entry.codec is not None or entry.dtype != "uint8" or len(entry.shape) != 1:
            raise FormatError(
                f"{reader.path}: the embedded profile {PROFILE_TENSOR!r} must be a lossless 1-D uint8 tensor"
            )
        raw = decode_entry(reader.entry(PROFILE_TENSOR), reader.read_sections(PROFILE_TENSOR))
        found = profile_from_bytes(raw.numpy().tobytes(), f"{reader.path} (embedded profile)")
    else:
        found = find_profile(model_fingerprint, fingerprint, model, profile)
    if found.fingerprint != fingerprint:
        raise InvalidInputError(
            f"{reader.path} was made with profile {fingerprint} of model {model or '?'} (weights "
            f"{model_fingerprint or '?'}), not {found.fingerprint}: pass that profile (--profile)"
        )
    for entry in entries:
        reader.attach(entry.name, entry.codec.with_profile(found))
    return found
