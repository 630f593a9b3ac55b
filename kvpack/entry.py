"""One tensor <-> its sections: the single encode and the single decode path of a ``.kvp`` entry.

Tensors are KV-cache tensors of shape ``(batch, num_kv_heads, seq_len, head_dim)`` named
``layers.{i}.key`` / ``layers.{i}.value`` (or ``(layers, ...)`` stacked, ``layers.all.key``);
any other tensor (``token_ids``) is stored losslessly. Plain tensors go through the fused
kernels (:mod:`kvpack.fused`), the rest through the tensor plan (:mod:`kvpack.transforms.plan`):
the same bytes either way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvpack import fused
from kvpack.codecs.base import KIND_CODEBOOKS, KIND_CODES, KIND_SCALES, SectionSpec
from kvpack.config import CodecConfig
from kvpack.dtypes import TORCH_DTYPES, as_uint8, check_finite, check_float_dtype, dtype_name, from_bytes, tensor_bytes
from kvpack.errors import FormatError, InvalidInputError
from kvpack.formats.entropy import EntropyConfig, section_transposes, transposed, untransposed
from kvpack.formats.header import TensorEntry, section_specs, spec_nbytes
from kvpack.formats.safetensors_io import SafetensorsSource
from kvpack.names import ROLES, kv_tensor_name, parse_kv_name, stacked_name, tensor_order
from kvpack.packing import pack, unpack
from kvpack.transforms.pca import decode_transform, encode_transform, layer_basis
from kvpack.transforms.plan import plan_for, stacked_view, unstacked_view


def encode_tensor(
    name: str,
    x: torch.Tensor,
    config: CodecConfig | None,
    widths: torch.Tensor | None = None,
    transposes: dict[str, int] | None = None,
) -> dict[str, bytes]:
    """Serialize one tensor into the sections of a ``.kvp`` entry.

    Args:
        name: tensor name (for messages).
        x: with a codec, a float16 / bfloat16 / float32 tensor ``(batch, num_kv_heads,
            seq_len, head_dim)``, or ``(num_layers, batch, num_kv_heads, seq_len, head_dim)``
            with ``config.stack_layers``; without (``config=None``), any supported tensor,
            stored as is.
        config: the codec config, or ``None`` for lossless storage.
        widths: with ``config.width_counts`` (mixed precision), the code width of every group
            (int64 ``(n_groups,)``, 0 to 8), as an allocator chose it (:mod:`kvpack.allocation.solver`).
        transposes: code sections to pack feature-major, with their row length
            (:func:`section_transposes`; format 1.5, docs/format.md §6.3); default none.

    Returns:
        Section name -> bytes, in the order :func:`kvpack.formats.header.section_specs` gives.

    Raises:
        InvalidInputError: wrong shape or dtype, NaN/Inf values, values beyond the float16
            metadata range, or a group size that does not divide the features.
    """
    dtype = dtype_name(x.dtype)
    if config is None:
        return {"data": tensor_bytes(x)}
    if config.whole_tensor:
        raise InvalidInputError(
            f"tensor {name!r}: method {config.method} sets per-entry values while encoding; use encode_entry"
        )
    if x.numel():
        check_float_dtype(name, dtype)
    try:
        plan = plan_for(tuple(x.shape), dtype, name, config)
        specs = plan.section_specs()
    except InvalidInputError as exc:
        raise InvalidInputError(f"tensor {name!r}: {exc}") from None
    if x.numel() == 0:  # nothing to quantize: every section is its declared size of zeros
        return {section: bytes(spec_nbytes(spec)) for section, spec in specs.items()}
    values = x.detach().to("cpu")
    transposes = transposes or {}
    if fused.can_encode(values, config, plan, transposes):  # fused kernels, the same bytes
        arrays = fused.encode(name, values, config, plan)
        return {
            section: arrays[section]
            if spec.dtype == "code"
            else tensor_bytes(arrays[section].to(TORCH_DTYPES[spec.dtype]))
            for section, spec in specs.items()
        }
    check_finite(name, values, config.stack_layers)
    if config.stack_layers:
        values = stacked_view(values)
    try:
        arrays = plan.encode(values, widths)
    except InvalidInputError as exc:
        raise InvalidInputError(f"tensor {name!r}: {exc}") from None
    out = {}
    for section, spec in specs.items():
        if spec.dtype == "code":
            codes = arrays[section].reshape(-1)
            if transposes.get(section):
                codes = transposed(codes, transposes[section])
            out[section] = pack(codes.numpy(), spec.bits).tobytes()
        else:
            out[section] = tensor_bytes(arrays[section].to(TORCH_DTYPES[spec.dtype]))
    return out


def encode_entry(
    name: str,
    x: torch.Tensor,
    config: CodecConfig | None,
    widths: torch.Tensor | None = None,
    transposes: dict[str, int] | None = None,
) -> tuple[CodecConfig | None, dict[str, bytes]]:
    """Like :func:`encode_tensor`, also for whole-tensor codecs (the transform codec,
    :mod:`kvpack.transforms.pca`), which set per-entry values while encoding.

    Returns:
        ``(the entry's codec config, section name -> bytes)``.

    Raises:
        InvalidInputError: see :func:`encode_tensor` and :func:`kvpack.transforms.pca.encode_transform`.
    """
    if config is None or not config.whole_tensor:
        return config, encode_tensor(name, x, config, widths, transposes)
    check_float_dtype(name, dtype_name(x.dtype))
    check_finite(name, x, False)
    try:
        return encode_transform(name, x.detach().to("cpu"), config)
    except InvalidInputError as exc:
        raise InvalidInputError(f"tensor {name!r}: {exc}") from None


def encode_for_file(
    name: str, x: torch.Tensor, config: CodecConfig | None, widths: torch.Tensor | None, entropy: EntropyConfig
) -> tuple[CodecConfig | None, dict[str, bytes], dict[str, int]]:
    """One tensor as a file with the entropy stage ``entropy`` takes it, before that stage: the
    single encode path of ``compress`` and of rate control's candidate files.

    Args:
        name, x, config, widths: see :func:`encode_entry` (whole-tensor codecs included).
        entropy: the file's entropy stage (:class:`kvpack.formats.entropy.EntropyConfig`).

    Returns:
        ``(codec, sections, transposes)``: the entry's codec config (:func:`encode_entry`), section
        name -> bytes with the code sections the file stores feature-major already transposed, and
        those sections with their row length (:func:`kvpack.formats.entropy.section_transposes`), as
        the writer takes them.

    Raises:
        InvalidInputError: see :func:`encode_entry`.
    """
    transposes = section_transposes(name, tuple(x.shape), dtype_name(x.dtype), config, entropy) if x.numel() else {}
    codec, sections = encode_entry(name, x, config, widths, transposes)
    return codec, sections, transposes


def decode_entry(
    entry: TensorEntry, sections: dict[str, bytes | np.ndarray], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Rebuild a tensor from its header entry and section bytes.

    Args:
        entry: the tensor's header entry (shape, dtype, codec).
        sections: section name -> raw bytes (as read from the file).
        dtype: output dtype; default the stored dtype.

    Returns:
        Tensor of ``entry.shape``.

    Raises:
        FormatError: a section has the wrong size (only possible if not read through the reader).
        InvalidInputError: a transform-coded entry without its calibration profile
            (:mod:`kvpack.restore.profiles` attaches it).
    """
    if entry.codec is not None and entry.codec.whole_tensor:
        try:
            layer_basis(entry.name, entry.shape, entry.codec)
        except InvalidInputError as exc:  # a missing or foreign profile: not a fault of the file
            raise InvalidInputError(f"tensor {entry.name!r}: {exc}") from None
    specs = section_specs(entry.shape, entry.dtype, entry.codec, entry.name)
    out_dtype = dtype or TORCH_DTYPES[entry.dtype]
    try:
        if entry.codec is None:
            return from_bytes(sections["data"], entry.dtype).reshape(entry.shape).to(out_dtype)
        if entry.codec.whole_tensor:
            return decode_transform(entry.name, entry.shape, entry.dtype, entry.codec, sections).to(out_dtype)
        plan = entry.plan
        layout = plan.layout
        fast = entry.n_elements > 0 and fused.can_decode(entry, out_dtype)
        arrays = {
            section: section_array(
                entry.name, section, spec, sections[section], layout.group_size, transpose_of(entry, section)
            )
            for section, spec in specs.items()
            if not (fast and section == "codes")  # the kernel reads the packed codes itself
        }
        if entry.n_elements == 0:  # the sections were still checked: a tensor-scope codebook exists
            return torch.empty(entry.shape, dtype=out_dtype)
        if fast:  # fused kernel, the same values
            return fused.decode(entry, as_uint8(sections["codes"]), arrays, out_dtype)
        decoded = plan.decode(arrays).to(out_dtype)
        return unstacked_view(decoded, entry.shape) if entry.codec.stack_layers else decoded
    except InvalidInputError as exc:
        raise FormatError(f"tensor {entry.name!r}: {exc}") from None


def section_array(
    name: str, section: str, spec: SectionSpec, raw: bytes | np.ndarray, group_size: int, transpose: int = 0
) -> torch.Tensor:
    """The array a codec decodes from one section's bytes, as read from the file (``transpose``:
    the section's feature-major row length, format 1.5 §6.3; 0 for group order).

    Returns:
        See :func:`codes_array` (``spec.dtype == "code"``) and :func:`values_array`.

    Raises:
        FormatError: scales or codebooks that are NaN or infinite.
        InvalidInputError: a length that does not match ``spec`` (only without the reader's checks).
    """
    if spec.dtype == "code":
        codes = unpack(as_uint8(raw), spec.bits, spec.count)
        if transpose:
            codes = untransposed(codes, transpose)
        return codes_array(spec, codes, group_size)
    return values_array(name, section, spec, raw)


def transpose_of(entry: TensorEntry, section: str) -> int:
    """The feature-major row length of a section of ``entry`` (0: group order)."""
    where = entry.sections.get(section)
    return where.transpose if where is not None else 0


def codes_array(spec: SectionSpec, codes: np.ndarray, group_size: int) -> torch.Tensor:
    """Unpacked codes as a codec takes them: the codes of groups (kind ``codes``) as uint8
    ``(groups, group_size)``; other codes (outlier positions, rotation signs) as int64 ``(count,)``."""
    codes = torch.from_numpy(codes)
    if spec.kind == KIND_CODES:
        return codes.reshape(-1, group_size)
    return codes.long()  # scatter indices, signs


def values_array(name: str, section: str, spec: SectionSpec, raw: bytes | np.ndarray) -> torch.Tensor:
    """The values of a section that is not packed codes, as float32 ``(count,)`` (the count
    ``raw`` holds: all of the section or a piece of it).

    Raises:
        FormatError: scales or codebooks that are NaN or infinite; a length that is not a
            whole number of values.
    """
    values = from_bytes(raw, spec.dtype).to(torch.float32)
    if spec.kind in (KIND_SCALES, KIND_CODEBOOKS) and not bool(torch.isfinite(values).all()):
        raise FormatError(f"tensor {name!r}: section {section} holds NaN or infinite values")
    return values


def entry_layout(
    shapes: dict[str, tuple[tuple[int, ...], str]], config: CodecConfig | None
) -> list[tuple[str, list[str], CodecConfig | None]]:
    """Which entries a file of these tensors holds: ``(entry name, source tensor names, codec)``.

    Each tensor is its own entry (K/V quantized with ``config``, the rest lossless), except with
    ``config.stack_layers``: then ``layers.all.key`` stacks ``layers.0.key`` ... ``layers.{L-1}.key``
    (shape ``(L, batch, num_kv_heads, seq_len, head_dim)``) and ``layers.all.value`` the values,
    first in the file.

    Args:
        shapes: tensor name -> ``(shape, dtype name)``.

    Raises:
        InvalidInputError: stacking a cache whose K/V tensors are not exactly layers 0 to L-1
            with a key and a value each, the keys of one shape and dtype and the values of one,
            or that already holds a tensor named ``layers.all.key|value``.
    """
    if config is None or not config.stack_layers:
        return [(name, [name], config if config is not None and parse_kv_name(name) else None) for name in shapes]
    kv = {name: parse_kv_name(name) for name in shapes if parse_kv_name(name)}
    taken = [stacked_name(role) for role in ROLES if stacked_name(role) in shapes]
    if taken:
        raise InvalidInputError(f"the cache holds a tensor named {taken[0]!r}, the name of a stacked entry")
    layers = 1 + max((layer for layer, _ in kv.values()), default=-1)
    missing = [kv_tensor_name(i, role) for i in range(layers) for role in ROLES if kv_tensor_name(i, role) not in kv]
    if not kv or missing:
        raise InvalidInputError(
            "groups across layers (`level=token`) need every layer's key and value, layers 0 to L-1"
            + (f"; missing {', '.join(missing[:3])}" if missing else "")
        )
    for name in sorted(kv, key=tensor_order):
        first = kv_tensor_name(0, kv[name][1])
        if shapes[name] != shapes[first]:
            raise InvalidInputError(
                f"groups across layers (`level=token`) need the layers' {kv[name][1]}s to have one shape and dtype: "
                f"{name!r} is {shapes[name][0]} {shapes[name][1]}, {first} {shapes[first][0]} {shapes[first][1]}"
            )
    stacked = [(stacked_name(role), [kv_tensor_name(i, role) for i in range(layers)], config) for role in ROLES]
    return stacked + [(name, [name], None) for name in shapes if name not in kv]


def stack(tensors: Any, names: list[str]) -> torch.Tensor:
    """``(len(names), *shape)``: the named tensors (from a dict, a :class:`SafetensorsSource` or a
    name -> tensor function) stacked."""
    if callable(tensors):
        get = tensors
    else:
        get = tensors.get if isinstance(tensors, SafetensorsSource) else tensors.__getitem__
    return torch.stack([get(name) for name in names])
