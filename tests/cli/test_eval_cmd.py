"""`kvpack eval` (kvpack.cli.eval_cmd): its JSON names, the token level, and refused method choices."""

from __future__ import annotations

import json

import pytest

from kvpack.cli.app import main
from kvpack.formats.reader import KvpReader
from tests.cli_helpers import run
from tests.conftest import wikitext_excerpt


def test_eval_refuses_mixed_method_choices(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["eval", "--text-file", str(text), "--baseline", "kivi-2-r0", "--bits", "3"]) == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert main(["eval", "--text-file", str(text), "--baseline", "int3"]) == 2
    assert "unknown baseline 'int3'" in capsys.readouterr().err


@pytest.mark.model
def test_cli_eval_json_has_the_documented_names(cli_model, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(wikitext_excerpt(), encoding="utf-8")
    out = tmp_path / "r.json"
    args = ["eval", "--text-file", str(text), "--prefix", "64", "--continuation", "16", "--windows", "2"]
    assert main([*args, "-m", "normal", "-b", "3", "--normalization", "minmax", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("ppl_ref", "ppl", "delta_ppl_pct", "kl_mean", "top1_agreement_pct", "bits_per_element"):
        assert isinstance(report[key], float), key
    assert len(report["attention_error"]) == 30
    assert report["config"]["method"] == "normal" and report["config"]["params"]["normalization"] == "minmax"
    assert "ΔPPL" in capsys.readouterr().out
    assert main([*args, "--windows", "200"]) == 2
    assert "windows of 64 + 16 + 1 tokens need" in capsys.readouterr().err


LAYERS, HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M


@pytest.mark.model
def test_eval_at_the_token_level_on_the_model(cli_model, tmp_path, capsys):
    from tests.conftest import wikitext_excerpt

    text = tmp_path / "wiki.txt"
    text.write_text(wikitext_excerpt(), encoding="utf-8")
    args = ["eval", "--text-file", text, "--prefix", "64", "--continuation", "16", "--windows", "2", "--json", "-"]
    code, stdout, err = run([*args, "-m", "uniform", "-b", "4", "--level", "token"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["config"]["stack_layers"] is True and report["config"]["group_size"] == LAYERS * HEADS * HEAD_DIM
    # 4-bit codes and a scale per token, after the entropy stage (one grid for a whole token: mostly middle codes)
    assert 1.0 < report["bits_per_element"] < 4.2 and report["kl_mean"] > 0
    code, stdout, err = run(["dump", "--text-file", text, "-o", tmp_path / "d.kvp", "--level", "token"], capsys)
    assert code == 0, err
    with KvpReader(tmp_path / "d.kvp") as reader:
        assert reader.entry("layers.all.value").codec.stack_layers
