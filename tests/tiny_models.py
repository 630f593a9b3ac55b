"""Tiny random transformers models built offline from their configs (no download), one per rotary layout
kvpack must undo, and the pre-RoPE keys they compute."""

from __future__ import annotations

import torch

VOCAB = 64
_BASE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_LONG = {"rope_theta": 10000.0, "original_max_position_embeddings": 16}
#: name -> (transformers config class, its options): every rotary layout and scaling of the brief.
TINY_MODELS = {
    "llama": ("LlamaConfig", {}),
    "llama-linear": ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
    # past max_position_embeddings (16) the frequencies grow with the sequence: the dump's 40 tokens use their own
    "llama-dynamic": (
        "LlamaConfig",
        {"max_position_embeddings": 16, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
    ),
    "llama-llama3": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "rope_theta": 500000.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ),
    "llama-yarn": (  # attention_scaling 1.139 on cos / sin
        "LlamaConfig",
        {"max_position_embeddings": 64, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, **_LONG}},
    ),
    "llama-longrope": (  # past 16 tokens the long factors, and attention_scaling 1.225
        "LlamaConfig",
        {
            "max_position_embeddings": 64,
            "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, **_LONG},
        },
    ),
    "stablelm-partial": ("StableLmConfig", {"partial_rotary_factor": 0.25}),
    "phi-partial": ("PhiConfig", {"partial_rotary_factor": 0.5}),
    "qwen3-knorm": ("Qwen3Config", {"head_dim": 16}),
    # local layers (sliding window 16, rope_theta 1e4) and a global layer (rope_theta 1e6) with their own RoPE
    "gemma3": (
        "Gemma3TextConfig",
        {"head_dim": 16, "num_hidden_layers": 6, "sliding_window": 16, "max_position_embeddings": 256},
    ),
    "glm-interleaved": ("GlmConfig", {"head_dim": 16}),  # Llama's cos layout, GPT-J's channel pairs
    "smollm3-nope": ("SmolLM3Config", {"no_rope_layers": [1, 0, 1, 1]}),  # layer 1 has no RoPE at all
}


def tiny_model(name: str, **overrides):
    """The random model ``name`` of :data:`TINY_MODELS` (seeded), in eval mode."""
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, options = TINY_MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, class_name)(**{**_BASE, **options, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


class PreRopeKeys:
    """Records each layer's keys before RoPE, ``(batch, num_kv_heads, seq_len, head_dim)`` float32: the
    output of ``k_norm`` where the attention has one, else of ``k_proj``; only the first call per layer."""

    def __init__(self, model) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self._hooks = []
        for index, layer in enumerate(model.model.layers):
            attention = layer.self_attn
            module = getattr(attention, "k_norm", None) or getattr(attention, "k_layernorm", None) or attention.k_proj
            heads = model.config.num_key_value_heads
            self._hooks.append(module.register_forward_hook(self._record(index, heads, attention.head_dim)))

    def _record(self, index: int, heads: int, head_dim: int):
        def hook(module, args, output):
            if index in self.keys:
                return
            if output.ndim == 4 and output.shape[1] == heads:  # Gemma 3 normalizes (batch, heads, seq, head_dim)
                self.keys[index] = output.detach().float()
            else:  # (batch, seq, heads * head_dim) or (batch, seq, heads, head_dim)
                batch, seq = output.shape[:2]
                self.keys[index] = output.detach().reshape(batch, seq, heads, head_dim).transpose(1, 2).float()

        return hook

    def __enter__(self) -> PreRopeKeys:
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
