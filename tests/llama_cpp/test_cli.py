"""The llama.cpp commands as a user types them: compress a slot file, inspect it, restore it for llama.cpp."""

from __future__ import annotations

import json

import pytest

from tests import llama_cpp_harness as harness
from tests.cli_helpers import assert_one_line_error, run

pytestmark = pytest.mark.model


def test_compress_inspect_decompress_restore(llama_state_f16_fa, tmp_path, capsys):
    gguf = str(harness.default_gguf_path())
    slot = str(llama_state_f16_fa.seq.path)
    packed, back = tmp_path / "slot.kvp", tmp_path / "slot.bin"

    code, out, err = run(["inspect", slot, "--model", gguf, "--json", "-"], capsys)
    info = json.loads(out)
    assert code == 0 and info["kind"] == "seq" and info["layers"] == 30 and info["key_types"] == ["F16"]
    assert info["kv_bytes_per_token"] == 23040 and len(info["tensors"]) == 61

    code, out, err = run(["compress", slot, "--model", gguf, "--bits", "4", "-o", str(packed), "--json", "-"], capsys)
    report = json.loads(out)
    assert code == 0, err
    assert report["config"]["method"] == "adaptive" and report["file_bytes"] < info["file_bytes"] / 3

    code, out, err = run(["decompress", str(packed), "--format", "llama-cpp", "--model", gguf, "-o", str(back)], capsys)
    assert code == 0 and "llama.cpp sequence state file, 300 tokens, 30 layers (F16)" in out + err
    restored = llama_state_f16_fa.restore(path=back, feed=llama_state_f16_fa.reference.tokens)
    assert harness.compare(llama_state_f16_fa.reference, restored)["kl_mean"] < 0.05


def test_user_errors_are_one_line(llama_state_f16_fa, tmp_path, capsys):
    gguf = str(harness.default_gguf_path())
    slot = str(llama_state_f16_fa.seq.path)
    code, _, err = run(["compress", slot, "-o", str(tmp_path / "x.kvp")], capsys)
    assert_one_line_error(code, err, "GGUF model it was made with")
    code, _, err = run(["compress", slot, "--model", gguf, "--lossless", "--bits", "3"], capsys)
    assert_one_line_error(code, err, "--lossless stores K/V exactly; drop --bits")
    packed = tmp_path / "l.kvp"
    assert run(["compress", slot, "--model", gguf, "--lossless", "-o", str(packed)], capsys)[0] == 0
    code, _, err = run(["decompress", str(packed), "--format", "llama-cpp", "--layers", "0"], capsys)
    assert_one_line_error(code, err, "restores the whole state")
    code, _, err = run(["decompress", str(packed), "--format", "gguf"], capsys)
    assert_one_line_error(code, err, "--format must be")
    cut = tmp_path / "cut.bin"
    cut.write_bytes(llama_state_f16_fa.seq.path.read_bytes()[:5000])
    code, _, err = run(["inspect", str(cut)], capsys)
    assert_one_line_error(code, err, "truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.bin", "l.kvp"]


def test_archives_of_quantized_caches_restore_only_to_llama_cpp(llama_state_q8_0, tmp_path, capsys):
    gguf = str(harness.default_gguf_path())
    slot, packed = str(llama_state_q8_0.seq.path), tmp_path / "q8.kvp"
    assert run(["compress", slot, "--model", gguf, "--lossless", "-o", str(packed)], capsys)[0] == 0
    code, _, err = run(["decompress", str(packed), "-o", str(tmp_path / "q8.safetensors")], capsys)
    assert_one_line_error(code, err, "--format llama-cpp")
    code, _, err = run(["stats", str(packed), str(packed)], capsys)
    assert_one_line_error(code, err, "lossless archive")
    code, _, err = run(["stats", slot, str(packed)], capsys)
    assert_one_line_error(code, err, "is a llama.cpp state file")
    assert run(["decompress", str(packed), "--format", "llama-cpp", "-o", str(tmp_path / "q8.bin")], capsys)[0] == 0
    assert (tmp_path / "q8.bin").read_bytes() == llama_state_q8_0.seq.path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8.bin", "q8.kvp"]
