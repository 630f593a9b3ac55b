"""Golden files: every committed ``.kvp`` decodes to what docs/format.md says, by an
independent decoder written from the spec alone (struct, json, zstandard, numpy, Python
integers for the bit stream, the standard library's NormalDist for the Gaussian levels, the
minifloat formula of §8 for the element formats, hashlib and the `constriction` range coder for
the transform codec of §6.5; none of kvpack's decoding code), and the current writer reproduces
the current version's files byte for byte. Tensors that go through the Hadamard rotation or
un-RoPE (§6.1 steps 3 and 4) or the transform codec's basis (§6.5), specified to float32
accuracy, may differ from kvpack's by one ulp of their dtype; everything else must be equal."""

import hashlib
import json
import math
import re
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
from tests.golden_files import (
    GOLDEN,
    GOLDEN_DIR,
    PROFILE,
    PROFILE_FILE,
    SINCE,
    current_folder,
    golden_inputs,
    profile_file_bytes,
    write_golden,
)
from tests.kvp_bytes import with_header

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "kvp-header.schema.json"
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

#: §4: the transform keys of a codec config and their defaults (a missing key has its default).
TRANSFORM_DEFAULTS = {
    "key_axis": "token",
    "value_axis": "token",
    "keep_first": 0,
    "keep_last": 0,
    "outlier_select": "tails",
    "rotate": "none",
    "rotate_seed": 0,
    "unrope": False,
    "rope_dim": 0,
    "rope_offset": 0,
    "rope_scaling": 1.0,
    "stack_layers": False,
    "width_counts": [],
}
#: §5: the role is `key` for tensors named `layers.{i}.key`, and for the stacked entry `layers.all.key`.
KEY_NAME = re.compile(r"layers\.(0|[1-9][0-9]{0,8})\.key")  # §4: ASCII digits, no leading zeros
STACKED_NAME = re.compile(r"layers\.all\.(key|value)")
#: §8: element formats: method -> (exponent bits, mantissa bits, bias, E8M0 block scale, codes a reader refuses).
ELEMENT_FORMATS = {
    "fp8-e4m3": (4, 3, 7, False, {0x7F, 0xFF}),
    "fp8-e5m2": (5, 2, 15, False, set(range(0x7C, 0x80)) | set(range(0xFC, 0x100))),
    "fp4-e2m1": (2, 1, 1, False, set()),
    "mxfp8": (4, 3, 7, True, {0x7F, 0xFF}),
    "mxfp6-e2m3": (2, 3, 1, True, set()),
    "mxfp6-e3m2": (3, 2, 3, True, set()),
    "mxfp4": (2, 1, 1, True, set()),
}


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


class Section(bytes):
    """A section's bytes once its zstd stage is undone (§6.3), with its ``transpose`` (0: group order)."""

    transpose = 0


