"""Calibration on the real SmolLM2 and the transform codec on its real caches (kvpack calibrate, method transform)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvpack.allocation.solver import Allocation
from kvpack.compress import compress_file
from kvpack.config import CodecConfig
from kvpack.formats.safetensors_io import SafetensorsSource
from kvpack.profile import PROFILES_ENV, load_profile
from kvpack.restore.files import load_kvp
from tests.cli_helpers import run

pytestmark = pytest.mark.model

CALIBRATION_TOKENS = 1024


@pytest.fixture(scope="module")
def profile_file(cli_model_module, tmp_path_factory):
    """A profile made by `kvpack calibrate` (1,024 tokens of the bundled calibration text)."""
    folder = tmp_path_factory.mktemp("profile")
    path = folder / "smollm2.profile"
    from kvpack.cli.app import main

    code = main(
        ["calibrate", "--max-tokens", str(CALIBRATION_TOKENS), "-o", str(path), "--json", str(folder / "r.json")]
    )
    assert code == 0
    return path


@pytest.fixture(scope="module")
def cli_model_module(smollm):
    """The session's SmolLM2 for `kvpack calibrate` (module scope, unlike ``cli_model``)."""
    import kvpack.model.dump

    original = kvpack.model.dump.load_model
    kvpack.model.dump.load_model = lambda model=None, gguf_file=None, device="cpu": smollm
    yield smollm
    kvpack.model.dump.load_model = original


def test_the_profile_is_a_valid_calibration(profile_file, real_dump, smollm):
    profile = load_profile(profile_file)
    report = json.loads((profile_file.parent / "r.json").read_text())
    assert report["fingerprint"] == profile.fingerprint and report["layers"] == 30 and report["features"] == 192
    with SafetensorsSource(real_dump) as source:
        assert profile.model_fingerprint == source.metadata["weights_fingerprint"]
    assert profile.metadata["keys"] == "pre_rope"
    assert int(profile.metadata["calibration_tokens"]) == CALIBRATION_TOKENS - 1  # the sink token left out
    for layer in profile.layers:
        for basis in layer.values():
            gram = basis.basis.T.astype(np.float64) @ basis.basis
            assert np.abs(gram - np.eye(192)).max() < 2e-2
            assert (np.diff(basis.variance) <= 1e-6).all() and (basis.weight >= 0).all()
    sensitivity = np.array(json.loads(profile.metadata["sensitivity"]))
    assert sensitivity.shape == (30, 2) and (sensitivity > 0).all()
    # the sink token's keys and values have their own measured weight (kvpack.weighted_error)
    sink = json.loads(profile.metadata["sink_sensitivity"])
    assert len(sink) == 2 and all(np.isfinite(sink)) and min(sink) > 0
    fp16_weights = 2 * sum(p.numel() for p in smollm.model.parameters())
    assert profile.nbytes <= 0.02 * fp16_weights  # the bound on a profile's size


def test_transform_codec_on_a_real_cache(profile_file, real_dump, real_tensors, tmp_path):
    errors = {}
    for target in (1.0, 2.0, 3.0):
        out = tmp_path / f"t{target}.kvp"
        report = compress_file(
            real_dump,
            out,
            CodecConfig.build("transform"),
            allocation=Allocation(target_bits=target),
            profile=profile_file,
        )
        kv = sum(x.numel() for n, x in real_tensors.items() if n.startswith("layers."))
        assert out.stat().st_size * 8 / kv == pytest.approx(target, rel=0.02)
        assert report["rows"]["all"]["bits_per_element"]["total"] == pytest.approx(target, rel=0.02)
        restored, _ = load_kvp(out, profile=profile_file)
        errors[target] = {
            role: sum(
                float(((restored[n].float() - x.float()) ** 2).sum())
                for n, x in real_tensors.items()
                if n.endswith(role)
            )
            / sum(float((x.float() ** 2).sum()) for n, x in real_tensors.items() if n.endswith(role))
            for role in ("key", "value")
        }
    for role in ("key", "value"):
        assert errors[1.0][role] > errors[2.0][role] > errors[3.0][role]
    assert errors[2.0]["key"] < 0.03 and errors[3.0]["key"] < 0.015


def test_the_profile_directory_serves_compress_and_decompress(profile_file, real_dump, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path / "profiles"))
    out = tmp_path / "c.kvp"
    code, _, err = run(["compress", real_dump, "-o", out, "--method", "transform"], capsys)
    assert code == 2 and "kvpack calibrate" in err and len(err.strip().splitlines()) == 1
    profile = load_profile(profile_file)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / f"{profile.model_fingerprint}.safetensors").write_bytes(profile_file.read_bytes())
    code, out_text, err = run(
        ["compress", real_dump, "-o", out, "--method", "transform", "--target-bits", "1.5"], capsys
    )
    assert code == 0, err
    code, _, err = run(["decompress", out, "-o", tmp_path / "r.safetensors"], capsys)
    assert code == 0, err
    with SafetensorsSource(tmp_path / "r.safetensors") as source:
        assert source.shape_dtype("layers.3.key")[1] == "float16"
        assert torch.isfinite(source.get("layers.3.key")).all()


def test_eval_runs_the_transform_codec(profile_file, smollm, wiki_ids):
    from kvpack.evaluation.evaluate import EvalMethod, EvalProtocol, evaluate

    config = CodecConfig.build("transform").with_profile(load_profile(profile_file))
    method = EvalMethod.codec(config, allocation=Allocation(target_bits=2.0))
    result = evaluate(smollm, wiki_ids, [method], EvalProtocol(prefix=256, continuation=32, windows=1))["methods"][0]
    assert result["bits_per_element"] == pytest.approx(2.0, rel=0.03)
    assert 0 <= result["kl_mean"] < 0.5 and result["top1_agreement_pct"] > 60


def test_transform_codec_on_a_llama_cpp_slot_file(profile_file, llama_state_f16_fa, tmp_path, monkeypatch):
    """A profile calibrated from the GGUF names it; in the profile directory a llama.cpp slot file of that
    GGUF finds it by the GGUF's fingerprint, and the transform-coded file restores in the real llama.cpp."""
    from kvpack.llama_cpp.gguf_model import read_gguf_model
    from kvpack.llama_cpp.restore import write_llama_cpp
    from kvpack.profile import default_profile_path, link_aliases
    from tests import llama_cpp_harness as harness

    gguf = harness.default_gguf_path()
    profile = load_profile(profile_file)
    assert profile.metadata["gguf_fingerprint"] == read_gguf_model(gguf).fingerprint
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path / "profiles"))
    target = default_profile_path(profile.model_fingerprint)
    target.parent.mkdir()
    target.write_bytes(profile_file.read_bytes())
    (link,) = link_aliases(target, profile)
    assert link.name == f"{profile.metadata['gguf_fingerprint']}.safetensors" and link.resolve() == target.resolve()

    packed, back = tmp_path / "slot.kvp", tmp_path / "slot.bin"
    config = CodecConfig.build(method="transform", recommended=True)
    report = compress_file(
        llama_state_f16_fa.seq.path, packed, config, allocation=Allocation("target", target_bits=3.0), model=gguf
    )
    assert abs(report["file_bytes"] * 8 / report["kv_elements"] / 3.0 - 1) <= 0.02
    write_llama_cpp(packed, back, model=gguf)
    restored = llama_state_f16_fa.restore(path=back, feed=llama_state_f16_fa.reference.tokens)
    assert harness.compare(llama_state_f16_fa.reference, restored)["kl_mean"] < 0.1
