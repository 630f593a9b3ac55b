"""Library errors name options in API terms; the command line shows its flags for the same errors."""

import pytest
import torch

from kvpack import CodecConfig, compress_tensors
from kvpack.allocation.solver import Allocation
from kvpack.cli.app import main
from kvpack.errors import InvalidInputError, OutputExistsError
from kvpack.formats.safetensors_io import write_safetensors


def cli_error(args, capsys):
    code = main([str(a) for a in args])
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.fixture
def dump(tmp_path):
    path = tmp_path / "c.safetensors"
    write_safetensors(path, {"layers.0.key": torch.randn(1, 2, 8, 64).half()}, {})
    return path


def test_output_exists_says_force_true_in_the_api_and_force_on_the_command_line(dump, tmp_path, capsys):
    out = tmp_path / "c.kvp"
    compress_tensors({"layers.0.key": torch.randn(1, 2, 8, 64)}, out, CodecConfig.build("uniform", 4, 64))
    with pytest.raises(OutputExistsError) as raised:
        compress_tensors({"layers.0.key": torch.randn(1, 2, 8, 64)}, out, CodecConfig.build("uniform", 4, 64))
    assert "pass `force=True` to overwrite it" in str(raised.value) and "--" not in str(raised.value)
    assert (
        cli_error(["compress", dump, "-o", out], capsys) == f"error: output {out} exists (pass --force to overwrite it)"
    )


@pytest.mark.parametrize(
    "build, api_words, cli_args, cli_words",
    [
        (
            lambda: CodecConfig.build("uniform", 4, 64, transforms={"rotate_seed": 3}),
            "`rotate_seed` only applies with `rotate=hadamard`",
            ["--rotate", "none", "--rotate-seed", "3"],
            "--rotate-seed only applies with --rotate hadamard",
        ),
        (
            lambda: Allocation("target"),
            "`allocate=target` needs exactly one of `target_bits` and `max_error`",
            ["--allocate", "target"],
            "--allocate target needs exactly one of --target-bits and --max-error",
        ),
        (
            lambda: Allocation("target", target_bits=-1.0),
            "`target_bits` must be a number of bits per element above 0",
            ["--allocate", "target", "--target-bits", "-1"],
            "--target-bits must be a number of bits per element above 0",
        ),
    ],
)
def test_the_same_error_in_api_and_cli_terms(dump, tmp_path, capsys, build, api_words, cli_args, cli_words):
    with pytest.raises(InvalidInputError) as raised:
        build()
    assert api_words in str(raised.value) and " --" not in str(raised.value)
    line = cli_error(["compress", dump, "-o", tmp_path / "x.kvp", *cli_args], capsys)
    assert cli_words in line and "`" not in line
    assert not (tmp_path / "x.kvp").exists()
