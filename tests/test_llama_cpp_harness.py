"""The llama.cpp harness against the real llama.cpp (llama-cpp-python) and SmolLM2: the files it saves have the
layout llama.h describes, an unmodified file restored into a fresh context continues exactly as the original
context did (so the harness restores from the file, not by recomputing), and bad files raise."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest

from tests import llama_cpp_harness as harness

if harness.LLAMA_CPP_MISSING:
    pytest.skip(harness.LLAMA_CPP_MISSING, allow_module_level=True)

from tests.conftest import LLAMA_NEW_TOKENS, LLAMA_TOKENS  # noqa: E402

# SmolLM2-135M: 30 layers, 3 kv heads of 64 channels = 192 values per token and layer.
N_LAYER, N_EMBD_KV = 30, 3 * 64


def walsh_hadamard(n: int) -> np.ndarray:
    """llama.cpp's normalized Walsh-Hadamard matrix (Sylvester order), ``(n, n)``."""
    matrix = np.ones((1, 1))
    while len(matrix) < n:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix / np.sqrt(n)


def span_values(path, span, cells: int) -> np.ndarray:
    """A K or V span as float32 ``(cells, N_EMBD_KV)`` (f16 rows, f16 transposed, or q8_0 blocks)."""
    with open(path, "rb") as file:
        file.seek(span.offset)
        raw = file.read(span.nbytes)
    if span.ggml_type == harness.GGML_TYPES["f16"]:
        values = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        return values.reshape(span.n_embd, cells).T if span.n_embd else values.reshape(cells, -1)
    assert span.ggml_type == harness.GGML_TYPES["q8_0"]
    blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("q", "i1", 32)]))
    return (blocks["d"].astype(np.float32)[:, None] * blocks["q"]).reshape(cells, -1)


# ----------------------------------------------------------------------------------------------------------
# the layout, on real files


@pytest.mark.model
@pytest.mark.parametrize("kind", ["seq", "session"])
def test_files_have_the_documented_layout(llama_state_f16, llama_state_f16_fa, kind):
    n = LLAMA_TOKENS
    for files, v_trans in ((llama_state_f16, True), (llama_state_f16_fa, False)):
        saved = getattr(files, kind)
        data = saved.path.read_bytes()
        magic, version, n_tokens = struct.unpack_from("<III", data)
        assert data[:4] == {"seq": b"qsgg", "session": b"nsgg"}[kind]  # 'ggsq' / 'ggsn' as little-endian u32
        assert (magic, version) == harness.MAGICS[kind]
        assert (magic, version) == {
            "seq": (harness.llama_cpp.LLAMA_STATE_SEQ_MAGIC, harness.llama_cpp.LLAMA_STATE_SEQ_VERSION),
            "session": (harness.llama_cpp.LLAMA_SESSION_MAGIC, harness.llama_cpp.LLAMA_SESSION_VERSION),
        }[kind]
        assert n_tokens == n
        layout = harness.read_state_layout(saved.path)
        assert layout.kind == kind and layout.arch == ("llama" if kind == "session" else "")
        np.testing.assert_array_equal(layout.token_ids, saved.token_ids)
        assert (layout.n_stream, layout.cell_count, layout.n_layer, layout.v_trans) == (1, [n], [N_LAYER], [v_trans])
        np.testing.assert_array_equal(layout.positions, np.arange(n))
        assert saved.v_trans is v_trans
        # header, tokens, (session: "llama"), n_stream + cell_count, 12 bytes per cell, v_trans + n_layer
        first_key = 12 + 4 * n + (9 if kind == "session" else 0) + 8 + 12 * n + 8
        assert layout.cells_offset == 12 + 4 * n + (9 if kind == "session" else 0) + 8
        keys, values = layout.keys(), layout.values()
        assert keys[0].header_offset == first_key and keys[0].offset == first_key + 12
        assert all(span.ggml_type == 1 and span.row_bytes == 2 * N_EMBD_KV for span in keys)
        if v_trans:
            assert all(span.element_bytes == 2 and span.n_embd == N_EMBD_KV for span in values)
        else:
            assert all(span.row_bytes == 2 * N_EMBD_KV for span in values)
        # K/V data: 23,040 bytes per token (README), plus 12-byte type/size headers per layer and role
        kv_bytes = sum(span.nbytes for span in layout.spans)
        assert kv_bytes == n * 23_040
        assert layout.size == first_key + kv_bytes + 2 * N_LAYER * 12 == saved.file_bytes == len(data)


