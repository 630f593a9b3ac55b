"""`kvpack compress` (kvpack.cli.compress_cmd): options, outputs, reports and one-line errors."""

import json
import math
import os

import pytest
import torch
from safetensors import safe_open

from kvpack.cli.app import main
from kvpack.formats.reader import KvpReader
from kvpack.presets import PRESETS
from tests.cli_helpers import assert_one_line_error, run


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


def test_unwritable_output_folder(dump, capsys):
    code, _, err = run(["compress", dump, "-o", "/proc/kvpack-test.kvp"], capsys)
    assert_one_line_error(code, err, "cannot write to /proc")


def test_json_report_may_not_replace_input_or_output(dump, tmp_path, capsys):
    before = dump.read_bytes()
    for target in (dump, tmp_path / "o.kvp"):
        code, _, err = run(["compress", dump, "-o", tmp_path / "o.kvp", "--json", target, "--force"], capsys)
        assert_one_line_error(code, err, "must differ from the input and the output")
    assert dump.read_bytes() == before and not (tmp_path / "o.kvp").exists()


def test_input_is_validated_before_the_output_check(dump, tmp_path, capsys):
    existing = tmp_path / "exists.kvp"
    existing.write_bytes(b"old")
    code, _, err = run(["compress", dump, "-o", existing, "-g", "24"], capsys)
    assert_one_line_error(code, err, "does not divide")
    assert existing.read_bytes() == b"old"


# Relative MSE ceilings per (method, bits), about 2x above what these codecs measure on
# SmolLM2 keys and values (docs/benchmarks.md); a regression in any codec breaks them.
CEILINGS = {
    ("uniform", 2): (0.8, 0.5),
    ("uniform", 3): (0.16, 0.09),
    ("uniform", 4): (0.035, 0.02),
    ("normal", 2): (0.6, 0.32),
    ("normal", 3): (0.4, 0.14),
    ("normal", 4): (0.3, 0.07),
    ("adaptive", 2): (0.28, 0.26),
    ("adaptive", 3): (0.065, 0.065),
    ("adaptive", 4): (0.017, 0.016),
}


@pytest.mark.model
@pytest.mark.parametrize("method", ["uniform", "normal", "adaptive"])
def test_compress_decompress_each_method_within_bounds(real_dump, tmp_path, method):
    for bits in (2, 3, 4):
        kvp, report_path, restored = (
            tmp_path / f"{bits}.kvp",
            tmp_path / f"{bits}.json",
            tmp_path / f"{bits}.safetensors",
        )
        assert (
            main(
                [
                    "compress",
                    str(real_dump),
                    "-o",
                    str(kvp),
                    "--method",
                    method,
                    "--bits",
                    str(bits),
                    "--group-size",
                    "64",
                    "--json",
                    str(report_path),
                ]
            )
            == 0
        )
        report = json.loads(report_path.read_text())
        rows = report["rows"]
        # the entropy stage (on by default) stores fewer code bits than the dense width, never more
        assert 0.5 * bits < rows["all"]["bits_per_element"]["codes"] < bits
        assert rows["all"]["dense_bits_per_element"] > rows["all"]["bits_per_element"]["total"]
        assert rows["all"]["bits_per_element"]["total"] * report["kv_elements"] == pytest.approx(kvp.stat().st_size * 8)
        key_ceiling, value_ceiling = CEILINGS[(method, bits)]
        assert rows["key"]["rel_mse"] < key_ceiling and rows["value"]["rel_mse"] < value_ceiling
        assert main(["decompress", str(kvp), "-o", str(restored)]) == 0
        with KvpReader(kvp) as reader, safe_open(str(restored), "pt") as out, safe_open(str(real_dump), "pt") as src:
            assert out.metadata()["model"] == src.metadata()["model"]
            assert torch.equal(out.get_tensor("token_ids"), src.get_tensor("token_ids"))
            err = ref = 0.0
            for name in reader.keys():
                if name == "token_ids":
                    continue
                x, y = src.get_tensor(name).double(), out.get_tensor(name).double()
                assert y.shape == x.shape and out.get_tensor(name).dtype == torch.float16
                err += float(((x - y) ** 2).sum())
                ref += float((x**2).sum())
        assert err / ref == pytest.approx(rows["all"]["rel_mse"], rel=1e-6)


