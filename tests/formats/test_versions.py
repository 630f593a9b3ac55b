"""Versioning rules of docs/format.md: older minor versions read, newer minor versions read
unless they require something unknown (then the error names both versions), unknown optional
keys and sections ignored, a newer major version refused."""

import json

import pytest
import torch

from kvpack import load_kvp
from kvpack.errors import ChecksumMismatchError, FormatError, UnsupportedVersionError
from kvpack.formats.constants import FORMAT_MAJOR, FORMAT_MINOR, pack_preamble
from kvpack.formats.reader import KvpReader
from tests.golden_files import GOLDEN_DIR, current_folder
from tests.kvp_bytes import append_section, dumps, header_json, preamble_fields, read_everything, with_header

SAMPLE = current_folder() / "adaptive-head-a4-g32-bf16.kvp"


def edited(header_edit, version=(1, 7), data: bytes | None = None) -> bytes:
    data = SAMPLE.read_bytes() if data is None else data
    header = json.loads(header_json(data))
    header_edit(header)
    return with_header(data, dumps(header), version=version)


@pytest.mark.parametrize("version", [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5)])
def test_older_minor_version_reads_like_the_current_one(version):
    folder = GOLDEN_DIR / "v{}.{}".format(*version)
    for older in sorted(folder.glob("*.kvp")):
        with KvpReader(older) as reader:
            assert reader.version == version
        old, new = load_kvp(older)[0], load_kvp(current_folder() / older.name)[0]
        assert all(torch.equal(old[name], new[name]) for name in new)


# every key format 1.1 defined: what a 1.1 reader accepts in `required`
KEYS_OF_1_1 = {"metadata", "tensors", "required", "shape", "dtype", "codec", "sections", "offset", "length"} | {
    "crc32",
    "method",
    "bits",
    "group_size",
    "outlier_ratio",
    "params",
    "symmetric",
    "normalization",
    "codebook_scope",
}


def test_files_using_the_1_2_transforms_require_them_and_others_look_like_1_1():
    """A 1.1 reader refuses a file that uses a transform (its `required` names keys 1.1 lacks);
    a file that uses none has only 1.1 keys and codecs. Likewise the 1.5 section keys."""
    for path in sorted(current_folder().glob("*.kvp")):
        header = json.loads(header_json(path.read_bytes()))
        used = set()
        for entry in header["tensors"].values():
            if entry["codec"] is not None:
                used |= set(entry["codec"]) - KEYS_OF_1_1
            for section in entry["sections"].values():
                used |= set(section) - {"offset", "length", "crc32"}
        assert sorted(used - {"rotate_seed"}) == header.get("required", []), path.name  # the seed is informative
        assert not used & KEYS_OF_1_1


def test_the_reader_knows_every_codec_option_as_a_required_key():
    """A key `required` may name is any key this format defines, codec options included (format 1.6
    added the transform codec's `chunk_tokens`, `deadzone`, `distortion`, `stream_bytes` and `profile`)."""
    import dataclasses

    from kvpack.codecs.base import Codec
    from kvpack.formats.constants import KNOWN_REQUIRED_KEYS

    options = {f.name for codec in Codec.registry.values() for f in dataclasses.fields(codec.Params)}
    assert options <= KNOWN_REQUIRED_KEYS
    assert {"chunk_tokens", "deadzone", "distortion", "stream_bytes", "profile"} <= options


