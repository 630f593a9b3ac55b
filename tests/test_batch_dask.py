"""The batch on a real Dask cluster (``dask.distributed.LocalCluster``, 2 worker processes on loopback),
with copies of the real SmolLM2 dump: the same files as the local pool, resumable, one error per bad file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvpack.batch import Job, run_job
from kvpack.config import CodecConfig
from tests.cli_helpers import assert_one_line_error, run, write_store

distributed = pytest.importorskip(
    "distributed", reason="dask.distributed is not installed (pip install 'kvpack[dask]')"
)

pytestmark = pytest.mark.model
UNIFORM_4 = ["--method", "uniform", "--bits", "4", "--group-size", "64"]


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as dask_client,
    ):
        yield dask_client


@pytest.fixture
def store(real_dump, tmp_path) -> Path:
    """a, b, c, d: copies of the real dump; bad: truncated."""
    return write_store(real_dump, tmp_path / "store")


def test_the_api_on_a_client_writes_what_the_local_path_writes_and_resumes(store, client, tmp_path):
    from kvpack import compress_on_dask

    config = CodecConfig.build("uniform", 4, 64, recommended=True)
    out = tmp_path / "packed"
    out.mkdir()
    results = compress_on_dask([store], out, config, client=client)
    assert [(Path(r["input"]).name, r["ok"], r["skipped"]) for r in results] == [
        ("a.safetensors", True, False),
        ("b.safetensors", True, False),
        ("bad.safetensors", False, False),
        ("c.safetensors", True, False),
        ("d.safetensors", True, False),
    ]
    assert "not a readable safetensors file" in results[2]["error"]
    local = tmp_path / "local.kvp"
    assert run_job(Job(store / "a.safetensors", local, config))["ok"]
    assert all((out / f"{name}.kvp").read_bytes() == local.read_bytes() for name in "abcd")

    (out / "c.kvp").write_bytes((out / "c.kvp").read_bytes()[:1000])  # an output cut short: not skipped
    again = compress_on_dask([store], out, config, client=client)
    assert [r["skipped"] for r in again] == [True, True, False, False, True]
    assert "exists" in again[3]["error"]  # never overwritten without force
    assert (out / "c.kvp").stat().st_size == 1000


def test_cli_engine_dask(store, tmp_path, capsys):
    out = tmp_path / "packed"
    out.mkdir()
    report = tmp_path / "batch.json"
    args = ["compress", store, "-o", out, *UNIFORM_4, "--engine", "dask", "--jobs", "2"]
    code, stdout, err = run([*args, "--json", report], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {store / 'bad.safetensors'}: "), err
    assert "4 ok, 1 failed" in stdout
    assert [r["ok"] for r in json.loads(report.read_text())] == [True, True, False, True, True]
    code, stdout, err = run(args, capsys)
    assert code == 2 and "0 ok, 4 skipped (outputs there and verified), 1 failed" in stdout


def test_an_unreachable_scheduler_is_one_line(store, tmp_path, capsys):
    code, _, err = run(
        ["compress", store, "-o", tmp_path, *UNIFORM_4, "--engine", "dask", "--scheduler", "tcp://127.0.0.1:9"], capsys
    )
    assert_one_line_error(code, err, "cannot reach the Dask scheduler tcp://127.0.0.1:9")
    assert not any(tmp_path.glob("*.kvp"))


def test_ctrl_c_on_a_local_cluster_is_one_line_and_leaves_no_partial_output(real_dump, tmp_path):
    """Ctrl-C reaches the whole process group, as from a terminal: the workers of the cluster kvpack
    started ignore it, the caller cancels the tasks, and only whole files remain."""
    store, out = tmp_path / "store", tmp_path / "packed"
    store.mkdir()
    out.mkdir()
    for i in range(12):
        shutil.copyfile(real_dump, store / f"c{i:02d}.safetensors")
    command = [sys.executable, "-m", "kvpack", "compress", str(store), "-o", str(out), *UNIFORM_4]
    process = subprocess.Popen(
        [*command, "--engine", "dask", "--jobs", "2"], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while not any(out.glob("*.kvp")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.strip() == "error: interrupted", err
    written = sorted(out.iterdir())
    assert written and len(written) < 12 and all(p.suffix == ".kvp" and not p.name.startswith(".") for p in written)
    from kvpack.formats.reader import KvpReader
    from kvpack.restore.streaming import verify_entries

    for path in written:
        with KvpReader(path) as reader:
            verify_entries(reader)
