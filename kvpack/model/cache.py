"""Persist a transformers KV cache and restore it so a model continues from it.

``save_cache`` writes the cache object a forward pass returns (``output.cache``, a
``DynamicCache``; ``output.past_key_values`` in older transformers) or the legacy tuple of
``(key, value)`` pairs, its token ids and the model's identity to a
``.kvp`` (any codec, or lossless). ``load_cache`` reads it back as a ``DynamicCache`` of
the installed transformers version, on a chosen device and dtype, after checking that the
file was made by the same model. The whole file is decoded before the cache object is
built, so a bad file raises before anything the caller owns is touched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpack import __version__
from kvpack.compress import compress_tensors
from kvpack.config import CodecConfig
from kvpack.dtypes import dtype_name
from kvpack.errors import InvalidInputError, ModelMismatchError, brief_text
from kvpack.model.dump import (
    cache_keyword,
    cache_layers,
    decoder_config,
    kv_head_shape,
    model_identity,
    rope_for_cache,
)
from kvpack.names import kv_tensor_name, parse_kv_name, tensor_order
from kvpack.report import build_report
from kvpack.sources import open_cache

#: Metadata fields that must agree between a cache file and the model it is loaded into
#: (compared where both sides have them: files from earlier versions lack the later ones).
STRUCTURE_FIELDS = (
    "architecture",
    "model_type",
    "num_layers",
    "num_attention_heads",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
    "rope_theta",
    "rope_parameters",
    "partial_rotary_factor",
    "tokenizer_fingerprint",
)


@dataclass
class PromptCache:
    """A restored prompt cache.

    Attributes:
        cache: a transformers ``DynamicCache`` holding every layer's keys and values
            ``(batch, num_kv_heads, seq_len, head_dim)``.
        token_ids: int64 ``(batch, seq_len)``, the tokens the cache was computed from.
        metadata: the file's string metadata (model identity, codec, ...).
    """

    cache: Any
    token_ids: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return int(self.token_ids.shape[-1])


def model_tokenizer(model: Any, tokenizer: Any = None) -> Any:
    """``tokenizer`` if given, else the tokenizer of a :class:`~kvpack.model.dump.LoadedModel`, else ``None``."""
    return tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)


def unwrap_model(model: Any) -> tuple[Any, str, str | None]:
    """``(transformers model, name, gguf file)`` of a :class:`~kvpack.model.dump.LoadedModel` or a bare model."""
    if hasattr(model, "model") and hasattr(model, "tokenizer") and hasattr(model, "name"):
        return model.model, model.name, model.gguf_file
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    return model, str(name), None


def cache_tensors(cache: Any, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``layers.{i}.key|value`` tensors ``(batch, num_kv_heads, seq_len_i, head_dim)`` of a cache, on CPU.

    Args:
        cache: a transformers ``Cache`` (``DynamicCache`` ...) or a tuple of ``(key, value)`` pairs.
        dtype: cast to this dtype; default the cache's own.

    Raises:
        InvalidInputError: the object holds no per-layer keys and values.
    """

    tensors = {}
    for index, (key, value) in enumerate(cache_layers(cache)):
        tensors[kv_tensor_name(index, "key")] = key.detach().to("cpu", dtype or key.dtype).contiguous()
        tensors[kv_tensor_name(index, "value")] = value.detach().to("cpu", dtype or value.dtype).contiguous()
    return tensors


