import json
import os
import subprocess
import sys

import pytest
import torch

from kvpack import CodecConfig, compress_tensors
from kvpack.cli.app import main
from kvpack.formats.constants import FORMAT_MAJOR, FORMAT_MINOR
from kvpack.formats.safetensors_io import write_safetensors


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def dump(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"layers.{i}.{r}": torch.randn(1, 2, 10, 32, generator=gen).half() for i in range(2) for r in ("key", "value")
    }
    tensors["token_ids"] = torch.arange(10).reshape(1, 10)
    path = tmp_path / "c.safetensors"
    write_safetensors(path, tensors, {"model": "unit", "seq_len": "10", "dtype": "float16"})
    return path


def assert_one_line_error(code, err, pattern):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--bits", "9"], "bits must be an integer from 1 to 8"),
        (["--bits", "0"], "bits must be"),
        (["--bits", "x"], "--bits"),
        (["--group-size", "24"], "does not divide"),
        (["--method", "zip"], "unknown method 'zip'"),
        (["--method", "uniform", "--codebook-scope", "head"], "unknown option"),
        (["--outlier-ratio", "0.7"], "outlier ratio"),
        (["--codebook-scope", "layer"], "codebook_scope must be one of"),
    ],
)
def test_compress_bad_options(dump, tmp_path, capsys, extra, pattern):
    code, _, err = run(["compress", dump, "-o", tmp_path / "o.kvp", *extra], capsys)
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "o.kvp").exists()


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


def test_output_exists_needs_force(dump, tmp_path, capsys):
    target = tmp_path / "c.kvp"
    target.write_bytes(b"precious")
    code, _, err = run(["compress", dump, "-o", target], capsys)
    assert_one_line_error(code, err, "exists (pass --force to overwrite it)")
    assert target.read_bytes() == b"precious"
    code, _, _ = run(["compress", dump, "-o", target, "--force"], capsys)
    assert code == 0 and target.read_bytes() != b"precious"


def test_special_files_are_never_replaced_and_links_are_followed(dump, tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, _, err = run(["compress", dump, "-o", fifo, "--force"], capsys)
    assert_one_line_error(code, err, "is not a regular file")
    assert fifo.is_fifo()
    real = tmp_path / "real.kvp"
    real.write_bytes(b"old")
    link = tmp_path / "link.kvp"
    link.symlink_to(real)
    code, _, _ = run(["compress", dump, "-o", link, "--force"], capsys)
    assert code == 0 and link.is_symlink() and real.read_bytes()[:8] == b"\x89KVP\r\n\x1a\n"
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    code, _, err = run(["compress", dump, "-o", tmp_path / "loop1", "--force"], capsys)
    assert_one_line_error(code, err, "cannot follow the link")


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


def test_corrupted_kvp_through_the_cli(dump, tmp_path, capsys):
    path = tmp_path / "c.kvp"
    compress_tensors({"layers.0.key": torch.randn(1, 1, 4, 8)}, path, CodecConfig.build("uniform", 4, 8))
    data = bytearray(path.read_bytes())
    data[70] ^= 0x01
    path.write_bytes(bytes(data))
    code, _, err = run(["decompress", path, "-o", tmp_path / "o.safetensors"], capsys)
    assert_one_line_error(code, err, "checksum mismatch")
    assert not (tmp_path / "o.safetensors").exists()


def test_real_subprocess_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.kvp"
    bad.write_bytes(b"\x89KVP\r\n\x1a\n" + b"\xff" * 100)
    result = subprocess.run([sys.executable, "-m", "kvpack", "inspect", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_methods_lists_the_registry(capsys):
    code, out, _ = run(["methods"], capsys)
    assert code == 0 and all(name in out for name in ("uniform", "normal", "adaptive"))


def test_markup_in_file_contents_is_printed_verbatim(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"layers.0.key": torch.ones(1, 1, 2, 8)}, {"model": "[/bold][link=x]evil"})
    code, out, err = run(["inspect", path], capsys)
    assert code == 0 and "[/bold][link=x]evil" in out
    code, out, _ = run(["compress", path, "-o", tmp_path / "m.kvp", "--group-size", "8"], capsys)
    assert code == 0
    code, out, _ = run(["inspect", tmp_path / "m.kvp", "--tensors"], capsys)
    assert code == 0 and "[/bold][link=x]evil" in out


def test_unwritable_output_folder(dump, capsys):
    code, _, err = run(["compress", dump, "-o", "/proc/kvpack-test.kvp"], capsys)
    assert_one_line_error(code, err, "cannot write to /proc")


def test_json_report_may_not_replace_input_or_output(dump, tmp_path, capsys):
    before = dump.read_bytes()
    for target in (dump, tmp_path / "o.kvp"):
        code, _, err = run(["compress", dump, "-o", tmp_path / "o.kvp", "--json", target, "--force"], capsys)
        assert_one_line_error(code, err, "must differ from the input and the output")
    assert dump.read_bytes() == before and not (tmp_path / "o.kvp").exists()


def test_decompress_refuses_to_replace_its_input(tmp_path, capsys):
    path = tmp_path / "c.kvp"
    compress_tensors({"layers.0.key": torch.randn(1, 1, 4, 8)}, path, CodecConfig.build("uniform", 4, 8))
    before = path.read_bytes()
    code, _, err = run(["decompress", path, "-o", path, "--force"], capsys)
    assert_one_line_error(code, err, "same file")
    assert path.read_bytes() == before


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


def test_inspect_verify_finds_a_corrupted_section(tmp_path, capsys):
    path = tmp_path / "v.kvp"
    compress_tensors({"layers.0.key": torch.randn(1, 1, 64, 8)}, path, CodecConfig.build("uniform", 4, 8))
    code, out, _ = run(["inspect", path, "--verify"], capsys)
    assert code == 0 and "verified: all 3 sections match their checksums" in out
    data = bytearray(path.read_bytes())
    data[80] ^= 0x10  # inside the codes section
    path.write_bytes(bytes(data))
    code, _, _ = run(["inspect", path], capsys)
    assert code == 0  # without --verify the sections are not read
    code, _, err = run(["inspect", path, "--verify"], capsys)
    assert_one_line_error(code, err, "checksum mismatch in section codes")


def test_input_is_validated_before_the_output_check(dump, tmp_path, capsys):
    existing = tmp_path / "exists.kvp"
    existing.write_bytes(b"old")
    code, _, err = run(["compress", dump, "-o", existing, "-g", "24"], capsys)
    assert_one_line_error(code, err, "does not divide")
    assert existing.read_bytes() == b"old"
