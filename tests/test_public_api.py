"""The names kvpack exports at the top level."""

from __future__ import annotations


def test_public_api_names():
    import kvpack

    assert callable(kvpack.save_cache) and callable(kvpack.load_cache) and callable(kvpack.continue_generation)
    assert kvpack.EvalProtocol().windows == 8 and kvpack.EvalMethod.named_baseline("fp16").label == "fp16"
