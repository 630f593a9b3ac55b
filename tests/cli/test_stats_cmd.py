"""What a new user hit in reports and messages: NaN/Inf in `stats`, one wrong-magic message everywhere."""

import pytest
import torch

from kvpack.cli.app import main
from kvpack.formats.safetensors_io import write_safetensors


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err):
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["original", "reconstructed"])
def test_stats_refuses_nan_or_inf_in_either_cache(tmp_path, capsys, bad, which):
    good_values = torch.randn(1, 2, 8, 4)
    bad_values = good_values.clone()
    bad_values[0, 1, 3, 2] = bad
    good, broken = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    write_safetensors(good, {"layers.0.key": good_values}, {})
    write_safetensors(broken, {"layers.0.key": bad_values}, {})
    pair = [good, broken] if which == "reconstructed" else [broken, good]
    for extra in ([], ["--json"]):
        code, out, err = run(["stats", *pair, *extra], capsys)
        line = one_line_error(code, err)
        assert f"{broken}: tensor 'layers.0.key' holds 1 NaN or Inf values" in line
        assert out == ""


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
