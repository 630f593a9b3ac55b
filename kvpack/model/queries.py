"""Capturing each attention layer's queries during a transformers forward pass (for attention statistics and evaluation)."""

from __future__ import annotations

import sys
from typing import Any

import torch

_CAPTURE_PREFIX = "kvpack_capture_"
_ACTIVE: QueryCapture | None = None


class QueryCapture:
    """Records each attention layer's queries ``(batch, num_heads, q_len, head_dim)`` (after RoPE).

    Installs an attention implementation registered with transformers' ``AttentionInterface``
    that records the query and then calls the model's own implementation (sdpa, eager, ...),
    so the forward pass is unchanged. Use as a context manager; set ``recording`` to choose
    which forward passes are recorded.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.recording = False
        #: keep only the last this many query positions, over all recorded calls (chunked prefill)
        self.keep_last: int | None = None
        self.queries: dict[int, tuple[torch.Tensor, float]] = {}
        self._previous: str | None = None

    def __enter__(self) -> QueryCapture:
        global _ACTIVE
        from transformers import AttentionInterface  # optional heavy dependency (the models extra), loaded on first use
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        previous = self.model.config._attn_implementation or "eager"
        name = _CAPTURE_PREFIX + previous
        AttentionInterface.register(name, _capture_attention)
        if previous in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[previous])
        self._previous = previous
        self.model.set_attn_implementation(name)
        _ACTIVE = self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _ACTIVE
        _ACTIVE = None
        self.model.set_attn_implementation(self._previous)

    def record(self, module: Any, query: torch.Tensor, scaling: float | None) -> None:
        if self.recording:
            scale = scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5)
            query = query.detach().to("cpu", torch.float32)
            layer = int(module.layer_idx)
            if self.keep_last is not None:
                if layer in self.queries:
                    query = torch.cat([self.queries[layer][0], query], dim=2)
                query = query[:, :, -self.keep_last :]
            self.queries[layer] = (query, float(scale))

    def take(self) -> dict[int, tuple[torch.Tensor, float]]:
        queries, self.queries = self.queries, {}
        return queries


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import (
        ALL_ATTENTION_FUNCTIONS,  # optional heavy dependency (the models extra), loaded on first use
    )

    capture = _ACTIVE
    previous = capture._previous if capture is not None else "sdpa"
    if capture is not None:
        capture.record(module, query, kwargs.get("scaling"))
    if previous != "eager" and previous in ALL_ATTENTION_FUNCTIONS:
        implementation = ALL_ATTENTION_FUNCTIONS[previous]
    else:  # eager attention lives in the model's own module
        implementation = sys.modules[type(module).__module__].eager_attention_forward
    return implementation(module, query, key, value, attention_mask, **kwargs)
