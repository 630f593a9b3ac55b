"""Calibration profiles (kvpack.profile): exact round trip, content fingerprint, lookup, and hostile files refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save

from kvpack.errors import FormatError, InvalidInputError
from kvpack.profile import PROFILES_ENV, default_profile_path, find_profile, load_profile, profile_from_bytes
from tests.profile_helpers import SYNTHETIC_MODEL, synthetic_profile


@pytest.fixture(scope="module")
def profile():
    return synthetic_profile()


def test_round_trip_is_exact_and_fingerprinted(profile, tmp_path):
    path = tmp_path / "p.safetensors"
    path.write_bytes(profile.to_bytes())
    loaded = load_profile(path)
    assert loaded.fingerprint == profile.fingerprint and len(profile.fingerprint) == 16
    for name, array in profile.tensors().items():
        assert np.array_equal(loaded.tensors()[name], array), name
    assert loaded.metadata == profile.metadata
    assert profile.nbytes == sum(a.nbytes for a in profile.tensors().values())


def test_fingerprint_changes_with_content():
    assert synthetic_profile(seed=0).fingerprint != synthetic_profile(seed=1).fingerprint


def _tampered(profile, change):
    tensors = profile.tensors()
    metadata = dict(profile.metadata)
    change(tensors, metadata)
    return save(tensors, metadata=metadata)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda t, m: m.update(format="something-else"), "format"),
        (lambda t, m: t.pop("layers.1.value.weight"), "missing weight"),
        (lambda t, m: t.pop("layers.0.key.mean"), "missing mean"),
        (lambda t, m: t.__setitem__("layers.0.key.basis", t["layers.0.key.basis"] * 2), "not orthonormal"),
        (lambda t, m: t.__setitem__("layers.0.key.mean", np.full_like(t["layers.0.key.mean"], np.nan)), "NaN"),
        (lambda t, m: t.__setitem__("layers.0.value.variance", -t["layers.0.value.variance"]), "negative"),
        (lambda t, m: t.__setitem__("layers.0.key.mean", t["layers.0.key.mean"][:3]), "basis must be float16"),
        (
            lambda t, m: t.__setitem__("layers.0.key.weight", t["layers.0.key.weight"].astype(np.float64)),
            "not F32 or F16",
        ),
        (lambda t, m: t.__setitem__("layers.0.key.mean", t["layers.0.key.mean"] + 1), "corrupted"),
        (lambda t, m: t.__setitem__("layers.5.key.mean", t["layers.0.key.mean"]), "numbered 0 to L-1"),
        (lambda t, m: t.__setitem__("other", t["layers.0.key.mean"]), "unexpected tensor"),
        (lambda t, m: m.update(fingerprint="xyz"), "16 hex digits"),
    ],
)
def test_hostile_profiles_are_refused(profile, change, words):
    with pytest.raises(FormatError, match=words):
        profile_from_bytes(_tampered(profile, change), "p")


@pytest.mark.parametrize("cut", [0, 7, 8, 100, -1])
def test_truncated_profiles_are_refused(profile, cut):
    data = profile.to_bytes()
    with pytest.raises(FormatError):
        profile_from_bytes(data[:cut] if cut >= 0 else data[:-1], "p")


def test_a_lying_header_length_is_refused():
    data = (1 << 60).to_bytes(8, "little") + json.dumps({"__metadata__": {}}).encode()
    with pytest.raises(FormatError, match="not a kvpack profile"):
        profile_from_bytes(data, "p")


def test_lookup_in_the_profile_directory(profile, tmp_path, monkeypatch):
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path))
    assert default_profile_path(SYNTHETIC_MODEL) == tmp_path / f"{SYNTHETIC_MODEL}.safetensors"
    with pytest.raises(InvalidInputError, match="kvpack calibrate") as missing:
        find_profile(SYNTHETIC_MODEL, model="synthetic")
    assert "\n" not in str(missing.value) and SYNTHETIC_MODEL in str(missing.value)
    default_profile_path(SYNTHETIC_MODEL).write_bytes(profile.to_bytes())
    assert find_profile(SYNTHETIC_MODEL).fingerprint == profile.fingerprint
    with pytest.raises(InvalidInputError, match="0000000000000000"):
        find_profile(SYNTHETIC_MODEL, fingerprint="0000000000000000")
    other = tmp_path / "other.safetensors"
    other.write_bytes(profile.to_bytes())
    with pytest.raises(InvalidInputError, match="calibrate a profile for that model"):
        find_profile("ffffffffffffffff", path=other)
    with pytest.raises(InvalidInputError, match="16 hex digits"):
        default_profile_path("../../etc/passwd")
