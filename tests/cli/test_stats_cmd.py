"""`kvpack stats` (kvpack.cli.stats_cmd): NaN or Inf in either cache is refused in one line."""

import pytest
import torch

from kvpack.formats.safetensors_io import write_safetensors
from tests.cli_helpers import run


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