@pytest.mark.model
def test_cli_compress_with_every_flag_and_presets(tmp_path, real_dump, capsys):
    out = tmp_path / "x.kvp"
    args = ["compress", real_dump, "-o", out, "--json", "-"]
    flags = [
        "--method", "uniform", "--bits", "3", "--group-size", "32", "--key-axis", "channel", "--value-axis", "token",
        "--keep-first", "2", "--keep-last", "16", "--outlier-ratio", "0.03", "--outlier-select", "magnitude",
        "--rotate", "hadamard", "--rotate-seed", "9", "--unrope",
    ]  # fmt: skip
    code, stdout, err = run(args + flags, capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["config"]["unrope"] is True  # the run's choice; each key entry carries its layer's rotary dims
    with KvpReader(out) as reader:
        assert {reader.entry(f"layers.{i}.key").codec.rope_dim for i in range(30)} == {64}
    assert report["config"]["rotate_seed"] == 9 and report["config"]["keep_last"] == 16
    assert report["rows"]["all"]["bits_per_element"]["exact"] > 0
    assert report["rows"]["key"]["rel_mse"] < 0.05
    for preset in PRESETS:
        code, stdout, err = run(
            ["compress", real_dump, "-o", out, "--force", "--json", "-", "--preset", preset], capsys
        )
        assert code == 0, (preset, err)
    # a flag overrides the preset
    code, stdout, _ = run(
        ["compress", real_dump, "-o", out, "--force", "--json", "-", "--preset", "kivi-2-r128", "-b", "3"], capsys
    )
    cfg = json.loads(stdout)["config"]
    assert (cfg["bits"], cfg["key_axis"], cfg["group_size"], cfg["keep_last"]) == (3, "channel", 32, 128)
    code, stdout, _ = run(
        ["compress", real_dump, "-o", out, "--force", "--json", "-", "-m", "uniform", "--level", "layer"], capsys
    )
    assert json.loads(stdout)["config"]["group_size"] == 3 * 64
    # a level replaces a preset's group size; an explicit --group-size subdivides the level
    for extra, expected in ((["--level", "layer"], 192), (["--level", "layer", "-g", "96"], 96)):
        code, stdout, _ = run(
            ["compress", real_dump, "-o", out, "--force", "--json", "-", "--preset", "qaq-uniform", *extra], capsys
        )
        assert json.loads(stdout)["config"]["group_size"] == expected
    # an element format's block subdivides the level
    code, stdout, _ = run(
        ["compress", real_dump, "-o", out, "--force", "--json", "-", "-m", "mxfp4", "--level", "head"], capsys
    )
    assert code == 0 and json.loads(stdout)["config"]["group_size"] == 32
    # a .kvp input is named as such, also when --level needs the dump's shape
    code, _, err = run(["compress", out, "-o", tmp_path / "again.kvp", "--level", "head"], capsys)
    assert code == 2 and "already a .kvp file" in err


@pytest.mark.model
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--key-axis", "diagonal"], "--key-axis must be one of"),
        (["--level", "layer", "--key-axis", "channel"], "--level sets the size of token groups"),
        (["--level", "head", "--group-size", "48"], "does not subdivide the head level"),
        (["--preset", "kivi-9"], "unknown preset"),
        (["--method", "mxfp4", "--bits", "3"], "4-bit elements"),
        (["--method", "uniform", "--group-size", "7", "--rotate", "hadamard"], "does not divide"),
        (["--keep-first", "-3"], "--keep-first must be an integer"),
        (["--rotate", "none", "--rotate-seed", "5"], "--rotate-seed only applies"),
        (["--outlier-select", "magnitude"], "--outlier-select only applies"),
    ],
)
def test_cli_refuses_bad_toolbox_flags_in_one_line(tmp_path, real_dump, capsys, flags, message):
    code, out, err = run(["compress", real_dump, "-o", tmp_path / "x.kvp", *flags], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.kvp").exists()


def test_cli_unrope_on_a_dump_without_rotary_frequencies(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"layers.0.key": torch.randn(1, 1, 8, 8).half(), "layers.0.value": torch.randn(1, 1, 8, 8).half()}, path)
    code, _, err = run(["compress", path, "-m", "uniform", "-g", "8", "--unrope"], capsys)
    assert code == 2 and "does not record" in err and "Traceback" not in err


@pytest.mark.model
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--target-bits", "2.5"], "--target-bits need --allocate"),
        (["--allocate", "target"], "needs exactly one of --target-bits and --max-error"),
        (["--allocate", "greedy", "--target-bits", "2"], "--allocate must be one of"),
        (["--allocate", "importance", "--target-bits", "2.5"], "needs attention statistics"),
        (["--allocate", "qaq", "--max-error", "0.1"], "takes --target-bits or --target-error"),
        (["--allocate", "target", "--target-bits", "0.1"], "bits per element this file needs"),
        (["--allocate", "target", "--target-bits", "3", "--bits-min", "5", "--bits-max", "4"], "--bits-min"),
    ],
)
def test_cli_allocation_errors_are_one_line(tmp_path, real_dump, capsys, flags, message):
    code, _, err = run(["compress", real_dump, "-o", tmp_path / "x.kvp", "-m", "uniform", *flags], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.kvp").exists()


@pytest.mark.model
@pytest.mark.parametrize(
    "options", [["--zstd-level", "23"], ["--zstd-level", "-1"], ["--zstd-kinds", "codes,bogus"]], ids=str
)
def test_cli_refuses_bad_entropy_options_in_one_line(options, real_dump, tmp_path, capsys):
    code = main(["compress", str(real_dump), "-o", str(tmp_path / "x.kvp"), *options])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "x.kvp").exists()


