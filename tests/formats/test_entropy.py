"""The entropy stage (format 1.5, docs/format.md §6.3): lossless, smaller on real caches, refused when lying."""

import json
import zlib

import numpy as np
import pytest
import torch
import zstandard

from kvpack import compress_tensors, load_kvp
from kvpack.entry import encode_tensor
from kvpack.errors import FormatError, UnsupportedVersionError
from kvpack.formats.entropy import MAX_EXPANSION, EntropyConfig, section_transposes, transposed, untransposed
from kvpack.formats.reader import KvpReader
from kvpack.packing import unpack
from tests.codec_settings import CODECS
from tests.kvp_bytes import dumps, header_json, read_everything, with_header


def code_bits(path) -> float:
    """Stored bits of the code sections per coded element."""
    with KvpReader(path) as reader:
        entries = [e for e in reader.entries() if e.codec is not None]
        stored = sum(s.length for e in entries for name, s in e.sections.items() if name.startswith("codes"))
        dense = sum(s.decoded_length for e in entries for name, s in e.sections.items() if name.startswith("codes"))
        bits = entries[0].codec.bits
    return bits * stored / dense


@pytest.mark.model
@pytest.mark.parametrize("name", list(CODECS))
def test_entropy_stage_is_lossless_and_never_larger_on_a_real_cache(name, real_tensors, tmp_path):
    config = CODECS[name]
    compress_tensors(real_tensors, tmp_path / "dense.kvp", config, entropy=EntropyConfig.off())
    compress_tensors(real_tensors, tmp_path / "zstd.kvp", config)
    dense, _ = load_kvp(tmp_path / "dense.kvp")
    packed, _ = load_kvp(tmp_path / "zstd.kvp")
    assert list(dense) == list(packed) and all(torch.equal(dense[n], packed[n]) for n in dense)
    assert (tmp_path / "zstd.kvp").stat().st_size < (tmp_path / "dense.kvp").stat().st_size
    with KvpReader(tmp_path / "dense.kvp") as reader:
        assert not any(s.encoding or s.transpose for e in reader.entries() for s in e.sections.values())
    with KvpReader(tmp_path / "zstd.kvp") as reader:
        for entry in reader.entries():
            for section in entry.sections.values():
                assert section.length <= section.decoded_length
                assert section.encoding is None or section.length < section.decoded_length


@pytest.mark.model
def test_real_uniform_codes_lose_a_sixth_of_their_bits_and_two_bit_codes_a_third(real_tensors, tmp_path):
    """Measured on the 512-token test cache: 4-bit 3.31, 2-bit 1.25 code bits (docs/benchmarks.md has the
    full-size numbers); the bounds leave a margin."""
    for config, bound in ((CODECS["uniform-4"], 3.45), (CODECS["uniform-2"], 1.35)):
        compress_tensors(real_tensors, tmp_path / "x.kvp", config, force=True)
        assert code_bits(tmp_path / "x.kvp") < bound


@pytest.mark.model
def test_feature_major_codes_beat_group_order(real_tensors, tmp_path):
    config = CODECS["uniform-4"]
    compress_tensors(real_tensors, tmp_path / "t.kvp", config)
    compress_tensors(real_tensors, tmp_path / "g.kvp", config, entropy=EntropyConfig(transpose=False))
    assert code_bits(tmp_path / "t.kvp") < code_bits(tmp_path / "g.kvp")


@pytest.mark.model
def test_transposed_sections_hold_the_codes_feature_major(real_tensors):
    x = real_tensors["layers.2.value"]
    config = CODECS["uniform-4"]
    transposes = section_transposes("layers.2.value", tuple(x.shape), "float16", config, EntropyConfig())
    features = x.shape[1] * x.shape[3]
    assert transposes == {"codes": features}
    plain = unpack(np.frombuffer(encode_tensor("layers.2.value", x, config)["codes"], np.uint8), 4, x.numel())
    moved = unpack(
        np.frombuffer(encode_tensor("layers.2.value", x, config, transposes=transposes)["codes"], np.uint8),
        4,
        x.numel(),
    )
    rows = x.numel() // features
    # stream position c * rows + r holds code r * features + c (§6.3)
    assert np.array_equal(moved.reshape(features, rows), plain.reshape(rows, features).T)
    codes = torch.arange(24)
    assert torch.equal(untransposed(transposed(codes, 6), 6), codes)


def test_channel_axis_codes_stay_in_group_order():
    config = CODECS["kivi-2"]
    keys = section_transposes("layers.0.key", (1, 3, 64, 64), "float16", config, EntropyConfig())
    values = section_transposes("layers.0.value", (1, 3, 64, 64), "float16", config, EntropyConfig())
    assert keys == {} and values == {"codes": 192}


@pytest.mark.model
def test_kinds_and_level_select_what_is_compressed(real_tensors, tmp_path):
    compress_tensors(
        real_tensors,
        tmp_path / "c.kvp",
        CODECS["uniform-4"],
        entropy=EntropyConfig(level=19, kinds=frozenset({"codes"})),
    )
    with KvpReader(tmp_path / "c.kvp") as reader:
        encoded = {name for e in reader.entries() for name, s in e.sections.items() if s.encoding}
        header = json.loads(header_json((tmp_path / "c.kvp").read_bytes()))
    assert encoded == {"codes"}
    assert {"encoding", "transpose"} <= set(header["required"])  # a 1.4 reader refuses the file


