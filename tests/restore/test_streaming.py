"""Streaming decompress (a safetensors writer of our own), piecewise decoding and partial reads,
on a real SmolLM2 cache."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kvpack.restore.streaming as streaming
from kvpack.allocation.solver import Allocation
from kvpack.compress import compress_file, compress_tensors
from kvpack.config import CodecConfig
from kvpack.errors import ChecksumMismatchError, InvalidInputError
from kvpack.formats.entropy import EntropyConfig
from kvpack.formats.reader import KvpReader
from kvpack.formats.safetensors_io import SafetensorsStream
from kvpack.report import compare_caches, describe_file
from kvpack.restore.decode import read_tensor
from kvpack.restore.files import decompress_file, load_kvp
from tests.cli_helpers import run

LAYERS, HEADS, HEAD_DIM, TOKENS = 30, 3, 64, 512  # SmolLM2-135M on the real_dump fixture


@pytest.fixture(scope="module")
def dump_tensors(real_dump):
    with safe_open(str(real_dump), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, dict(handle.metadata())


@pytest.fixture(scope="module")
def kvp_files(real_dump, dump_tensors, tmp_path_factory):
    """The real cache as a lossless file, a uniform 4-bit file and a stacked-entry (token level) file, with
    codes in group order (decoded piece by piece), and a uniform 4-bit file with the default feature-major codes
    (format 1.5: decoded whole, then cut)."""
    folder = tmp_path_factory.mktemp("kvp")
    tensors, metadata = dump_tensors
    files = {
        "lossless": folder / "lossless.kvp",
        "uniform": folder / "uniform.kvp",
        "stacked": folder / "stacked.kvp",
    }
    group_order = EntropyConfig(transpose=False)
    compress_tensors(tensors, files["lossless"], None, metadata)
    compress_file(real_dump, files["uniform"], CodecConfig.build("uniform", 4, 64), entropy=group_order)
    compress_file(
        real_dump,
        files["stacked"],
        CodecConfig.build("uniform", 3, LAYERS * HEADS * HEAD_DIM, transforms={"stack_layers": True}),
        entropy=group_order,
    )
    files["feature-major"] = folder / "feature-major.kvp"
    compress_file(real_dump, files["feature-major"], CodecConfig.build("uniform", 4, 64))
    return files


def whole_tensors(path, dtype=None) -> dict[str, torch.Tensor]:
    """Every tensor as the reader decodes it whole (the path decompress took before streaming)."""
    with KvpReader(path) as reader:
        return {n: read_tensor(reader, n, dtype if n != "token_ids" else None) for n in reader.tensor_names()}


def header_of(path) -> tuple[int, dict]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length])


# --- the streamed safetensors file ----------------------------------------------------------


@pytest.mark.model
@pytest.mark.parametrize("kind", ["lossless", "uniform", "stacked"])
def test_streamed_decompress_matches_the_save_file_path(kvp_files, kind, tmp_path):
    path = kvp_files[kind]
    streamed, reference = tmp_path / "streamed.safetensors", tmp_path / "reference.safetensors"
    result = decompress_file(path, streamed)
    with KvpReader(path) as reader:
        metadata = dict(reader.metadata)
    save_file(whole_tensors(path), str(reference), metadata=metadata)  # what decompress wrote before
    got, expected = load_file(str(streamed)), load_file(str(reference))
    assert sorted(got) == sorted(expected) and len(got) == 2 * LAYERS + 1 == result["tensors"]
    for name in expected:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name
    with safe_open(str(streamed), "pt") as a, safe_open(str(reference), "pt") as b:
        assert a.metadata() == b.metadata() == metadata
    # the layout the safetensors spec asks for: 8-byte LE length, space-padded JSON, no holes
    length, header = header_of(streamed)
    assert length % 8 == 0 and streamed.read_bytes()[8 + length - 1 : 8 + length] in (b"}", b" ")
    spans = [tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"]
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert 8 + length + spans[-1][1] == streamed.stat().st_size == result["output_bytes"]


@pytest.mark.model
def test_dtype_option_still_works(kvp_files, tmp_path, capsys):
    out = tmp_path / "f32.safetensors"
    code, _, err = run(["decompress", kvp_files["uniform"], "-o", out, "--dtype", "float32"], capsys)
    assert code == 0, err
    got, expected = load_file(str(out)), whole_tensors(kvp_files["uniform"], torch.float32)
    for name, x in expected.items():
        assert got[name].dtype == (torch.int64 if name == "token_ids" else torch.float32)
        assert torch.equal(got[name], x), name
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata()["dtype"] == "float32"


@pytest.mark.model
@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_midway_leaves_no_output_and_no_temp_file(kvp_files, tmp_path, monkeypatch, existing):
    out = tmp_path / "out.safetensors"
    if existing:
        out.write_bytes(b"old")
    calls = []
    real_write = SafetensorsStream.write

    def failing_write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 20:
            raise OSError(28, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(SafetensorsStream, "write", failing_write)
    with pytest.raises(OSError, match="No space"):
        decompress_file(kvp_files["uniform"], out, force=True)
    assert len(calls) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out.safetensors"] if existing else [])
    if existing:
        assert out.read_bytes() == b"old"


def corrupted_copy(path, target, name: str, at: int, mask: int):
    """A copy of ``path`` with one byte of tensor ``name``'s codes flipped by ``mask`` (its CRC-32 no longer matches)."""
    data = bytearray(path.read_bytes())
    with KvpReader(path) as reader:
        data[reader.entry(name).sections["codes"].offset + at] ^= mask
    target.write_bytes(bytes(data))
    return target


