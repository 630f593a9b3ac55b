"""The single compress loop: K/V tensors in memory or a safetensors dump on disk -> a ``.kvp`` file.

Every ``layers.{i}.key|value`` tensor is quantized with the codec config, other tensors are
stored losslessly; entries are encoded one at a time (:mod:`kvpack.entry`) and streamed into
the writer, so a cache is never held twice in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import torch

from kvpack import __version__
from kvpack.allocation.importance import is_stats_tensor
from kvpack.allocation.plan import allocate_entries
from kvpack.allocation.solver import Allocation
from kvpack.allocation.transform_rate import TOLERANCE, choose_distortion
from kvpack.config import CodecConfig
from kvpack.dtypes import check_float_dtype, dtype_name
from kvpack.entry import decode_entry, encode_for_file, entry_layout, stack
from kvpack.errors import FormatError, InvalidInputError
from kvpack.formats.atomic import check_output_path
from kvpack.formats.entropy import EntropyConfig
from kvpack.formats.header import TensorEntry, section_specs
from kvpack.formats.safetensors_io import SafetensorsSource
from kvpack.formats.writer import KvpWriter
from kvpack.llama_cpp.source import LlamaStateSource
from kvpack.metrics import ErrorAccumulator
from kvpack.names import parse_kv_name, tensor_order
from kvpack.profile import Profile, default_profile_path, find_profile, model_key
from kvpack.report import build_report
from kvpack.restore.profiles import PROFILE_TENSOR
from kvpack.sources import open_dump
from kvpack.storage import accepts_storage_options, is_url, same_location, upload_on_success
from kvpack.transforms.rope import ROTATE_HALF, cached_first_position, rope_for_layer
from kvpack.weighted_error import estimated_kl

Progress = Callable[[int, int, str], None]
#: File bits per K/V element the transform codec aims at when no target is given.
DEFAULT_TRANSFORM_BITS = 2.0


@accepts_storage_options
def compress_tensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    config: CodecConfig | None,
    metadata: dict[str, str] | None = None,
    force: bool = False,
    allocation: Allocation | None = None,
    stats: dict[str, torch.Tensor] | None = None,
    entropy: EntropyConfig | None = None,
    profile: Profile | str | os.PathLike | None = None,
    embed_profile: bool = False,
    rope: dict[str, str] | None = None,
    *,
    storage_options: dict | None = None,
) -> list[TensorEntry]:
    """Write a dict of tensors to a ``.kvp``: ``layers.{i}.key|value`` quantized, the rest lossless.

    With ``config=None`` every tensor is stored losslessly in its own dtype. With
    ``config.unrope``, the rotary frequencies come from the config (:meth:`CodecConfig.with_rope`,
    the same for every layer) or else from ``rope`` or ``metadata``, each layer its own (what
    ``kvpack dump`` records, :func:`layer_rope`; ``rope`` is not written to the file). With
    ``config.stack_layers`` the
    K/V tensors are written as two stacked entries (:func:`entry_layout`). With an
    ``allocation``, groups get their own widths (:func:`allocate_widths`), weighted by the
    attention statistics ``stats`` or by those among ``tensors`` (which are not stored).
    ``entropy`` sets the lossless stage (:class:`kvpack.formats.entropy.EntropyConfig`; default zstd
    level 1 on every section, codes feature-major; ``EntropyConfig.off()`` writes dense sections).

    The transform codec (``method="transform"``) takes its calibration ``profile`` (a
    :class:`~kvpack.profile.Profile` or a path; default: the config's, else the profile directory's
    for the model ``metadata`` names) and lands the file on ``allocation.target_bits`` (default
    :data:`DEFAULT_TRANSFORM_BITS`) bits per K/V element; ``embed_profile`` stores the profile in
    the file (tensor ``kvpack.profile``, counted in its bits).

    ``storage_options``: fsspec options (credentials, ``endpoint_url``, ...) for the URLs among the paths
    (:mod:`kvpack.storage`: ``s3://``, ``gs://``, ``memory://`` ...), which any path argument may be.

    Raises:
        InvalidInputError, OutputExistsError: see :func:`encode_tensor`, :func:`entry_layout`
            and :class:`KvpWriter`; a missing or foreign profile.
    """
    if is_url(path):  # written locally, uploaded once complete (the transform codec may write twice)
        with upload_on_success(str(path), force) as local:
            return compress_tensors(
                tensors, local, config, metadata, True, allocation, stats, entropy, profile, embed_profile, rope
            )
    metadata = metadata or {}
    config = with_model_profile(config, metadata, profile)
    stats = stats if stats is not None else {n: x for n, x in tensors.items() if is_stats_tensor(n)}
    tensors = {name: x for name, x in tensors.items() if not is_stats_tensor(name)}
    if embed_profile:
        tensors[PROFILE_TENSOR] = embedded_profile(config)
    shapes = {name: (tuple(x.shape), dtype_name(x.dtype)) for name, x in tensors.items()}
    layout = layer_rope(entry_layout(shapes, config), shapes, rope if rope is not None else metadata)
    file_metadata = metadata_for_file(metadata, config, allocation)
    entropy = EntropyConfig() if entropy is None else entropy
    groups_allocation = None if config is not None and config.whole_tensor else allocation  # the transform: one level
    written: list[int] = []

    def write(layout, force: bool) -> list[TensorEntry]:
        mixed = allocate_entries(
            layout, shapes, tensors.__getitem__, config, groups_allocation, stats, file_metadata, entropy
        )
        with KvpWriter(path, file_metadata, force=force, entropy=entropy) as writer:
            for entry_name, sources, codec in layout:
                x = tensors[entry_name] if entry_name == sources[0] else stack(tensors, sources)
                codec, widths = mixed.codec_for(entry_name, codec)
                _write_entry(writer, entry_name, x, codec, widths)
        written.append(writer.close())  # the file's size in bytes (close is idempotent)
        return writer.entries

    if config is None or not config.whole_tensor:
        return write(layout, force)
    target = transform_target(allocation)
    chosen = _transform_layout(layout, shapes, tensors.__getitem__, config, target, file_metadata, entropy)
    entries = write(chosen, force)
    correction = _missed_target(written[-1], entries, target)
    if correction is None:
        return entries
    chosen = _transform_layout(layout, shapes, tensors.__getitem__, config, target, file_metadata, entropy, correction)
    return write(chosen, True)  # our own first attempt is replaced


def transform_target(allocation: Allocation | None) -> float:
    """The file bits per K/V element the transform codec aims at.

    Raises:
        InvalidInputError: an allocation other than a bits target (the transform codec has one knob).
    """
    if allocation is None:
        return DEFAULT_TRANSFORM_BITS
    if allocation.target_bits is None or allocation.method != "target":
        raise InvalidInputError("method transform takes `target_bits` (file bits per element), no other allocation")
    return allocation.target_bits


def _transform_layout(layout, shapes, get, config, target, metadata, entropy, correction=0.0):
    theta = choose_distortion(layout, shapes, get, config, target, metadata, entropy, correction)
    return [
        (name, sources, codec.with_params(distortion=theta) if codec is not None else None)
        for name, sources, codec in layout
    ]


def _missed_target(file_size: int, entries: list[TensorEntry], target: float) -> float | None:
    """``target - actual`` bits per element when the written file (``file_size`` bytes) missed ``target``
    by more than the tolerance, else None."""
    kv_elements = sum(e.n_elements for e in entries if e.codec is not None)
    actual = file_size * 8 / max(kv_elements, 1)
    return None if abs(actual / target - 1) <= TOLERANCE else target - actual


def with_model_profile(
    config: CodecConfig | None, metadata: dict[str, str], profile: Profile | str | os.PathLike | None = None
) -> CodecConfig | None:
    """``config`` with its calibration profile when its codec needs one (the transform codec).

    ``profile`` is a :class:`Profile`, a path, or ``None``: the config's own, else the profile
    directory's profile of the model the dump's ``metadata`` names (:func:`~kvpack.profile.model_key`).

    Raises:
        InvalidInputError: none found (naming the ``kvpack calibrate`` command that makes it), or a
            profile of another model or whose keys are not what the config codes.
        FormatError: a corrupted profile file.
    """
    if config is None or not config.whole_tensor:
        return config
    if profile is None and config.profile is not None:
        found = config.profile
    elif isinstance(profile, Profile):
        found = profile
    else:
        found = find_profile(model_key(metadata), model=metadata.get("model", ""), path=profile)
    _check_model(found, metadata)
    pre_rope = found.metadata.get("keys") == "pre_rope"
    if pre_rope != config.unrope:
        raise InvalidInputError(
            f"{found.label} holds {'pre-RoPE' if pre_rope else 'cached (no RoPE to undo)'} keys, but the codec "
            f"{'does not un-RoPE' if pre_rope else 'un-RoPEs'} them (`unrope={not config.unrope}` fits it)"
        )
    return config.with_profile(found)


def weighing_profile(
    config: CodecConfig | None, metadata: dict[str, str], profile: Profile | str | os.PathLike | None = None
) -> Profile | None:
    """The profile that weighs a compressed cache's error (:mod:`kvpack.weighted_error`): the config's
    (the transform codec's), else ``profile`` (a :class:`Profile` or a path), else the profile
    directory's for the model ``metadata`` names; ``None`` when the directory has none or it is unreadable.

    Raises:
        InvalidInputError: a given ``profile`` of another model.
        FormatError: a given ``profile`` file that is corrupted.
    """
    if config is not None and config.profile is not None:
        return config.profile
    model = model_key(metadata)
    if isinstance(profile, Profile):
        found = profile
    elif profile is not None:
        found = find_profile(model, model=metadata.get("model", ""), path=profile)
    else:
        if not model or not default_profile_path(model).is_file():
            return None
        try:
            found = find_profile(model, model=metadata.get("model", ""))
        except (InvalidInputError, FormatError):
            return None  # grouped codecs do not need it: no estimate rather than no file
    _check_model(found, metadata)
    return found


def _check_model(found: Profile, metadata: dict[str, str]) -> None:
    """Refuse a profile of another model than the one the dump's ``metadata`` names."""
    model = model_key(metadata)
    if model and found.model_fingerprints and model not in found.model_fingerprints:
        raise InvalidInputError(
            f"{found.label} does not belong to this cache's model {metadata.get('model', '?')} (weights {model})"
        )


def embedded_profile(config: CodecConfig | None) -> torch.Tensor:
    """The profile's file bytes as a uint8 tensor (entry ``kvpack.profile``).

    Raises:
        InvalidInputError: the codec has no profile to embed.
    """
    if config is None or config.profile is None:
        raise InvalidInputError("`embed_profile` needs the transform codec and its profile")
    return torch.frombuffer(bytearray(config.profile.to_bytes()), dtype=torch.uint8)


def _write_entry(
    writer: KvpWriter, name: str, x: torch.Tensor, codec: CodecConfig | None, widths: torch.Tensor | None
) -> tuple[TensorEntry, dict[str, bytes]]:
    """Encode one tensor and add it to ``writer`` (with its entropy stage); returns the entry and the sections."""
    codec, sections, transposes = encode_for_file(name, x, codec, widths, writer.entropy)
    return writer.add_tensor(name, tuple(x.shape), dtype_name(x.dtype), codec, sections, transposes), sections


def metadata_for_file(
    source: dict[str, str], config: CodecConfig | None, allocation: Allocation | None = None
) -> dict[str, str]:
    meta = dict(source)
    meta["kvpack_version"] = __version__
    meta["codec"] = config.describe() if config is not None else "lossless"
    if allocation is not None and config is not None:
        meta["allocation"] = json.dumps(dataclasses.asdict(allocation), sort_keys=True)
    if config is not None and config.profile is not None:
        meta["profile"] = config.profile.fingerprint
        meta["profile_model"] = config.profile.model_fingerprint
    return meta


@accepts_storage_options
def compress_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: CodecConfig,
    force: bool = False,
    progress: Progress | None = None,
    allocation: Allocation | None = None,
    entropy: EntropyConfig | None = None,
    profile: Profile | str | os.PathLike | None = None,
    embed_profile: bool = False,
    model: str | os.PathLike | None = None,
    *,
    storage_options: dict | None = None,
) -> dict:
    """Compress a safetensors KV-cache dump or a llama.cpp state file into a ``.kvp`` file and measure the result.

    Every ``layers.{i}.key|value`` tensor is quantized with ``config``; other tensors are
    stored losslessly; ``config=None`` stores every tensor exactly (lossless). Each tensor is decoded
    again from the bytes written, so the error statistics are those of the file. ``profile`` and
    ``embed_profile``: see :func:`compress_tensors`. ``model``: the GGUF a llama.cpp state file was
    made with (:func:`kvpack.sources.open_dump`); the ``.kvp`` then keeps every other byte of the state
    file (``llama_cpp.state``), so ``kvpack decompress --format llama-cpp`` rebuilds it.

    ``storage_options``: fsspec options (credentials, ``endpoint_url``, ...) for the URLs among the paths
    (:mod:`kvpack.storage`: ``s3://``, ``gs://``, ``memory://`` ...), which any path argument may be.

    Returns:
        The report (see :func:`build_report`).

    Raises:
        InvalidInputError: missing input, bad tensor (NaN/Inf, shape), group size that does
            not divide, an input without K/V tensors, a ``.kvp`` given as input, or a missing or
            foreign profile.
        FormatError: the input is not a readable safetensors dump or llama.cpp state file.
        OutputExistsError: the output exists and ``force`` is false.
    """
    if is_url(output_path):  # written locally, uploaded once complete (the transform codec may write twice)
        if same_location(input_path, output_path):
            raise InvalidInputError("input and output are the same file")
        url = str(output_path)
        with upload_on_success(url, force) as local:  # refused before any download
            report = compress_file(
                input_path, local, config, True, progress, allocation, entropy, profile, embed_profile, model
            )
        return {**report, "output": url}
    if is_url(input_path):  # refuse the output before the dump is downloaded
        check_output_path(output_path, force)
    with open_dump(input_path, model, lossless=config is None) as source:
        config = with_model_profile(config, source.metadata, profile)
        names = sorted((n for n in source.keys() if not is_stats_tensor(n)), key=tensor_order)
        layout = check_compressible(source, config, names, source.metadata)
        check_output_path(output_path, force)
        if same_location(input_path, output_path):
            raise InvalidInputError("input and output are the same file")
        shapes = {name: source.shape_dtype(name) for name in names}
        extra = {PROFILE_TENSOR: embedded_profile(config)} if embed_profile else {}
        for name, x in extra.items():
            shapes[name] = (tuple(x.shape), dtype_name(x.dtype))
            layout.append((name, [name], None))

        def get(name: str) -> torch.Tensor:
            return extra[name] if name in extra else source.get(name)

        stats = {name: source.get(name) for name in source.keys() if is_stats_tensor(name)}
        # sorted: safetensors hands the metadata over in a different order each run; same input, same bytes
        file_metadata = metadata_for_file(dict(sorted(source.metadata.items())), config, allocation)
        entropy = EntropyConfig() if entropy is None else entropy
        if config is None and allocation is not None:
            raise InvalidInputError("a lossless file (no codec) has no bits to allocate; drop the allocation")
        groups_allocation = None if config is None or config.whole_tensor else allocation  # transform: one level

        weighing = weighing_profile(config, source.metadata, profile)
        estimates: dict[str, float | None] = {}
        reached: dict = {}
        written: list[int] = []

        def write(layout, force: bool) -> tuple[list[TensorEntry], dict[str, ErrorAccumulator]]:
            errors: dict[str, ErrorAccumulator] = {}
            mixed = allocate_entries(layout, shapes, get, config, groups_allocation, stats, file_metadata, entropy)
            reached.update(mixed.summary)
            with KvpWriter(output_path, file_metadata, force=force, entropy=entropy) as writer:
                for index, (entry_name, sources, codec) in enumerate(layout):
                    if progress:
                        progress(index, len(layout), entry_name)
                    stacked = entry_name != sources[0]
                    x = stack(get, sources) if stacked else get(entry_name)
                    codec, widths = mixed.codec_for(entry_name, codec)
                    entry, sections = _write_entry(writer, entry_name, x, codec, widths)
                    if codec is not None:
                        decoded = decode_entry(entry, sections)
                        for i, name in enumerate(sources):  # errors per layer, also of a stacked entry
                            errors[name] = ErrorAccumulator()
                            errors[name].add(x[i] if stacked else x, decoded[i] if stacked else decoded)
                            if weighing is not None:
                                original, restored = (x[i], decoded[i]) if stacked else (x, decoded)
                                estimates[name] = estimated_kl(weighing, name, original, restored, source.metadata)
                    del x
                if progress:
                    progress(len(layout), len(layout), "")
            written.append(writer.close())  # the file's size in bytes (close is idempotent)
            return writer.entries, errors

        if config is None or not config.whole_tensor:
            entries, errors = write(layout, force)
        else:
            target = transform_target(allocation)
            chosen = _transform_layout(layout, shapes, get, config, target, file_metadata, entropy)
            entries, errors = write(chosen, force)
            correction = _missed_target(written[-1], entries, target)
            if correction is not None:
                chosen = _transform_layout(layout, shapes, get, config, target, file_metadata, entropy, correction)
                entries, errors = write(chosen, True)
        file_size = written[-1]
        input_size = source.file_size
    report = build_report(entries, file_size, errors, estimates if weighing is not None else None)
    report.update(
        input=str(input_path),
        output=str(output_path),
        input_bytes=input_size,
        ratio_vs_input=input_size / file_size,
        config=config.to_dict() if config is not None else None,
    )
    if weighing is not None:
        report["weighted_by"] = weighing.fingerprint
    if config is not None and config.profile is not None:
        report["profile"] = {
            "fingerprint": config.profile.fingerprint,
            "bytes": config.profile.nbytes,
            "embedded": embed_profile,
        }
    if reached:  # what rate control reached (file bits per element or decoded error)
        report["allocation"] = reached
    return report


def layer_rope(
    layout: list[tuple[str, list[str], CodecConfig | None]],
    shapes: dict[str, tuple[tuple[int, ...], str]],
    metadata: dict[str, str],
) -> list[tuple[str, list[str], CodecConfig | None]]:
    """``layout`` (:func:`entry_layout`) with each key entry's codec un-RoPE'ing with its own layer's
    rotary parameters from a dump's ``metadata`` (:func:`kvpack.transforms.rope.rope_for_layer`).

    An entry's first token is at ``rope_offset`` plus the position of its layer's first cached
    token (:func:`~kvpack.transforms.rope.cached_first_position`: a sliding-window layer holds the
    last tokens). Entries without un-RoPE, value entries, and codecs that already carry their
    frequencies (:meth:`CodecConfig.with_rope`: the caller's, for every layer) are left as they are.
    An un-RoPE the codec only recommended (``unrope_optional``) is dropped where it cannot apply.

    Raises:
        InvalidInputError: a layer without recorded rotary parameters (see ``rope_for_layer``), a
            layer whose RoPE rotates interleaved channel pairs (the format stores rotate-half
            un-RoPE only), or a stacked entry (``level=token``) over layers whose parameters differ.
    """
    result = []
    for entry_name, sources, codec in layout:
        parsed = [parse_kv_name(name) for name in sources]
        if codec is None or not codec.unrope or codec.rope_inv_freq is not None or parsed[0][1] != "key":
            result.append((entry_name, sources, codec))
            continue
        try:
            specs = [rope_for_layer(metadata, layer) for layer, _ in parsed]
        except InvalidInputError:
            if not codec.unrope_optional:
                raise
            specs = []
        differ = next((i for i, spec in enumerate(specs) if spec != specs[0]), None)
        if codec.unrope_optional and (not specs or differ is not None or specs[0].layout != ROTATE_HALF):
            # a recommended un-RoPE this cache's model does not allow: keys as cached
            result.append((entry_name, sources, dataclasses.replace(codec, unrope=False, unrope_optional=False)))
            continue
        if differ is not None:
            raise InvalidInputError(
                f"groups across layers (`level=token`) un-RoPE every layer alike, but layers {parsed[0][0]} and "
                f"{parsed[differ][0]} use different rotary parameters; group per layer (`level=layer`) or drop `unrope`"
            )
        if specs[0].layout != ROTATE_HALF:
            raise InvalidInputError(
                f"tensor {sources[0]!r}: its model rotates interleaved channel pairs (GPT-J style RoPE), which the "
                ".kvp format cannot store un-RoPE'd (only rotate-half); compress it without `unrope`"
            )
        shape = shapes[sources[0]][0]
        offset = codec.rope_offset + (cached_first_position(metadata, shape[2]) if len(shape) == 4 else 0)
        result.append((entry_name, sources, codec.with_rope(specs[0].inv_freq, specs[0].attention_scaling, offset)))
    return result


def check_compressible(
    source: SafetensorsSource | LlamaStateSource,
    config: CodecConfig | None,
    names: list[str],
    metadata: dict[str, str] | None = None,
) -> list[tuple[str, list[str], CodecConfig | None]]:
    """Check every K/V tensor's shape and dtype against ``config`` before any work (no data read).

    Returns:
        The file's entries (:func:`entry_layout`), un-RoPE'd keys with their layers' rotary
        parameters from ``metadata`` (:func:`layer_rope`).

    Raises:
        InvalidInputError: no K/V tensors, a non-float or non-4-D K/V tensor, a group size
            that does not divide a tensor's features, K/V tensors that cannot be stacked, or
            un-RoPE without usable rotary parameters (see :func:`layer_rope`).
    """
    if config is not None and not any(parse_kv_name(n) for n in names):
        raise InvalidInputError(f"{source.path}: no layers.<i>.key / layers.<i>.value tensors found")
    shapes = {name: source.shape_dtype(name) for name in names}
    layout = entry_layout(shapes, config)
    for _, sources, codec in layout:
        if codec is not None:
            check_float_dtype(sources[0], shapes[sources[0]][1])
    layout = layer_rope(layout, shapes, metadata or {})
    for entry_name, sources, codec in layout:
        if codec is None:
            continue
        shape, dtype = shapes[sources[0]]
        if config is not None and config.stack_layers:
            if len(shape) != 4:
                raise InvalidInputError(
                    f"tensor {sources[0]!r}: a KV tensor must have shape (batch, num_kv_heads, seq_len, head_dim), "
                    f"got {tuple(shape)}"
                )
            shape = (len(sources), *shape)
        try:
            section_specs(tuple(shape), dtype, codec, entry_name)
        except InvalidInputError as exc:
            raise InvalidInputError(f"tensor {entry_name!r}: {exc}") from None
    return layout