@pytest.mark.model
def test_cli_reports_effective_and_dense_bits(real_dump, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert (
        main(["compress", str(real_dump), "-o", str(tmp_path / "x.kvp"), "--method", "uniform", "--json", str(report)])
        == 0
    )
    row = json.loads(report.read_text())["rows"]["all"]
    assert row["bits_per_element"]["total"] < row["dense_bits_per_element"]
    assert abs(row["dense_bits_per_element"] - 4.5) < 0.02  # 4-bit codes + fp16 scale and zero-point per 64
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "x.kvp")]) == 0
    assert "entropy stage:" in capsys.readouterr().out
    assert (
        main(["compress", str(real_dump), "-o", str(tmp_path / "d.kvp"), "--method", "uniform", "--zstd-level", "0"])
        == 0
    )
    assert "entropy stage" not in capsys.readouterr().out


@pytest.mark.model
def test_cli_target_bits_means_the_written_file(real_dump, tmp_path, capsys):
    """`kvpack compress --allocate target --target-bits B` end to end: the file on disk holds B bits per K/V
    element within 2 % (after the entropy stage, header included), and the report shows that number."""
    with safe_open(str(real_dump), "pt") as f:
        elements = sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys() if n.startswith("layers."))
    out, report = tmp_path / "a.kvp", tmp_path / "r.json"
    code, stdout, err = run(
        ["compress", real_dump, "-o", out, "-m", "uniform", "--allocate", "target", "--target-bits", "2.5",
         "--json", report], capsys)  # fmt: skip
    assert code == 0, err
    bits = os.path.getsize(out) * 8 / elements
    assert abs(bits - 2.5) <= 0.05, bits
    assert f"rate control: the file holds {bits:.3f} bits per element of K/V for --target-bits 2.5" in stdout
    assert "warning" not in stdout
    parsed = json.loads(report.read_text())
    assert parsed["kv_elements"] == elements and parsed["rows"]["all"]["bits_per_element"]["total"] == pytest.approx(
        bits
    )
    # more than the widest widths give: the widest file, and one warning line saying so
    code, stdout, err = run(
        ["compress", real_dump, "-o", out, "-m", "uniform", "--allocate", "target", "--target-bits", "6",
         "--bits-max", "4", "--force"], capsys)  # fmt: skip
    assert code == 0, err
    warnings = [line for line in stdout.splitlines() if line.startswith("warning:")]
    bits = os.path.getsize(out) * 8 / elements
    assert len(warnings) == 1 and "--target-bits 6 is out of reach within 2%" in warnings[0], stdout
    assert f"the file holds {bits:.3f} bits per element" in warnings[0] and bits < 4.6
    # less than the narrowest widths' file: one error line, exit code 2, nothing written
    code, _, err = run(
        ["compress", real_dump, "-o", tmp_path / "x.kvp", "-m", "uniform", "--allocate", "target", "--target-bits",
         "0.05"], capsys)  # fmt: skip
    assert_one_line_error(code, err, "--target-bits 0.05 is below the ")
    assert not (tmp_path / "x.kvp").exists()


# --- a codec option is one field of the codec's Params ------------------------------------------


@pytest.fixture
def probe_codec():
    """A throwaway codec registered for one test: uniform with one more ``Params`` field."""
    from dataclasses import dataclass

    from kvpack.codecs import Codec
    from kvpack.codecs.base import option
    from kvpack.codecs.uniform import UniformCodec, UniformParams

    @dataclass(frozen=True)
    class ProbeParams(UniformParams):
        sharpness: float = option(1.0, "How sharp the probe codec is")

    class ProbeCodec(UniformCodec):
        name = "probe"
        Params = ProbeParams

    try:
        yield ProbeCodec
    finally:
        Codec.registry.pop("probe", None)


def test_a_codec_params_field_is_a_flag_of_compress_eval_and_dump(probe_codec, dump, tmp_path, capsys):
    from kvpack.codecs import Codec

    for name in ("compress", "eval", "dump"):  # every run builds the commands from the registry
        code, out, _ = run([name, "--help"], capsys)
        assert code == 0 and out.count("--sharpness") == 1 and "How sharp the probe" in out, name
        assert out.count("--symmetric") == 1  # a field name several codecs share is one option

    out = tmp_path / "p.kvp"
    code, _, err = run(["compress", dump, "-o", out, "--method", "probe", "--sharpness", "2.5", "--symmetric"], capsys)
    assert code == 0, err
    code, listing, _ = run(["inspect", out, "--json"], capsys)
    params = {tensor["name"]: tensor["codec"]["params"] for tensor in json.loads(listing)["tensors"] if tensor["codec"]}
    assert params and all(p == {"symmetric": True, "sharpness": 2.5} for p in params.values()), params
    # validated by the Params dataclass: a codec without the field, a value of the wrong type
    code, _, err = run(["compress", dump, "-o", tmp_path / "u.kvp", "--method", "uniform", "--sharpness", "2"], capsys)
    assert_one_line_error(code, err, "unknown option")
    code, _, err = run(["compress", dump, "-o", tmp_path / "u.kvp", "--method", "probe", "--sharpness", "x"], capsys)
    assert_one_line_error(code, err, "--sharpness")

    Codec.registry.pop("probe")
    code, out, _ = run(["compress", "--help"], capsys)
    assert code == 0 and "--sharpness" not in out and "--symmetric" in out
