"""The transform codec end to end on synthetic caches: file bits on target, profiles found or refused, CLI."""

from __future__ import annotations

import pytest
import torch

from kvpack.allocation.solver import Allocation
from kvpack.compress import compress_tensors
from kvpack.config import CodecConfig
from kvpack.errors import InvalidInputError
from kvpack.formats.reader import KvpReader
from kvpack.formats.safetensors_io import write_safetensors
from kvpack.profile import PROFILES_ENV
from kvpack.report import compare_caches, describe_file
from kvpack.restore.files import decompress_file, load_kvp
from tests.cli_helpers import assert_one_line_error, run
from tests.profile_helpers import SYNTHETIC_MODEL, correlated_cache, synthetic_profile

METADATA = {"model": "synthetic", "weights_fingerprint": SYNTHETIC_MODEL}


@pytest.fixture(scope="module")
def profile():
    return synthetic_profile()


@pytest.fixture(scope="module")
def cache():
    return correlated_cache(seq=2048, text=9)


def kv_elements(tensors):
    return sum(x.numel() for name, x in tensors.items() if name.startswith("layers."))


def transform(**transforms):
    return CodecConfig.build("transform", transforms={"unrope": False, **transforms})


def rel_mse(a, b, role):
    num = sum(float(((a[n].float() - b[n].float()) ** 2).sum()) for n in a if n.endswith(role))
    return num / sum(float((a[n].float() ** 2).sum()) for n in a if n.endswith(role))


@pytest.mark.parametrize("target", [1.0, 2.0, 3.0, 4.5])
def test_the_file_lands_on_the_target_bits(tmp_path, cache, profile, target):
    path = tmp_path / "c.kvp"
    compress_tensors(cache, path, transform(), METADATA, allocation=Allocation(target_bits=target), profile=profile)
    bits = path.stat().st_size * 8 / kv_elements(cache)
    assert bits == pytest.approx(target, rel=0.02)
    restored, _ = load_kvp(path, profile=profile)
    assert torch.equal(restored["token_ids"], cache["token_ids"])
    assert rel_mse(cache, restored, "key") < 0.5 / target**2


def test_more_bits_less_error(tmp_path, cache, profile):
    errors = []
    for target in (1.0, 2.0, 4.0):
        path = tmp_path / f"{target}.kvp"
        compress_tensors(cache, path, transform(), METADATA, allocation=Allocation(target_bits=target), profile=profile)
        errors.append(rel_mse(cache, load_kvp(path, profile=profile)[0], "value"))
    assert errors[0] > errors[1] > errors[2]


def test_an_unreachable_target_is_one_clear_error(tmp_path, cache, profile):
    with pytest.raises(InvalidInputError, match="ask for more bits"):
        compress_tensors(
            cache,
            tmp_path / "x.kvp",
            transform(keep_first=512),
            METADATA,
            allocation=Allocation(target_bits=1.0),
            profile=profile,
        )
    assert not (tmp_path / "x.kvp").exists()
    with pytest.raises(InvalidInputError, match="target_bits"):
        compress_tensors(
            cache, tmp_path / "x.kvp", transform(), METADATA, allocation=Allocation(max_error=0.01), profile=profile
        )


def test_profiles_are_found_embedded_or_refused(tmp_path, cache, profile, monkeypatch):
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path / "profiles"))
    (tmp_path / "profiles").mkdir()
    with pytest.raises(InvalidInputError, match="kvpack calibrate"):
        compress_tensors(cache, tmp_path / "a.kvp", transform(), METADATA)
    (tmp_path / "profiles" / f"{SYNTHETIC_MODEL}.safetensors").write_bytes(profile.to_bytes())
    plain, embedded = tmp_path / "a.kvp", tmp_path / "b.kvp"
    compress_tensors(cache, plain, transform(), METADATA)  # found in the profile directory, 2 bits by default
    compress_tensors(cache, embedded, transform(), METADATA, embed_profile=True)
    assert plain.stat().st_size * 8 / kv_elements(cache) == pytest.approx(2.0, rel=0.02)
    assert embedded.stat().st_size * 8 / kv_elements(cache) == pytest.approx(2.0, rel=0.02)  # profile counted
    with KvpReader(embedded) as reader:  # the profile is in the file, and in its bits: the K/V got fewer
        assert reader.entry("kvpack.profile").shape == (len(profile.to_bytes()),)
    from_dir = load_kvp(plain)[0]
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(InvalidInputError, match=profile.fingerprint):
        load_kvp(plain)
    from_file = load_kvp(embedded)[0]  # no profile needed: it is in the file
    assert rel_mse(cache, from_file, "key") > rel_mse(cache, from_dir, "key")
    other = synthetic_profile(seed=3)
    with pytest.raises(InvalidInputError, match=f"{profile.fingerprint}.*not {other.fingerprint}"):
        load_kvp(plain, profile=other)
    assert describe_file(plain, verify=True, profile=profile)["verified_sections"] > 0
    out = tmp_path / "restored.safetensors"
    decompress_file(plain, out, profile=profile)
    stats = compare_caches(tmp_path / "restored.safetensors", plain, profile)
    assert stats["rows"]["all"]["rel_mse"] == pytest.approx(0.0, abs=1e-6)


def test_a_profile_of_other_keys_is_refused(tmp_path, cache):
    roped = synthetic_profile(keys="pre_rope")
    with pytest.raises(InvalidInputError, match="pre-RoPE"):
        compress_tensors(cache, tmp_path / "a.kvp", transform(), METADATA, profile=roped)
    with pytest.raises(InvalidInputError, match="does not belong"):
        compress_tensors(
            cache,
            tmp_path / "a.kvp",
            transform(),
            {"weights_fingerprint": "ffffffffffffffff"},
            profile=synthetic_profile(),
        )


def test_cli_round_trip(tmp_path, cache, profile, capsys, monkeypatch):
    dump, packed, restored = tmp_path / "c.safetensors", tmp_path / "c.kvp", tmp_path / "r.safetensors"
    write_safetensors(dump, cache, METADATA)
    profile_path = tmp_path / "p.safetensors"
    profile_path.write_bytes(profile.to_bytes())
    with_profile = ["--profile", profile_path]
    args = ["compress", dump, "-o", packed, "--method", "transform", "--no-unrope", "--target-bits", "2.5"]
    code, out, err = run(args + with_profile, capsys)
    assert code == 0, err
    assert f"profile {profile.fingerprint}" in out
    assert packed.stat().st_size * 8 / kv_elements(cache) == pytest.approx(2.5, rel=0.02)
    code, out, err = run(["decompress", packed, "-o", restored, *with_profile], capsys)
    assert code == 0, err
    code, out, err = run(["inspect", packed, "--verify", *with_profile], capsys)
    assert code == 0 and "every tensor decodes" in out
    code, out, err = run(["stats", dump, packed, *with_profile], capsys)
    assert code == 0, err
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path / "none"))
    code, out, err = run(["decompress", packed, "-o", tmp_path / "x.safetensors"], capsys)
    assert_one_line_error(code, err, profile.fingerprint)
    assert not (tmp_path / "x.safetensors").exists()
    wrong = ["compress", dump, "-o", tmp_path / "y.kvp", "--method", "uniform", "--embed-profile"]
    code, out, err = run(wrong, capsys)
    assert_one_line_error(code, err, "--method transform")