@pytest.mark.model
def test_a_corrupt_section_midway_leaves_nothing_and_one_error_line(kvp_files, tmp_path, capsys):
    bad = corrupted_copy(kvp_files["uniform"], tmp_path / "bad.kvp", "layers.20.value", 5, 0x10)
    code, _, err = run(["decompress", bad, "-o", tmp_path / "o.safetensors"], capsys)
    assert code == 2 and err.count("\n") == 1 and "checksum mismatch" in err and "layers.20.value" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.kvp"]


# --- piecewise decoding ---------------------------------------------------------------------------


PIECEWISE_CASES = {
    "uniform-4": dict(method="uniform", bits=4, group_size=64),
    "uniform-3-sym-g32": dict(method="uniform", bits=3, group_size=32, symmetric=True),
    "adaptive-head": dict(method="adaptive", bits=3, group_size=64),
    "adaptive-group": dict(method="adaptive", bits=2, group_size=64, codebook_scope="group"),
    "normal": dict(method="normal", bits=3, group_size=64),
    "mxfp4": dict(method="mxfp4"),
    "stacked-outliers-10bit-positions": dict(
        method="uniform", bits=4, group_size=3 * HEADS * HEAD_DIM, outlier_ratio=0.01, transforms={"stack_layers": True}
    ),
    "kept-tokens": dict(method="uniform", bits=4, group_size=64, transforms={"keep_first": 5, "keep_last": 11}),
    "hadamard": dict(method="uniform", bits=4, group_size=64, transforms={"rotate": "hadamard", "rotate_seed": 3}),
    "unrope-kept": dict(method="uniform", bits=4, group_size=64, transforms={"unrope": True, "keep_first": 3}),
    "channel-keys (whole)": dict(method="uniform", bits=2, group_size=32, transforms={"key_axis": "channel"}),
    "stacked-kept": dict(
        method="uniform", bits=4, group_size=HEADS * HEAD_DIM, transforms={"stack_layers": True, "keep_last": 7}
    ),
}


