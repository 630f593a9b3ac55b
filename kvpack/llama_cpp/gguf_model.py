"""What a GGUF model file tells about its KV cache: shapes, key channel order, rotary parameters, identity.

A llama.cpp state file holds rows of ``kv_heads · head_dim`` features per cell and nothing about
the model beyond (in session files) its architecture name; the GGUF the cache was made with gives
the rest (GGUF keys ``{arch}.block_count``, ``{arch}.attention.head_count_kv``,
``{arch}.attention.key_length``, ``{arch}.rope.*``; llama.cpp's ``llama-arch.cpp`` and
``llama-model.cpp``). Read with the ``gguf`` package (memory-mapped: no tensor data is loaded
beyond the samples of the fingerprint and the optional ``rope_freqs`` factors).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvpack.errors import FormatError, InvalidInputError
from kvpack.transforms.rope import RopeSpec, rope_metadata

#: Architectures whose RoPE rotates adjacent channel pairs (LLAMA_ROPE_TYPE_NORM in llama.cpp's
#: ``llama_model_rope_type``): their converter permutes the key projection, so cached keys hold each
#: head's channels as ``(x0, y0, x1, y1, ...)`` where transformers holds ``(x0, x1, ..., y0, y1, ...)``.
NORM_ROPE_ARCHS = frozenset(
    "llama llada llama4 deci baichuan starcoder internlm2 minicpm xverse command-r cohere2 olmo arctic deepseek "
    "deepseek2 plm chatglm granite granitemoe chameleon bailingmoe smollm3 arcee ernie4_5 ernie4_5-moe mistral3".split()
)
#: Architectures whose RoPE rotates the two halves of each head (LLAMA_ROPE_TYPE_NEOX): the same
#: channel order as transformers' rotate-half.
NEOX_ROPE_ARCHS = frozenset(
    "falcon grok dbrx stablelm bitnet qwen qwen2 qwen2moe qwen3 qwen3moe olmo2 olmoe phi2 phi3 phimoe plamo gemma "
    "gemma2 gemma3 gemma3n gemma-embedding starcoder2 openelm gptneox codeshell orion nemotron exaone exaone4 "
    "minicpm3 dots1 hunyuan-moe hunyuan-dense lfm2 seed_oss apertus".split()
)
MAX_SAMPLE = 64  # values at each end of a tensor the fingerprint reads


@dataclass(frozen=True)
class GgufModel:
    """The KV-cache facts of one GGUF model.

    ``head_dim_k`` / ``head_dim_v``: features per kv head of keys and values; ``rope_order``:
    ``"interleaved"`` (NORM: keys are permuted to rotate-half order on the way in), ``"halves"``
    (NEOX) or ``"unknown"``; ``rope``: the rotary parameters of every layer, or the reason
    un-RoPE cannot follow them; ``fingerprint``: 16 hex digits over the GGUF's metadata, tensor
    layout and a sample of every tensor's bytes.
    """

    path: str
    arch: str
    name: str
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim_k: int
    head_dim_v: int
    vocab_size: int
    rope_order: str
    rope: RopeSpec | str
    fingerprint: str
    rope_theta: float | None = None
    rope_dim: int = 0
    fields: dict = field(default_factory=dict, repr=False)

    @property
    def permutes_keys(self) -> bool:
        return self.rope_order == "interleaved"

    def identity(self) -> dict[str, str]:
        """String metadata in ``kvpack dump``'s vocabulary (model, architecture, layer/head/dim counts,
        rotary parameters as ``rope_specs``/``rope_layers``) plus ``gguf_file`` and ``gguf_fingerprint``."""
        meta = {
            "model": self.name,
            "gguf_file": Path(self.path).name,
            "gguf_fingerprint": self.fingerprint,
            "model_type": self.arch,
            "architecture": self.arch,
            "num_layers": str(self.num_layers),
            "num_attention_heads": str(self.num_heads),
            "num_kv_heads": str(self.kv_heads),
            "head_dim": str(self.head_dim_k),
            "vocab_size": str(self.vocab_size or ""),
        }
        if self.head_dim_v != self.head_dim_k:
            meta["head_dim_v"] = str(self.head_dim_v)
        if self.rope_theta is not None:
            meta["rope_theta"] = str(self.rope_theta)
        meta.update(rope_metadata([self.rope] * self.num_layers))
        return meta


def read_gguf_model(path: str | os.PathLike) -> GgufModel:
    """The KV-cache facts of the GGUF model at ``path``.

    Raises:
        InvalidInputError: a missing file.
        FormatError: not a GGUF file, or one without the attention keys a KV cache needs.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InvalidInputError(f"{path}: no such GGUF model file")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError/struct errors of its own for malformed files
        raise FormatError(f"{path}: not a readable GGUF model file ({str(exc).splitlines()[0][:200]})") from None
    fields = {key: _value(f) for key, f in reader.fields.items() if not key.startswith("tokenizer.ggml.")}
    arch = str(fields.get("general.architecture", ""))
    if not arch:
        raise FormatError(f"{path}: a GGUF without general.architecture")

    def number(key: str, default=None):
        value = fields.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer arrays: kvpack maps models whose layers agree
            if len(set(value)) != 1:
                raise FormatError(f"{path}: {arch}.{key} differs between layers ({value[:4]}...); not supported")
            value = value[0]
        return value

    layers, heads = number("block_count"), number("attention.head_count")
    kv_heads = number("attention.head_count_kv", heads)
    embedding = number("embedding_length")
    if not layers or not heads or not kv_heads or not embedding:
        raise FormatError(f"{path}: {arch} model without block_count / attention head counts / embedding_length")
    head_dim_k = int(number("attention.key_length", embedding // heads))
    head_dim_v = int(number("attention.value_length", head_dim_k))
    order = "interleaved" if arch in NORM_ROPE_ARCHS else "halves" if arch in NEOX_ROPE_ARCHS else "unknown"
    theta = number("rope.freq_base", 10000.0)
    rope_dim = int(number("rope.dimension_count", head_dim_k))
    rope = _rope(reader, fields, arch, order, head_dim_k, rope_dim, theta)
    vocab = fields.get(f"{arch}.vocab_size") or 0
    return GgufModel(
        path=path,
        arch=arch,
        name=str(fields.get("general.name") or Path(path).stem),
        num_layers=int(layers),
        num_heads=int(heads),
        kv_heads=int(kv_heads),
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        vocab_size=int(vocab),
        rope_order=order,
        rope=rope,
        fingerprint=_fingerprint(reader, fields),
        rope_theta=float(theta),
        rope_dim=rope_dim if 0 < rope_dim <= head_dim_k and rope_dim % 2 == 0 else head_dim_k,
        fields=fields,
    )


def _rope(reader, fields: dict, arch: str, order: str, head_dim: int, rope_dim: int, theta: float) -> RopeSpec | str:
    """The rotary parameters llama.cpp applies (as frequencies in transformers' convention), or why not."""
    if order == "unknown":
        return f"kvpack does not know the RoPE channel order of llama.cpp architecture {arch!r}"
    scaling = str(fields.get(f"{arch}.rope.scaling.type", "none"))
    if scaling not in ("none", "linear"):
        return f"{scaling} rope scaling (kvpack follows plain and linear scaling of llama.cpp models)"
    rope_dim = int(rope_dim)
    if not 0 < rope_dim <= head_dim or rope_dim % 2:
        return f"rope.dimension_count {rope_dim} for head_dim {head_dim}"
    # transformers' default rotary frequencies: 1 / theta^(2i / rope_dim), in float32
    inv_freq = 1.0 / (float(theta) ** (np.arange(0, rope_dim, 2, dtype=np.int64).astype(np.float32) / rope_dim))
    if scaling == "linear":
        inv_freq = inv_freq / float(fields.get(f"{arch}.rope.scaling.factor", 1.0))
    factors = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if factors is not None:  # llama 3 style: each frequency divided by a stored factor
        values = np.asarray(factors.data, dtype=np.float32).reshape(-1)
        if values.size != inv_freq.size:
            return f"rope_freqs of {values.size} factors for {inv_freq.size} frequencies"
        inv_freq = inv_freq / values
    return RopeSpec(tuple(float(f) for f in inv_freq.astype(np.float32)))


def _value(f):
    try:
        return f.contents()
    except Exception:  # an array type gguf cannot decode: not one of the keys we read
        return None


def _fingerprint(reader, fields: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(fields):
        digest.update(f"{key}={fields[key]!r};".encode())
    for tensor in sorted(reader.tensors, key=lambda t: t.name):
        raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)
        digest.update(f"{tensor.name}:{tuple(int(d) for d in tensor.shape)}:{int(tensor.tensor_type)};".encode())
        digest.update(raw[:MAX_SAMPLE].tobytes() + raw[-MAX_SAMPLE:].tobytes())
    return digest.hexdigest()[:16]
