"""The command line as a whole (kvpack.cli.app): known errors are one line and exit code 2, in every command
and in a real subprocess; a workflow across commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kvpack.cli.app import main
from kvpack.formats.constants import FORMAT_MAJOR, FORMAT_MINOR
from kvpack.formats.safetensors_io import write_safetensors
from tests.cli_helpers import assert_one_line_error, run


def test_compress_inspect_decompress_stats(dump, tmp_path, capsys):
    out_kvp, report_json = tmp_path / "c.kvp", tmp_path / "r.json"
    code, out, _ = run(
        [
            "compress",
            dump,
            "-o",
            out_kvp,
            "--method",
            "uniform",
            "--bits",
            "4",
            "--group-size",
            "32",
            "--key-axis",
            "token",  # keys per channel would keep this short prompt's keys exact
            "--rotate",
            "none",  # and the rotation's signs would count in the scales
            "--zstd-level",
            "0",  # dense sections: the accounting below is exact
            "--json",
            report_json,
            "--per-layer",
        ],
        capsys,
    )
    assert code == 0 and "bits per element" in out and "layer 1" in out
    report = json.loads(report_json.read_text())
    bits = report["rows"]["all"]["bits_per_element"]
    assert bits["total"] * report["kv_elements"] / 8 == pytest.approx(out_kvp.stat().st_size)
    assert bits["codes"] == pytest.approx(4.0) and bits["scales"] == pytest.approx(1.0)
    assert 0 < report["rows"]["key"]["rel_mse"] < 0.02

    code, out, _ = run(["inspect", out_kvp, "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["version"] == f"{FORMAT_MAJOR}.{FORMAT_MINOR}" and info["metadata"]["model"] == "unit"
    assert info["size"]["rows"]["all"]["bits_per_element"] == pytest.approx(bits)
    code, out, _ = run(["inspect", out_kvp, "--tensors"], capsys)
    assert code == 0 and "layers.1.value" in out and "uniform" in out
    code, out, _ = run(["inspect", dump], capsys)
    assert code == 0 and "K/V per token" in out

    restored = tmp_path / "r.safetensors"
    code, _, _ = run(["decompress", out_kvp, "-o", restored, "--dtype", "float32"], capsys)
    assert code == 0
    code, out, _ = run(["stats", dump, restored, "--json"], capsys)
    stats = json.loads(out)
    assert code == 0 and stats["rows"]["key"]["rel_mse"] == pytest.approx(report["rows"]["key"]["rel_mse"], rel=1e-3)
    code, out, _ = run(["stats", dump, out_kvp], capsys)
    assert code == 0 and "rel MSE" in out


def test_bad_input_files(dump, tmp_path, capsys):
    code, _, err = run(["compress", tmp_path / "missing.safetensors"], capsys)
    assert_one_line_error(code, err, "no such file")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    code, _, err = run(["compress", junk, "-o", tmp_path / "j.kvp"], capsys)
    assert_one_line_error(code, err, "not a readable safetensors file")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(dump.read_bytes()[:-100])
    code, _, err = run(["compress", truncated, "-o", tmp_path / "t.kvp"], capsys)
    assert_one_line_error(code, err, "t.safetensors")
    code, _, err = run(["decompress", dump, "-o", tmp_path / "x.safetensors"], capsys)
    assert_one_line_error(code, err, "not a .kvp file")
    code, _, err = run(["inspect", tmp_path], capsys)
    assert code == 2
    nan = tmp_path / "nan.safetensors"
    write_safetensors(nan, {"layers.0.key": torch.tensor([[[[float("nan")] * 4]]])}, {})
    code, _, err = run(["compress", nan, "-o", tmp_path / "n.kvp", "--group-size", "4"], capsys)
    assert_one_line_error(code, err, "NaN or Inf")
    no_kv = tmp_path / "nokv.safetensors"
    write_safetensors(no_kv, {"weight": torch.zeros(3)}, {})
    code, _, err = run(["compress", no_kv, "-o", tmp_path / "k.kvp"], capsys)
    assert_one_line_error(code, err, "no layers.<i>.key")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "c.safetensors",
        "junk.safetensors",
        "nan.safetensors",
        "nokv.safetensors",
        "t.safetensors",
    ]


def test_real_subprocess_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.kvp"
    bad.write_bytes(b"\x89KVP\r\n\x1a\n" + b"\xff" * 100)
    result = subprocess.run([sys.executable, "-m", "kvpack", "inspect", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_empty_cache_through_the_cli(tmp_path, capsys):
    path = tmp_path / "e.safetensors"
    write_safetensors(
        path,
        {
            "layers.0.key": torch.zeros(1, 3, 0, 64, dtype=torch.float16),
            "layers.0.value": torch.zeros(1, 3, 0, 64, dtype=torch.float16),
            "token_ids": torch.zeros(1, 0, dtype=torch.int64),
        },
        {},
    )
    code, out, _ = run(["compress", path, "-o", tmp_path / "e.kvp"], capsys)
    assert code == 0
    code, _, _ = run(["decompress", tmp_path / "e.kvp", "-o", tmp_path / "r.safetensors"], capsys)
    assert code == 0


def test_json_to_stdout_and_natural_tensor_order(tmp_path, capsys):
    gen = torch.Generator().manual_seed(1)
    tensors = {f"layers.{i}.{r}": torch.randn(1, 1, 3, 8, generator=gen) for i in range(12) for r in ("value", "key")}
    path = tmp_path / "many.safetensors"
    write_safetensors(path, tensors, {})
    code, out, _ = run(["compress", path, "-o", tmp_path / "m.kvp", "-g", "8", "--json", "-"], capsys)
    report = json.loads(out)  # nothing but the JSON on stdout
    assert code == 0 and report["kv_elements"] == 24 * 24
    code, out, _ = run(["inspect", tmp_path / "m.kvp", "--json"], capsys)
    names = [t["name"] for t in json.loads(out)["tensors"]]
    assert names == [f"layers.{i}.{r}" for i in range(12) for r in ("key", "value")]


def one_line_error(code, err):
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_wrong_magic_reads_the_same_in_every_command(tmp_path, capsys):
    junk = tmp_path / "junk.kvp"
    junk.write_bytes(b"this is not a kvpack file at all, just some bytes" * 4)
    expected = f"error: {junk}: not a .kvp file (it does not start with the .kvp magic bytes)"
    seen = set()
    for args in (
        ["inspect", junk],
        ["decompress", junk, "-o", tmp_path / "out.safetensors"],
        ["stats", junk, junk],
        ["compress", junk, "-o", tmp_path / "out2.kvp"],
    ):
        code, _, err = run(args, capsys)
        seen.add(one_line_error(code, err))
    assert seen == {expected}


def test_a_kvp_named_file_without_the_magic_is_named_as_such(tmp_path, capsys):
    garbage = tmp_path / "prompt.kvp"
    garbage.write_bytes(b"not a cache at all" * 10)
    for command in (["inspect", str(garbage)], ["generate", "--cache", str(garbage)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err == f"error: {garbage}: not a .kvp file (it does not start with the .kvp magic bytes)\n"
