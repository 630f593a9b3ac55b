"""Un-RoPE per layer through compress and decompress: every key entry with its own layer's rotary parameters and
first position (kvpack.compress.layer_rope), on synthetic caches and on a tiny Gemma 3 (local and global RoPE)."""

import json

import numpy as np
import pytest
import torch

from kvpack.compress import compress_tensors
from kvpack.config import CodecConfig
from kvpack.errors import InvalidInputError
from kvpack.formats.reader import KvpReader
from kvpack.restore.files import load_kvp
from kvpack.transforms.rope import RopeSpec, rope_metadata, rotate_keys
from tests.cli_helpers import assert_one_line_error, run
from tests.conftest import small_cache
from tests.tiny_models import VOCAB, PreRopeKeys, tiny_model

LOCAL = RopeSpec(tuple(1.0 / 10000 ** (np.arange(0, 16, 2) / 16)))
GLOBAL = RopeSpec(tuple(1.0 / 1000000 ** (np.arange(0, 16, 2) / 16)), 1.25)


def unrope(**transforms):
    return CodecConfig.build("uniform", 8, 16, transforms={"unrope": True, "key_axis": "channel", **transforms})


def relative_error(restored, original):
    x = original.float()
    return float(((restored.float() - x) ** 2).sum() / (x**2).sum())


def stored_rope(reader, name):
    """``(inv_freq, rope_scaling, rope_offset)`` the file stores for entry ``name``."""
    entry = reader.entry(name)
    inv_freq = torch.from_numpy(reader.read_section(name, "rope_inv_freq").view(np.float32).copy())
    return inv_freq, entry.codec.rope_scaling, entry.codec.rope_offset


def test_each_key_entry_is_unroped_with_its_own_layers_parameters(tmp_path):
    tensors = small_cache(seq=40, dim=16, layers=3)
    tensors["layers.0.key"] = tensors["layers.0.key"][:, :, -15:]  # a sliding-window layer: the last 15 tokens
    tensors["layers.0.value"] = tensors["layers.0.value"][:, :, -15:]
    metadata = {**rope_metadata([LOCAL, GLOBAL, LOCAL]), "seq_len": "40"}
    compress_tensors(tensors, tmp_path / "x.kvp", unrope(), metadata)
    with KvpReader(tmp_path / "x.kvp") as reader:
        for layer, spec, offset in ((0, LOCAL, 25), (1, GLOBAL, 0), (2, LOCAL, 0)):
            inv_freq, scaling, first = stored_rope(reader, f"layers.{layer}.key")
            assert inv_freq.tolist() == list(np.float32(spec.inv_freq)) and (scaling, first) == (
                spec.attention_scaling,
                offset,
            )
            assert "rope_inv_freq" not in reader.entry(f"layers.{layer}.value").sections  # values keep their RoPE
    restored = load_kvp(tmp_path / "x.kvp")[0]
    assert all(relative_error(restored[n], x) < 1e-4 for n, x in tensors.items() if n != "token_ids")
    # the caller's frequencies (CodecConfig.with_rope) hold for every layer; `rope` is read, not written
    compress_tensors(tensors, tmp_path / "y.kvp", unrope().with_rope(GLOBAL.inv_freq, 1.0), metadata)
    compress_tensors(tensors, tmp_path / "z.kvp", unrope(), {"note": "x"}, rope=metadata)
    with KvpReader(tmp_path / "y.kvp") as y, KvpReader(tmp_path / "z.kvp") as z:
        assert stored_rope(y, "layers.0.key")[0].tolist() == list(np.float32(GLOBAL.inv_freq))
        assert stored_rope(z, "layers.1.key")[0].tolist() == list(np.float32(GLOBAL.inv_freq))
        assert "rope_specs" not in z.metadata and z.metadata["note"] == "x"