@pytest.mark.model
@pytest.mark.parametrize("transpose", [False, True], ids=["group order (pieces)", "feature-major (whole)"])
@pytest.mark.parametrize("case", list(PIECEWISE_CASES))
def test_piecewise_decoding_is_bit_exact(case, transpose, dump_tensors, tmp_path, monkeypatch):
    tensors, metadata = dump_tensors
    few = {
        n: x for n, x in tensors.items() if n.startswith(("layers.0.", "layers.1.", "layers.2.")) or n == "token_ids"
    }
    options = dict(PIECEWISE_CASES[case])
    config = CodecConfig.build(options.pop("method"), **options)
    path = tmp_path / "x.kvp"
    compress_tensors(few, path, config, metadata, entropy=EntropyConfig(transpose=transpose))
    expected = whole_tensors(path)
    with KvpReader(path) as reader:
        moved = [e for e in reader.entries() if any(s.transpose for s in e.sections.values())]
        assert bool(moved) == transpose
        assert not any(streaming._piecewise(e) for e in moved)
    # pieces of 8 tokens: boundaries fall inside kept tokens, groups and codebook heads
    monkeypatch.setattr(streaming, "PIECE_ELEMENTS", 1)
    got, _ = load_kvp(path)
    assert list(got) == list(expected)
    for name, x in expected.items():
        assert got[name].dtype == x.dtype and torch.equal(got[name], x), name
    part, _ = load_kvp(path, tokens=(13, 333))
    for name, x in expected.items():
        assert torch.equal(part[name], x[..., 13:333] if name == "token_ids" else x[:, :, 13:333]), name


@pytest.mark.model
def test_mixed_precision_entries_are_decoded_whole_and_cut(dump_tensors, tmp_path, monkeypatch):
    tensors, metadata = dump_tensors
    few = {
        n: x for n, x in tensors.items() if n.startswith(("layers.0.", "layers.1.", "layers.2.")) or n == "token_ids"
    }
    path = tmp_path / "m.kvp"
    compress_tensors(
        few, path, CodecConfig.build("uniform", 4, 64), metadata, allocation=Allocation("target", target_bits=3.0)
    )
    expected = whole_tensors(path)
    monkeypatch.setattr(streaming, "PIECE_ELEMENTS", 1)
    part, _ = load_kvp(path, layers=[2], tokens=(100, None))
    assert sorted(part) == ["layers.2.key", "layers.2.value", "token_ids"]
    assert torch.equal(part["layers.2.key"], expected["layers.2.key"][:, :, 100:])
    assert torch.equal(part["token_ids"], expected["token_ids"][:, 100:])
    with KvpReader(path) as reader:
        assert reader.entry("layers.2.key").codec.width_counts  # really mixed precision
        assert not streaming._piecewise(reader.entry("layers.2.key"))


# --- partial reads --------------------------------------------------------------------------------


@pytest.mark.model
def test_partial_reads_match_the_whole_cache(kvp_files, tmp_path, capsys):
    for kind in ("uniform", "stacked", "lossless"):
        path = kvp_files[kind]
        whole = whole_tensors(path)
        got, metadata = load_kvp(path, layers=[0, 3, 4, 5], tokens=(100, 300))
        assert list(got) == [f"layers.{i}.{r}" for i in (0, 3, 4, 5) for r in ("key", "value")] + ["token_ids"]
        for name, x in got.items():
            reference = whole[name][..., 100:300] if name == "token_ids" else whole[name][:, :, 100:300]
            assert torch.equal(x, reference), (kind, name)
        assert metadata["seq_len"] == str(TOKENS)  # load_kvp returns the file's metadata
        got, _ = load_kvp(path, names=["layers.7.value", "token_ids"], tokens=slice(None, 10))
        assert torch.equal(got["layers.7.value"], whole["layers.7.value"][:, :, :10])
        got, _ = load_kvp(path, names=("layers.29.key",), tokens=(500, None))
        assert list(got) == ["layers.29.key"] and torch.equal(got["layers.29.key"], whole["layers.29.key"][:, :, 500:])
    out = tmp_path / "part.safetensors"
    args = ["--layers", "0,3-5", "--tensors", "layers.3.key,layers.9.key,token_ids", "--tokens", "10:42"]
    code, _, err = run(["decompress", kvp_files["uniform"], "-o", out, *args], capsys)
    assert code == 0, err
    got = load_file(str(out))
    whole = whole_tensors(kvp_files["uniform"])
    assert sorted(got) == ["layers.3.key", "token_ids"]
    assert torch.equal(got["layers.3.key"], whole["layers.3.key"][:, :, 10:42])
    assert torch.equal(got["token_ids"], whole["token_ids"][:, 10:42])
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["seq_len"] == "32"
    assert json.loads(metadata["kvpack_selection"]) == {
        "layers": [0, 3, 4, 5],
        "tensors": ["layers.3.key", "token_ids"],
        "tokens": [10, 42],
    }


