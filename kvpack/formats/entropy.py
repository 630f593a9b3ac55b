"""The lossless entropy stage of ``.kvp`` sections (format 1.5): zstd per section, codes feature-major.

Quantized codes are far from uniform: uniform levels over Gaussian-like data use the middle
codes most, and each feature (channel) of a KV tensor keeps its own range across tokens (key
outlier channels sit at the ends of the grid token after token). Two steps use this:

1. **Transpose** (code sections on the token axis): the codes of a section, a row-major
   ``(n / K, K)`` matrix with ``K`` the features of a token row (``num_kv_heads * head_dim``,
   or the group size for the per-width sections of a mixed-precision tensor), are packed in
   column order, so one feature's codes of every token are adjacent.
2. **zstd** (RFC 8878) of the packed bytes, one frame per section that declares its content
   size. The encoder ends a zstd block at feature boundaries every ``BLOCK_BYTES`` or more, so
   each block's Huffman table fits a few features (zstd blocks hold at most 128 KiB).

A section keeps the zstd frame only when it is smaller than the packed bytes; otherwise it is
stored as is (no ``encoding`` key), so a file never grows. Measured gains per codec:
``docs/benchmarks.md``, "Entropy coding". Specified in ``docs/format.md`` §6.3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zstandard

from kvpack.codecs.base import KIND_CODES, SECTION_KINDS, SectionSpec
from kvpack.config import CodecConfig
from kvpack.errors import InvalidInputError
from kvpack.transforms.plan import plan_for

ZSTD_LEVEL_MIN, ZSTD_LEVEL_MAX = 1, 22
#: Default zstd level: level 1 packs codes within about 1 % of level 3, at about 1.5x the speed
#: (bench/speed.py, docs/benchmarks.md).
DEFAULT_ZSTD_LEVEL = 1
#: The encoder ends a zstd block at the first feature boundary after this many bytes.
BLOCK_BYTES = 16 << 10
#: A zstd section may declare at most this many times its stored length (plus the slack): zstd
#: cannot do better (a block of at most 128 KiB costs at least 4 bytes), so a real file never
#: comes near it, and a hostile header cannot make a reader allocate more.
MAX_EXPANSION = 1 << 15
EXPANSION_SLACK = 1 << 10


@dataclass(frozen=True)
class EntropyConfig:
    """Which sections get the entropy stage, and how.

    Args:
        level: zstd level, 1 (fast) to 22 (small); 0 turns the stage off (the file is then
            what a 1.4 writer writes).
        kinds: the section kinds (``kvpack.codecs.base.SECTION_KINDS``, ``--zstd-kinds``) it
            applies to; default every kind.
        transpose: store token-axis codes feature-major before zstd.

    Raises:
        InvalidInputError: a level outside 0-22 or an unknown kind.
    """

    level: int = DEFAULT_ZSTD_LEVEL
    kinds: frozenset[str] = field(default_factory=lambda: frozenset(SECTION_KINDS))
    transpose: bool = True

    def __post_init__(self) -> None:
        if type(self.level) is not int or not (self.level == 0 or ZSTD_LEVEL_MIN <= self.level <= ZSTD_LEVEL_MAX):
            raise InvalidInputError(
                f"`zstd_level` must be 0 (off) or {ZSTD_LEVEL_MIN}-{ZSTD_LEVEL_MAX}, got {self.level}"
            )
        unknown = sorted(set(self.kinds) - set(SECTION_KINDS))
        if unknown:
            raise InvalidInputError(
                f"unknown section kind(s) {', '.join(unknown)} for `zstd_kinds`; choose from {', '.join(SECTION_KINDS)}"
            )
        object.__setattr__(self, "kinds", frozenset(self.kinds))

    @property
    def enabled(self) -> bool:
        return self.level > 0 and bool(self.kinds)

    def applies_to(self, kind: str) -> bool:
        return self.enabled and kind in self.kinds

    @classmethod
    def off(cls) -> EntropyConfig:
        return cls(level=0)

    def describe(self) -> str:
        if not self.enabled:
            return "no entropy coding"
        kinds = "" if self.kinds == frozenset(SECTION_KINDS) else f" on {', '.join(sorted(self.kinds))}"
        return f"zstd level {self.level}{kinds}" + (", codes feature-major" if self.transpose else "")


def transpose_width(plan, section: str, spec: SectionSpec) -> int:
    """The row length ``K`` a code section is transposed by, or 0 when it is stored in group order.

    Only codes on the token axis are transposed (channel-axis codes are already one channel's
    tokens after another): ``K`` is the features of a token row (``plan.layout.features``), or
    the group size for the ``codes_{w}`` sections of a mixed-precision tensor, whose groups of
    one width do not form whole rows.
    """
    if spec.kind != KIND_CODES or spec.dtype != "code" or plan.layout.axis != "token":
        return 0
    width = plan.layout.features if section == "codes" else plan.layout.group_size
    if width < 2 or spec.count <= width or spec.count % width:
        return 0
    return width


def transposed(codes, width: int):
    """Codes ``(..., )`` in group order -> the same codes feature-major (a ``(K, n / K)`` stream)."""
    return codes.reshape(-1, width).T.reshape(-1)


def untransposed(codes, width: int):
    """The inverse of :func:`transposed`: a feature-major stream back to group order."""
    return codes.reshape(width, -1).T.reshape(-1)


def compress_section(data: memoryview, level: int, transpose: int, spec: SectionSpec) -> bytes:
    """One zstd frame (with its content size) of a section's bytes.

    For a transposed code section the blocks end at feature boundaries (every
    :data:`BLOCK_BYTES` or more), so each zstd block's Huffman table fits its features.
    """
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
    if not transpose:
        return compressor.compress(data)
    feature_bits = spec.count // transpose * spec.bits
    features = max(1, -(-BLOCK_BYTES * 8 // feature_bits))  # per block: whole features of at least BLOCK_BYTES
    step = max(1, features * feature_bits // 8)
    stream = compressor.compressobj(size=len(data))
    parts = []
    for start in range(0, len(data), step):
        parts.append(stream.compress(data[start : start + step]))
        parts.append(stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    parts.append(stream.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
    return b"".join(parts)


def decompress_section(stored: bytes | np.ndarray, raw_length: int) -> bytes:
    """The bytes of a zstd section: exactly one frame declaring ``raw_length`` bytes.

    Raises:
        ValueError: not one zstd frame, a different declared size, bytes after the frame, or
            a frame that does not decode (the reader turns this into a FormatError).
    """
    data = memoryview(stored).cast("B") if not isinstance(stored, bytes) else stored
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise ValueError("not a zstd frame") from None
    if declared != raw_length:
        raise ValueError(f"the zstd frame declares {declared} bytes, the section needs {raw_length}")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max(raw_length, 1), allow_extra_data=False)
    except zstandard.ZstdError as exc:
        reason = "bytes follow the zstd frame" if "unused data" in str(exc) else f"bad zstd frame ({exc})"
        raise ValueError(reason) from None
    if len(out) != raw_length:
        raise ValueError(f"the zstd frame holds {len(out)} bytes, the section needs {raw_length}")
    return out


def section_transposes(
    name: str, shape: tuple[int, ...], dtype: str, config: CodecConfig | None, entropy: EntropyConfig
) -> dict[str, int]:
    """The code sections of a tensor that ``entropy`` stores feature-major, and their row length."""
    if config is None or not entropy.enabled or not entropy.transpose or KIND_CODES not in entropy.kinds:
        return {}
    if config.whole_tensor:  # range-coded: no fixed-width codes to transpose
        return {}
    plan = plan_for(tuple(shape), dtype, name, config)
    widths = {section: transpose_width(plan, section, spec) for section, spec in plan.section_specs().items()}
    return {section: width for section, width in widths.items() if width}
