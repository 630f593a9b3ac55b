"""`kvpack sweep` (kvpack.cli.sweep_cmd): table, CSV, JSON and plot; a bad config in one line."""

from __future__ import annotations

import csv
import json

import pytest

from kvpack.cli.app import main
from tests.conftest import wikitext_excerpt


def test_sweep_cli_bad_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "sweep.toml"
    path.write_text("[grid]\nmethods = ['uniform']\nbits = [2]\n")
    assert main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "group_sizes" in err
    assert main(["sweep", "--config", str(tmp_path / "missing.toml")]) == 2


@pytest.mark.model
def test_cli_sweep_writes_table_csv_json_and_plot(cli_model, tmp_path, capsys):
    (tmp_path / "t.txt").write_text(wikitext_excerpt(), encoding="utf-8")
    (tmp_path / "s.toml").write_text(
        'baselines = ["fp16", "fp8-e4m3", "kivi-4-r0"]\n[eval]\ntext_file = "t.txt"\nprefix = 64\ncontinuation = 16\n'
        'windows = 1\n[grid]\nmethods = ["uniform"]\nbits = [2, 4]\ngroup_sizes = [64]\n'
    )
    assert main(["sweep", "--config", str(tmp_path / "s.toml")]) == 0
    out = capsys.readouterr().out
    assert "* fp16" in out and "uniform-2 g64" in out
    rows = list(csv.DictReader((tmp_path / "sweep-results" / "results.csv").open()))
    assert [r["label"] for r in rows] == ["fp16", "fp8-e4m3", "kivi-4-r0", "uniform-2 g64", "uniform-4 g64"]
    by_label = {r["label"]: r for r in rows}
    assert float(by_label["uniform-2 g64"]["kl_mean"]) > float(by_label["uniform-4 g64"]["kl_mean"]) > 0
    assert by_label["fp16"]["pareto"] == "True"
    assert (tmp_path / "sweep-results" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "sweep-results" / "results.json").read_text())
    assert len(data["methods"]) == 5 and data["protocol"]["windows"] == 1
    # a second run without --force leaves the results alone
    before = (tmp_path / "sweep-results" / "results.csv").read_bytes()
    assert main(["sweep", "--config", str(tmp_path / "s.toml")]) == 2
    assert "exists" in capsys.readouterr().err
    assert (tmp_path / "sweep-results" / "results.csv").read_bytes() == before
