"""The steps between a quantized K/V tensor and its codec: protected tokens, un-RoPE, rotation, grouping, outliers.

Encoding one tensor ``x`` of shape ``(batch, num_kv_heads, seq_len, head_dim)`` (see
:class:`TensorPlan`; docs/format.md §6 is normative):

1. **Protected tokens.** The first ``keep_first`` and the last ``keep_last`` tokens are
   stored exactly, in the tensor's dtype (section ``kept``). With the channel axis, the
   ``seq_len - keep_first - keep_last`` tokens in between are cut to a multiple of
   ``group_size`` and the remainder (at the end) is stored exactly too, as KIVI keeps its
   residual tokens. Every exact value is counted in the file's bits.
2. **Un-RoPE** (keys, ``unrope``): the coded tokens are rotated back to before the rotary
   embedding (:mod:`kvpack.transforms.rope`); the frequencies are stored (section ``rope_inv_freq``).
3. **Rotation** (``rotate="hadamard"``): each head vector is multiplied by a random sign
   per channel and a normalized Walsh-Hadamard matrix (QuaRot, Ashkboos et al., arXiv
   2404.00456); the signs are stored (section ``rotation_signs``). A head_dim that is not
   a power of two is rotated block-diagonally, in blocks of its largest power-of-two divisor.
4. **Groups** along the tensor's axis (:mod:`kvpack.grouping`), **outliers** (the
   ``outlier_select`` rule) kept at their positions, and the **codec** on the rest.

Decoding reverses 4 to 1. Outlier values are stored in the tensor's dtype: without a
transform they are exact; after un-RoPE or rotation they are values of the transformed
tensor rounded to that dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch

from kvpack.codecs.base import (
    KIND_EXACT,
    KIND_OUTLIERS,
    KIND_TRANSFORM,
    SCOPE_EXACT,
    SCOPE_GROUP,
    SCOPE_SHARED,
    SectionSpec,
    check_fp16_range,
)
from kvpack.config import CodecConfig
from kvpack.errors import InvalidInputError
from kvpack.grouping import (
    GroupLayout,
    from_groups,
    merge_outliers,
    outliers_per_group,
    split_outliers,
    to_groups,
)
from kvpack.names import parse_kv_name, parse_stacked_name
from kvpack.transforms.mixed import codec_specs, decode_mixed, encode_mixed
from kvpack.transforms.rope import rotate_keys

#: Values per piece of the un-RoPE / rotation loop (float64 temporaries of about 8 bytes each).
TRANSFORM_CHUNK_ELEMENTS = 1 << 20
#: The transforms work on whole head vectors: a bound keeps one piece small (real models: <= 256).
MAX_TRANSFORM_HEAD_DIM = 1 << 16
#: Layers in one stacked entry (``stack_layers``): bounds what a reader lists for a hostile header.
MAX_STACKED_LAYERS = 1 << 16


def role_of(name: str) -> str:
    """``key`` for ``layers.{i}.key`` tensors, ``value`` for every other quantized tensor."""
    parsed = parse_kv_name(name)
    return "key" if parsed is not None and parsed[1] == "key" else "value"


@dataclass(frozen=True)
class TensorPlan:
    """How one quantized tensor is laid out: which tokens are coded, their group layout, its sections.

    Args:
        shape: ``(batch, num_kv_heads, seq_len, head_dim)``.
        dtype: the tensor's dtype name (of the exact tokens and outlier values).
        role: ``key`` or ``value`` (selects the axis; un-RoPE applies to keys only).
        config: the codec config.

    Raises:
        InvalidInputError: the shape does not fit (group size, odd head_dim under rotation,
            rotary dimension beyond head_dim, outlier ratio for the group size).
    """

    shape: tuple[int, ...]
    dtype: str
    role: str
    config: CodecConfig

    def __post_init__(self) -> None:
        if len(self.shape) != 4:
            raise InvalidInputError(
                f"a KV tensor must have shape (batch, num_kv_heads, seq_len, head_dim), got {tuple(self.shape)}"
            )
        GroupLayout((self.shape[0], self.shape[1], 0, self.shape[3]), self.config.group_size, self.axis)
        head_dim = self.shape[3]
        if self.config.rotate == "hadamard" and head_dim % 2:
            raise InvalidInputError(f"a Hadamard rotation needs an even head_dim, got {head_dim}")
        if (self.config.rotate == "hadamard" or self.unrope) and head_dim > MAX_TRANSFORM_HEAD_DIM:
            raise InvalidInputError(
                f"rotation and un-RoPE support head_dim up to {MAX_TRANSFORM_HEAD_DIM}, got {head_dim}"
            )
        if self.unrope and not 0 < self.config.rope_dim <= head_dim:
            raise InvalidInputError(
                f"un-RoPE needs a rotary dimension from 2 to head_dim {head_dim}, got {self.config.rope_dim}"
            )
        outliers_per_group(self.config.outlier_ratio, self.config.group_size, self.config.outlier_select)

    @property
    def axis(self) -> str:
        return self.config.axis_for(self.role)

    @property
    def unrope(self) -> bool:
        return self.config.unrope and self.role == "key"

    @cached_property
    def kept_first(self) -> int:
        return min(self.config.keep_first, self.shape[2])

    @cached_property
    def coded_tokens(self) -> int:
        """Tokens that go through the codec: neither protected nor a channel-axis remainder."""
        middle = max(self.shape[2] - self.kept_first - self.config.keep_last, 0)
        return middle - middle % self.config.group_size if self.axis == "channel" else middle

    @property
    def kept_tokens(self) -> int:
        return self.shape[2] - self.coded_tokens

    @cached_property
    def layout(self) -> GroupLayout:
        batch, heads, _, head_dim = self.shape
        return GroupLayout((batch, heads, self.coded_tokens, head_dim), self.config.group_size, self.axis)

    def section_specs(self) -> dict[str, SectionSpec]:
        """Sections in file order: the codec's, outliers, ``kept``, ``rotation_signs``, ``rope_inv_freq``."""
        config, layout = self.config, self.layout
        specs = codec_specs(config, layout)
        per_group = outliers_per_group(config.outlier_ratio, config.group_size, config.outlier_select)
        if per_group:
            count = layout.n_groups * per_group
            index_bits = max(1, (config.group_size - 1).bit_length())
            specs["outlier_index"] = SectionSpec(KIND_OUTLIERS, "code", count, index_bits, SCOPE_GROUP)
            specs["outlier_value"] = SectionSpec(KIND_OUTLIERS, self.dtype, count, scope=SCOPE_GROUP)
        batch, heads, _, head_dim = self.shape
        if self.kept_tokens:
            specs["kept"] = SectionSpec(
                KIND_EXACT, self.dtype, batch * heads * self.kept_tokens * head_dim, scope=SCOPE_EXACT
            )
        if config.rotate == "hadamard":
            specs["rotation_signs"] = SectionSpec(KIND_TRANSFORM, "code", head_dim, 1, SCOPE_SHARED)
        if self.unrope:
            specs["rope_inv_freq"] = SectionSpec(KIND_TRANSFORM, "float32", config.rope_dim // 2, scope=SCOPE_SHARED)
        return specs

    def encode(self, x: torch.Tensor, widths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Arrays of every section (codes as integer tensors, the rest in any float dtype).

        Args:
            x: finite float tensor of ``shape``.
            widths: with ``config.width_counts``, the width of every group (int64 ``(n_groups,)``).

        Raises:
            InvalidInputError: transformed values beyond the float16 range of the metadata,
                or un-RoPE without rotary frequencies in the config.
        """
        arrays, groups, mask = self.prepare(x)
        config, layout = self.config, self.layout
        if config.width_counts:
            if widths is None or torch.bincount(widths, minlength=9).tolist() != list(config.width_counts):
                raise InvalidInputError("a mixed-precision tensor needs group widths that match width_counts")
            arrays.update(encode_mixed(config, groups, layout, mask, widths))
        elif layout.n_elements:
            arrays.update(config.make_codec().encode(groups, layout, mask))
        else:  # nothing to quantize: the codec's sections are their declared size of zeros
            for section, spec in config.make_codec().section_specs(layout).items():
                arrays[section] = torch.zeros(spec.count, dtype=torch.uint8 if spec.dtype == "code" else torch.float32)
        return arrays

    def prepare(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """Steps 1 to 4 before the codec: ``(arrays of the transform, kept and outlier sections,
        float32 groups (n_groups, group_size), inlier mask or None)``."""
        config, layout = self.config, self.layout
        start, stop = self.kept_first, self.kept_first + self.coded_tokens
        arrays: dict[str, torch.Tensor] = {}
        coded = x[:, :, start:stop].to(torch.float32, copy=True).contiguous()  # transformed in place below
        if self.unrope:
            if config.rope_inv_freq is None or len(config.rope_inv_freq) != config.rope_dim // 2:
                raise InvalidInputError("un-RoPE needs the model's rotary frequencies (see CodecConfig.with_rope)")
            arrays["rope_inv_freq"] = torch.tensor(config.rope_inv_freq, dtype=torch.float32)
        if config.rotate == "hadamard":
            arrays["rotation_signs"] = hadamard_signs(config.rotate_seed, self.shape[3]).to(torch.uint8)
        coded = self._transform(coded, arrays, inverse=False)
        if self.kept_tokens:
            arrays["kept"] = torch.cat([x[:, :, :start], x[:, :, stop:]], dim=2)
        groups = to_groups(coded, layout)
        check_fp16_range(groups)
        per_group = outliers_per_group(config.outlier_ratio, config.group_size, config.outlier_select)
        mask = None
        if per_group:
            positions, outlier_values, mask = split_outliers(groups, per_group, config.outlier_select)
            arrays["outlier_index"], arrays["outlier_value"] = positions, outlier_values
        return arrays, groups, mask

    def decode(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float32 tensor of ``shape`` from the section arrays (codes unpacked, the rest float32).

        Raises:
            InvalidInputError: values no encoder writes (outlier position beyond the group,
                negative or non-finite rotary frequencies).
        """
        config, layout = self.config, self.layout
        batch, heads, _, head_dim = self.shape
        if config.width_counts:
            groups = decode_mixed(config, arrays, layout)
        elif layout.n_elements:
            groups = config.make_codec().decode(arrays, layout)
        if (config.width_counts or layout.n_elements) and not bool(torch.isfinite(groups).all()):
            # e.g. an E8M0 scale of 2^127 times a large element
            raise InvalidInputError("decoded values overflow float32; no encoder writes such scales")
        if not config.width_counts and not layout.n_elements:
            groups = torch.zeros(layout.n_groups, layout.group_size)
        if "outlier_index" in arrays:
            per_group = outliers_per_group(config.outlier_ratio, config.group_size, config.outlier_select)
            positions = arrays["outlier_index"].reshape(layout.n_groups, per_group)
            if positions.numel() and int(positions.max()) >= layout.group_size:
                raise InvalidInputError("outlier position beyond the group size")
            merge_outliers(groups, positions, arrays["outlier_value"].reshape(layout.n_groups, per_group))
        coded = from_groups(groups, layout)
        del groups
        if "rope_inv_freq" in arrays:
            inv_freq = arrays["rope_inv_freq"]
            if not bool(torch.isfinite(inv_freq).all()) or bool((inv_freq < 0).any()):
                raise InvalidInputError("rotary frequencies must be finite and non-negative")
        coded = self._transform(coded, arrays, inverse=True)
        if not self.kept_tokens:
            return coded
        kept = arrays["kept"].reshape(batch, heads, self.kept_tokens, head_dim).to(torch.float32)
        return torch.cat([kept[:, :, : self.kept_first], coded, kept[:, :, self.kept_first :]], dim=2)

    def _transform(self, coded: torch.Tensor, arrays: dict[str, torch.Tensor], inverse: bool) -> torch.Tensor:
        """Un-RoPE then rotate (encode), or rotate back then re-RoPE (decode), in place, one piece of
        at most ``TRANSFORM_CHUNK_ELEMENTS`` values (rows of heads x tokens) at a time, so the
        float64 / butterfly temporaries stay small whatever the tensor's shape."""
        config = self.config
        rope = arrays.get("rope_inv_freq") if self.unrope else None
        negative = arrays["rotation_signs"].bool() if "rotation_signs" in arrays else None
        if (rope is None and negative is None) or coded.numel() == 0:
            return coded
        batch, heads, tokens, head_dim = coded.shape
        rows = coded.view(batch * heads, tokens, head_dim)  # coded is contiguous: a view, changed in place
        token_step = max(1, min(tokens, TRANSFORM_CHUNK_ELEMENTS // head_dim))
        row_step = max(1, TRANSFORM_CHUNK_ELEMENTS // (token_step * head_dim))
        first = config.rope_offset + self.kept_first
        for row in range(0, batch * heads, row_step):
            for begin in range(0, tokens, token_step):
                piece = rows[row : row + row_step, begin : begin + token_step].unsqueeze(0)
                if rope is not None and not inverse:
                    piece = rotate_keys(piece, rope, config.rope_scaling, first + begin, inverse=True)
                if negative is not None:
                    piece = hadamard_rotate(piece, negative, inverse=inverse)
                if rope is not None and inverse:
                    piece = rotate_keys(piece, rope, config.rope_scaling, first + begin, inverse=False)
                rows[row : row + row_step, begin : begin + token_step] = piece[0]
        return coded


def plan_for(shape: tuple[int, ...], dtype: str, name: str, config: CodecConfig) -> TensorPlan:
    """The :class:`TensorPlan` of tensor ``name`` (its role comes from the name).

    With ``config.stack_layers`` the entry is ``layers.all.key|value`` of shape ``(num_layers,
    batch, num_kv_heads, seq_len, head_dim)`` and is planned as :func:`stacked_view` lays it
    out: ``(batch, num_layers * num_kv_heads, seq_len, head_dim)``, so a token group may span layers.

    A plan depends only on its arguments and is built once for each (memoized): every reader,
    writer and size estimate of one entry shares it.

    Raises:
        InvalidInputError: see :class:`TensorPlan`; a stacked entry with another name or shape.
    """
    # rope_inv_freq is left out of the config's equality: part of the key on its own
    return _plan_for(tuple(int(s) for s in shape), dtype, name, config, config.rope_inv_freq)


@functools.lru_cache(maxsize=4096)
def _plan_for(
    shape: tuple[int, ...], dtype: str, name: str, config: CodecConfig, rope_inv_freq: tuple[float, ...] | None
) -> TensorPlan:
    if not config.stack_layers:
        return TensorPlan(shape, dtype, role_of(name), config)
    role = parse_stacked_name(name)
    if role is None:
        raise InvalidInputError(f"stack_layers applies to the entries layers.all.key / layers.all.value, not {name!r}")
    if len(shape) != 5 or not 1 <= shape[0] <= MAX_STACKED_LAYERS:
        raise InvalidInputError(
            f"a stacked entry has shape (num_layers from 1 to {MAX_STACKED_LAYERS}, batch, num_kv_heads, seq_len, "
            f"head_dim), got {shape}"
        )
    layers, batch, heads, seq, head_dim = shape
    return TensorPlan((batch, layers * heads, seq, head_dim), dtype, role, config)


def stacked_view(x: torch.Tensor) -> torch.Tensor:
    """``(num_layers, batch, num_kv_heads, seq_len, head_dim)`` -> ``(batch, num_layers * num_kv_heads,
    seq_len, head_dim)``: layer-major heads, so one token's features run over every layer."""
    layers, batch, heads, seq, head_dim = x.shape
    return x.transpose(0, 1).reshape(batch, layers * heads, seq, head_dim)


def unstacked_view(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`stacked_view` to the entry's 5-D ``shape`` (contiguous)."""
    layers, batch, heads, seq, head_dim = shape
    return x.reshape(batch, layers, heads, seq, head_dim).transpose(0, 1).contiguous()


# --- Hadamard rotation -----------------------------------------------------------------


def hadamard_signs(seed: int, head_dim: int) -> torch.Tensor:
    """Bool ``(head_dim,)``: True where a channel's sign is flipped (numpy ``default_rng(seed)``)."""
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 2, size=head_dim).astype(bool))


@lru_cache(maxsize=16)
def hadamard_matrix(size: int) -> torch.Tensor:
    """The normalized Walsh-Hadamard matrix (Sylvester order), float32 ``(size, size)``, ``size`` a power of two.

    For tests and documentation; the rotation itself never builds it (:func:`fast_hadamard`).
    """
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return (matrix / size**0.5).to(torch.float32)


def rotation_block(head_dim: int) -> int:
    """Size of the Hadamard blocks: the largest power of two dividing ``head_dim``."""
    return head_dim & -head_dim


def fast_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` times the normalized Walsh-Hadamard matrix of size ``block``, on each block of the last axis.

    The fast transform: ``log2(block)`` butterfly passes (``a + b, a - b``) over float32
    data, ``O(n log block)`` work and no ``block x block`` matrix, so a huge head_dim in a
    hostile header cannot make us allocate one.
    """
    shape = x.shape
    y = x.reshape(-1, block)
    half = 1
    while half < block:
        pairs = y.reshape(-1, block // (2 * half), 2, half)
        y = torch.stack([pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]], dim=2)
        half *= 2
    return (y.reshape(shape) * (1.0 / block**0.5)).to(torch.float32)


def hadamard_rotate(x: torch.Tensor, negative: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Rotate each head vector: ``y = (x * s) H`` (forward) or ``x = (y H) * s`` (inverse).

    Args:
        x: float32 ``(..., head_dim)``, ``head_dim`` even (or 0).
        negative: bool ``(head_dim,)``, True where the sign ``s`` is -1.
        inverse: undo the rotation (``H`` is symmetric and orthogonal).

    Returns:
        float32 tensor of the same shape. ``H`` is block-diagonal with blocks of
        :func:`rotation_block` channels.
    """
    head_dim = x.shape[-1]
    if head_dim == 0 or x.numel() == 0:
        return x.clone()
    signs = 1.0 - 2.0 * negative.to(torch.float32)
    if not inverse:
        x = x * signs
    y = fast_hadamard(x.contiguous(), rotation_block(head_dim))
    return y * signs if inverse else y