@pytest.mark.model
def test_a_selection_reads_only_its_own_sections(kvp_files, tmp_path, monkeypatch):
    read = []
    real = KvpReader.read_section

    def counting(self, name, section):
        read.append(name)
        return real(self, name, section)

    monkeypatch.setattr(KvpReader, "read_section", counting)
    decompress_file(kvp_files["uniform"], tmp_path / "a.safetensors", layers=[3], tokens=(0, 64))
    assert set(read) == {"layers.3.key", "layers.3.value", "token_ids"}
    read.clear()
    load_kvp(kvp_files["uniform"], names=["layers.11.value"])
    assert set(read) == {"layers.11.value"}
    read.clear()
    # a stacked entry holds every layer of its role: read once, each token decoded once for all selected layers
    decoded = []
    real_decode = streaming._decode_coded
    monkeypatch.setattr(streaming, "_decode_coded", lambda *a: decoded.append(a[-1] - a[-2]) or real_decode(*a))
    load_kvp(kvp_files["stacked"], layers=[1, 2, 28], names=[f"layers.{i}.key" for i in (1, 2, 28)])
    with KvpReader(kvp_files["stacked"]) as reader:
        sections = len(reader.entry("layers.all.key").sections)
    assert read == ["layers.all.key"] * sections and sum(decoded) == TOKENS


@pytest.mark.model
def test_a_selection_reads_despite_another_tensors_corrupt_bytes(kvp_files, tmp_path, capsys):
    bad = corrupted_copy(kvp_files["uniform"], tmp_path / "bad.kvp", "layers.0.key", 100, 0xFF)
    part, _ = load_kvp(bad, layers=[1, 2])
    whole = whole_tensors(kvp_files["uniform"])
    assert all(torch.equal(x, whole[name]) for name, x in part.items())
    code, _, err = run(["decompress", bad, "-o", tmp_path / "p.safetensors", "--layers", "1-2"], capsys)
    assert code == 0, err
    with pytest.raises(ChecksumMismatchError, match="layers.0.key"):
        load_kvp(bad)


