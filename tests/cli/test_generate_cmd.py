"""`kvpack dump` to a .kvp, then `kvpack generate` (kvpack.cli.generate_cmd) continues it exactly."""

from __future__ import annotations

import json

import pytest
import torch

from kvpack.cli.app import main


@pytest.mark.model
def test_cli_dump_kvp_then_generate(cli_model, wiki_ids, tmp_path, capsys):
    text = tmp_path / "prompt.txt"
    text.write_text(cli_model.tokenizer.decode(wiki_ids[0, :200]), encoding="utf-8")
    path = tmp_path / "prompt.kvp"
    args = ["dump", "--text-file", str(text), "-o", str(path), "--lossless", "--dtype", "float32"]
    assert main(args) == 0
    assert "lossless float32" in capsys.readouterr().out
    assert main(["generate", "--cache", str(path), "--prompt-suffix", " The", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    from kvpack.model.dump import tokenize

    full = torch.cat([tokenize(cli_model.tokenizer, text.read_text()), tokenize(cli_model.tokenizer, " The")], 1)
    with torch.no_grad():
        expected = cli_model.model.generate(
            input_ids=full, attention_mask=torch.ones_like(full), max_new_tokens=8, do_sample=False
        )[0, full.shape[1] :]
    assert out.rstrip("\n") == cli_model.tokenizer.decode(expected, skip_special_tokens=True)
    # compressed in one step: 4-bit uniform, then restored and continued
    small = tmp_path / "small.kvp"
    assert main(["dump", "--text-file", str(text), "-o", str(small), "-m", "uniform", "-b", "4"]) == 0
    assert "uniform 4-bit, group 64" in capsys.readouterr().out
    assert main(["generate", "--cache", str(small), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    # a file naming another model never makes generate load it (cli_model refuses any other name)
    from tests.kvp_bytes import dumps, header_json, with_header

    header = json.loads(header_json(small.read_bytes()))
    header["metadata"].update(model="evil/remote-model", weights_fingerprint="0" * 16)
    other = tmp_path / "other.kvp"
    other.write_bytes(with_header(small.read_bytes(), dumps(header)))
    assert main(["generate", "--cache", str(other), "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model: file evil/remote-model" in err[0] and "generate --model" in err[0]
