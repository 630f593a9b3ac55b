"""Golden files: every committed ``.kvp`` decodes to what docs/format.md says, by an
independent decoder written from the spec alone (struct, json, zstandard, Python integers
for the bit stream, the standard library's NormalDist for the Gaussian levels), and the
current writer reproduces the current version's files byte for byte."""

import json
import math
import struct
import zlib
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
import zstandard

from kvpack import load_kvp
from kvpack.errors import FormatError
from kvpack.formats.reader import KvpReader
from tests.golden_files import GOLDEN, GOLDEN_DIR, SINCE, current_folder, golden_inputs, write_golden
from tests.kvp_bytes import with_header

SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "kvp-header.schema.json"
VERSION_FOLDERS = sorted(p for p in GOLDEN_DIR.iterdir() if p.is_dir())
GOLDEN_PATHS = [
    folder / f"{name}.kvp"
    for folder in VERSION_FOLDERS
    for name in GOLDEN
    if SINCE.get(name, (1, 0)) <= tuple(int(part) for part in folder.name[1:].split("."))
]
STORAGE = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}


def golden_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


# --- the independent decoder -------------------------------------------------------------


def parse_file(data: bytes) -> tuple[tuple[int, int], dict]:
    """Preamble and header exactly as the spec lays them out."""
    magic, major, minor, flags, header_offset, header_length, header_crc, preamble_crc = struct.unpack(
        "<8sHHIQQII24x", data[:64]
    )
    assert magic == b"\x89KVP\r\n\x1a\n"
    assert preamble_crc == (zlib.crc32(data[:36]) if (major, minor) >= (1, 1) else 0)
    assert header_offset + header_length == len(data)
    raw = data[header_offset:]
    assert zlib.crc32(raw) == header_crc
    if flags & 1:
        raw = zstandard.ZstdDecompressor().decompress(raw)
    return (major, minor), json.loads(raw)


def unpack_bits(data: bytes, bits: int, count: int) -> list[int]:
    """Code i = stream bits [i*bits, (i+1)*bits), LSB first; 9-16 bits as a low plane then a high plane."""
    if bits > 8:
        split = count
        low = unpack_bits(data[:split], 8, count)
        high = unpack_bits(data[split:], bits - 8, count)
        return [lo | (hi << 8) for lo, hi in zip(low, high, strict=True)]
    assert len(data) == (count * bits + 7) // 8
    stream = int.from_bytes(data, "little")
    return [(stream >> (i * bits)) & ((1 << bits) - 1) for i in range(count)]


def storage_values(data: bytes, dtype: str) -> np.ndarray:
    """Little-endian values as float32 (floats) or their own dtype (integers, bool)."""
    if dtype == "bfloat16":  # the top half of a float32
        return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
    values = np.frombuffer(data, STORAGE[dtype])
    return values.astype(np.float32) if values.dtype.kind == "f" and dtype != "float64" else values


def gaussian_levels(bits: int, normalization: str) -> np.ndarray:
    """c[i] = L (phi(t_i) - phi(t_{i+1})), t_i = Phi^-1(i / L): float64, rounded to float32."""
    normal = NormalDist()
    levels = 1 << bits
    edges = [-math.inf] + [normal.inv_cdf(i / levels) for i in range(1, levels)] + [math.inf]
    density = [0.0 if math.isinf(t) else normal.pdf(t) for t in edges]
    c = np.array([levels * (density[i] - density[i + 1]) for i in range(levels)]).astype(np.float32)
    return c / np.abs(c).max() if normalization == "minmax" else c