def save_cache(
    path: str | os.PathLike,
    cache: Any,
    token_ids: torch.Tensor,
    model: Any,
    config: CodecConfig | None = None,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    force: bool = False,
    tokenizer: Any = None,
    entropy: Any = None,
) -> dict:
    """Write a transformers cache, its token ids and the model identity to a ``.kvp``.

    The metadata also records each layer's rotary parameters (for un-RoPE), as a short probe of
    the model finds them (:func:`kvpack.model.dump.rope_for_cache`).

    Args:
        path: output ``.kvp`` file (written atomically).
        cache: the cache a forward pass returned (``output.cache``; see :func:`kvpack.model.dump.output_cache`).
        token_ids: int64 ``(batch, seq_len)``, the tokens the cache holds.
        model: the model that made the cache (a transformers model or a
            :class:`~kvpack.model.dump.LoadedModel`); its identity is recorded and checked on load.
        config: codec for every K/V tensor; ``None`` stores them losslessly.
        dtype: cast K/V to this dtype first (e.g. ``torch.float16``); default the cache's own.
        metadata: extra string metadata.
        force: overwrite an existing file.
        tokenizer: its fingerprint is recorded (default: the tokenizer of a ``LoadedModel``).
        entropy: the file's entropy stage (:class:`kvpack.formats.entropy.EntropyConfig`; default zstd
            level 1, codes feature-major).

    Returns:
        The size report of the file (see :func:`kvpack.report.build_report`).

    Raises:
        InvalidInputError: a cache without K/V tensors, token ids that do not match its length.
        OutputExistsError: the file exists and ``force`` is false.
    """

    lm, name, gguf_file = unwrap_model(model)
    tensors = cache_tensors(cache, dtype)
    token_ids = torch.as_tensor(token_ids).to("cpu", torch.int64)
    if token_ids.ndim == 1:
        token_ids = token_ids[None]
    if not tensors:
        raise InvalidInputError("the cache holds no layers")
    seq_len = (
        int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else max(t.shape[2] for t in tensors.values())
    )
    if token_ids.ndim != 2 or token_ids.shape[1] != seq_len:
        raise InvalidInputError(
            f"token_ids of shape {tuple(token_ids.shape)} do not match the cache's {seq_len} tokens"
        )
    first = tensors[kv_tensor_name(0, "key")]
    meta = model_identity(lm, name, gguf_file, model_tokenizer(model, tokenizer))
    meta.update(rope_for_cache(lm, token_ids))  # as a short probe finds them (the run itself is the caller's)
    meta.update(metadata or {})
    meta.update(
        num_layers=str(len(tensors) // 2),
        seq_len=str(seq_len),
        dtype=dtype_name(first.dtype),
        kvpack_version=__version__,
        format="kvpack-cache-1",
    )
    tensors["token_ids"] = token_ids
    entries = compress_tensors(tensors, path, config, meta, force=force, entropy=entropy)
    return build_report(entries, os.path.getsize(path), None)


def check_model(metadata: dict[str, str], model: Any, tokenizer: Any = None) -> None:
    """Check that a cache file's recorded identity matches ``model`` (and ``tokenizer``).

    Compared: the :data:`STRUCTURE_FIELDS` (architecture type, layer / kv-head / head_dim
    counts, vocabulary size, rotary parameters, tokenizer fingerprint) where both sides
    have them, and the model name (with its GGUF file)
    unless the weights fingerprints are present and equal (the same weights loaded from
    another path). A differing fingerprint alone is not an error: the same weights loaded
    in another dtype hash differently.

    Raises:
        ModelMismatchError: naming every differing field with both values.
    """

    lm, name, gguf_file = unwrap_model(model)
    current = model_identity(lm, name, gguf_file, model_tokenizer(model, tokenizer))
    if not any(metadata.get(key) for key in ("model", "num_layers", "num_kv_heads")):
        raise ModelMismatchError(
            "the cache file records no model identity (model, layers, kv heads); pass `check=False` to load it anyway"
        )
    differences = []
    for key in STRUCTURE_FIELDS:
        recorded, actual = metadata.get(key), current.get(key)
        if recorded and actual and _normalized(key, recorded) != _normalized(key, actual):
            differences.append(f"{key}: file {brief_text(recorded)}, model {brief_text(actual)}")
    same_weights = bool(metadata.get("weights_fingerprint")) and (
        metadata.get("weights_fingerprint") == current.get("weights_fingerprint")
    )
    recorded_name = _full_name(metadata.get("model", ""), metadata.get("gguf_file", ""))
    actual_name = _full_name(current["model"], current.get("gguf_file", ""))
    if recorded_name and recorded_name != actual_name and not same_weights:
        differences.insert(0, f"model: file {brief_text(recorded_name)}, model {brief_text(actual_name)}")
    if differences:
        raise ModelMismatchError("the cache was made by another model or tokenizer (" + "; ".join(differences) + ")")


def _normalized(key: str, value: str) -> Any:
    """Compare rotary parameters as values (another transformers may write 1e4 as 10000.0 or reorder keys)."""
    if key == "rope_parameters":
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        return parsed  # compared as values: key order and 10000 versus 10000.0 do not matter
    return value


def _full_name(model: str, gguf_file: str) -> str:
    return f"{model} ({gguf_file})" if gguf_file else model


def load_cache(
    path: str | os.PathLike,
    model: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    check: bool = True,
    tokenizer: Any = None,
    profile: Any = None,
) -> PromptCache:
    """Restore a prompt cache from a ``.kvp`` (or a safetensors dump) as a ``DynamicCache``.

    :func:`read_prompt_cache`, then :func:`restore_cache`.

    Args:
        path: a file written by :func:`save_cache`, ``kvpack dump`` or ``kvpack compress``.
        model: the model that will continue from the cache (transformers model or
            :class:`~kvpack.model.dump.LoadedModel`). With it, the file's identity is checked and
            the cache gets the model's layer types (sliding-window layers included).
        device: where the cache tensors go.
        dtype: K/V dtype; default the model's parameter dtype, or the stored one without a model.
        check: compare the file's identity with ``model`` (see :func:`check_model`).
        tokenizer: also compare its fingerprint (default: the tokenizer of a ``LoadedModel``).
        profile: the calibration profile of a transform-coded file (a ``Profile`` or a path); default
            the embedded one, else the profile directory's (:mod:`kvpack.restore.profiles`).

    Returns:
        A :class:`PromptCache`; pass ``result.cache`` to the model as ``cache=`` (``past_key_values=``
        in older transformers; :func:`kvpack.model.dump.cache_keyword` names it).

    Raises:
        FormatError: the file is truncated or corrupted.
        InvalidInputError: the file holds no K/V tensors or no ``token_ids``, or token ids
            outside the model's vocabulary.
        ModelMismatchError: the file was made by another model.
    """
    tensors, metadata = read_prompt_cache(path, profile)
    return restore_cache(path, tensors, metadata, model, device, dtype, check, tokenizer)


def read_prompt_cache(path: str | os.PathLike, profile: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every K/V tensor and the token ids of a prompt cache file, decoded (no model needed;
    ``profile``: see :func:`load_cache`).

    Returns:
        ``(tensors, metadata)``: ``layers.{i}.key|value`` ``(batch, num_kv_heads, seq_len, head_dim)``
        and ``token_ids``; the file's string metadata.

    Raises:
        FormatError: the file is truncated or corrupted (every section is read and checked).
        InvalidInputError: the file holds no K/V tensors or no ``token_ids``.
    """
    with open_cache(path, profile) as source:
        metadata = dict(source.metadata)
        names = source.keys()
        kv_names = sorted((n for n in names if parse_kv_name(n)), key=tensor_order)
        if not kv_names or "token_ids" not in names:
            raise InvalidInputError(f"{path}: not a prompt cache (needs layers.<i>.key/value and token_ids)")
        return {name: source.get(name) for name in (*kv_names, "token_ids")}, metadata


def restore_cache(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    model: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    check: bool = True,
    tokenizer: Any = None,
) -> PromptCache:
    """A :class:`PromptCache` from what :func:`read_prompt_cache` returned (see :func:`load_cache`).

    Every check runs before the cache object is built; nothing the caller owns is touched.
    """
    lm = unwrap_model(model)[0] if model is not None else None
    if dtype is None and lm is not None:
        dtype = next(lm.parameters()).dtype
    if lm is not None and check:
        try:
            check_model(metadata, model, tokenizer)
        except ModelMismatchError as exc:
            raise ModelMismatchError(
                f"{path}: {exc}; restore it into the model that made it (kvpack generate --model ...) "
                "or dump the prompt again with this one"
            ) from None
    layers = layer_pairs(tensors, path)
    token_ids = tensors["token_ids"].to(torch.int64)
    if token_ids.ndim == 1:
        token_ids = token_ids[None]
    if lm is not None and check:
        _check_shapes(layers, lm, path)
        _check_token_ids(token_ids, lm, path)
    cache = build_cache(layers, lm, token_ids.shape[-1], device, dtype)
    return PromptCache(cache, token_ids.to(device), metadata)


def build_cache(
    layers: list[tuple[torch.Tensor, torch.Tensor]],
    model: Any = None,
    seq_len: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Any:
    """A new ``DynamicCache`` holding ``layers``: ``(key, value)`` pairs ``(batch, num_kv_heads, seq_len_i, head_dim)``.

    With ``model`` the cache gets the model's layer types; a sliding-window layer that holds
    fewer than ``seq_len`` tokens is told it has seen ``seq_len`` tokens. The tensors are
    copied to ``device`` / ``dtype`` (default: their own dtype).
    """
    from transformers import DynamicCache  # optional heavy dependency (the models extra), loaded on first use

    lm = unwrap_model(model)[0] if model is not None else None
    cache = DynamicCache(config=lm.config) if lm is not None else DynamicCache()
    for index, (key, value) in enumerate(layers):
        key = key.to(device=device, dtype=dtype or key.dtype, copy=True)
        value = value.to(device=device, dtype=dtype or value.dtype, copy=True)
        if lm is None:
            cache.update(key, value, index)
            continue
        if index >= len(cache.layers):
            raise ModelMismatchError(f"the cache holds {len(layers)} layers, the model has {len(cache.layers)}")
        layer = cache.layers[index]
        layer.update(key, value)
        if seq_len is not None and hasattr(layer, "cumulative_length"):
            layer.cumulative_length = seq_len
    return cache


def layer_pairs(tensors: dict[str, torch.Tensor], where: Any = "the cache") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(key, value)]`` per layer from ``layers.{i}.key|value`` tensors (other names ignored).

    Raises:
        InvalidInputError: a layer below the highest one lacks its key or value.
    """
    count = max(parse_kv_name(n)[0] for n in tensors if parse_kv_name(n)) + 1
    pairs = []
    for index in range(count):
        key, value = tensors.get(kv_tensor_name(index, "key")), tensors.get(kv_tensor_name(index, "value"))
        if key is None or value is None:
            raise InvalidInputError(f"{where}: layer {index} lacks its key or value tensor")
        pairs.append((key, value))
    return pairs


def _check_token_ids(token_ids: torch.Tensor, lm: Any, path: Any) -> None:
    """Cached token ids must be ids of the model's vocabulary."""

    vocab = getattr(decoder_config(lm), "vocab_size", None)
    if token_ids.numel() and (int(token_ids.min()) < 0 or (vocab and int(token_ids.max()) >= vocab)):
        raise InvalidInputError(
            f"{path}: token ids range from {int(token_ids.min())} to {int(token_ids.max())}, "
            f"outside the model's vocabulary of {vocab}"
        )


def _check_shapes(layers: list, lm: Any, path: Any) -> None:
    """The tensors themselves must fit the model, whatever the metadata says."""

    expected_layers = getattr(decoder_config(lm), "num_hidden_layers", None) or len(layers)
    if len(layers) != expected_layers:
        raise ModelMismatchError(f"{path} holds {len(layers)} layers, the model has {expected_layers}")
    heads, head_dim = kv_head_shape(lm)
    for index, (key, value) in enumerate(layers):
        for tensor in (key, value):
            if tensor.ndim != 4 or (heads and tensor.shape[1] != heads) or (head_dim and tensor.shape[3] != head_dim):
                raise ModelMismatchError(
                    f"{path}: layer {index} has shape {tuple(tensor.shape)}, the model needs "
                    f"(batch, {heads}, seq_len, {head_dim})"
                )


@torch.no_grad()
def continue_generation(
    model: Any,
    prompt: PromptCache,
    suffix_ids: torch.Tensor,
    max_new_tokens: int = 32,
) -> torch.Tensor:
    """Greedy generation from a restored prompt cache plus suffix tokens.

    Args:
        model: the model (transformers model or :class:`~kvpack.model.dump.LoadedModel`).
        prompt: the restored cache; it is consumed (the model appends to it).
        suffix_ids: int64 ``(batch, n)`` or ``(n,)`` tokens that follow the cached prompt
            (may be empty: the last cached token is then fed again).
        max_new_tokens: tokens to generate, at least 1.

    Returns:
        int64 ``(batch, new_tokens)``, the generated tokens only.

    Raises:
        InvalidInputError: ``max_new_tokens < 1``, or an empty suffix on a cache whose
            layers cannot drop their last token (sliding-window layers).
    """

    lm = unwrap_model(model)[0]
    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = next(lm.parameters()).device
    suffix = torch.as_tensor(suffix_ids, dtype=torch.int64).reshape(prompt.token_ids.shape[0], -1)
    input_ids = torch.cat([prompt.token_ids.to(device), suffix.to(device)], dim=1)
    cache = prompt.cache
    if suffix.shape[1] == 0:
        # generate needs at least one token the cache has not seen: drop the last and feed it again
        if any(hasattr(layer, "cumulative_length") for layer in getattr(cache, "layers", [])):
            raise InvalidInputError("this model has sliding-window layers; give a non-empty prompt suffix")
        cache.crop(-1)
    options = {cache_keyword(lm): cache}
    eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if getattr(lm.generation_config, "pad_token_id", None) is None and eos is not None:
        options["pad_token_id"] = eos[0] if isinstance(eos, (list, tuple)) else eos  # silences a warning
    output = lm.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        **options,
    )
    return output[:, input_ids.shape[1] :]
