"""Conventions every command follows: tables never cut a cell, one ``--json [PATH|-]`` option,
unambiguous KIVI names, literal brackets in --help, sweep configs that work from a clone."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvpack import CodecConfig, compress_tensors
from kvpack.cli.app import main
from kvpack.report import BIT_COLUMNS
from tests.cli_helpers import run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_kvp(tmp_path):
    """A .kvp of one layer, random float16 K/V of shape (1, 2, 64, 32), uniform 4-bit in groups of 32."""
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layers.0.{role}": torch.randn(1, 2, 64, 32, generator=gen).half() for role in ("key", "value")}
    path = tmp_path / "small.kvp"
    config = CodecConfig.build("uniform", bits=4, group_size=32)
    compress_tensors(tensors, path, config, {"model": "unit", "note": "a value long enough to need wrapping " * 3})
    return path


def cli_subprocess(args, columns=40, **kwargs):
    """``python -m kvpack ARGS`` with stdout a pipe and ``COLUMNS`` set (as in a log or ``| less``)."""
    env = dict(os.environ, COLUMNS=str(columns), PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "kvpack", *map(str, args)], capture_output=True, text=True, env=env, **kwargs
    )


def bits_cells(info: dict) -> dict[str, list[str]]:
    """The cells the bits table must show for each row, formatted as render.bits_table formats them."""
    rows = {}
    for part in ("key", "value", "all"):
        row = info["size"]["rows"][part]
        bits = row["bits_per_element"]
        rows[part] = [f"{bits[c]:.3f}" for c in BIT_COLUMNS] + [f"{bits['total']:.3f}", f"{row['ratio_vs_fp16']:.2f}x"]
    return rows


# --- 1. tables are never cut ----------------------------------------------------------------


def test_piped_tables_keep_every_cell_whole_at_40_columns(small_kvp, capsys):
    code, out, _ = run(["inspect", small_kvp, "--json"], capsys)
    info = json.loads(out)
    assert code == 0
    result = cli_subprocess(["inspect", small_kvp, "--tensors"], columns=40)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    lines = result.stdout.splitlines()
    for part, cells in bits_cells(info).items():
        # not a terminal: each row on one line, every number in full
        row = [line for line in lines if line.startswith(f"│ {part} ")]
        assert len(row) == 1 and all(cell in row[0] for cell in cells), (part, cells, result.stdout)
    for column in (*BIT_COLUMNS, "vs fp16"):
        assert column in result.stdout
    for tensor in info["tensors"]:
        assert f"{tensor['bits_per_element']:.3f}" in result.stdout and f"{tensor['bytes']:,}" in result.stdout
    assert info["metadata"]["note"] in result.stdout  # text cells whole and unwrapped in a pipe


def test_narrow_terminal_wraps_text_but_never_cuts(small_kvp, capsys, monkeypatch):
    from rich.console import Console

    import kvpack.cli.render as render

    code, out, _ = run(["inspect", small_kvp, "--json"], capsys)
    info = json.loads(out)
    screen = io.StringIO()
    monkeypatch.setattr(render, "console", Console(file=screen, force_terminal=True, width=40, color_system=None))
    assert main(["inspect", str(small_kvp), "--tensors"]) == 0
    text = screen.getvalue()
    assert "…" not in text
    for cells in bits_cells(info).values():
        assert all(cell in text for cell in cells)
    # the long metadata value wraps inside its column (the terminal is 40 wide), word by word
    words = info["metadata"]["note"].split()
    assert all(word in text for word in words) and info["metadata"]["note"] not in text


# --- 2. one --json [PATH|-] convention ------------------------------------------------------

COMMANDS = ("dump", "calibrate", "compress", "decompress", "inspect", "stats", "methods", "generate", "eval", "sweep")


def click_commands() -> dict:
    import typer.main

    from kvpack.cli.app import app

    return typer.main.get_command(app).commands


def test_every_command_reports_with_the_same_json_option(capsys):
    from kvpack.cli.options import Command

    commands = click_commands()
    assert set(commands) == set(COMMANDS)
    for name, cmd in commands.items():
        assert isinstance(cmd, Command), name  # the class that lets --json go without a value
        (option,) = [p for p in cmd.params if "--json" in getattr(p, "opts", ())]
        assert option.metavar == "[PATH|-]" and option.default is None, name
        assert any("--force" in getattr(p, "opts", ()) for p in cmd.params), name
        code, out, _ = run([name, "--help"], capsys)
        assert code == 0 and "--json" in out and "[PATH|-]" in out, name


@pytest.mark.parametrize(
    "args, expected",
    [
        (["inspect", "f.kvp", "--json"], ["f.kvp", "--json=-"]),  # at the end
        (["inspect", "--json", "f.kvp"], ["--json=-", "f.kvp"]),  # FILE would be missing: the bare flag
        (["inspect", "f.kvp", "--json", "r.json"], ["f.kvp", "--json", "r.json"]),
        (["inspect", "f.kvp", "--json", "-"], ["f.kvp", "--json", "-"]),
        (["inspect", "f.kvp", "--json", "--tensors"], ["f.kvp", "--json=-", "--tensors"]),
        (["inspect", "--json=r.json", "f.kvp"], ["--json=r.json", "f.kvp"]),
        (["stats", "--json", "a", "b"], ["--json=-", "a", "b"]),
        (["stats", "a", "--json", "r.json", "b"], ["a", "--json", "r.json", "b"]),
        (["compress", "c.safetensors", "--json", "-o", "x.kvp"], ["c.safetensors", "--json=-", "-o", "x.kvp"]),
        # an option's value is never taken for --json, nor --json for an option's value
        (["dump", "--prompt", "--json", "-o", "p.kvp"], ["--prompt", "--json", "-o", "p.kvp"]),
        (["compress", "c.safetensors", "-o", "--json"], ["c.safetensors", "-o", "--json"]),
        (["inspect", "--", "--json"], ["--", "--json"]),  # after --, an argument
    ],
)
def test_json_value_may_be_left_out(args, expected):
    from kvpack.cli.options import fill_optional_values

    assert fill_optional_values(click_commands()[args[0]], args[1:]) == expected


def test_inspect_and_stats_json_as_before_and_to_a_file(small_kvp, tmp_path, capsys):
    code, out, _ = run(["inspect", small_kvp, "--json"], capsys)
    info = json.loads(out)  # README: `kvpack inspect x.kvp --json` prints only the JSON
    assert code == 0 and info["format"] == "kvp" and info["metadata"]["model"] == "unit"
    for args in (["inspect", "--json", small_kvp], ["inspect", small_kvp, "--json", "-"]):
        code, out, _ = run(args, capsys)
        assert code == 0 and json.loads(out) == info

    report = tmp_path / "info.json"
    code, out, _ = run(["inspect", small_kvp, "--json", report], capsys)
    assert code == 0 and "bits per element" in out  # the usual output, and the file besides
    assert json.loads(report.read_text()) == info
    report.write_text("precious")
    code, _, err = run(["inspect", small_kvp, "--json", report], capsys)
    assert code == 2 and "exists (pass --force" in err and report.read_text() == "precious"
    code, _, _ = run(["inspect", small_kvp, "--json", report, "--force"], capsys)
    assert code == 0 and json.loads(report.read_text()) == info
    before = small_kvp.read_bytes()
    code, _, err = run(["inspect", small_kvp, "--json", small_kvp, "--force"], capsys)
    assert code == 2 and "must differ from the file inspected" in err and small_kvp.read_bytes() == before

    restored = tmp_path / "r.safetensors"
    assert run(["decompress", small_kvp, "-o", restored], capsys)[0] == 0
    code, out, _ = run(["stats", restored, small_kvp, "--json"], capsys)
    stats = json.loads(out)  # README: `kvpack stats a b --json`
    assert code == 0 and stats["rows"]["all"]["rel_mse"] == 0.0  # the restored file holds the decoded values
    code, out, _ = run(["stats", "--json", restored, small_kvp], capsys)
    assert code == 0 and json.loads(out) == stats
    code, out, _ = run(["stats", restored, small_kvp, "--json", tmp_path / "s.json"], capsys)
    assert code == 0 and "rel MSE" in out and json.loads((tmp_path / "s.json").read_text()) == stats


def test_compress_and_decompress_json(small_kvp, tmp_path, capsys):
    restored = tmp_path / "r.safetensors"
    code, out, _ = run(["decompress", small_kvp, "-o", restored, "--tokens", "8:40", "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["output_bytes"] == restored.stat().st_size and report["tensors"] == 2
    assert report["selection"] == {"layers": None, "names": None, "tokens": [8, 40]} and report["dtype"] is None
    code, out, _ = run(["decompress", small_kvp, "-o", restored, "--force", "--json", tmp_path / "d.json"], capsys)
    assert code == 0 and out.startswith("wrote ")
    assert json.loads((tmp_path / "d.json").read_text())["output_bytes"] == restored.stat().st_size

    # compress: a bare --json before another option prints only the JSON, as --json - did
    code, out, _ = run(["compress", restored, "--json", "-o", tmp_path / "c.kvp", "-m", "uniform", "-g", "32"], capsys)
    report = json.loads(out)
    assert code == 0 and report["file_bytes"] == (tmp_path / "c.kvp").stat().st_size


def test_methods_json_lists_the_registry(tmp_path, capsys):
    from kvpack.codecs import Codec
    from kvpack.evaluation.baselines import BASELINES
    from kvpack.presets import PRESETS

    code, out, _ = run(["methods", "--json"], capsys)
    listing = json.loads(out)
    assert code == 0
    assert [c["name"] for c in listing["codecs"]] == sorted(Codec.registry)
    assert [p["name"] for p in listing["presets"]] == list(PRESETS)
    assert [b["name"] for b in listing["baselines"]] == ["fp16", *BASELINES]
    uniform = next(c for c in listing["codecs"] if c["name"] == "uniform")
    assert uniform["options"] == {"symmetric": False}
    code, out, _ = run(["methods", "--json", tmp_path / "m.json"], capsys)
    assert code == 0 and "presets (--preset NAME" in out and json.loads((tmp_path / "m.json").read_text()) == listing


@pytest.mark.model
def test_dump_and_generate_json(cli_model, tmp_path, capsys):
    prompt = tmp_path / "p.kvp"
    code, out, _ = run(
        ["dump", "--prompt", "The capital of France is", "-o", prompt, "--lossless", "--dtype", "float32", "--json"],
        capsys,
    )
    report = json.loads(out)
    assert code == 0 and report["format"] == "kvp" and report["lossless"] and report["codec"] is None
    assert report["file_bytes"] == prompt.stat().st_size and report["num_layers"] == 30
    assert report["seq_len"] == int(report["metadata"]["seq_len"]) > 0

    code, out, _ = run(
        ["generate", "--cache", prompt, "--prompt-suffix", " Paris.", "--max-new-tokens", "4", "--json"], capsys
    )
    result = json.loads(out)
    assert code == 0 and len(result["token_ids"]) == 4 and result["prompt_tokens"] == report["seq_len"]
    assert result["text"] == cli_model.tokenizer.decode(result["token_ids"], skip_special_tokens=True)
    assert result["suffix_token_ids"] == cli_model.tokenizer(" Paris.", add_special_tokens=False)["input_ids"]
    code, out, _ = run(["generate", "--cache", prompt, "--max-new-tokens", "4", "--json", tmp_path / "g.json"], capsys)
    saved = json.loads((tmp_path / "g.json").read_text())
    assert code == 0 and out.strip() == saved["text"].strip() and len(saved["token_ids"]) == 4


@pytest.mark.model
def test_sweep_json_is_the_results(cli_model, tmp_path, capsys):
    from tests.conftest import wikitext_excerpt

    (tmp_path / "text.txt").write_text(wikitext_excerpt(), encoding="utf-8")
    config = tmp_path / "sweep.toml"
    config.write_text(
        'baselines = ["fp16", "kivi-4-r0"]\n'
        '[eval]\ntext_file = "text.txt"\nprefix = 64\ncontinuation = 16\nwindows = 1\n'
        '[[runs]]\nlabel = "kivi-4-r128"\npreset = "kivi-4-r128"\n[output]\ndir = "out"\n'
    )
    code, out, _ = run(["sweep", "--config", config, "--json"], capsys)
    report = json.loads(out)
    assert code == 0
    assert [r["label"] for r in report["methods"]] == ["fp16", "kivi-4-r0", "kivi-4-r128"]
    assert report == json.loads((tmp_path / "out" / "results.json").read_text())
    code, out, _ = run(["sweep", "--config", config, "--force", "--json", tmp_path / "s.json"], capsys)
    assert code == 0 and "Pareto" in out
    assert [r["label"] for r in json.loads((tmp_path / "s.json").read_text())["methods"]] == [
        r["label"] for r in report["methods"]
    ]


# --- 3. KIVI names say what they store --------------------------------------------------------


def assert_one_line_error(code, err, *patterns):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(p in lines[0] for p in patterns), err


@pytest.fixture
def long_dump(tmp_path):
    """A safetensors dump of one layer, 192 tokens (six KIVI groups of 32), random float16 K/V."""
    from kvpack.formats.safetensors_io import write_safetensors

    gen = torch.Generator().manual_seed(2)
    tensors = {f"layers.0.{r}": torch.randn(1, 2, 192, 32, generator=gen).half() for r in ("key", "value")}
    tensors["token_ids"] = torch.arange(192).reshape(1, 192)
    path = tmp_path / "long.safetensors"
    write_safetensors(path, tensors, {"model": "unit", "seq_len": "192", "dtype": "float16"})
    return path, tensors


def test_kivi_preset_keeps_128_recent_tokens_and_the_baseline_none(long_dump, tmp_path, capsys):
    from kvpack.evaluation.baselines import BASELINES
    from kvpack.formats.safetensors_io import SafetensorsSource

    path, tensors = long_dump
    out = tmp_path / "r128.kvp"
    code, _, _ = run(["compress", path, "-o", out, "--preset", "kivi-4-r128"], capsys)
    assert code == 0
    restored = tmp_path / "r128.safetensors"
    assert run(["decompress", out, "-o", restored], capsys)[0] == 0
    with SafetensorsSource(restored) as source:
        for role in ("key", "value"):
            x, x_hat = tensors[f"layers.0.{role}"], source.get(f"layers.0.{role}")
            assert torch.equal(x_hat[:, :, -128:], x[:, :, -128:])  # r128: the last 128 tokens exact
            assert not torch.equal(x_hat[:, :, :64], x[:, :, :64])  # the older ones quantized

    for role in ("key", "value"):  # r0: every token quantized, 4 bits + a float16 scale and zero per 32
        x = tensors[f"layers.0.{role}"]
        x_hat, bits = BASELINES["kivi-4-r0"].reconstruct(f"layers.0.{role}", x)
        assert bits / x.numel() == pytest.approx(5.0)
        recent = (x_hat[:, :, -128:] == x[:, :, -128:].float()).float().mean()
        assert recent < 0.5


@pytest.mark.parametrize("old", ["kivi-2", "kivi-4"])
def test_old_kivi_names_fail_naming_the_new_ones(old, long_dump, tmp_path, capsys):
    path, _ = long_dump
    code, _, err = run(["compress", path, "-o", tmp_path / "x.kvp", "--preset", old], capsys)
    assert_one_line_error(code, err, f"preset '{old}' was renamed", f"{old}-r128", f"{old}-r0")
    assert not (tmp_path / "x.kvp").exists()
    text = tmp_path / "t.txt"
    text.write_text("some text")
    code, _, err = run(["eval", "--text-file", text, "--baseline", old], capsys)
    assert_one_line_error(code, err, f"baseline '{old}' was renamed", f"{old}-r0", f"{old}-r128")
    for toml in (f'baselines = ["{old}"]\n', f'[[runs]]\npreset = "{old}"\n'):
        config = tmp_path / "s.toml"
        config.write_text(toml + '[eval]\ntext_file = "t.txt"\n')
        code, _, err = run(["sweep", "--config", config], capsys)
        assert_one_line_error(code, err, str(config), f"'{old}' was renamed", f"{old}-r0", f"{old}-r128")


def test_methods_lists_the_unambiguous_names(capsys):
    code, out, _ = run(["methods", "--json"], capsys)
    listing = json.loads(out)
    presets = {p["name"]: p for p in listing["presets"]}
    baselines = {b["name"] for b in listing["baselines"]}
    assert {"kivi-2-r128", "kivi-4-r128"} <= set(presets) and {"kivi-2-r0", "kivi-4-r0"} <= baselines
    assert not {"kivi-2", "kivi-4"} & (set(presets) | baselines)
    assert presets["kivi-4-r128"]["options"]["transforms"]["keep_last"] == 128
    for config in ("quality.toml", "toolbox.toml"):  # the bench configs load with the new names
        from kvpack.evaluation.sweep import load_sweep_config

        labels = [m.label for m in load_sweep_config(REPO / "bench" / config).methods]
        assert "kivi-2-r0" in labels and "kivi-4-r0" in labels


# --- 4. help shows brackets as written -------------------------------------------------------


def test_sweep_help_shows_runs_tables(capsys):
    code, out, _ = run(["sweep", "--help"], capsys)
    assert code == 0 and out.count("[[runs]]") == 2  # the summary and the example configs


def test_every_bracket_of_every_help_text_is_printed(capsys):
    import re

    tokens = re.compile(r"\[[^\]\s]*\]+")
    for name, cmd in click_commands().items():
        code, out, _ = run([name, "--help"], capsys)
        assert code == 0
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for text in texts:
            for token in tokens.findall(text.replace("\\", "")):
                assert token in out, (name, token)


# --- 5. the quality config works from a clone beside shared/ ---------------------------------


def test_quality_config_works_from_a_clone_beside_shared(tmp_path, capsys, monkeypatch):
    import shutil

    import kvpack.model.dump
    from kvpack.errors import ModelUnavailableError
    from kvpack.evaluation.sweep import load_sweep_config

    clone = tmp_path / "kvpack"  # a fresh clone, with shared/ beside it
    (clone / "bench").mkdir(parents=True)
    config = clone / "bench" / "quality.toml"
    shutil.copy(REPO / "bench" / "quality.toml", config)
    text = tmp_path / "shared" / "data" / "wikitext-2-raw-test.txt"
    settings = load_sweep_config(config)
    assert settings.text_file == text  # relative to the config's folder, named without ".."
    assert load_sweep_config(REPO / "bench" / "quality.toml").text_file == REPO.parent / text.relative_to(tmp_path)

    code, _, err = run(["sweep", "--config", config], capsys)  # no WikiText-2 copy yet
    assert_one_line_error(code, err, str(config), str(text), "does not exist; put the text there")

    # the results go to a folder the repository does not track: a clone's first sweep needs no --force
    if (REPO / ".git").exists():
        folder = settings.output_dir.relative_to(clone)
        tracked = subprocess.run(["git", "ls-files", str(folder)], cwd=REPO, capture_output=True, text=True)
        assert tracked.returncode == 0 and tracked.stdout == ""

    text.parent.mkdir(parents=True)
    text.write_text("A short stand-in for the WikiText-2 test split.\n", encoding="utf-8")

    def model_reached(*args, **kwargs):
        raise ModelUnavailableError("every check before the model passed")

    monkeypatch.setattr(kvpack.model.dump, "load_model", model_reached)
    code, _, err = run(["sweep", "--config", config], capsys)
    assert_one_line_error(code, err, "every check before the model passed")
