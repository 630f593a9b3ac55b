"""llama.cpp state files through kvpack, against the real llama.cpp (llama-cpp-python) and SmolLM2.

Files are saved by llama.cpp itself (tests/llama_cpp_harness.py, session fixtures in tests/conftest.py):
f16 with transposed values (flash attention off), f16 by rows (flash attention on) and q8_0 (stored
Hadamard-rotated). The round trips are checked on bytes and by restoring into a fresh llama.cpp context.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvpack.compress import compress_file
from kvpack.config import CodecConfig
from kvpack.errors import FormatError, InvalidInputError, OutputExistsError
from kvpack.formats.llama_state import kv_free_bytes, read_llama_state, state_from_skeleton
from kvpack.llama_cpp.gguf_model import read_gguf_model
from kvpack.llama_cpp.restore import write_llama_cpp
from kvpack.llama_cpp.source import LlamaStateSource, RowOrder
from kvpack.restore.files import load_kvp
from tests import llama_cpp_harness as harness

pytestmark = pytest.mark.model

STATE_FIXTURES = ["llama_state_f16", "llama_state_f16_fa", "llama_state_q8_0"]


@pytest.fixture(scope="module")
def gguf():
    return harness.default_gguf_path()


@pytest.fixture(params=STATE_FIXTURES)
def files(request):
    return request.getfixturevalue(request.param)


def _kinds(files):
    return [("seq", files.seq), ("session", files.session)]


def test_layout_is_what_llama_cpp_wrote(files):
    """kvpack's reader agrees with the harness's independent walk of the same bytes and with what was saved."""
    for kind, saved in _kinds(files):
        state = read_llama_state(saved.path)
        expected = harness.read_state_layout(saved.path)
        stream = state.only_stream()
        assert state.kind == kind and state.file_size == saved.path.stat().st_size
        assert np.array_equal(state.token_ids, saved.token_ids)
        assert stream.cell_count == len(saved.token_ids)
        assert np.array_equal(stream.positions, np.arange(stream.cell_count))
        assert stream.v_trans == bool(saved.v_trans)
        assert [(k.offset, k.nbytes) for k in stream.keys] == [(s.offset, s.nbytes) for s in expected.keys()]
        assert [(v.offset, v.nbytes) for v in stream.values] == [(s.offset, s.nbytes) for s in expected.values()]
        assert state.arch == ("llama" if kind == "session" else "")


def test_skeleton_holds_every_other_byte(files):
    """The K/V-free bytes parse to the same layout, and writing the original K/V back gives the file."""
    from io import BytesIO

    from kvpack.formats.llama_state import write_llama_state

    state = read_llama_state(files.seq.path)
    skeleton = kv_free_bytes(state)
    again = state_from_skeleton(skeleton)
    assert again.streams[0].keys == state.streams[0].keys and again.streams[0].values == state.streams[0].values
    stream = state.streams[0]
    out = BytesIO()
    write_llama_state(
        out, skeleton, again, lambda _s, kind, i: state.read((stream.keys if kind == "key" else stream.values)[i])
    )
    assert out.getvalue() == files.seq.path.read_bytes()


def test_lossless_round_trip_is_byte_identical_and_restores_the_same(files, gguf, tmp_path):
    for kind, saved in _kinds(files):
        kvp, back = tmp_path / f"{kind}.kvp", tmp_path / f"{kind}.bin"
        compress_file(saved.path, kvp, None, model=gguf)
        assert kvp.stat().st_size < saved.path.stat().st_size  # block types kept as bytes, not as float32
        write_llama_cpp(kvp, back, model=gguf)
        assert back.read_bytes() == saved.path.read_bytes()
    result = files.restore(path=tmp_path / "seq.bin")
    assert harness.compare(files.reference, result)["identical"]


def test_keys_reach_transformers_channel_order(llama_state_f16, llama_state_q8_0, gguf, smollm):
    """After the NORM-RoPE permutation (and, for q8_0, undoing llama.cpp's Hadamard rotation) the keys
    are transformers' keys of the same tokens; the raw channel order is not."""
    from kvpack.model.dump import collect_cache

    ids = torch.tensor(llama_state_f16.seq.token_ids, dtype=torch.long)[None]
    reference = collect_cache(smollm.model, ids, "float32")
    for files, bound in ((llama_state_f16, 5e-3), (llama_state_q8_0, 2e-2)):
        source = LlamaStateSource(files.seq.path, gguf)
        for layer in (0, 15, 29):
            for role in ("key", "value"):
                ours = source.get(f"layers.{layer}.{role}").float()
                theirs = reference[f"layers.{layer}.{role}"]
                assert float(((ours - theirs) ** 2).sum() / (theirs**2).sum()) < bound, (files.seq.path, layer, role)
    keys = LlamaStateSource(llama_state_f16.seq.path, gguf).get("layers.15.key").float()
    as_saved = RowOrder(permuted=True, rope_dim=64).to_llama(keys)
    theirs = reference["layers.15.key"]
    assert float(((as_saved - theirs) ** 2).sum() / (theirs**2).sum()) > 0.5


@pytest.mark.parametrize("method", ["uniform", "adaptive"])
def test_lossy_round_trip_restores_in_llama_cpp(llama_state_f16, gguf, tmp_path, method):
    """4-bit codes with the codecs' defaults: llama.cpp loads the file and predicts close to the original."""
    kvp, back = tmp_path / "x.kvp", tmp_path / "x.bin"
    config = CodecConfig.build(method=method, bits=4, group_size=64, recommended=True)
    report = compress_file(llama_state_f16.seq.path, kvp, config, model=gguf)
    assert report["file_bytes"] < llama_state_f16.seq.path.stat().st_size / 2.5
    write_llama_cpp(kvp, back, model=gguf)
    assert back.stat().st_size == llama_state_f16.seq.path.stat().st_size
    decoded, _ = load_kvp(kvp)
    with LlamaStateSource(back, gguf) as restored:  # what llama.cpp gets is what kvpack decoded
        assert torch.equal(restored.get("layers.7.key"), decoded["layers.7.key"])
    teacher = llama_state_f16.restore(path=back, feed=llama_state_f16.reference.tokens)
    measured = harness.compare(llama_state_f16.reference, teacher)
    assert measured["kl_mean"] < 0.05, measured


def test_decompress_refuses_another_model_before_writing(llama_state_f16, gguf, tmp_path, monkeypatch):
    kvp, back = tmp_path / "x.kvp", tmp_path / "x.bin"
    compress_file(llama_state_f16.seq.path, kvp, None, model=gguf)
    model = read_gguf_model(gguf)
    other = type(model)(**{**model.__dict__, "kv_heads": 4, "fingerprint": "0" * 16})
    with pytest.raises(InvalidInputError, match="does not fit"):
        write_llama_cpp(kvp, back, model=other)
    renamed = type(model)(**{**model.__dict__, "fingerprint": "0" * 16})
    with pytest.raises(InvalidInputError, match="was made with GGUF"):
        write_llama_cpp(kvp, back, model=renamed)
    assert not back.exists() and list(tmp_path.iterdir()) == [kvp]
    back.write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        write_llama_cpp(kvp, back, model=gguf)
    assert back.read_bytes() == b"keep"


def test_compress_needs_the_model_and_refuses_a_mismatch(llama_state_f16, gguf, tmp_path):
    with pytest.raises(InvalidInputError, match="GGUF model it was made with"):
        compress_file(llama_state_f16.seq.path, tmp_path / "x.kvp", None)
    model = read_gguf_model(gguf)
    with pytest.raises(InvalidInputError, match="layer 0 holds 192 key"):
        LlamaStateSource(llama_state_f16.seq.path, type(model)(**{**model.__dict__, "kv_heads": 4}))
    with pytest.raises(InvalidInputError, match="llama.cpp state"):
        write_llama_cpp(_plain_kvp(tmp_path), tmp_path / "y.bin")
    assert not (tmp_path / "x.kvp").exists() and not (tmp_path / "y.bin").exists()


def _plain_kvp(tmp_path):
    from kvpack.compress import compress_tensors

    path = tmp_path / "plain.kvp"
    compress_tensors({"layers.0.key": torch.zeros(1, 1, 4, 8), "layers.0.value": torch.zeros(1, 1, 4, 8)}, path, None)
    return path


def test_truncated_or_altered_files_fail_in_one_line(llama_state_f16, tmp_path):
    """Every cut of a real file, and headers rewritten to hostile values, are refused (never a crash or a
    huge allocation)."""
    data = llama_state_f16.seq.path.read_bytes()
    path = tmp_path / "cut.bin"
    for cut in [0, 3, 4, 8, 11, 12, 100, 1210, 1220, 4000, len(data) // 2, len(data) - 1]:
        path.write_bytes(data[:cut])
        with pytest.raises(FormatError):
            read_llama_state(path)
    path.write_bytes(data + b"\0")
    with pytest.raises(FormatError, match="bytes after the KV cache"):
        read_llama_state(path)
    n_tokens = len(llama_state_f16.seq.token_ids)
    cells_at = 12 + 4 * n_tokens + 4  # after magic, version, token count, ids and the stream count
    for offset, value in [(4, 4), (8, 0xFFFFFFFF), (12 + 4 * n_tokens, 0xFFFFFFFF), (cells_at, 0xFFFFFFF0)]:
        altered = bytearray(data)
        altered[offset : offset + 4] = value.to_bytes(4, "little")
        path.write_bytes(bytes(altered))
        with pytest.raises(FormatError):
            read_llama_state(path)


def test_reader_survives_random_damage(llama_state_f16, tmp_path_factory):
    """Bytes of a real file's metadata overwritten at random: a layout whose every span lies inside the
    file, or one FormatError; never another exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    data = llama_state_f16.seq.path.read_bytes()
    metadata_end = read_llama_state(llama_state_f16.seq.path).streams[0].keys[0].offset + 64
    path = tmp_path_factory.mktemp("fuzz") / "damaged.bin"

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.integers(0, metadata_end - 1), st.integers(0, 255)), min_size=1, max_size=8))
    def check(edits):
        damaged = bytearray(data)
        for offset, value in edits:
            damaged[offset] = value
        path.write_bytes(bytes(damaged))
        try:
            state = read_llama_state(path)
        except FormatError:
            return
        for stream in state.streams:
            for layer in (*stream.keys, *stream.values):
                assert 0 <= layer.offset and layer.offset + layer.nbytes <= len(data)

    check()


@pytest.mark.parametrize(("type_k", "type_v"), [("f32", "f32"), ("bf16", "bf16"), ("q8_0", "f16"), ("q4_0", "q4_0")])
def test_other_cache_types_round_trip(tmp_path, gguf, type_k, type_v):
    """F32, BF16, mixed and 4-bit block caches: lossless is byte-identical and restores the same; 4-bit
    uniform codes restore in llama.cpp."""
    from tests.conftest import wikitext_excerpt

    files = harness.make_state_files(
        tmp_path, "state", wikitext_excerpt(), max_tokens=96, n_new=8, type_k=type_k, type_v=type_v, flash_attn=True
    )
    kvp, back = tmp_path / "x.kvp", tmp_path / "x.bin"
    compress_file(files.seq.path, kvp, None, model=gguf)
    write_llama_cpp(kvp, back, model=gguf)
    assert back.read_bytes() == files.seq.path.read_bytes()
    assert harness.compare(files.reference, files.restore(path=back))["identical"]
    config = CodecConfig.build(method="uniform", bits=4, group_size=32, recommended=True)
    compress_file(files.seq.path, kvp, config, model=gguf, force=True)
    write_llama_cpp(kvp, back, model=gguf, force=True)
    forced = files.restore(path=back, feed=files.reference.tokens)
    assert harness.compare(files.reference, forced)["kl_mean"] < 0.1
