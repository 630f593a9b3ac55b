"""Captured queries and attention statistics (kvpack.model.queries) match the model's own attention."""

import json

import pytest
import torch

from kvpack.formats.reader import KvpReader
from tests.cli_helpers import run


@pytest.mark.model
def test_dump_attention_stats_match_the_models_own_attention(cli_model, tmp_path, capsys):
    """The recorded max attention weights equal those of the model's eager attention (output_attentions)."""
    from safetensors import safe_open

    code, _, err = run(
        ["dump", "--prompt", "The quick brown fox jumps over the lazy dog. " * 6, "-o", tmp_path / "s.safetensors",
         "--attention-stats", "--last-n-queries", "8"], capsys)  # fmt: skip
    assert code == 0, err
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["attention_stats"])
        assert meta["last_n_queries"] == 8
        recorded = f.get_tensor("attention.3.max_weight")
        channel = f.get_tensor("queries.3.channel_ms")
        ids = f.get_tensor("token_ids")
    model = cli_model.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(input_ids=ids, output_attentions=True).attentions[3]  # (1, heads, S, S)
    finally:
        model.set_attn_implementation(previous)
    heads, kv_heads = attentions.shape[1], recorded.shape[1]
    expected = attentions[:, :, -8:].reshape(1, kv_heads, heads // kv_heads * 8, -1).amax(dim=2)
    # the statistics use the stored float16 keys, the model its float32 ones
    assert torch.allclose(recorded, expected.float(), rtol=5e-3, atol=1e-4)
    assert bool((channel > 0).all()) and recorded.shape[2] == ids.shape[1]
    # the statistics are not stored in a compressed file, and allocation uses them
    code, out, err = run(
        ["compress", tmp_path / "s.safetensors", "-o", tmp_path / "s.kvp", "-m", "uniform", "-g", "64",
         "--key-axis", "token",  # keys per channel would keep this short prompt's keys exact
         "--allocate", "qaq", "--target-bits", "3", "--json", "-"], capsys)  # fmt: skip
    assert code == 0, err
    with KvpReader(tmp_path / "s.kvp") as reader:
        assert not any(name.startswith(("attention.", "queries.")) for name in reader.keys())
    code, out, _ = run(["inspect", tmp_path / "s.kvp"], capsys)
    assert code == 0 and "groups by code width" in out
