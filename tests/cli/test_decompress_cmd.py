"""`kvpack decompress` (kvpack.cli.decompress_cmd): corrupted input, never replacing its input."""

import torch

from kvpack import CodecConfig, compress_tensors
from tests.cli_helpers import assert_one_line_error, run


def test_corrupted_kvp_through_the_cli(dump, tmp_path, capsys):
    path = tmp_path / "c.kvp"
    compress_tensors({"layers.0.key": torch.randn(1, 1, 4, 8)}, path, CodecConfig.build("uniform", 4, 8))
    data = bytearray(path.read_bytes())
    data[70] ^= 0x01
    path.write_bytes(bytes(data))
    code, _, err = run(["decompress", path, "-o", tmp_path / "o.safetensors"], capsys)
    assert_one_line_error(code, err, "checksum mismatch")
    assert not (tmp_path / "o.safetensors").exists()


def test_decompress_refuses_to_replace_its_input(tmp_path, capsys):
    path = tmp_path / "c.kvp"
    compress_tensors({"layers.0.key": torch.randn(1, 1, 4, 8)}, path, CodecConfig.build("uniform", 4, 8))
    before = path.read_bytes()
    code, _, err = run(["decompress", path, "-o", path, "--force"], capsys)
    assert_one_line_error(code, err, "same file")
    assert path.read_bytes() == before