@pytest.mark.model
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "30"], "layer 30 is out of range: .* holds layers 0 to 29"),
        (["--layers", "5-3"], "range 5-3 is reversed"),
        (["--layers", "1,x"], "'x' is not a layer number"),
        (["--layers", ""], "is not a layer number"),
        (["--tensors", "layers.0.kee"], "no tensor named 'layers.0.kee'; it holds 'layers.0.key'"),
        (["--tensors", "a,,b"], "an empty name"),
        (["--tokens", "300:200"], "token range 300:200 is reversed"),
        (["--tokens", "7:7"], "token range 7:7 is empty"),
        (["--tokens", "0:513"], "beyond the 512 tokens of tensor 'layers.0.key'"),
        (["--tokens", "512:"], "beyond the 512 tokens"),
        (["--tokens", ":"], "expected A:B, A: or :B"),
        (["--tokens", "1-5"], "expected A:B, A: or :B"),
        (["--layers", "2", "--tensors", "layers.3.key"], "the selection holds no tensor"),
    ],
)
def test_bad_selections_give_one_line_and_exit_2(kvp_files, tmp_path, capsys, args, message):
    out = tmp_path / "o.safetensors"
    code, _, err = run(["decompress", kvp_files["uniform"], "-o", out, *args], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.model
def test_api_selection_errors(kvp_files):
    with pytest.raises(InvalidInputError, match="bounds are non-negative integers"):
        load_kvp(kvp_files["uniform"], tokens=(-1, 5))
    with pytest.raises(InvalidInputError, match="a step is not supported"):
        load_kvp(kvp_files["uniform"], tokens=slice(0, 10, 2))
    with pytest.raises(InvalidInputError, match="layers are integers"):
        load_kvp(kvp_files["uniform"], layers=["0"])
    with pytest.raises(InvalidInputError, match="layer selection is empty"):
        load_kvp(kvp_files["uniform"], layers=[])


# --- stats and inspect ----------------------------------------------------------------------


@pytest.mark.model
def test_stats_and_verify_work_piece_by_piece(real_dump, kvp_files, tmp_path, monkeypatch):
    restored = tmp_path / "r.safetensors"
    decompress_file(kvp_files["uniform"], restored)
    whole = compare_caches(real_dump, kvp_files["uniform"])
    with KvpReader(kvp_files["stacked"]) as reader:
        sections = reader.verify()
    monkeypatch.setattr(streaming, "PIECE_ELEMENTS", 1)  # pieces of 8 tokens
    for pieces in (compare_caches(real_dump, kvp_files["uniform"]), compare_caches(real_dump, restored)):
        for row in ("key", "value", "all"):
            for metric in ("rel_mse", "max_abs_err", "cosine_mean"):
                assert pieces["rows"][row][metric] == pytest.approx(whole["rows"][row][metric], rel=1e-9)
    assert compare_caches(kvp_files["uniform"], restored)["rows"]["all"]["rel_mse"] == 0.0
    assert describe_file(kvp_files["stacked"], verify=True)["verified_sections"] == sections


@pytest.mark.model
def test_stats_decodes_a_stacked_entry_once_for_all_its_layers(real_dump, dump_tensors, kvp_files, monkeypatch):
    decoded = []
    real_decode = streaming._decode_coded
    monkeypatch.setattr(streaming, "_decode_coded", lambda *a: decoded.append(a[-1] - a[-2]) or real_decode(*a))
    result = compare_caches(real_dump, kvp_files["stacked"])
    assert sum(decoded) == 2 * TOKENS  # keys and values: every token decoded once, not once per layer
    tensors, whole = dump_tensors[0], whole_tensors(kvp_files["stacked"])
    pairs = [(tensors[f"layers.{i}.value"].double(), whole[f"layers.{i}.value"].double()) for i in range(LAYERS)]
    expected = sum(float(((x - y) ** 2).sum()) for x, y in pairs) / sum(float((x**2).sum()) for x, _ in pairs)
    assert result["rows"]["value"]["rel_mse"] == pytest.approx(expected, rel=1e-9)
    both = compare_caches(kvp_files["uniform"], kvp_files["stacked"])  # a stacked file against a per-layer one
    assert both["tensors"] == 2 * LAYERS and both["rows"]["all"]["rel_mse"] > 0


@pytest.mark.model
def test_feature_major_files_read_a_selection_whole_and_cut(kvp_files, monkeypatch):
    """Format 1.5's default codes: a token range decodes the selected entries whole (fused kernel), then cuts."""
    path = kvp_files["feature-major"]
    expected = whole_tensors(path)
    read = []
    real_read = KvpReader.read_section
    monkeypatch.setattr(KvpReader, "read_section", lambda self, n, s: read.append(n) or real_read(self, n, s))
    part, _ = load_kvp(path, layers=[3], tokens=(100, 300))
    assert sorted(part) == ["layers.3.key", "layers.3.value", "token_ids"]
    assert set(read) == {"layers.3.key", "layers.3.value", "token_ids"}
    for name in ("layers.3.key", "layers.3.value"):
        assert torch.equal(part[name], expected[name][:, :, 100:300]), name
    assert torch.equal(part["token_ids"], expected["token_ids"][:, 100:300])
