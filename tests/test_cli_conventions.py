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
from kvpack.stats import BIT_COLUMNS

REPO = Path(__file__).resolve().parents[1]


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


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
    import kvpack.cli.render as render
    from rich.console import Console

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