def test_layers_that_cannot_be_unroped_alike_are_refused_in_one_line(tmp_path):
    tensors = small_cache(seq=8, dim=16, layers=2)
    stacked = unrope(stack_layers=True)
    with pytest.raises(InvalidInputError, match=r"\(`level=token`\) un-RoPE every layer alike, but layers 0 and 1"):
        compress_tensors(tensors, tmp_path / "x.kvp", stacked, rope_metadata([LOCAL, GLOBAL]))
    compress_tensors(tensors, tmp_path / "x.kvp", stacked, rope_metadata([LOCAL, LOCAL]))
    interleaved = rope_metadata([LOCAL, RopeSpec(LOCAL.inv_freq, layout="interleaved")])
    with pytest.raises(InvalidInputError, match="'layers.1.key': its model rotates interleaved channel pairs"):
        compress_tensors(tensors, tmp_path / "y.kvp", unrope(), interleaved)
    with pytest.raises(InvalidInputError, match="layer 1 is out of range: the dump records rotary parameters for 1"):
        compress_tensors(tensors, tmp_path / "y.kvp", unrope(), rope_metadata([LOCAL]))
    assert not (tmp_path / "y.kvp").exists()


def gemma3_dump(tmp_path, **overrides):
    """A tiny Gemma 3's cache of 40 tokens through kvpack's dump, written to safetensors, and its pre-RoPE keys."""
    from kvpack.formats.safetensors_io import write_safetensors
    from kvpack.model.dump import dump_tokens

    model = tiny_model("gemma3", **overrides)
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    with PreRopeKeys(model) as pre:
        tensors, metadata = dump_tokens(model, ids, "float32")
    path = tmp_path / "gemma3.safetensors"
    write_safetensors(path, tensors, metadata)
    return path, tensors, pre.keys


@pytest.mark.model
def test_compress_unrope_and_decompress_a_cache_with_local_and_global_rope(tmp_path, capsys):
    from kvpack.formats.safetensors_io import SafetensorsSource

    path, tensors, pre_rope = gemma3_dump(tmp_path)  # layers 0-4: sliding window 16, theta 1e4; layer 5: global
    out, restored = tmp_path / "g.kvp", tmp_path / "restored.safetensors"
    options = ["-m", "uniform", "-b", "8", "-g", "16", "--key-axis", "channel", "--unrope", "--json", "-"]
    code, stdout, err = run(["compress", path, "-o", out, *options], capsys)
    assert code == 0, err
    assert all(row["rel_mse"] < 1e-4 for row in json.loads(stdout)["layers"])
    with KvpReader(out) as reader:  # what the file stores undoes each layer's RoPE exactly
        for layer, expected in pre_rope.items():
            inv_freq, scaling, first = stored_rope(reader, f"layers.{layer}.key")
            assert first == (25 if layer < 5 else 0)  # a sliding layer holds tokens 25..39
            keys = tensors[f"layers.{layer}.key"]
            unroped = rotate_keys(keys, inv_freq, scaling, first, inverse=True)
            assert float((unroped - expected[:, :, first:]).abs().max()) <= 2e-6 * float(expected.abs().max())
        assert not torch.equal(stored_rope(reader, "layers.0.key")[0], stored_rope(reader, "layers.5.key")[0])
    code, _, err = run(["decompress", out, "-o", restored], capsys)
    assert code == 0, err
    with SafetensorsSource(restored) as source:  # bounded as the single-rotary case (8 bits: < 1e-4)
        for name, x in tensors.items():
            if name != "token_ids":
                assert source.shape_dtype(name)[0] == tuple(x.shape)
                assert relative_error(source.get(name), x) < 1e-4, name


@pytest.mark.model
def test_cli_refuses_what_it_cannot_unrope_in_one_line(tmp_path, capsys):
    from kvpack.formats.safetensors_io import write_safetensors
    from kvpack.model.dump import dump_tokens

    path = gemma3_dump(tmp_path, sliding_window=64)[0]  # every layer holds all 40 tokens: they could be stacked
    code, _, err = run(["compress", path, "-m", "uniform", "-g", "16", "--unrope", "--level", "token"], capsys)
    assert_one_line_error(code, err, "but layers 0 and 5 use different rotary parameters")
    assert run(["compress", path, "-m", "uniform", "-g", "16", "--level", "token"], capsys)[0] == 0  # without unrope
    tensors, metadata = dump_tokens(tiny_model("glm-interleaved"), torch.randint(3, VOCAB, (1, 12)), "float32")
    write_safetensors(tmp_path / "glm.safetensors", tensors, metadata)
    code, _, err = run(["compress", tmp_path / "glm.safetensors", "-m", "uniform", "-g", "16", "--unrope"], capsys)
    assert_one_line_error(code, err, "rotates interleaved channel pairs (GPT-J style RoPE)")