@pytest.mark.model
def test_transposed_and_row_values_hold_the_same_cache(llama_state_f16, llama_state_f16_fa):
    """The V transposition is only a layout: layer 0's keys and values (computed before any attention) are the
    same bits in both files; later layers differ only by flash attention's rounding."""
    n = LLAMA_TOKENS
    rows, transposed = (harness.read_state_layout(f.seq.path) for f in (llama_state_f16_fa, llama_state_f16))
    for layer in (0, 29):
        for role in ("keys", "values"):
            a = span_values(llama_state_f16_fa.seq.path, getattr(rows, role)()[layer], n)
            b = span_values(llama_state_f16.seq.path, getattr(transposed, role)()[layer], n)
            if layer == 0:
                np.testing.assert_array_equal(a, b)
            else:
                assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.1, (layer, role)


@pytest.mark.model
def test_q8_0_cache_is_hadamard_rotated(llama_state_f16_fa, llama_state_q8_0):
    """A q8_0 cache holds every head vector times the 64×64 Walsh-Hadamard matrix (llama.cpp's attn_rot_k/v)."""
    n = LLAMA_TOKENS
    layout = harness.read_state_layout(llama_state_q8_0.seq.path)
    f16 = harness.read_state_layout(llama_state_f16_fa.seq.path)
    assert layout.v_trans == [False]
    assert all(span.ggml_type == 8 and span.row_bytes == N_EMBD_KV // 32 * 34 for span in layout.spans)
    assert layout.size == 12 + 4 * n + 8 + 12 * n + 8 + 2 * N_LAYER * (12 + n * 204)
    hadamard = walsh_hadamard(64)
    for role, tolerance in (("keys", 0.05), ("values", 0.1)):
        for layer in (0, 15, 29):
            q8 = span_values(llama_state_q8_0.seq.path, getattr(layout, role)()[layer], n).reshape(n, 3, 64)
            ref = span_values(llama_state_f16_fa.seq.path, getattr(f16, role)()[layer], n).reshape(n, 3, 64)
            rotated_error = np.linalg.norm(q8 - ref @ hadamard) / np.linalg.norm(ref)
            assert rotated_error < tolerance, (role, layer, rotated_error)
            assert np.linalg.norm(q8 - ref) / np.linalg.norm(ref) > 1, (role, layer)


# ----------------------------------------------------------------------------------------------------------
# restoring


@pytest.mark.model
@pytest.mark.parametrize("kind", ["seq", "session"])
@pytest.mark.parametrize("fixture", ["llama_state_f16", "llama_state_f16_fa", "llama_state_q8_0"])
def test_unmodified_file_restores_exactly(request, fixture, kind):
    files = request.getfixturevalue(fixture)
    restored = files.restore(kind)
    np.testing.assert_array_equal(restored.prompt_tokens, files.token_ids)
    assert restored.load_bytes == getattr(files, kind).file_bytes
    report = harness.compare(files.reference, restored)
    assert report["identical"], report
    assert report["steps"] == report["kl_steps"] == LLAMA_NEW_TOKENS
    assert report["kl_mean"] == report["max_abs_logit_diff"] == 0.0
    np.testing.assert_array_equal(restored.logits, files.reference.logits)
    np.testing.assert_array_equal(restored.tokens, files.reference.tokens)


@pytest.mark.model
def test_extend_mode_uses_every_restored_cell(llama_state_f16):
    files = llama_state_f16
    restored = files.restore("seq", mode="extend")
    reference = files.seq.references["extend"]
    assert restored.start_pos == LLAMA_TOKENS and restored.fed[0] == files.seq.first_token
    assert harness.compare(reference, restored)["identical"]
    # the first greedy token chosen by the prefill is what redecode's restored context predicts as well
    assert files.reference.tokens[0] == files.seq.first_token


@pytest.mark.model
def test_logits_come_from_the_file(llama_state_f16_fa, tmp_path):
    """A file whose layer-10 keys are zeroed still loads (llama.cpp has no checksum) and predicts differently:
    the continuation is computed from the restored cache, not from the prompt again."""
    files = llama_state_f16_fa
    span = harness.read_state_layout(files.seq.path).keys()[10]
    data = bytearray(files.seq.path.read_bytes())
    data[span.offset : span.offset + span.nbytes] = bytes(span.nbytes)
    changed = tmp_path / "zeroed.bin"
    changed.write_bytes(bytes(data))
    report = harness.compare(files.reference, files.restore(path=changed, feed=files.reference.tokens))
    assert not report["identical"]
    assert report["kl_steps"] == LLAMA_NEW_TOKENS  # teacher-forced: every step compared
    assert report["max_abs_logit_diff"] > 0.1 and report["kl_mean"] > 1e-4


@pytest.mark.model
def test_rotation_is_not_recorded_in_the_file(llama_state_q8_0):
    """A q8_0 file restored without llama.cpp's Hadamard rotation loads and predicts differently."""
    files = llama_state_q8_0
    report = harness.compare(files.reference, files.restore(attn_rotation=False, feed=files.reference.tokens))
    assert not report["identical"] and report["kl_mean"] > 0.01


@pytest.mark.model
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"flash_attn": True}, "incompatible V transposition"),
        ({"type_k": "q8_0"}, "mismatched key type"),
        ({"type_v": "bf16"}, "mismatched value type"),
    ],
)
def test_mismatched_context_raises(llama_state_f16, overrides, message):
    with pytest.raises(harness.StateLoadError, match=message) as caught:
        llama_state_f16.restore("seq", **overrides)
    assert str(llama_state_f16.seq.path) in str(caught.value)


