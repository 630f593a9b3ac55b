"""Attention statistics of a cache, and the importance weights bit allocation derives from them.

``kvpack dump --attention-stats`` records, for every layer ``i`` (recomputed in float32 from the
queries the model computes, captured with :class:`kvpack.evaluation.evaluate.QueryCapture`, and the
cached keys, with the causal mask; the model's own attention is not changed):

- ``attention.{i}.max_weight``: float32 ``(batch, num_kv_heads, seq_len)``: the largest
  attention weight each cached token receives from the last ``N`` query positions and the
  query heads that share the kv head;
- ``queries.{i}.channel_ms``: float32 ``(batch, num_kv_heads, head_dim)``: the mean square of
  each query channel (after RoPE) over those queries and heads;
- ``queries.{i}.norm``: float32 ``(batch, num_kv_heads)``: their mean L2 norm;
- ``queries.{i}.scale``: float32 ``(1,)``: the softmax scale of the logits (``1 / sqrt(head_dim)``).

What an error costs (first order, one query ``q`` and attention weights ``a``): the attention
output ``o = sum_t a_t v_t`` moves by ``a_t dv_t`` for a value error, and a key error moves the
logit of token ``t`` by ``scale * q . dk_t``, hence ``o`` by about ``a_t (v_t - o) scale q . dk_t``.
So the expected squared output error is weighted by ``a_t^2`` for values and by
``a_t^2 q_c^2`` per key channel ``c`` (independent errors). But ``a_t`` comes from the last
``N`` prompt queries only, and later queries attend tokens those did not: squared weights make
such tokens look free, and so do plain ``a_t`` for the many tokens those queries ignore.
:func:`importance_weights` therefore uses ``w_t = a_t + 0.05 * mean(a)`` for values and
``w_t * ms(q_c)`` for keys. Measured on the standard benchmark (SmolLM2, WikiText-2, prefix
1024, continuation 256, 8 windows; uniform, keys per channel, un-RoPE, Hadamard, ``--allocate
target``), ΔPPL at 2.5 / 3.0 bits per element: ``a_t^2`` +53.6 % (2 windows only), ``a_t``
+15.9 %, floor 0.02 +6.4 / +2.1 %, **0.05 +5.0 / +2.1 %**, 0.1 +5.6 / +2.6 %, 0.25 +7.7 / +2.5 %,
0.5 +8.6 / +4.0 %, 1 +10.3 %, 2 +12.0 / +6.8 %; fixed 2-bit codes (2.505 bits): +22.0 %.
"""

from __future__ import annotations

import json

import torch

from kvpack.errors import InvalidInputError

STATS_PREFIXES = ("attention.", "queries.")
#: Every token's weight is ``a_t + ATTENTION_FLOOR * mean(a)``: tokens the last prompt queries
#: ignore can still be attended later (chosen on the standard benchmark, see the module docstring).
ATTENTION_FLOOR = 0.05
#: Metadata key describing the statistics tensors (JSON).
STATS_METADATA = "attention_stats"


def is_stats_tensor(name: str) -> bool:
    return name.startswith(STATS_PREFIXES)


def stats_description(last_n: int) -> str:
    """The ``attention_stats`` metadata value: what the statistics tensors hold (JSON)."""
    return json.dumps(
        {
            "last_n_queries": last_n,
            "how": "recomputed in float32 from the captured post-RoPE queries and the cached keys, causal mask",
            "attention.{i}.max_weight": "(batch, num_kv_heads, seq_len): max attention weight each cached token "
            "receives from the last n queries and the query heads of the kv head",
            "queries.{i}.channel_ms": "(batch, num_kv_heads, head_dim): mean square of each query channel",
            "queries.{i}.norm": "(batch, num_kv_heads): mean L2 norm of the queries",
            "queries.{i}.scale": "(1,): softmax scale of the logits",
        },
        sort_keys=True,
    )


