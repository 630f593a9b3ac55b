"""`kvpack dump` (kvpack.cli.dump_cmd): option combinations refused before the model loads."""

from __future__ import annotations

from kvpack.cli.app import main
from tests.cli_helpers import run


def test_dump_refuses_attention_statistics_it_cannot_store(tmp_path, capsys):
    # both refused before the model loads (no model needed)
    code, _, err = run(["dump", "--attention-stats", "-o", tmp_path / "d.kvp", "--lossless"], capsys)
    assert code == 2 and "--attention-stats needs a .safetensors output" in err
    code, _, err = run(["dump", "--attention-stats", "--last-n-queries", "0", "-o", tmp_path / "d.safetensors"], capsys)
    assert code == 2 and "--last-n-queries must be at least 1" in err
    assert not list(tmp_path.iterdir())


def test_dump_codec_options_need_a_kvp_output(tmp_path, capsys):
    assert main(["dump", "-o", str(tmp_path / "c.safetensors"), "--method", "uniform"]) == 2
    assert "--method only applies to a .kvp output" in capsys.readouterr().err
    assert main(["dump", "-o", str(tmp_path / "c.kvp"), "--lossless", "--bits", "3"]) == 2
    assert "--lossless stores K/V exactly" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