@pytest.mark.model
@pytest.mark.parametrize("kind", ["seq", "session"])
def test_truncated_file_fails_the_precheck(llama_state_f16, tmp_path, kind):
    """Truncated anywhere, the pre-check refuses the file (a seq file cut inside its K/V data would otherwise
    abort the process in llama.cpp: GGML_ASSERT(nread <= state_size))."""
    source = getattr(llama_state_f16, kind).path
    data = source.read_bytes()
    layout = harness.read_state_layout(source)
    cuts = [
        6,
        11,
        layout.cells_offset + 100,
        layout.keys()[0].offset + 1,
        layout.values()[29].offset + 7,
        len(data) - 1,
    ]
    for cut in cuts:
        path = tmp_path / f"cut{cut}.bin"
        path.write_bytes(data[:cut])
        with pytest.raises(harness.StateFileError, match="truncated"):
            llama_state_f16.restore(kind, path=path)
    grown = tmp_path / "grown.bin"
    grown.write_bytes(data + b"\0")
    with pytest.raises(harness.StateFileError, match="1 bytes after the last layer"):
        llama_state_f16.restore(kind, path=grown)


@pytest.mark.model
@pytest.mark.parametrize(("kind", "cut"), [("seq", 6), ("seq", 100), ("session", 100), ("session", -1)])
def test_llama_cpp_load_failure_raises(llama_state_f16, tmp_path, kind, cut):
    """Without the pre-check, llama.cpp's own refusal (0 / false) becomes a StateLoadError quoting it. (Only
    cuts that llama.cpp survives: a seq file cut inside its data aborts the process.)"""
    data = getattr(llama_state_f16, kind).path.read_bytes()
    path = tmp_path / "cut.bin"
    path.write_bytes(data[:cut])
    with pytest.raises(harness.StateLoadError, match="llama.cpp could not restore") as caught:
        llama_state_f16.restore(kind, path=path, preflight=False)
    assert not isinstance(caught.value, harness.StateFileError)
    assert "llama.cpp: " in str(caught.value)


