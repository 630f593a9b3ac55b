"""`kvpack inspect` (kvpack.cli.inspect_cmd): --verify, and file contents printed verbatim."""

import torch

from kvpack import CodecConfig, compress_tensors
from kvpack.formats.safetensors_io import write_safetensors
from tests.cli_helpers import assert_one_line_error, run


def test_markup_in_file_contents_is_printed_verbatim(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"layers.0.key": torch.ones(1, 1, 2, 8)}, {"model": "[/bold][link=x]evil"})
    code, out, err = run(["inspect", path], capsys)
    assert code == 0 and "[/bold][link=x]evil" in out
    code, out, _ = run(["compress", path, "-o", tmp_path / "m.kvp", "--group-size", "8"], capsys)
    assert code == 0
    code, out, _ = run(["inspect", tmp_path / "m.kvp", "--tensors"], capsys)
    assert code == 0 and "[/bold][link=x]evil" in out


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