def decode_quantized(shape: list[int], codec: dict, sections: dict[str, bytes], dtype: str) -> np.ndarray:
    """One quantized tensor, as float32 in token-row order ``(B*S, H*D)`` rearranged to ``shape``."""
    batch, heads, seq, dim = shape
    group, bits, params = codec["group_size"], codec["bits"], codec["params"]
    n_groups = batch * seq * heads * dim // group
    codes = np.array(unpack_bits(sections["codes"], bits, n_groups * group), dtype=np.int64).reshape(n_groups, group)
    scale = storage_values(sections["scale"], "float16")[:, None]
    zero = storage_values(sections["zero_point"], "float16")[:, None] if "zero_point" in sections else None
    if codec["method"] == "uniform":
        top = np.float32((1 << bits) - 1)
        level = codes.astype(np.float32) - top / np.float32(2) if params["symmetric"] else codes.astype(np.float32)
    elif codec["method"] == "normal":
        level = gaussian_levels(bits, params["normalization"])[codes]
    else:  # adaptive: codebook chosen per element by scope
        books = storage_values(sections["codebook"], "float16").reshape(-1, 1 << bits)
        scope = params["codebook_scope"]
        feature = (np.arange(n_groups)[:, None] % (heads * dim // group)) * group + np.arange(group)[None, :]
        book = {"tensor": np.zeros_like(codes), "head": feature // dim, "group": np.arange(n_groups)[:, None]}[scope]
        level = books[np.broadcast_to(book, codes.shape), codes]
    x = (level * scale).astype(np.float32)
    if zero is not None:
        x = (x + zero).astype(np.float32)
    if codec["outlier_ratio"] > 0:
        per_side = max(1, math.floor(codec["outlier_ratio"] * group / 2 + 0.5))
        count = n_groups * 2 * per_side
        positions = np.array(unpack_bits(sections["outlier_index"], max(1, math.ceil(math.log2(group))), count))
        values = storage_values(sections["outlier_value"], dtype)
        rows = np.repeat(np.arange(n_groups), 2 * per_side)
        x[rows, positions] = values
    return x.reshape(batch, seq, heads, dim).transpose(0, 2, 1, 3)


def decode_file(path: Path) -> dict[str, torch.Tensor]:
    data = path.read_bytes()
    _, header = parse_file(data)
    out = {}
    for name, entry in header["tensors"].items():
        sections = {}
        for section, where in entry["sections"].items():
            raw = data[where["offset"] : where["offset"] + where["length"]]
            assert zlib.crc32(raw) == where["crc32"]
            sections[section] = raw
        dtype = entry["dtype"]
        if entry["codec"] is None:
            values = storage_values(sections["data"], dtype).reshape(entry["shape"])
        else:
            values = decode_quantized(entry["shape"], entry["codec"], sections, dtype)
        tensor = torch.from_numpy(np.array(values))
        out[name] = tensor.to(getattr(torch, dtype)) if dtype in ("float16", "bfloat16") else tensor
    return out


# --- the tests -----------------------------------------------------------------------------


def test_every_version_folder_holds_every_golden_file():
    assert [p.name for p in VERSION_FOLDERS] == ["v1.0", "v1.1", "v1.2"]
    assert all(p.is_file() for p in GOLDEN_PATHS)


@pytest.mark.parametrize("path", GOLDEN_PATHS, ids=golden_id)
def test_golden_file_decodes_as_the_spec_says(path):
    restored, metadata = load_kvp(path)
    expected = decode_file(path)
    assert metadata["source"] == "kvpack golden file"
    assert list(restored) == list(expected)
    for name, tensor in expected.items():
        assert restored[name].dtype == tensor.dtype or tensor.dtype == torch.float32
        assert torch.equal(restored[name], tensor.to(restored[name].dtype)), name


@pytest.mark.parametrize("path", GOLDEN_PATHS, ids=golden_id)
def test_golden_file_is_close_to_its_real_inputs(path):
    config, kind = GOLDEN[path.stem]
    restored, _ = load_kvp(path)
    for name, x in golden_inputs(kind).items():
        if config is None or not name.startswith("layers."):
            assert torch.equal(restored[name], x), name
            continue
        error = float(((restored[name].double() - x.double()) ** 2).sum() / (x.double() ** 2).sum())
        assert error < {2: 0.3, 3: 0.12, 4: 0.04, 8: 1e-4}[config.bits], (name, error)


@pytest.mark.parametrize("name", list(GOLDEN))
def test_writer_reproduces_the_current_golden_files_byte_for_byte(name, tmp_path):
    write_golden(name, tmp_path / "again.kvp")
    assert (tmp_path / "again.kvp").read_bytes() == (current_folder() / f"{name}.kvp").read_bytes()


def test_hand_worked_bytes():
    """Rows (0..7) and (1.5, -2, 0, 0.5, -0.5, 1, -1, -1.5) at 3 bits, asymmetric, groups of 8."""
    data = (current_folder() / "hand-uniform-a3-g8.kvp").read_bytes()
    # row 0: zero-point 0, scale 1, codes 0..7: sum(c_i << 3i) = 0xFAC688 -> 88 C6 FA
    # row 1: zero-point -2, scale 0.5, codes 7 0 4 5 3 6 2 1 -> 0x2B3B07 -> 07 3B 2B
    assert data[64:70] == bytes.fromhex("88C6FA 073B2B")
    assert data[70:72] == b"\0\0"  # padding to the next multiple of 8
    assert data[72:76] == bytes.fromhex("003C 0038")  # scales 1.0, 0.5 as float16
    assert data[76:80] == b"\0\0\0\0"
    assert data[80:84] == bytes.fromhex("0000 00C0")  # zero-points 0.0, -2.0
    _, header = parse_file(data)
    sections = header["tensors"]["layers.0.key"]["sections"]
    assert [(s["offset"], s["length"]) for s in sections.values()] == [(64, 6), (72, 4), (80, 4)]
    assert struct.unpack("<Q", data[16:24])[0] == 84  # the header follows the last section
    restored, _ = load_kvp(current_folder() / "hand-uniform-a3-g8.kvp")
    assert restored["layers.0.key"].flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 1.5, -2, 0, 0.5, -0.5, 1, -1, -1.5]


@pytest.mark.parametrize("path", GOLDEN_PATHS, ids=golden_id)
def test_golden_headers_match_the_json_schema(path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(parse_file(path.read_bytes())[1], schema)


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h["tensors"]["layers.0.key"]["codec"].update(bits=30),
        lambda h: h["tensors"]["layers.0.key"]["codec"].update(method="evil"),
        lambda h: h["tensors"]["layers.0.key"]["codec"]["params"].update(extra=1),
        lambda h: h["tensors"]["layers.0.key"].update(dtype="complex128"),
        lambda h: h["tensors"]["layers.0.key"].update(shape=[1, 2, -6, 64]),
        lambda h: h["tensors"]["layers.0.key"]["sections"]["codes"].update(crc32=1 << 32),
        lambda h: h.pop("metadata"),
        lambda h: h.update(required="key_axis"),
    ],
)
def test_schema_and_reader_refuse_the_same_malformed_headers(edit, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    data = (current_folder() / "uniform-a3-g16.kvp").read_bytes()
    header = parse_file(data)[1]
    edit(header)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(header, json.loads(SCHEMA.read_text()))
    bad = tmp_path / "bad.kvp"
    bad.write_bytes(with_header(data, json.dumps(header).encode()))
    with pytest.raises(FormatError):
        with KvpReader(bad) as reader:
            reader.verify()


@pytest.mark.parametrize("normalization", ["meanstd", "minmax"])
def test_gaussian_levels_match_the_spec_for_every_width(normalization):
    """kvpack's normal levels (scipy) equal the spec's formula computed with the standard library."""
    from kvpack.codecs.normal import NormalCodec, NormalParams

    for bits in range(1, 9):
        levels = NormalCodec(bits, NormalParams(normalization=normalization)).levels_for().numpy()
        assert np.array_equal(levels, gaussian_levels(bits, normalization)), bits
