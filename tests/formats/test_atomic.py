"""Crash-safe output (kvpack.formats.atomic): an interrupted or failing write keeps the old output (or leaves
nothing), and outputs get the usual file mode.

The subprocess tests run ``python -m kvpack`` in a child process and interrupt it the way the outside
world does (SIGINT, SIGKILL, a full disk, a file size limit), then look at the target folder.
"""

import errno
import hashlib
import json
import os
import resource
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

from kvpack import CodecConfig, compress_tensors, load_kvp
from kvpack.cli.app import main
from kvpack.errors import (
    InvalidInputError,
    OutputExistsError,
)
from kvpack.formats.constants import PREAMBLE_SIZE
from tests.conftest import small_cache

ROOT = Path(__file__).resolve().parents[2]
COMPRESS = ["--method", "adaptive", "--bits", "4", "--group-size", "64"]
# The real cache repeated along the sequence: compress then writes for several seconds, so a
# signal sent once the temp file has grown lands in the middle of the write, not after it.
TILE = 8
MID_WRITE = PREAMBLE_SIZE + (1 << 20)  # temp file bytes: past the preamble, several tensors in, most still to come
FSIZE_LIMIT = 1 << 20  # RLIMIT_FSIZE: a little of each output fits, never all of it
TIMEOUT = 120


@pytest.fixture(scope="module")
def big_dump(real_dump, tmp_path_factory) -> Path:
    """The real SmolLM2 dump tiled TILE times along the sequence axis (same metadata, seq_len scaled)."""
    with safe_open(str(real_dump), "pt") as f:
        metadata = dict(f.metadata())
        tensors = {
            name: torch.cat([f.get_tensor(name)] * TILE, dim=-1 if name == "token_ids" else 2) for name in f.keys()
        }
    metadata["seq_len"] = str(int(metadata["seq_len"]) * TILE)
    path = tmp_path_factory.mktemp("crash") / "big.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def old_kvp(real_dump, tmp_path_factory) -> Path:
    """A real earlier output (2 bits, so it differs from what the tests write over it)."""
    path = tmp_path_factory.mktemp("crash-old") / "old.kvp"
    assert main(["compress", str(real_dump), "-o", str(path), "--method", "adaptive", "--bits", "2"]) == 0
    return path