@pytest.mark.model
def test_wrong_kind_and_magic_raise(llama_state_f16, tmp_path):
    with pytest.raises(harness.StateFileError, match="a session file, restored as kind='seq'"):
        llama_state_f16.restore("seq", path=llama_state_f16.session.path)
    path = tmp_path / "bad-version.bin"
    data = bytearray(llama_state_f16.seq.path.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    path.write_bytes(bytes(data))
    with pytest.raises(harness.StateFileError, match="seq file version 2, this llama.cpp reads 3"):
        harness.read_state_layout(path)
    with pytest.raises(harness.StateLoadError, match="unknown \\(magic, version\\)"):
        llama_state_f16.restore("seq", path=path, preflight=False)


@pytest.mark.model
def test_save_refuses_quantized_v_without_flash_attention(tmp_path):
    with pytest.raises(ValueError, match="needs flash attention"):
        harness.save_prompt_state(
            harness.default_gguf_path(), [1, 2, 3], tmp_path / "x.bin", type_v="q8_0", flash_attn=False
        )


@pytest.mark.model
def test_copy_restores_like_the_original(llama_state_q8_0, tmp_path):
    """The file alone carries the state: a byte copy elsewhere restores identically (what kvpack's lossless
    round trip must reproduce)."""
    copy = tmp_path / "copy.bin"
    shutil.copyfile(llama_state_q8_0.session.path, copy)
    assert harness.compare(llama_state_q8_0.reference, llama_state_q8_0.restore("session", path=copy))["identical"]


# ----------------------------------------------------------------------------------------------------------
# compare() and the layout walker, without the model


def continuation(tokens, fed, logits, mode="redecode"):
    return harness.Continuation(
        mode=mode,
        logits=np.asarray(logits, dtype=np.float32),
        tokens=np.asarray(tokens, dtype=np.int32),
        fed=np.asarray(fed, dtype=np.int32),
        start_pos=9,
        prompt_tokens=np.arange(10, dtype=np.int32),
    )


def test_compare_stops_comparing_distributions_after_divergence():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5))
    reference = continuation(logits.argmax(1), [7, *logits.argmax(1)[:3]], logits)
    assert harness.compare(reference, reference)["identical"]
    other = logits.copy()
    other[1] = -other[1]  # step 1 picks another token; steps 2 and 3 are fed different tokens
    restored = continuation(other.argmax(1), [7, *other.argmax(1)[:3]], other)
    report = harness.compare(reference, restored)
    assert report["first_divergence"] == 1 and report["prefix_agreement"] == 0.25
    assert report["kl_steps"] == 2 and report["token_agreement"] == 0.75  # steps 2 and 3 pick the same tokens
    log_p = logits[1] - np.log(np.exp(logits[1]).sum())
    log_q = other[1] - np.log(np.exp(other[1]).sum())
    assert report["kl_mean"] == pytest.approx((np.exp(log_p) * (log_p - log_q)).sum() / 2, rel=1e-5)
    assert report["max_abs_logit_diff"] == pytest.approx(np.abs(logits[1] - other[1]).max(), rel=1e-6)
    forced = continuation(other.argmax(1), reference.fed, other)
    assert harness.compare(reference, forced)["kl_steps"] == 4
    with pytest.raises(ValueError, match="not the same experiment"):
        harness.compare(reference, continuation(other.argmax(1), [8, 0, 0, 0], other))


def test_layout_walker_on_handmade_bytes(tmp_path):
    """Two cells, one layer, f16 rows of 4 bytes, transposed f16 values of 2 channels."""
    cells = struct.pack("<iIi", 0, 1, 0) + struct.pack("<iIi", 1, 1, 0)
    keys = struct.pack("<iQ", 1, 4) + bytes(range(8))
    values = struct.pack("<iII", 1, 2, 2) + bytes(range(8, 16))
    body = struct.pack("<I", 1) + struct.pack("<I", 2) + cells + struct.pack("<II", 1, 1) + keys + values
    path = tmp_path / "tiny.bin"
    path.write_bytes(struct.pack("<III", harness.STATE_SEQ_MAGIC, 3, 2) + struct.pack("<ii", 5, 6) + body)
    layout = harness.read_state_layout(path)
    assert layout.token_ids.tolist() == [5, 6] and layout.positions.tolist() == [0, 1]
    key, value = layout.spans
    assert (key.offset, key.nbytes, key.row_bytes) == (20 + 8 + 24 + 8 + 12, 8, 4)
    assert (value.offset, value.nbytes, value.element_bytes, value.n_embd) == (key.offset + 8 + 12, 8, 2, 2)
    assert layout.size == value.offset + 8
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(harness.StateFileError, match="layer 0's transposed values"):
        harness.read_state_layout(path)
