"""Constants of the ``.kvp`` container (specified in docs/format.md). Never renumber."""

from __future__ import annotations

import struct
import zlib

#: File signature: a non-ASCII byte, "KVP", CR LF, Ctrl-Z, LF (catches text-mode mangling).
MAGIC = b"\x89KVP\r\n\x1a\n"
FORMAT_MAJOR = 1
#: 1.1 adds the preamble CRC-32, zero padding checks, and optional header keys ("required").
#: 1.2 adds the tensor transforms (group axis, protected tokens, outlier selection, Hadamard
#: rotation, un-RoPE) and the element-format codecs (FP8, FP4, OCP MX).
#: 1.3 adds groups across layers: one stacked entry per role (``stack_layers``).
#: 1.4 adds mixed precision: per-group code widths (``width_counts``, section ``bit_widths``).
#: 1.5 adds the entropy stage: zstd sections and feature-major codes (``encoding``, ``transpose``).
#: 1.6 adds the transform codec: whole-tensor PCA coding from a calibration profile, range-coded.
FORMAT_MINOR = 6

#: Preamble, 64 bytes, little-endian: magic, major u16, minor u16, flags u32,
#: header offset u64, header length u64, header CRC-32 u32, preamble CRC-32 u32 (of bytes
#: 0-35; zero in 1.0 files), 24 reserved zero bytes.
PREAMBLE = struct.Struct("<8sHHIQQII24x")
PREAMBLE_SIZE = PREAMBLE.size
PREAMBLE_CRC_OFFSET = 36

#: Preamble flag bit 0: the header is one zstd frame (with its content size) holding the JSON.
FLAG_HEADER_ZSTD = 1
KNOWN_FLAGS = FLAG_HEADER_ZSTD
HEADER_ZSTD_LEVEL = 19
#: A compressed header may declare at most this many times its stored size, plus the slack
#: below (real headers shrink about 10x): a few KB of zstd cannot become 64 MiB of JSON.
MAX_HEADER_EXPANSION = 32
HEADER_EXPANSION_SLACK = 1 << 20

#: Header keys (at any level) this reader understands when a file lists them under "required":
#: every key format 1.6 defines (codec options included, as ``symmetric`` is). A later version lists
#: the keys it adds that change decoding; a 1.2+ writer lists the transform keys its codec configs use.
KNOWN_REQUIRED_KEYS: frozenset[str] = frozenset(
    {"metadata", "tensors", "required", "shape", "dtype", "codec", "sections", "offset", "length", "crc32"}
    | {"method", "bits", "group_size", "outlier_ratio", "params", "symmetric", "normalization", "codebook_scope"}
    | {"key_axis", "value_axis", "keep_first", "keep_last", "outlier_select", "rotate", "rotate_seed"}
    | {"unrope", "rope_dim", "rope_offset", "rope_scaling"}
    | {"stack_layers", "width_counts"}
    | {"encoding", "transpose"}
    | {"chunk_tokens", "deadzone", "distortion", "stream_bytes", "profile"}
)
#: Section encodings (1.5): the stored bytes are one zstd frame of the section's bytes.
SECTION_ENCODINGS = ("zstd",)

#: Every data section starts at a multiple of this many bytes (enough for any dtype).
SECTION_ALIGNMENT = 8

#: Reader limits: a header larger than this, or declaring more than these, is refused
#: before it is parsed or anything is allocated.
MAX_HEADER_BYTES = 64 << 20
MAX_TENSORS = 1 << 16
MAX_ELEMENTS = 1 << 48  # per tensor (product of the dimensions, zero-length ones counted as 1)
MAX_DIMS = 8
MAX_METADATA_ENTRIES = 4096
#: The JSON text may hold at most max(file size / 8, 65,536) structural characters ({ [ : ,),
#: counted before parsing: each becomes a Python object of up to ~200 bytes, so this bounds
#: what parsing allocates by the file size (a few KB of zstd could otherwise hold a million
#: empty lists under a key the reader would ignore).
HEADER_TOKENS_PER_FILE_BYTE = 1 / 8
MIN_HEADER_TOKEN_LIMIT = 1 << 16

#: Storage dtypes of lossless tensors and metadata arrays: name -> bytes per element.
DTYPE_SIZES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def pack_preamble(major: int, minor: int, flags: int, header_offset: int, header_length: int, header_crc: int) -> bytes:
    """The 64-byte preamble, with its own CRC-32 over bytes 0-35 (from format 1.1 on)."""
    head = PREAMBLE.pack(MAGIC, major, minor, flags, header_offset, header_length, header_crc, 0)
    crc = zlib.crc32(head[:PREAMBLE_CRC_OFFSET]) if (major, minor) >= (1, 1) else 0
    return PREAMBLE.pack(MAGIC, major, minor, flags, header_offset, header_length, header_crc, crc)