def kvpack(*args, fsize: int | None = None) -> subprocess.Popen:
    """Start ``python -m kvpack ARGS`` in a child process, optionally under RLIMIT_FSIZE."""

    def child_setup() -> None:
        # pytest may run with SIGINT ignored (a background job); the child must get Python's default handler
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if fsize is not None:
            # writes past fsize bytes fail with EFBIG (Python ignores SIGXFSZ, so it is an OSError)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.Popen(
        [sys.executable, "-m", "kvpack", *map(str, args)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=child_setup,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def wait_mid_write(proc: subprocess.Popen, target: Path) -> Path:
    """Poll until the writer's temp file (``.NAME.*.tmp`` beside ``target``) holds MID_WRITE bytes."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for tmp in target.parent.glob(f".{target.name}.*.tmp"):
            try:
                if tmp.stat().st_size > MID_WRITE:
                    return tmp
            except FileNotFoundError:
                pass
        if proc.poll() is not None:
            code, err = finish(proc)
            pytest.fail(f"kvpack exited ({code}) before it was caught mid-write; raise TILE\n{err}")
        time.sleep(0.005)
    proc.kill()
    finish(proc)
    pytest.fail(f"no temp file of {MID_WRITE} bytes beside {target} within {TIMEOUT} s")


def folder_state(folder: Path) -> dict[str, str]:
    """Every file in ``folder`` (hidden ones too), name -> sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(tmp_path: Path, name: str, old: Path | None) -> tuple[Path, dict[str, str]]:
    """A folder holding only ``name`` (a copy of ``old``, or nothing); returns the target and the folder's state."""
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / name
    if old is not None:
        shutil.copyfile(old, target)
    return target, folder_state(folder)


def assert_one_line_error(code: int, err: str, expected_code: int, text: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], (
        f"want one line 'error: …{text}…', got {err!r}"
    )


@pytest.mark.model
@pytest.mark.parametrize("existing", [True, False], ids=["over-old-output", "no-old-output"])
@pytest.mark.parametrize(
    "signum, code, message",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["INT", "TERM"],
)
def test_signal_mid_compress_keeps_old_output_and_removes_temp(
    big_dump, old_kvp, tmp_path, existing, signum, code, message
):
    target, before = prepare(tmp_path, "out.kvp", old_kvp if existing else None)
    proc = kvpack("compress", big_dump, "-o", target, *COMPRESS, "--force")
    wait_mid_write(proc, target)
    proc.send_signal(signum)
    returncode, err = finish(proc)
    # a clean interrupt: the old file byte for byte (or nothing) and no temp file left behind
    assert folder_state(target.parent) == before, err
    assert_one_line_error(returncode, err, code, message)


@pytest.mark.model
@pytest.mark.parametrize("existing", [True, False], ids=["over-old-output", "no-old-output"])
def test_sigkill_mid_compress_keeps_old_output_and_a_rerun_succeeds(real_dump, big_dump, old_kvp, tmp_path, existing):
    target, before = prepare(tmp_path, "out.kvp", old_kvp if existing else None)
    proc = kvpack("compress", big_dump, "-o", target, *COMPRESS, "--force")
    wait_mid_write(proc, target)
    proc.kill()
    assert finish(proc)[0] == -signal.SIGKILL
    after = folder_state(target.parent)
    # SIGKILL cannot be handled, so the writer's half-written temp file stays behind (expected);
    # the target itself is never touched before the final rename
    strays = sorted(set(after) - {target.name})
    assert all(name.startswith(f".{target.name}.") and name.endswith(".tmp") for name in strays) and len(strays) <= 1
    assert {k: v for k, v in after.items() if k == target.name} == before

    # the stray temp file does not get in the way of the next run
    code, err = finish(kvpack("compress", real_dump, "-o", target, *COMPRESS, "--force"))
    assert code == 0, err
    tensors, metadata = load_kvp(target)
    with safe_open(str(real_dump), "pt") as f:
        assert sorted(tensors) == sorted(f.keys())
        assert all(list(tensors[name].shape) == f.get_slice(name).get_shape() for name in f.keys())
        assert torch.equal(tensors["token_ids"], f.get_tensor("token_ids"))  # stored losslessly
        assert metadata["seq_len"] == f.metadata()["seq_len"]


@pytest.mark.model
@pytest.mark.parametrize("existing", [True, False], ids=["over-old-output", "no-old-output"])
def test_file_size_limit_fails_compress_cleanly(big_dump, old_kvp, tmp_path, existing):
    target, before = prepare(tmp_path, "out.kvp", old_kvp if existing else None)
    code, err = finish(kvpack("compress", big_dump, "-o", target, *COMPRESS, "--force", fsize=FSIZE_LIMIT))
    assert folder_state(target.parent) == before, err
    assert_one_line_error(code, err, 2, os.strerror(errno.EFBIG))


# Runs inside `unshare -rm` (its own mount namespace): mounts a tmpfs of the given size, puts the
# old output in it, runs the command and prints what the tmpfs holds afterwards as JSON (the mount
# goes away with the namespace).
TMPFS_DRIVER = """
import hashlib, json, shutil, subprocess, sys
from pathlib import Path
target, size, old, *command = sys.argv[1:]
target = Path(target)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", str(target.parent)], check=True)
shutil.copyfile(old, target)
before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in target.parent.iterdir()}
run = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in target.parent.iterdir()}
print(json.dumps({"code": run.returncode, "stderr": run.stderr, "before": before, "after": after}))
"""


@pytest.mark.model
def test_full_tmpfs_fails_compress_cleanly(big_dump, old_kvp, tmp_path):
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(
        ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    # room for the old output plus 1 MiB: the new output (tens of MiB) runs out of space part way
    size = f"{old_kvp.stat().st_size // 1024 + 1024}k"
    target = folder / "out.kvp"
    command = [sys.executable, "-m", "kvpack", "compress", str(big_dump), "-o", str(target), *COMPRESS, "--force"]
    run = subprocess.run(
        ["unshare", "-rm", sys.executable, "-c", TMPFS_DRIVER, str(target), size, str(old_kvp), *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=2 * TIMEOUT,  # the driver gives kvpack 120 s
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["before"] == {"out.kvp": sha256(old_kvp)}
    assert result["after"] == result["before"], result["stderr"]
    assert_one_line_error(result["code"], result["stderr"], 2, os.strerror(errno.ENOSPC))


@pytest.mark.model
@pytest.mark.parametrize("existing", [True, False], ids=["over-old-output", "no-old-output"])
def test_file_size_limit_fails_decompress_cleanly(real_dump, old_kvp, tmp_path, existing):
    # the old restored file is the real dump; the new one (11 MiB of safetensors) cannot fit under the limit
    target, before = prepare(tmp_path, "restored.safetensors", real_dump if existing else None)
    code, err = finish(kvpack("decompress", old_kvp, "-o", target, "--force", fsize=FSIZE_LIMIT))
    # also catches a temp file of the safetensors library's own (.tmpXXXXXX) left behind
    assert folder_state(target.parent) == before, err
    assert_one_line_error(code, err, 2, os.strerror(errno.EFBIG))


def test_existing_output_is_kept_without_force(sample):
    before = sample.read_bytes()
    with pytest.raises(OutputExistsError, match="force=True"):
        compress_tensors(small_cache(1), sample, CodecConfig.build("normal", 2, 16))
    assert sample.read_bytes() == before
    compress_tensors(small_cache(1), sample, CodecConfig.build("normal", 2, 16), force=True)
    assert sample.read_bytes() != before


def test_failure_mid_write_leaves_nothing(tmp_path):
    target = tmp_path / "partial.kvp"
    tensors = small_cache()
    tensors["layers.1.value"][0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        compress_tensors(tensors, target, CodecConfig.build("uniform", 4, 16))
    assert os.listdir(tmp_path) == []


def test_outputs_get_the_usual_file_mode(tmp_path):
    path = tmp_path / "mode.kvp"
    compress_tensors({"x": torch.zeros(2)}, path, CodecConfig.build("uniform"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    os.chmod(path, 0o640)
    compress_tensors({"x": torch.ones(2)}, path, CodecConfig.build("uniform"), force=True)
    assert path.stat().st_mode & 0o777 == 0o640
    # safetensors writes through a temp file of its own (mode 0600): the output still gets the usual mode
    from kvpack.formats.safetensors_io import write_safetensors

    restored = tmp_path / "restored.safetensors"
    write_safetensors(restored, {"x": torch.zeros(2)}, {})
    assert restored.stat().st_mode & 0o777 == 0o666 & ~umask