def attention_statistics(
    queries: dict[int, tuple[torch.Tensor, float]], keys: dict[int, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The statistics tensors above, from each layer's last queries and its cached keys.

    Args:
        queries: layer -> (float32 ``(batch, num_heads, n, head_dim)``: the last ``n`` query
            positions, post-RoPE; the softmax scale).
        keys: layer -> ``(batch, num_kv_heads, seq_len, head_dim)`` cached keys; the queries
            sit at positions ``seq_len - n ... seq_len - 1``.

    Raises:
        InvalidInputError: a layer's heads are not a multiple of its kv heads, or more queries than keys.
    """
    out = {}
    for layer, (query, scale) in sorted(queries.items()):
        key = keys[layer].to(torch.float32)
        batch, heads, n, head_dim = query.shape
        kv_heads, seq = key.shape[1], key.shape[2]
        if heads % kv_heads or n > seq:
            raise InvalidInputError(
                f"layer {layer}: {heads} query heads / {n} queries do not fit {kv_heads} kv heads / {seq} keys"
            )
        group = heads // kv_heads
        logits = query @ key.repeat_interleave(group, dim=1).transpose(-1, -2) * scale  # (B, H, n, S)
        position = torch.arange(seq - n, seq)[:, None]
        logits = logits.masked_fill(torch.arange(seq)[None, :] > position, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        out[f"attention.{layer}.max_weight"] = weights.reshape(batch, kv_heads, group * n, seq).amax(dim=2)
        grouped = query.reshape(batch, kv_heads, group * n, head_dim)
        out[f"queries.{layer}.channel_ms"] = (grouped**2).mean(dim=2)
        out[f"queries.{layer}.norm"] = grouped.norm(dim=-1).mean(dim=2)
        out[f"queries.{layer}.scale"] = torch.tensor([scale], dtype=torch.float32)
    return out


def checked_statistics(
    stats: dict[str, torch.Tensor], layer: int, shape: tuple[int, ...]
) -> dict[str, torch.Tensor] | None:
    """One layer's statistics, checked against a ``(batch, num_kv_heads, seq_len, head_dim)``
    tensor: ``{"max_weight", "channel_ms", "norm", "scale"}`` float32, or ``None`` when the file
    has none for this layer.

    Raises:
        InvalidInputError: a missing or misshapen statistic, or one that is negative, NaN or infinite.
    """
    if f"attention.{layer}.max_weight" not in stats:
        return None
    batch, heads, seq, head_dim = shape
    expected = {
        "attention.{}.max_weight": (batch, heads, seq),
        "queries.{}.channel_ms": (batch, heads, head_dim),
        "queries.{}.norm": (batch, heads),
        "queries.{}.scale": (1,),
    }
    out = {}
    for pattern, want in expected.items():
        name = pattern.format(layer)
        value = stats.get(name)
        if value is None or tuple(value.shape) != want:
            found = "missing" if value is None else f"of shape {tuple(value.shape)}"
            raise InvalidInputError(f"attention statistics: {name} is {found}, the cache needs {want}")
        value = value.float()
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise InvalidInputError(f"attention statistics: {name} holds negative, NaN or infinite values")
        out[pattern.split(".")[-1]] = value
    return out


def importance_weights(
    stats: dict[str, torch.Tensor], layer: int, role: str, shape: tuple[int, ...], rotate: bool, rope_dim: int
) -> torch.Tensor | None:
    """Float32 importance of every value of one K/V tensor ``(batch, num_kv_heads, seq_len, head_dim)``.

    Values: ``w_t = a_t + ATTENTION_FLOOR * mean(a)``; keys: ``w_t * ms(q_c)`` with the query
    channel weights made to fit the transforms: averaged over the head under a Hadamard rotation
    (which mixes every channel), over each rotary pair ``(c, c + rope_dim / 2)`` under un-RoPE
    (which mixes a pair). ``None`` when ``stats`` has nothing for this layer.

    Raises:
        InvalidInputError: see :func:`checked_statistics`.
    """
    found = checked_statistics(stats, layer, shape)
    if found is None:
        return None
    token = found["max_weight"]
    token = token + ATTENTION_FLOOR * token.mean(dim=-1, keepdim=True)  # see the module docstring
    if role == "value":
        return token[..., None].expand(shape).contiguous()
    channel = found["channel_ms"].clone()  # (batch, heads, head_dim)
    if rotate:
        channel[:] = channel.mean(dim=-1, keepdim=True)
    elif rope_dim:
        half = rope_dim // 2
        pair = (channel[..., :half] + channel[..., half:rope_dim]) / 2
        channel[..., :half], channel[..., half:rope_dim] = pair, pair
    return token[..., None] * channel[:, :, None, :]


def layer_statistics(
    stats: dict[str, torch.Tensor], layer: int, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(a_t, |q|, scale)`` of one layer broadcast to every value of a ``(batch, num_kv_heads,
    seq_len, head_dim)`` tensor (float32), or ``None`` without statistics for it.

    Raises:
        InvalidInputError: see :func:`checked_statistics`.
    """
    found = checked_statistics(stats, layer, shape)
    if found is None:
        return None
    norm = found["norm"][:, :, None, None].expand(shape)
    return found["max_weight"][..., None].expand(shape), norm, float(found["scale"][0])