def unpack_bits(data: bytes, bits: int, count: int) -> list[int]:
    """Code i = stream bits [i*bits, (i+1)*bits), LSB first; 9-16 bits as a low plane then a high plane.
    §6.3: in a section with transpose K, stream position c·(n/K) + r holds code r·K + c."""
    transpose = getattr(data, "transpose", 0)
    if transpose:
        assert bits <= 8 and count % transpose == 0
        stream = unpack_bits(bytes(data), bits, count)
        rows = count // transpose
        return [stream[(i % transpose) * rows + i // transpose] for i in range(count)]
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


def minifloat_value(q: int, exponent_bits: int, mantissa_bits: int, bias: int) -> float:
    """§8: v(q) of the bit pattern q = S E M (sign on top), in float64."""
    sign = -1.0 if (q >> (exponent_bits + mantissa_bits)) & 1 else 1.0
    e = (q >> mantissa_bits) & ((1 << exponent_bits) - 1)
    m = q & ((1 << mantissa_bits) - 1)
    if e > 0:
        return sign * 2.0 ** (e - bias) * (1 + m / 2**mantissa_bits)
    return sign * 2.0 ** (1 - bias) * (m / 2**mantissa_bits)  # subnormals, and -0 for S=1, E=M=0


def minifloat_table(method: str) -> np.ndarray:
    """v(q) for every code of an element format, float64."""
    exponent_bits, mantissa_bits, bias, _, _ = ELEMENT_FORMATS[method]
    return np.array(
        [
            minifloat_value(q, exponent_bits, mantissa_bits, bias)
            for q in range(1 << (1 + exponent_bits + mantissa_bits))
        ]
    )


def e8m0_scale(e: int) -> float:
    """§8: the E8M0 exponent byte e is X = 2^(e - 127); e = 255 (NaN) is refused."""
    assert 0 <= e < 255
    return 2.0 ** (e - 127)


def transforms_of(codec: dict) -> dict:
    return {**TRANSFORM_DEFAULTS, **{key: codec[key] for key in TRANSFORM_DEFAULTS if key in codec}}


def role_of(name: str) -> str:
    stacked = STACKED_NAME.fullmatch(name)
    return "key" if KEY_NAME.fullmatch(name) or (stacked and stacked.group(1) == "key") else "value"


def coded_tokens(name: str, shape: list[int], codec: dict) -> tuple[int, int]:
    """§5: (kf, C): the coded tokens are [kf, kf + C); the other S - C tokens are kept."""
    t = transforms_of(codec)
    seq, group = shape[2], codec["group_size"]
    kf = min(t["keep_first"], seq)
    remaining = max(seq - kf - t["keep_last"], 0)
    return kf, remaining if t[f"{role_of(name)}_axis"] == "token" else remaining - remaining % group


def outlier_count(codec: dict) -> int:
    """§6: outliers per group, in float64 left to right."""
    ratio, group = codec["outlier_ratio"], codec["group_size"]
    if transforms_of(codec)["outlier_select"] == "tails":
        return 2 * max(1, math.floor(ratio * group / 2 + 0.5))
    return max(1, math.floor(ratio * group + 0.5))


def inverse_hadamard(y: np.ndarray, sign_bits: list[int]) -> np.ndarray:
    """§6.1 step 3: every block of b channels (b the largest power of two dividing D) times H_b, then times s_c."""
    dim = y.shape[-1]
    assert dim % 2 == 0 and len(sign_bits) == dim
    block = dim & -dim
    walsh = np.ones((1, 1))
    while walsh.shape[0] < block:  # W_2n = [[W_n, W_n], [W_n, -W_n]]
        walsh = np.block([[walsh, walsh], [walsh, -walsh]])
    h = (walsh / math.sqrt(block)).astype(np.float32)
    blocks = y.astype(np.float32).reshape(*y.shape[:-1], dim // block, block)
    x = np.matmul(blocks, h).reshape(y.shape).astype(np.float32)
    signs = np.array([-1.0 if bit else 1.0 for bit in sign_bits], dtype=np.float32)
    return x * signs


def apply_rope(y: np.ndarray, inv_freq: np.ndarray, first_position: int, scaling: float) -> np.ndarray:
    """§6.1 step 4: rotate channels i and i + h of every head by p_t * f_i, in float64, rounded to float32."""
    half = len(inv_freq)
    assert np.all(np.isfinite(inv_freq)) and np.all(inv_freq >= 0)
    positions = np.arange(first_position, first_position + y.shape[2], dtype=np.float64)
    theta = positions[:, None] * inv_freq.astype(np.float64)[None, :]  # (C, h)
    cos, sin = np.cos(theta), np.sin(theta)
    low, high = y[..., :half].astype(np.float64), y[..., half : 2 * half].astype(np.float64)
    x = y.astype(np.float32).copy()
    x[..., :half] = ((low * cos - high * sin) * scaling).astype(np.float32)
    x[..., half : 2 * half] = ((high * cos + low * sin) * scaling).astype(np.float32)
    return x


def decode_groups(
    shape: list[int], coded: int, codec: dict, sections: dict[str, bytes], dtype: str, axis: str
) -> np.ndarray:
    """§8 and §6: every group reconstructed by its codec, outliers written over it: (n_groups, G) float32."""
    batch, heads, _, dim = shape
    method, group, bits, params = codec["method"], codec["group_size"], codec["bits"], codec["params"]
    n_groups = batch * heads * coded * dim // group
    codes = np.array(unpack_bits(sections["codes"], bits, n_groups * group), dtype=np.int64).reshape(n_groups, group)
    if method in ELEMENT_FORMATS:
        _, _, _, block_scaled, refused = ELEMENT_FORMATS[method]
        assert not refused & set(codes.flatten().tolist())
        table = minifloat_table(method)
        if block_scaled:  # X = 2^(e - 127); v(q) X in float64, rounded to float32
            scale = np.array([e8m0_scale(e) for e in sections["scale"]], dtype=np.float64)[:, None]
            x = (table[codes] * scale).astype(np.float32)
        else:  # float16 scale; v(q) s in float32
            x = table.astype(np.float32)[codes] * storage_values(sections["scale"], "float16")[:, None]
    else:
        scale = storage_values(sections["scale"], "float16")[:, None]
        zero = storage_values(sections["zero_point"], "float16")[:, None] if "zero_point" in sections else None
        if method == "uniform":
            top = np.float32((1 << bits) - 1)
            level = codes.astype(np.float32) - top / np.float32(2) if params["symmetric"] else codes.astype(np.float32)
        elif method == "normal":
            level = gaussian_levels(bits, params["normalization"])[codes]
        else:  # adaptive: codebook chosen per element by scope
            books = storage_values(sections["codebook"], "float16").reshape(-1, 1 << bits)
            g = np.arange(n_groups)[:, None]
            if axis == "token":  # the head of the element's feature
                head = ((g % (heads * dim // group)) * group + np.arange(group)[None, :]) // dim
            else:  # §5: group g belongs to head (g div (D C / G)) mod H
                head = (g // (dim * coded // group)) % heads if n_groups else g
            book = {"tensor": np.zeros_like(codes), "head": head, "group": g}[params["codebook_scope"]]
            level = books[np.broadcast_to(book, codes.shape), codes]
        x = (level * scale).astype(np.float32)
        if zero is not None:
            x = (x + zero).astype(np.float32)
    return write_outliers(x, codec, sections, dtype)


def write_outliers(x: np.ndarray, codec: dict, sections: dict[str, bytes], dtype: str) -> np.ndarray:
    """§6: each outlier value written back at its position in its group."""
    n_groups, group = x.shape
    if codec["outlier_ratio"] > 0:
        per_group = outlier_count(codec)
        assert group - per_group >= 2
        count = n_groups * per_group
        positions = np.array(
            unpack_bits(sections["outlier_index"], max(1, math.ceil(math.log2(group))), count), np.int64
        )
        assert np.all(positions < group)
        values = storage_values(sections["outlier_value"], dtype)
        x[np.repeat(np.arange(n_groups), per_group), positions] = values
    return x


#: §6.2: the family member an element format uses at each width.
FAMILIES = {
    "fp8-e4m3": {4: "fp4-e2m1", 8: "fp8-e4m3"},
    "fp4-e2m1": {4: "fp4-e2m1", 8: "fp8-e4m3"},
    "fp8-e5m2": {4: "fp4-e2m1", 8: "fp8-e5m2"},
    "mxfp8": {4: "mxfp4", 6: "mxfp6-e2m3", 8: "mxfp8"},
    "mxfp6-e2m3": {4: "mxfp4", 6: "mxfp6-e2m3", 8: "mxfp8"},
    "mxfp4": {4: "mxfp4", 6: "mxfp6-e2m3", 8: "mxfp8"},
    "mxfp6-e3m2": {4: "mxfp4", 6: "mxfp6-e3m2", 8: "mxfp8"},
}


def decode_mixed_groups(
    shape: list[int], coded: int, codec: dict, sections: dict[str, bytes], dtype: str
) -> np.ndarray:
    """§6.2: each width class decoded as a (1, 1, count, G) tensor of its own, width 0 as the zero-point or 0."""
    batch, heads, _, dim = shape
    group, counts = codec["group_size"], codec["width_counts"]
    n_groups = batch * heads * coded * dim // group
    widths = np.array(unpack_bits(sections["bit_widths"], 4, n_groups), dtype=np.int64)
    assert np.all(widths <= 8) and np.bincount(widths, minlength=9).tolist() == counts
    scale_storage = "uint8" if codec["method"].startswith("mx") else "float16"
    scale = storage_values(sections["scale"], scale_storage)
    zero = storage_values(sections["zero_point"], "float16") if "zero_point" in sections else None
    x = np.zeros((n_groups, group), dtype=np.float32)
    for width in range(9):
        if not counts[width]:
            continue
        index = np.nonzero(widths == width)[0]
        if width == 0:
            x[index] = 0.0 if zero is None else zero[index][:, None]
            continue
        method = FAMILIES.get(codec["method"], {}).get(width, codec["method"])
        params = codec["params"] if method == codec["method"] else {}
        part = {"codes": sections[f"codes_{width}"], "scale": scale[index].astype(STORAGE[scale_storage]).tobytes()}
        if zero is not None:
            part["zero_point"] = zero[index].astype(STORAGE["float16"]).tobytes()
        if f"codebook_{width}" in sections:
            part["codebook"] = sections[f"codebook_{width}"]
        sub = {**codec, "method": method, "bits": width, "params": params, "outlier_ratio": 0.0}
        x[index] = decode_groups([1, 1, counts[width], group], counts[width], sub, part, dtype, "token")
    return write_outliers(x, codec, sections, dtype)


def decode_quantized(name: str, shape: list[int], codec: dict, sections: dict[str, bytes], dtype: str) -> np.ndarray:
    """One quantized tensor as float32 of ``shape``, by the steps of §6.1 (step 5's rounding is the caller's)."""
    batch, heads, seq, dim = shape
    t, role = transforms_of(codec), role_of(name)
    axis = t[f"{role}_axis"]
    kf, coded = coded_tokens(name, shape, codec)
    if codec.get("width_counts"):
        x = decode_mixed_groups(shape, coded, codec, sections, dtype)
    else:
        x = decode_groups(shape, coded, codec, sections, dtype, axis)
    if axis == "token":  # rows of H*D features per token: (B*C, H*D)
        y = x.reshape(batch, coded, heads, dim).transpose(0, 2, 1, 3)
    else:  # rows of C tokens per channel: (B*H*D, C)
        y = x.reshape(batch, heads, dim, coded).transpose(0, 1, 3, 2)
    if t["rotate"] == "hadamard":
        y = inverse_hadamard(y, unpack_bits(sections["rotation_signs"], 1, dim))
    if t["unrope"] and role == "key":
        assert t["rope_dim"] % 2 == 0 and 2 <= t["rope_dim"] <= dim
        inv_freq = storage_values(sections["rope_inv_freq"], "float32")
        assert len(inv_freq) == t["rope_dim"] // 2
        y = apply_rope(y, inv_freq, t["rope_offset"] + kf, t["rope_scaling"])
    kept = storage_values(sections.get("kept", b""), dtype).reshape(batch, heads, seq - coded, dim)
    return np.concatenate([kept[:, :, :kf], y.astype(np.float32), kept[:, :, kf:]], axis=2)


#: §6.5: the profile file.
PROFILE_FORMAT = "kvpack-profile-1"
PROFILE_NAME = re.compile(r"layers\.(0|[1-9][0-9]*)\.(key|value)\.(mean|basis|variance|weight)")
PROFILE_DTYPES = {"mean": ("F32", "<f4"), "basis": ("F16", "<f2"), "variance": ("F32", "<f4"), "weight": ("F32", "<f4")}
#: §6.5: a chunk's largest |q|; the scale codes' log grid (codes per octave, the code of mean |q| 1); the
#: embedded profile's entry.
MAX_SUPPORT = 4095
SCALE_CODE_STEPS = 8
SCALE_CODE_ZERO = 160
EMBEDDED_PROFILE = "kvpack.profile"


def parse_profile(data: bytes) -> tuple[str, dict[str, str], dict[tuple[int, str], dict[str, np.ndarray]]]:
    """§6.5 "The profile file": (fingerprint, metadata, {(layer, role): {part: array}}), every rule checked."""
    (length,) = struct.unpack("<Q", data[:8])
    assert 0 < length <= len(data) - 8
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    metadata = header.pop("__metadata__", {})
    assert metadata["format"] == PROFILE_FORMAT and re.fullmatch(r"[0-9a-f]{16}", metadata["fingerprint"])
    arrays, parts = {}, {}
    for name, info in header.items():
        layer, role, part = PROFILE_NAME.fullmatch(name).groups()
        tag, dtype = PROFILE_DTYPES[part]
        start, end = info["data_offsets"]
        assert info["dtype"] == tag and 0 <= start <= end <= len(body)
        arrays[name] = np.frombuffer(body[start:end], dtype).reshape(info["shape"])
        parts.setdefault((int(layer), role), {})[part] = arrays[name].astype(np.float32)
    layers = max(layer for layer, _ in parts) + 1
    assert set(parts) == {(layer, role) for layer in range(layers) for role in ("key", "value")}
    for values in parts.values():
        features = values["mean"].shape[0]
        assert values["mean"].shape == values["variance"].shape == values["weight"].shape == (features,)
        assert values["basis"].shape == (features, features)
        assert all(np.isfinite(v).all() for v in values.values())
        assert (values["variance"] >= 0).all() and (values["weight"] >= 0).all()
        basis = values["basis"].astype(np.float64)
        assert np.abs(basis.T @ basis - np.eye(features)).max() <= 0.02  # orthonormal columns
    digest = hashlib.sha256()  # the content fingerprint: names sorted, "name:dtype:shape;" then the bytes
    for name in sorted(arrays):
        array = arrays[name]
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    assert digest.hexdigest()[:16] == metadata["fingerprint"]
    return metadata["fingerprint"], metadata, parts


def code_mean(code: int) -> float:
    """§6.5.5: the mean |q| of a scale code: 0 for code 0, else ldexp(t^j, e) with code - 160 = 8 e + j
    (0 <= j < 8) and t^j the j-fold product of t = sqrt(sqrt(sqrt(2))), every operation in float64."""
    if code == 0:
        return 0.0
    exponent, index = divmod(code - SCALE_CODE_ZERO, SCALE_CODE_STEPS)
    root, power = math.sqrt(math.sqrt(math.sqrt(2.0))), 1.0
    for _ in range(index):
        power *= root
    return math.ldexp(power, exponent)


def geometric_ratio(code: int) -> float:
    """§6.5.5: r of a scale code, r = m / (sqrt(1 + m m) + 1) for its mean |q| m (0 for code 0)."""
    m = code_mean(code)
    return m / (math.sqrt(1.0 + m * m) + 1.0)


def centroid_offset(code: int) -> float:
    """§6.5.5: where a nonzero bin's centroid lies above its lower edge, in steps, under the density
    r^|x| of the code's ratio: 1/a - 1/(e^a - 1) with a = -ln r (0.5 - a/12 for a <= 1e-6; 0.5 without
    a ratio in (0, 1))."""
    r = geometric_ratio(code)
    if not 0 < r < 1:
        return 0.5
    a = -math.log(r)
    return 1.0 / a - 1.0 / math.expm1(a) if a > 1e-6 else 0.5 - a / 12


def geometric_pmf(code: int, support: int) -> np.ndarray:
    """§6.5: p(k) proportional to r^|k| for k in [-M, M], the powers as a sequential float64 product."""
    r, powers = geometric_ratio(code), [1.0]
    for _ in range(support):
        powers.append(powers[-1] * r)
    return np.array(powers[:0:-1] + powers, dtype=np.float64)


def decode_transform(
    name: str, entry: dict, sections: dict[str, bytes], profile: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """§6.5: one transform entry as float32 of its shape (step 7's rounding is the caller's), with the
    integers and decoded coefficients (rows, F) and the steps (F,)."""
    import constriction  # the entropy coder §6.5 names; its model and coder, not kvpack's

    batch, heads, seq, dim = entry["shape"]
    codec, dtype = entry["codec"], entry["dtype"]
    params, t = codec["params"], transforms_of(codec)
    layer, role = re.fullmatch(r"layers\.(0|[1-9][0-9]{0,8})\.(key|value)", name).groups()
    assert codec["outlier_ratio"] == 0 and not t["stack_layers"] and not t["width_counts"]
    assert (t["key_axis"], t["value_axis"], t["rotate"]) == ("token", "token", "none")
    mean, basis, weight = (profile[(int(layer), role)][part] for part in ("mean", "basis", "weight"))
    features = heads * dim
    assert mean.shape == (features,)
    kf = min(t["keep_first"], seq)
    kl = min(t["keep_last"], seq - kf)
    coded = seq - kf - kl
    rows, chunk_tokens, deadzone = batch * coded, params["chunk_tokens"], params.get("deadzone", 0.0)
    chunks = -(-rows // chunk_tokens)
    kept = [j for j, bit in enumerate(unpack_bits(sections["components"], 1, features)) if bit]
    support = np.frombuffer(sections["support"], "<i4")
    scales = np.array(unpack_bits(sections["scales"], 8, chunks * features), dtype=np.int64).reshape(chunks, features)
    stream = bytes(sections["stream"])
    assert len(support) == chunks and all(0 <= m <= MAX_SUPPORT for m in support.tolist())
    assert len(stream) == params["stream_bytes"] and len(stream) % 4 == 0
    assert all(weight[j] > 0 for j in kept)
    # steps s_j = sqrt(12 theta / w_j) in float64, rounded to float32
    steps = np.array([math.sqrt(12.0 * params["distortion"] / float(w)) if w > 0 else math.inf for w in weight])
    steps = steps.astype(np.float32)
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(stream, "<u4").astype(np.uint32))
    q = np.zeros((rows, features), dtype=np.int64)
    level = np.zeros((rows, features), dtype=np.float32)
    for chunk in range(chunks):  # rows [chunk T, min((chunk + 1) T, n)), kept components in increasing order
        a, b, m = chunk * chunk_tokens, min((chunk + 1) * chunk_tokens, rows), int(support[chunk])
        for j in kept:
            code = int(scales[chunk, j])
            if m:  # support 0: every integer of the chunk is 0, nothing in the stream
                model = constriction.stream.model.Categorical(geometric_pmf(code, m), perfect=False)
                q[a:b, j] = decoder.decode(model, b - a).astype(np.int64) - m
            # nonzero q: sign(q) (|q| - 1/2 + deadzone + centroid offset) steps, in float64, to float32
            magnitude = np.abs(q[a:b, j]) - 0.5 + deadzone + centroid_offset(code)
            level[a:b, j] = np.where(q[a:b, j] == 0, 0.0, np.sign(q[a:b, j]) * magnitude).astype(np.float32)
    shift = storage_values(sections["shift"], "float16")  # h_f, finite
    assert shift.shape == (features,) and np.isfinite(shift).all()
    c = np.repeat(shift[None, :], rows, axis=0)  # h_f + level s_f for a kept component, h_f for the others
    c[:, kept] = shift[kept] + level[:, kept] * steps[kept]
    x = (c @ basis.T + mean).astype(np.float32)  # float32: x = c B^T + mean
    y = x.reshape(batch, coded, heads, dim).transpose(0, 2, 1, 3)
    if t["unrope"] and role == "key":  # §6.1 step 4 on the decoded tokens
        assert 2 <= t["rope_dim"] <= dim
        inv_freq = storage_values(sections["rope_inv_freq"], "float32")
        assert len(inv_freq) == t["rope_dim"] // 2
        y = apply_rope(y, inv_freq, t["rope_offset"] + kf, t["rope_scaling"])
    exact = storage_values(sections["kept"], dtype).reshape(batch, heads, kf + kl, dim)
    return np.concatenate([exact[:, :, :kf], y.astype(np.float32), exact[:, :, kf:]], axis=2), q, c, steps


def file_sections(data: bytes, entry: dict) -> dict[str, bytes]:
    """An entry's sections, each checked (CRC-32 of the stored bytes) and its zstd stage undone (§6.3)."""
    sections = {}
    for section, where in entry["sections"].items():
        raw = data[where["offset"] : where["offset"] + where["length"]]
        assert zlib.crc32(raw) == where["crc32"]  # of the stored bytes
        if where.get("encoding") == "zstd":  # §6.3: one frame, with its content size, nothing after it
            assert zstandard.frame_content_size(raw) > len(raw)
            raw = zstandard.ZstdDecompressor().decompress(raw, allow_extra_data=False)
        else:
            assert "encoding" not in where
        sections[section] = Section(raw)
        sections[section].transpose = where.get("transpose", 0)
    return sections


def file_profile(path: Path, header: dict, data: bytes) -> dict | None:
    """§6.5: the profile the file's transform entries name (all the same one): the embedded
    `kvpack.profile` entry, else the profile file beside the golden file."""
    named = {e["codec"]["params"]["profile"] for e in header["tensors"].values() if is_transform(e)}
    if not named:
        return None
    (fingerprint,) = named
    if EMBEDDED_PROFILE in header["tensors"]:
        entry = header["tensors"][EMBEDDED_PROFILE]
        assert entry["codec"] is None and entry["dtype"] == "uint8"
        raw = bytes(file_sections(data, entry)["data"])
    else:
        raw = (path.parent / PROFILE_FILE).read_bytes()
    found, _, parts = parse_profile(raw)
    assert found == fingerprint
    return parts


def is_transform(entry: dict) -> bool:
    return entry["codec"] is not None and entry["codec"]["method"] == "transform"


def decode_file(path: Path) -> dict[str, torch.Tensor]:
    data = path.read_bytes()
    _, header = parse_file(data)
    profile = file_profile(path, header, data)
    out = {}
    for name, entry in header["tensors"].items():
        sections = file_sections(data, entry)
        dtype = entry["dtype"]
        if entry["codec"] is None:
            values = {name: storage_values(sections["data"], dtype).reshape(entry["shape"])}
        elif is_transform(entry):
            values = {name: decode_transform(name, entry, sections, profile)[0]}
        elif transforms_of(entry["codec"])["stack_layers"]:
            # §5: [L, B, H, S, D] decodes as one [B, L*H, S, D] tensor; layer i is heads i*H .. (i+1)*H - 1
            layers, batch, heads, seq, dim = entry["shape"]
            role = STACKED_NAME.fullmatch(name).group(1)
            whole = decode_quantized(name, [batch, layers * heads, seq, dim], entry["codec"], sections, dtype)
            values = {f"layers.{i}.{role}": whole[:, i * heads : (i + 1) * heads] for i in range(layers)}
        else:
            values = {name: decode_quantized(name, entry["shape"], entry["codec"], sections, dtype)}
        for restored_name, value in values.items():
            tensor = torch.from_numpy(np.array(value))
            out[restored_name] = tensor.to(getattr(torch, dtype)) if dtype in ("float16", "bfloat16") else tensor
    return out


def float32_accuracy_tensors(path: Path) -> set[str]:
    """The tensors that go through §6.1 step 3 or 4 or the basis of §6.5, specified to float32 accuracy only."""
    _, header = parse_file(path.read_bytes())
    names = set()
    for name, entry in header["tensors"].items():
        t = transforms_of(entry["codec"] or {})
        if entry["codec"] and (
            is_transform(entry) or t["rotate"] == "hadamard" or (t["unrope"] and role_of(name) == "key")
        ):
            if t["stack_layers"]:  # §5: the restored layers
                names |= {f"layers.{i}.{role_of(name)}" for i in range(entry["shape"][0])}
            else:
                names.add(name)
    return names


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many steps between representable values of their common float dtype a and b are apart (1: one ulp)."""
    assert a.dtype == b.dtype
    width = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[a.dtype]

    def ordered(x: torch.Tensor) -> torch.Tensor:  # the bit patterns as integers in the order of their values
        bits = x.contiguous().view(width).to(torch.int64)
        return torch.where(bits < 0, torch.iinfo(width).min - bits, bits)  # -0 and +0 are both 0

    return (ordered(a) - ordered(b)).abs()


# --- the tests -----------------------------------------------------------------------------


def test_every_version_folder_holds_every_golden_file():
    assert [p.name for p in VERSION_FOLDERS] == ["v1.0", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6"]
    assert all(p.is_file() for p in GOLDEN_PATHS)
    assert all((folder / PROFILE_FILE).is_file() for folder in VERSION_FOLDERS if folder.name >= "v1.6")


def profile_for(path: Path) -> Path | None:
    """The profile file a golden file's transform entries decode with, unless it embeds its own (§6.5)."""
    header = parse_file(path.read_bytes())[1]["tensors"]
    needs = any(is_transform(e) for e in header.values()) and EMBEDDED_PROFILE not in header
    return path.parent / PROFILE_FILE if needs else None


def restore(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return load_kvp(path, profile=profile_for(path))


@pytest.mark.parametrize("path", GOLDEN_PATHS, ids=golden_id)
def test_golden_file_decodes_as_the_spec_says(path):
    restored, metadata = restore(path)
    expected = decode_file(path)
    approximate = float32_accuracy_tensors(path)
    assert metadata["source"] == "kvpack golden file"
    assert sorted(restored) == sorted(expected)
    for name, tensor in expected.items():
        assert restored[name].dtype == tensor.dtype or tensor.dtype == torch.float32
        mine = tensor.to(restored[name].dtype)
        if name in approximate:
            # §6.1: steps 3 and 4 to float32 accuracy, bounded relative to the head vector (block), then one
            # rounding to the dtype; §6.5: the basis product likewise, relative to the token's vector (all heads)
            ours, theirs = restored[name].double(), mine.double()
            vector = theirs.transpose(1, 2).flatten(2).norm(dim=-1)[:, None, :, None] if "transform" in path.stem else 0
            bound = 2**-20 * (theirs.norm(dim=-1, keepdim=True) + vector) + torch.finfo(mine.dtype).eps * theirs.abs()
            close = (ours - theirs).abs() <= bound
            assert bool((close | (ulp_distance(restored[name], mine) <= 1)).all()), name
        else:
            assert torch.equal(restored[name], mine), name


def test_only_the_rotated_and_unroped_tensors_are_compared_to_float32_accuracy():
    approximate = {golden_id(path): sorted(float32_accuracy_tensors(path)) for path in GOLDEN_PATHS}
    expected = {
        "adaptive-a3-kchannel-g4-unrope-keeplast": ["layers.0.key"],  # un-RoPE is for keys only
        "mxfp6-e3m2": ["layers.0.key", "layers.0.value"],
        "uniform-a3-g16-hadamard-magnitude": ["layers.0.key", "layers.0.value"],
        "mxfp4-d96-hadamard-outliers-f32": ["layers.0.key", "layers.0.value"],
        "uniform-a3-kchannel-g4-hadamard": ["layers.0.key", "layers.0.value"],
        "uniform-a4-kchannel-g2-unrope-partial-bf16": ["layers.0.key"],
    }
    every_layer = ["layers.0.key", "layers.0.value", "layers.1.key", "layers.1.value"]
    assert {name: tensors for name, tensors in approximate.items() if tensors} == {
        f"{folder}/{name}": tensors
        for folder in ("v1.2", "v1.3", "v1.4", "v1.5", "v1.6")
        for name, tensors in expected.items()
    } | {
        f"{folder}/uniform-a3-kchannel-g4-all-layers-unrope-hadamard": every_layer
        for folder in ("v1.3", "v1.4", "v1.5", "v1.6")
    } | {
        f"{folder}/mxfp4-mixed-hadamard": ["layers.0.key", "layers.0.value"] for folder in ("v1.4", "v1.5", "v1.6")
    } | {f"v1.6/{name}": every_layer for name in ("transform-unrope-keep1-1", "transform-embedded-profile-bf16")}


#: Bounds on the relative squared error ``sum((x' - x)^2) / sum(x^2)`` of the codec families of format 1.0, by width.
BITS_ERROR_BOUNDS = {2: 0.3, 3: 0.12, 4: 0.04, 8: 1e-4}
#: The same for the files new in format 1.2 and 1.3, each about 2-3x the error measured when they were written
#: (key / value). 0.0: every token is kept, so the tensors must equal their inputs.
ERROR_BOUNDS = {
    "uniform-a2-kchannel-g2-keep1": 4e-7,  # 3.2e-8 / 1.3e-7: two tokens per group, both nearly on the 2-bit grid
    "uniform-a3-g16-hadamard-magnitude": 0.02,  # 0.0072 / 0.0084
    "adaptive-a3-kchannel-g4-unrope-keeplast": 0.005,  # 0.0011 / 0.0021
    "normal-s2-g32-tails-keep-all": 0.0,  # 6 tokens, keep_first 4 + keep_last 4: nothing is coded
    "fp8-e4m3-g64": 1.5e-3,  # 5.2e-4 / 6.2e-4: 3 mantissa bits, far from 8-bit uniform's 5e-5
    "fp8-e5m2-g16-outliers": 3e-3,  # 9.2e-4 / 1.2e-3: 2 mantissa bits
    "fp4-e2m1-g16": 0.025,  # 0.0085 / 0.0093
    "mxfp8": 3e-3,  # 1.1e-3 / 1.0e-3: the E8M0 rule saturates block maxima in [448, 512) X to 448
    "mxfp6-e2m3": 2.5e-3,  # 9.3e-4 / 9.1e-4
    "mxfp6-e3m2": 7e-3,  # 2.8e-3 / 2.8e-3
    "mxfp4": 0.04,  # 0.010 / 0.017
    # format 1.3: one group per token across both layers (256 values) is coarser than groups of 64
    "uniform-a3-g256-all-layers": 0.25,  # 0.111 / 0.077
    "adaptive-head-a2-g128-all-layers-keep1": 0.3,  # 0.140 / 0.133 (layer 0), 0.141 / 0.124 (layer 1)
    "uniform-a3-kchannel-g4-all-layers-unrope-hadamard": 0.015,  # 0.0016 / 0.0047: 4-value groups, 2 keys kept
    # format 1.4: mixed widths 0-8 in turn (width-0 groups keep only their mean)
    "uniform-mixed-g16": 0.6,  # 0.19 / 0.27
    "adaptive-group-mixed-g16-outliers": 0.2,  # 0.056 / 0.071
    "mxfp4-mixed-hadamard": 0.6,  # 0.28 / 0.25
    "normal-mixed-kchannel-g2-keep1": 0.25,  # 0.017 / 0.078
    "fp8-e5m2-mixed-g16-outliers": 0.45,  # 0.150 / 0.160
    "adaptive-head-mixed-g64-all-layers": 0.6,  # 0.136 / 0.109, 0.211 / 0.244
    # format 1.5: the entropy stage is lossless; the mixed file has widths 0-8 in turn, as above
    "uniform-mixed-g16-zstd-long": 0.6,  # 0.26 / 0.28
    # format 1.6: a random basis (not the data's PCA) at distortion 0.06: 1-4 of 16 components dropped
    "transform-unrope-keep1-1": 0.6,  # 0.25 / 0.27 (layer 0), 0.21 / 0.25 (layer 1)
    "transform-embedded-profile-bf16": 0.8,  # dead zone 0.25: 0.24 / 0.37, 0.18 / 0.36
}


@pytest.mark.parametrize("path", GOLDEN_PATHS, ids=golden_id)
def test_golden_file_is_close_to_its_real_inputs(path):
    config, kind = GOLDEN[path.stem]
    restored, _ = restore(path)
    entries = parse_file(path.read_bytes())[1]["tensors"]
    bound = ERROR_BOUNDS[path.stem] if path.stem in ERROR_BOUNDS else BITS_ERROR_BOUNDS[config.bits] if config else None
    for name, x in golden_inputs(kind).items():
        entry = entries.get(name) or entries[f"layers.all.{name.rsplit('.', 1)[1]}"]  # §5: a stacked layer
        codec, shape = entry["codec"], entry["shape"][-4:]
        if codec is None:
            assert torch.equal(restored[name], x), name
            continue
        all_kept = coded_tokens(name, shape, codec)[1] == 0
        assert all_kept == (bound == 0.0), name
        if all_kept:
            assert torch.equal(restored[name], x), name
            continue
        error = float(((restored[name].double() - x.double()) ** 2).sum() / (x.double() ** 2).sum())
        assert error < bound, (name, error)


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


def test_element_formats_by_hand():
    """§8 by hand: v(q) = (-1)^S 2^(E - β) (1 + M / 2^m), or (-1)^S 2^(1 - β) M / 2^m when E = 0."""
    # fp4-e2m1 (e 2, m 1, β 1), q = S E E M: E 0 -> 0, 0.5 (subnormal: M / 2); E 1 -> 1, 1.5; E 2 -> 2, 3; E 3 -> 4, 6
    fp4 = minifloat_table("fp4-e2m1")
    assert fp4.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert math.copysign(1.0, fp4[8]) == -1.0  # S = 1, E = M = 0 is -0
    # the largest values of §8's table, and the smallest subnormals
    assert minifloat_table("fp8-e4m3")[0x7E] == 2.0 ** (15 - 7) * 1.75 == 448  # 0 1111 110
    assert minifloat_table("fp8-e4m3")[0x01] == 2.0 ** (1 - 7) / 8 == 2.0**-9  # 0 0000 001
    assert minifloat_table("fp8-e5m2")[0x7B] == 2.0 ** (30 - 15) * 1.75 == 57344  # 0 11110 11
    assert minifloat_table("fp8-e5m2")[0x01] == 2.0 ** (1 - 15) / 4 == 2.0**-16  # 0 00000 01
    assert minifloat_table("mxfp6-e2m3")[0x1F] == 2.0 ** (3 - 1) * 1.875 == 7.5  # 0 11 111
    assert minifloat_table("mxfp6-e3m2")[0x1F] == 2.0 ** (7 - 3) * 1.75 == 28  # 0 111 11
    # E8M0: X = 2^(e - 127); 255 is NaN
    assert [e8m0_scale(e) for e in (0, 125, 127, 130, 254)] == [2.0**-127, 0.25, 1.0, 8.0, 2.0**127]
    with pytest.raises(AssertionError):
        e8m0_scale(255)
    # one mxfp4 block: codes 7 (6), 15 (-6), 1 (0.5), 10 (-1), then 28 zeros, 4-bit codes packed low nibble first
    # -> F7 A1 00 ...; scale byte 125: X = 1/4
    mxfp4 = {"method": "mxfp4", "bits": 4, "group_size": 32, "outlier_ratio": 0.0, "params": {}}
    block = {"codes": bytes.fromhex("F7A1") + bytes(14), "scale": bytes([125])}
    decoded = decode_quantized("layers.0.value", [1, 1, 1, 32], mxfp4, block, "float16")
    assert decoded.flatten().tolist() == [1.5, -1.5, 0.125, -0.25] + [0.0] * 28
    # fp8-e4m3 with the float16 scale 0.5 (00 38): codes 7E (448) and 81 (-2^-9) -> 224, -2^-10
    fp8 = {"method": "fp8-e4m3", "bits": 8, "group_size": 2, "outlier_ratio": 0.0, "params": {}}
    pair = {"codes": bytes.fromhex("7E81"), "scale": bytes.fromhex("0038")}
    assert decode_quantized("layers.0.key", [1, 1, 1, 2], fp8, pair, "float16").flatten().tolist() == [224, -(2**-10)]
    with pytest.raises(AssertionError):  # 7F is NaN: a reader refuses it
        decode_quantized("layers.0.key", [1, 1, 1, 2], fp8, {**pair, "codes": bytes.fromhex("7F00")}, "float16")


def test_transforms_by_hand():
    """§6.1 steps 3 and 4, and the counting rules of §5 and §6, on tiny examples."""
    h = np.float32(math.sqrt(0.5))
    # H_2 = [[1, 1], [1, -1]] / √2: [1, 0] H_2 = [1/√2, 1/√2]; sign bit 1 of channel 1 negates it after the product
    assert inverse_hadamard(np.array([1, 0], np.float32), [0, 0]).tolist() == [h, h]
    assert inverse_hadamard(np.array([1, 0], np.float32), [0, 1]).tolist() == [h, -h]
    # D = 6: b = 2, three blocks of H_2
    assert inverse_hadamard(np.array([1, 0, 0, 1, 2, 2], np.float32), [0] * 6).tolist() == [h, h, h, -h, 4 * h, 0]
    # H_4 = W_4 / 2 with W_4 = [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]:
    # [1, 2, 3, 4] W_4 = [10, -2, -4, 0]
    assert inverse_hadamard(np.array([1, 2, 3, 4], np.float32), [0] * 4).tolist() == [5, -1, -2, 0]
    # RoPE, rope_dim 2 of D 4, frequency π/2, positions 1 and 2 (θ = π/2, π), rope_scaling 2:
    # [1, 0] -> 2 [cos θ, sin θ] = [0, 2] and [-2, 0]; channels 2 and 3 are not rotated
    y = np.array([[[[1, 0, 5, 7], [1, 0, 5, 7]]]], np.float32)
    x = apply_rope(y, np.array([math.pi / 2], np.float32), 1, 2.0)
    assert x.dtype == np.float32 and np.allclose(x, [[[[0, 2, 5, 7], [-2, 0, 5, 7]]]], rtol=0, atol=1e-6)
    # outliers per group: tails 0.078125 * 64 / 2 + 0.5 = 3 per side; magnitude 0.1 * 16 + 0.5 -> 2, 0.01 * 64 -> 1
    assert outlier_count({"group_size": 64, "outlier_ratio": 0.078125}) == 6
    assert outlier_count({"group_size": 16, "outlier_ratio": 0.1, "outlier_select": "magnitude"}) == 2
    assert outlier_count({"group_size": 64, "outlier_ratio": 0.01, "outlier_select": "magnitude"}) == 1
    # S = 6, keep_first 1: keys on the channel axis in groups of 2 code tokens 1-4 (token 5 is the remainder),
    # values on the token axis code tokens 1-5; keep_first 4 + keep_last 4 leave nothing to code
    codec = {"group_size": 2, "key_axis": "channel", "keep_first": 1}
    assert coded_tokens("layers.0.key", [1, 2, 6, 64], codec) == (1, 4)
    assert coded_tokens("layers.0.value", [1, 2, 6, 64], codec) == (1, 5)
    assert coded_tokens("layers.0.key", [1, 2, 6, 64], {"group_size": 32, "keep_first": 4, "keep_last": 4}) == (4, 0)


def test_transform_codec_by_hand():
    """§6.5 on a tiny entry: one head of D = 2, identity basis, mean (1, -1), weights (3, 0) (component 1
    is dropped), distortion 0.25 (step sqrt(12 * 0.25 / 3) = 1), dead zone 0.25, three tokens in chunks of 2."""
    import constriction

    # scale codes: 160 is mean |q| 1, 8 codes an octave; r = m / (sqrt(1 + m^2) + 1); code 0 is r = 0
    assert [code_mean(k) for k in (0, 152, 160, 168, 176)] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert math.isclose(code_mean(164), math.sqrt(2)) and math.isclose(code_mean(163), 2 ** (3 / 8))
    assert math.isclose(code_mean(1), 2 ** (-159 / 8)) and math.isclose(code_mean(255), 2 ** (95 / 8))
    r1, r2 = geometric_ratio(160), geometric_ratio(168)
    assert geometric_ratio(0) == 0.0 and r1 == 1 / (math.sqrt(2) + 1) and r2 == 2 / (math.sqrt(5) + 1)
    assert math.isclose(2 * r2 / (1 - r2 * r2), 2.0)  # the two-sided geometric of r has mean |q| m
    assert geometric_pmf(160, 2).tolist() == [r1 * r1, r1, 1.0, r1, r1 * r1]
    assert geometric_pmf(0, 1).tolist() == [0.0, 1.0, 0.0]
    # centroid offsets: 1/a - 1/(e^a - 1), a = -ln r: for r = 1/(1 + sqrt 2), e^a - 1 = sqrt 2
    assert math.isclose(centroid_offset(160), 1 / math.log(1 + math.sqrt(2)) - 1 / math.sqrt(2), rel_tol=1e-12)
    assert math.isclose(centroid_offset(168), 1 / math.log((1 + math.sqrt(5)) / 2) - 2 / (math.sqrt(5) - 1))
    assert centroid_offset(0) == 0.5
    # q of component 0: chunk 0 (tokens 0, 1) = 1, -1: M = 1, mean |q| 1 -> code 160 + round(8 log2 1) = 160;
    # chunk 1 (token 2) = 2: M = 2, code 160 + round(8 log2 2) = 168. Symbols q + M: 2, 0 | 4.
    encoder = constriction.stream.queue.RangeEncoder()
    for symbols, code, support in (([2, 0], 160, 1), ([4], 168, 2)):
        model = constriction.stream.model.Categorical(geometric_pmf(code, support), perfect=False)
        encoder.encode(np.array(symbols, np.int32), model)
    stream = encoder.get_compressed().astype("<u4").tobytes()
    assert stream == bytes.fromhex("538a78d1")  # the coder's words (constriction 0.5), little-endian
    entry = {
        "shape": [1, 1, 3, 2],
        "dtype": "float32",
        "codec": {
            "method": "transform",
            "bits": 4,
            "group_size": 64,
            "outlier_ratio": 0.0,
            "params": {
                "chunk_tokens": 2,
                "deadzone": 0.25,
                "distortion": 0.25,
                "stream_bytes": 4,
                "profile": "0" * 16,
            },
        },
    }
    sections = {
        "kept": b"",
        "components": bytes([0b01]),  # component 0 kept, 1 dropped
        "shift": np.array([0.5, -0.25], "<f2").tobytes(),
        "support": struct.pack("<2i", 1, 2),
        "scales": bytes([160, 0, 168, 0]),  # (chunk, component); 0 for the dropped one
        "stream": stream,
    }
    profile = {
        (0, "value"): {
            "mean": np.array([1, -1], np.float32),
            "basis": np.eye(2, dtype=np.float32),
            "weight": np.array([3, 0], np.float32),
        }
    }
    x, q, c, steps = decode_transform("layers.0.value", entry, sections, profile)
    assert steps.tolist() == [1.0, math.inf] and q.tolist() == [[1, 0], [-1, 0], [2, 0]]
    # nonzero q decodes to the shift plus sign(q) (|q| - 1/2 + deadzone + centroid offset) steps; the dropped
    # component to its shift
    first, second = 0.75 + centroid_offset(160), 1.75 + centroid_offset(168)
    levels = [np.float32(first), np.float32(-first), np.float32(second)]
    assert c.tolist() == [[np.float32(0.5) + level, -0.25] for level in levels]
    expected = [[1.5 + first, -1.25], [1.5 - first, -1.25], [1.5 + second, -1.25]]  # c B^T + mean
    assert np.allclose(x.reshape(3, 2), expected, rtol=0, atol=1e-6)
    # a chunk of support 0 codes nothing: every q 0, decoded to the shift without reading the stream
    empty = {**sections, "support": struct.pack("<2i", 0, 0), "stream": b""}
    zero = {**entry, "codec": {**entry["codec"], "params": {**entry["codec"]["params"], "stream_bytes": 0}}}
    assert decode_transform("layers.0.value", zero, empty, profile)[0].reshape(3, 2).tolist() == [[1.5, -1.25]] * 3


def unrope(y: np.ndarray, inv_freq: np.ndarray, first_position: int, scaling: float) -> np.ndarray:
    """The inverse of §6.1 step 4 (what an encoder applies): rotate by -p f, divide by the scaling (float64)."""
    half = len(inv_freq)
    theta = np.arange(first_position, first_position + y.shape[2], dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(theta), np.sin(theta)
    low, high = y[..., :half].astype(np.float64), y[..., half : 2 * half].astype(np.float64)
    x = y.astype(np.float64).copy()
    x[..., :half], x[..., half : 2 * half] = (low * cos + high * sin) / scaling, (high * cos - low * sin) / scaling
    return x


TRANSFORM_PATHS = [
    path for path in GOLDEN_PATHS if GOLDEN[path.stem][0] is not None and GOLDEN[path.stem][0].whole_tensor
]


@pytest.mark.parametrize("path", TRANSFORM_PATHS, ids=golden_id)
def test_transform_coefficients_lie_in_the_bins_of_their_integers(path):
    """§6.5's guarantee: the input's coefficient of a kept component, less its shift h, lies in the bin of
    its decoded integer, |c - h| / s in [|q| - 1/2 + dz, |q| + 1/2 + dz) with the sign of q, or below
    1/2 + dz for q = 0; a dropped component decodes to h (the input's coefficients computed here, in
    float64, from the profile)."""
    data = path.read_bytes()
    header = parse_file(data)[1]
    profile = file_profile(path, header, data)
    kind = GOLDEN[path.stem][1]
    for name, x in golden_inputs(kind).items():
        entry = header["tensors"][name]
        if not is_transform(entry):
            continue
        _, q, c, steps = decode_transform(name, entry, file_sections(data, entry), profile)
        t, (batch, heads, seq, dim) = transforms_of(entry["codec"]), entry["shape"]
        deadzone = entry["codec"]["params"].get("deadzone", 0.0)
        kf = min(t["keep_first"], seq)
        coded = seq - kf - min(t["keep_last"], seq - kf)
        y = x.float().numpy()[:, :, kf : kf + coded]
        if t["unrope"] and role_of(name) == "key":
            inv_freq = storage_values(file_sections(data, entry)["rope_inv_freq"], "float32")
            y = unrope(y, inv_freq.astype(np.float64), t["rope_offset"] + kf, t["rope_scaling"])
        layer = int(name.split(".")[1])
        parts = profile[(layer, role_of(name))]
        rows = y.transpose(0, 2, 1, 3).reshape(batch * coded, heads * dim).astype(np.float64)
        exact = (rows - parts["mean"]) @ parts["basis"].astype(np.float64)
        kept = np.array(unpack_bits(file_sections(data, entry)["components"], 1, heads * dim), dtype=bool)
        shift = storage_values(file_sections(data, entry)["shift"], "float16")
        assert np.all(c[:, ~kept] == shift[~kept]) and np.all(q[:, ~kept] == 0)
        scaled, ints, slack = (exact[:, kept] - shift[kept]) / steps[kept], q[:, kept], 1e-4
        lower = np.where(ints == 0, -0.5 - deadzone, np.abs(ints) - 0.5 + deadzone)
        upper = np.abs(ints) + 0.5 + deadzone
        magnitude = np.where(ints == 0, scaled, np.sign(ints) * scaled)
        assert np.all((lower - slack <= magnitude) & (magnitude < upper + slack)), name
        assert np.all(np.sign(c[:, kept] - shift[kept]) == np.sign(ints))


def test_golden_profile_file_is_what_the_helper_makes_and_both_readers_agree():
    from kvpack.profile import load_profile

    for folder in VERSION_FOLDERS:
        if folder.name >= "v1.6":
            stored = (folder / PROFILE_FILE).read_bytes()
            assert stored == profile_file_bytes(PROFILE)
            fingerprint, metadata, parts = parse_profile(stored)
            assert fingerprint == PROFILE.fingerprint == load_profile(folder / PROFILE_FILE).fingerprint
            assert metadata["keys"] == "pre_rope" and sorted(parts) == [
                (0, "key"),
                (0, "value"),
                (1, "key"),
                (1, "value"),
            ]


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
    _schema_and_reader_refuse("uniform-a3-g16.kvp", edit, tmp_path)


def _schema_and_reader_refuse(name: str, edit, tmp_path) -> None:
    """The golden file ``name`` with its header edited: the JSON schema and the reader both refuse it."""
    jsonschema = pytest.importorskip("jsonschema")
    data = (current_folder() / name).read_bytes()
    header = parse_file(data)[1]
    edit(header)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(header, json.loads(SCHEMA.read_text()))
    bad = tmp_path / "bad.kvp"
    bad.write_bytes(with_header(data, json.dumps(header).encode()))
    with pytest.raises(FormatError):
        with KvpReader(bad) as reader:
            reader.verify()


def _transform_params(header: dict) -> dict:
    return header["tensors"]["layers.0.key"]["codec"]["params"]


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: _transform_params(h).update(chunk_tokens=0),
        lambda h: _transform_params(h).update(chunk_tokens=2**20 + 1),
        lambda h: _transform_params(h).update(distortion=-1.0),
        lambda h: _transform_params(h).update(stream_bytes=70),
        lambda h: _transform_params(h).update(profile="XYZ"),
        lambda h: _transform_params(h).update(symmetric=True),
        lambda h: h["tensors"]["layers.0.key"]["codec"].update(outlier_ratio=0.1),
        lambda h: h["tensors"]["layers.0.key"]["codec"].update(key_axis="channel"),
        lambda h: h["tensors"]["layers.0.key"]["codec"].update(stack_layers=True),
    ],
)
def test_schema_and_reader_refuse_the_same_malformed_transform_headers(edit, tmp_path):
    _schema_and_reader_refuse("transform-unrope-keep1-1.kvp", edit, tmp_path)


@pytest.mark.parametrize("normalization", ["meanstd", "minmax"])
def test_gaussian_levels_match_the_spec_for_every_width(normalization):
    """kvpack's normal levels (scipy) equal the spec's formula computed with the standard library."""
    from kvpack.codecs.normal import NormalCodec, NormalParams

    for bits in range(1, 9):
        levels = NormalCodec(bits, NormalParams(normalization=normalization)).levels_for().numpy()
        assert np.array_equal(levels, gaussian_levels(bits, normalization)), bits