def test_newer_minor_version_with_unknown_optional_keys_and_sections_reads(tmp_path):
    data, extra = append_section(SAMPLE.read_bytes(), b"an index a later version adds")

    def add_optional(header):
        header["created_by"] = {"tool": "kvpack 9.9", "nested": [1, 2, {"x": None}]}
        header["required"] = []
        tensor = header["tensors"]["layers.0.value"]
        tensor["key_axis"] = "token"
        tensor["sections"]["codes"]["compression"] = "none"
        header["tensors"]["token_ids"]["sections"]["token_index"] = extra  # after the last section

    path = tmp_path / "newer.kvp"
    path.write_bytes(edited(add_optional, data=data))
    with KvpReader(path) as reader:
        assert reader.version == (1, 7)
        assert reader.verify() == 4 + 4 + 1 + 1  # key, value, token_ids and the extra section
    expected = load_kvp(SAMPLE)[0]
    assert all(torch.equal(t, expected[n]) for n, t in read_everything(path).items())

    flipped = bytearray(path.read_bytes())
    flipped[extra["offset"] + 3] ^= 0x10
    path.write_bytes(bytes(flipped))
    with pytest.raises(ChecksumMismatchError, match="token_index"):
        read_everything(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h.update(required=["entropy_coder"]), "requires unknown header key.*'entropy_coder'"),
        (lambda h: h["tensors"]["layers.0.key"]["codec"].update(method="lattice-e8"), "unknown method 'lattice-e8'"),
        (lambda h: h["tensors"]["layers.0.key"]["codec"]["params"].update(key_axis="channel"), "key_axis"),
        (lambda h: h["tensors"]["layers.0.key"]["codec"].update(bits=12), "bits"),
        (lambda h: h["tensors"]["token_ids"].update(dtype="uint32"), "unsupported dtype 'uint32'"),
    ],
)
def test_newer_minor_version_needing_something_unknown_names_both_versions(edit, message, tmp_path):
    path = tmp_path / "needs.kvp"
    path.write_bytes(edited(edit, version=(1, 7)))
    with pytest.raises(UnsupportedVersionError, match=message) as info:
        KvpReader(path)
    assert f"the file is format 1.7, this kvpack reads up to {FORMAT_MAJOR}.{FORMAT_MINOR}; upgrade kvpack" in str(
        info.value
    )
    # the same header in a file claiming the current version is corruption, not a version problem
    path.write_bytes(edited(edit, version=(1, 2)))
    with pytest.raises(FormatError, match="corrupted header") as info:
        KvpReader(path)
    assert not isinstance(info.value, UnsupportedVersionError)


@pytest.mark.parametrize("name", ["transform-unrope-keep1-1", "transform-embedded-profile-bf16"])
def test_a_1_5_reader_asks_for_an_upgrade_on_a_transform_file(name, monkeypatch):
    """docs/format.md §7: a 1.5 reader (no `transform` method, reading up to 1.5) refuses a 1.6 file that
    uses the transform codec with an UnsupportedVersionError naming the method, both versions and what to
    do; the same file claiming 1.5 would be corruption. (The real 1.5 reader, commit 96be2ac, says the same.)"""
    from kvpack.codecs.base import Codec
    from kvpack.formats import header

    monkeypatch.delitem(Codec.registry, "transform")
    monkeypatch.setattr(header, "FORMAT_MINOR", 5)
    keys_of_1_6 = {"chunk_tokens", "deadzone", "distortion", "stream_bytes", "profile"}
    monkeypatch.setattr(header, "KNOWN_REQUIRED_KEYS", header.KNOWN_REQUIRED_KEYS - keys_of_1_6)
    path = current_folder() / f"{name}.kvp"
    with pytest.raises(UnsupportedVersionError) as info:
        KvpReader(path)
    assert str(info.value).startswith(f"{path}: tensor 'layers.0.key': unknown method 'transform'")
    assert str(info.value).endswith("the file is format 1.6, this kvpack reads up to 1.5; upgrade kvpack")
    # a 1.6 file without the transform codec holds nothing a 1.5 reader lacks
    with KvpReader(current_folder() / "uniform-a3-g16.kvp") as reader:
        assert reader.version == (1, 6)


def test_newer_major_version_is_refused_naming_both(tmp_path):
    path = tmp_path / "major.kvp"
    data = SAMPLE.read_bytes()
    _, _, _, flags, offset, length, crc, _ = preamble_fields(data)
    path.write_bytes(pack_preamble(2, 0, flags, offset, length, crc) + data[64:])
    with pytest.raises(UnsupportedVersionError, match=r"format version 2\.0 is newer .* reads \(1\.\d+\); upgrade"):
        KvpReader(path)
