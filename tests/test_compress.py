"""The compress loop (kvpack.compress): tensors in memory or a dump on disk -> a .kvp that decodes back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from kvpack.compress import compress_file, compress_tensors
from kvpack.config import CodecConfig
from kvpack.entry import decode_entry, encode_tensor
from kvpack.formats.constants import FORMAT_MAJOR, FORMAT_MINOR
from kvpack.formats.reader import KvpReader
from kvpack.restore.files import load_kvp
from tests.conftest import small_cache


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(["uniform", "normal", "adaptive"]),
    bits=st.integers(1, 8),
    seq=st.integers(1, 12),
    heads=st.integers(1, 3),
    group_div=st.sampled_from([1, 2, 4]),
    ratio=st.sampled_from([0.0, 0.1]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
)
def test_round_trip_matches_in_memory_decode(tmp_path_factory, method, bits, seq, heads, group_div, ratio, dtype):
    path = tmp_path_factory.mktemp("rt") / "c.kvp"
    tensors = small_cache(seq=seq, heads=heads, dtype=dtype)
    config = CodecConfig.build(method, bits, 16 // group_div, ratio)
    compress_tensors(tensors, path, config, {"model": "unit-test", "note": "é ü"})
    restored, metadata = load_kvp(path)
    assert metadata["model"] == "unit-test" and metadata["note"] == "é ü"
    assert list(restored) == list(tensors)
    assert torch.equal(restored["token_ids"], tensors["token_ids"])
    with KvpReader(path) as reader:
        assert reader.version == (FORMAT_MAJOR, FORMAT_MINOR)
        for name, x in tensors.items():
            if name == "token_ids":
                continue
            entry = reader.entry(name)
            assert entry.codec == config and entry.shape == tuple(x.shape) and restored[name].dtype == x.dtype
            # the codes, scales and codebooks in the file are exactly what the encoder produced
            # (token-axis codes feature-major, as the entry records: format 1.5)
            transposes = {k: s.transpose for k, s in entry.sections.items() if s.transpose}
            encoded = encode_tensor(name, x, config, transposes=transposes)
            assert {k: bytes(v) for k, v in reader.read_sections(name).items()} == encoded
            assert torch.equal(restored[name], decode_entry(entry, encoded))
            # ...and they reconstruct the original: the error shrinks with the bit width
            rel = float(((restored[name].double() - x.double()) ** 2).sum() / (x.double() ** 2).sum())
            assert rel < {1: 5.0, 2: 0.8, 3: 0.3}.get(bits, 0.05), (name, rel)  # 1-bit min/max grids can exceed 1


def test_layers_with_different_shapes(tmp_path):
    tensors = {
        "layers.0.key": torch.randn(1, 4, 8, 32).half(),
        "layers.0.value": torch.randn(1, 4, 8, 32).half(),
        "layers.1.key": torch.randn(1, 2, 3, 32).half(),  # a sliding-window layer with fewer heads
        "layers.1.value": torch.randn(1, 2, 3, 32).half(),
    }
    compress_tensors(tensors, tmp_path / "m.kvp", CodecConfig.build("adaptive", 4, 32))
    restored, _ = load_kvp(tmp_path / "m.kvp")
    for name, x in tensors.items():
        assert restored[name].shape == x.shape
        assert float(((restored[name].float() - x.float()) ** 2).sum() / (x.float() ** 2).sum()) < 0.02


def test_lossless_tensors_exact(tmp_path):
    tensors = {
        "layers.0.key": torch.randn(1, 1, 4, 8),
        "token_ids": torch.arange(-5, 5).reshape(1, 10),
        "mask": torch.tensor([[True, False]]),
        "weights": torch.randn(3, 3).to(torch.bfloat16),
    }
    compress_tensors(tensors, tmp_path / "l.kvp", CodecConfig.build("uniform", 8, 8))
    restored, _ = load_kvp(tmp_path / "l.kvp")
    for name in ("token_ids", "mask", "weights"):
        assert restored[name].dtype == tensors[name].dtype and torch.equal(restored[name], tensors[name])


def test_empty_tensors_round_trip(tmp_path):
    tensors = {
        "layers.0.key": torch.zeros(1, 2, 0, 16, dtype=torch.float16),
        "layers.0.value": torch.zeros(1, 2, 0, 16, dtype=torch.float16),
        "token_ids": torch.zeros(1, 0, dtype=torch.int64),
    }
    for method in ("uniform", "normal", "adaptive"):
        path = tmp_path / f"{method}.kvp"
        compress_tensors(
            tensors,
            path,
            CodecConfig.build(method, 3, 16, 0.1, **({"codebook_scope": "group"} if method == "adaptive" else {})),
        )
        restored, _ = load_kvp(path)
        assert {n: (tuple(t.shape), t.dtype) for n, t in restored.items()} == {
            n: (tuple(t.shape), t.dtype) for n, t in tensors.items()
        }


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.model
def test_compressing_a_dump_twice_gives_the_same_bytes(real_dump, tmp_path):
    """safetensors hands its metadata back in hash order, which differs between processes: sorted on reading."""
    with safe_open(str(real_dump), "pt") as handle:
        assert len(handle.metadata()) > 5
    here, there = tmp_path / "a.kvp", tmp_path / "b.kvp"
    compress_file(real_dump, here, CodecConfig.build("uniform", 4, 64, recommended=True))  # the CLI defaults
    args = ["compress", real_dump, "-o", there, "--method", "uniform", "--bits", "4", "--group-size", "64"]
    done = subprocess.run([sys.executable, "-m", "kvpack", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert here.read_bytes() == there.read_bytes()


@pytest.mark.model
def test_lossless_compress_of_a_dump_is_exact(real_dump, real_tensors, tmp_path):
    """``config=None`` (``kvpack compress --lossless``): every tensor back bit for bit, no allocation allowed."""
    from kvpack.allocation.solver import Allocation
    from kvpack.errors import InvalidInputError

    report = compress_file(real_dump, tmp_path / "x.kvp", None)
    assert report["rows"]["all"]["rel_mse"] == 0.0 and report["config"] is None
    restored, _ = load_kvp(tmp_path / "x.kvp")
    assert restored.keys() == real_tensors.keys()
    assert all(torch.equal(restored[name], real_tensors[name]) for name in real_tensors)
    with pytest.raises(InvalidInputError, match="no bits to allocate"):
        compress_file(real_dump, tmp_path / "y.kvp", None, allocation=Allocation(target_bits=3.0))
    assert not (tmp_path / "y.kvp").exists()