@pytest.fixture(scope="module")
def sample(tmp_path_factory, real_tensors):
    path = tmp_path_factory.mktemp("entropy") / "s.kvp"
    tensors = {n: real_tensors[n] for n in ("layers.0.key", "layers.0.value", "token_ids")}
    compress_tensors(tensors, path, CODECS["uniform-4"], entropy=EntropyConfig(kinds=frozenset({"codes"})))
    return path.read_bytes()


def edit(data: bytes, change, version=None) -> bytes:
    header = json.loads(header_json(data))
    change(header)
    return with_header(data, dumps(header), version=version)


def codes_of(header):
    return header["tensors"]["layers.0.key"]["sections"]["codes"]


def set_key(key, value, section="codes"):
    def change(header):
        header["tensors"]["layers.0.key"]["sections"][section][key] = value

    return change


@pytest.mark.model
@pytest.mark.parametrize(
    "change, message",
    [
        (set_key("encoding", 1), "encoding must be a string"),
        (set_key("encoding", None), "encoding must be a string"),  # null is not "absent"
        (set_key("transpose", 1), "transpose must be an integer of at least 2"),
        (set_key("transpose", 7), "does not divide"),
        (set_key("transpose", 2, "scale"), "only sections of 1- to 8-bit codes"),
        (set_key("encoding", "zstd", "scale"), "zstd section"),  # the stored scale bytes are not shorter
        (lambda h: codes_of(h).pop("encoding"), "but shape"),  # the frame is shorter than the dense codes
        (lambda h: codes_of(h).pop("transpose"), None),  # decodes, but to other values: not refused by the header
    ],
)
def test_lying_section_keys_are_refused(sample, tmp_path, change, message):
    path = tmp_path / "x.kvp"
    path.write_bytes(edit(sample, change))
    if message is None:
        read_everything(path)  # a valid file of other values: nothing to refuse
        return
    with pytest.raises(FormatError, match=message):
        read_everything(path)


@pytest.mark.model
def test_unknown_encoding_names_the_version_in_a_newer_file(sample, tmp_path):
    path = tmp_path / "x.kvp"
    path.write_bytes(edit(sample, set_key("encoding", "brotli")))
    with pytest.raises(FormatError, match="unknown encoding"):
        read_everything(path)
    path.write_bytes(edit(sample, set_key("encoding", "brotli"), version=(1, 9)))
    with pytest.raises(UnsupportedVersionError, match="upgrade kvpack"):
        read_everything(path)


def replace_codes(data: bytes, payload: bytes) -> bytes:
    """The key's codes section replaced by ``payload`` of the same length, its checksum recomputed."""
    header = json.loads(header_json(data))
    where = codes_of(header)
    assert len(payload) == where["length"]
    body = bytearray(data)
    body[where["offset"] : where["offset"] + where["length"]] = payload
    where["crc32"] = zlib.crc32(payload)
    return with_header(bytes(body), dumps(header))


@pytest.mark.model
def test_a_frame_of_the_wrong_size_or_with_trailing_bytes_is_refused(sample, tmp_path):
    header = json.loads(header_json(sample))
    where = codes_of(header)
    assert where["encoding"] == "zstd"
    stored = sample[where["offset"] : where["offset"] + where["length"]]
    raw = zstandard.ZstdDecompressor().decompress(stored)
    path = tmp_path / "x.kvp"
    for payload, message in (
        (zstandard.ZstdCompressor(level=1).compress(raw[:-1]), "declares"),  # one byte short
        (zstandard.ZstdCompressor(level=1, write_content_size=False).compress(raw), "declares"),
        (b"\0" * 16, "not a zstd frame"),
    ):
        payload = payload[: where["length"]] + b"\0" * max(0, where["length"] - len(payload))
        path.write_bytes(replace_codes(sample, payload))
        with pytest.raises(FormatError, match=message):
            read_everything(path)


@pytest.mark.model
def test_a_section_cannot_declare_more_than_the_zstd_limit(sample, tmp_path):
    """A reader never allocates more than MAX_EXPANSION times a section's stored bytes (plus 1 KiB)."""

    def grow(header):
        entry = header["tensors"]["layers.0.key"]
        entry["shape"][2] *= 1 << 16  # the derived code length grows, the stored frame does not

    path = tmp_path / "x.kvp"
    path.write_bytes(edit(sample, grow))
    with pytest.raises(FormatError, match=f"at most {MAX_EXPANSION}x"):
        KvpReader(path)


@pytest.mark.model
def test_transpose_on_an_unknown_optional_section_is_ignored(sample, tmp_path):
    from tests.kvp_bytes import append_section

    data, extra = append_section(sample, b"an index a later version adds")

    def add(header):
        header["tensors"]["token_ids"]["sections"]["token_index"] = dict(extra, transpose=3)

    path = tmp_path / "x.kvp"
    path.write_bytes(edit(data, add, version=(1, 7)))
    read_everything(path)
