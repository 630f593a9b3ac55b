"""Caches in object storage: a real S3 API server on loopback (moto's ``ThreadedMotoServer`` on 127.0.0.1,
driven through s3fs exactly as real S3 is) and a real Dask ``LocalCluster`` of 2 worker processes,
with copies of the real SmolLM2 dump."""

from __future__ import annotations

import json
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvpack.batch import Job, run_job
from kvpack.config import CodecConfig
from tests.cli_helpers import assert_one_line_error, run

s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'kvpack[s3]')")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (scripts/setup.sh --tests)")

pytestmark = pytest.mark.model
UNIFORM_4 = ["--method", "uniform", "--bits", "4", "--group-size", "64"]


@pytest.fixture(scope="module")
def endpoint():
    """The URL of an S3 API server on 127.0.0.1 (any free port), for this module."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def options(endpoint) -> dict:
    """Storage options of the server (credentials are checked only while :func:`checking_credentials`)."""
    return {
        "endpoint_url": endpoint,
        "key": "kvpack-test",
        "secret": "kvpack-test-secret",
        "client_kwargs": {"region_name": "us-east-1"},
    }


@pytest.fixture(scope="module")
def cli_options(options) -> list[str]:
    return [
        "--storage-option",
        f"endpoint_url={options['endpoint_url']}",
        "--storage-option",
        f"key={options['key']}",
        "--storage-option",
        f"secret={options['secret']}",
        "--storage-option",
        "client_kwargs.region_name=us-east-1",
    ]


@pytest.fixture
def s3(options):
    """``(filesystem, bucket)``: s3fs on the server and a new, empty bucket."""
    fs = s3fs.S3FileSystem(
        endpoint_url=options["endpoint_url"],
        key=options["key"],
        secret=options["secret"],
        skip_instance_cache=True,
    )
    bucket = f"kvpack-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    return fs, bucket


@pytest.fixture
def store(s3, real_dump) -> str:
    """``s3://BUCKET/store/``: a, b, c (copies of the real dump) and bad (cut in half)."""
    fs, bucket = s3
    for name in ("a", "b", "c"):
        fs.put_file(str(real_dump), f"{bucket}/store/{name}.safetensors")
    fs.pipe_file(f"{bucket}/store/bad.safetensors", real_dump.read_bytes()[: real_dump.stat().st_size // 2])
    return f"s3://{bucket}/store/"


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed (kvpack[dask])")
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as dask_client,
    ):
        yield dask_client


def test_a_store_in_s3_compressed_on_dask_is_what_the_local_path_writes(s3, store, client, options, tmp_path):
    from kvpack import compress_on_dask, decompress_file

    fs, bucket = s3
    config = CodecConfig.build("uniform", 4, 64, recommended=True)
    packed = f"s3://{bucket}/packed/"
    results = compress_on_dask([store], packed, config, client=client, storage_options=options)
    assert [(r["input"], r["ok"], r["skipped"]) for r in results] == [
        (f"{store}a.safetensors", True, False),
        (f"{store}b.safetensors", True, False),
        (f"{store}bad.safetensors", False, False),
        (f"{store}c.safetensors", True, False),
    ]
    assert results[2]["error"].startswith(f"{store}bad.safetensors: ")  # named by its URL, not a temp file
    assert "\n" not in results[2]["error"]
    assert not fs.exists(f"{bucket}/packed/bad.kvp")

    local = tmp_path / "a.kvp"
    assert run_job(Job(_local_dump(fs, bucket, tmp_path), local, config))["ok"]
    for name in "abc":
        assert fs.cat_file(f"{bucket}/packed/{name}.kvp") == local.read_bytes()

    # one back from S3 to S3: the same bytes as decompressing the local file
    decompress_file(f"{packed}a.kvp", f"s3://{bucket}/restored/a.safetensors", storage_options=options)
    decompress_file(local, tmp_path / "a.safetensors")
    assert fs.cat_file(f"{bucket}/restored/a.safetensors") == (tmp_path / "a.safetensors").read_bytes()

    fs.pipe_file(f"{bucket}/packed/c.kvp", local.read_bytes()[:1000])  # cut short: not skipped, not overwritten
    again = compress_on_dask([store], packed, config, client=client, storage_options=options)
    assert [r["skipped"] for r in again] == [True, True, False, False]
    assert "exists" in again[3]["error"]
    assert fs.size(f"{bucket}/packed/c.kvp") == 1000


def _local_dump(fs, bucket: str, tmp_path: Path) -> Path:
    """The store's ``a.safetensors``, downloaded."""
    target = tmp_path / "a.safetensors.local"
    fs.get_file(f"{bucket}/store/a.safetensors", str(target))
    return target


def test_the_cli_compresses_a_store_from_s3_to_s3_and_resumes(s3, store, client, cli_options, capsys, tmp_path):
    fs, bucket = s3
    packed = f"s3://{bucket}/packed/"
    report = tmp_path / "batch.json"
    scheduler = client.scheduler.address  # a running cluster, as `--scheduler tcp://HOST:8786` names one
    args = ["compress", store, "-o", packed, *UNIFORM_4, "--engine", "dask", "--scheduler", scheduler, *cli_options]
    code, stdout, err = run([*args, "--json", report], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {store}bad.safetensors: "), err
    assert "3 ok, 1 failed" in stdout
    assert [r["ok"] for r in json.loads(report.read_text())] == [True, True, False, True]
    assert sorted(fs.ls(f"{bucket}/packed")) == [f"{bucket}/packed/{name}.kvp" for name in "abc"]

    code, stdout, err = run(args, capsys)
    assert code == 2 and "0 ok, 3 skipped (outputs there and verified), 1 failed" in stdout
    other = [a if a != "4" else "2" for a in args]  # --bits 2: the outputs were made with other settings
    code, stdout, err = run(other, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 4 and "0 ok, 4 failed" in stdout
    assert f"error: {store}a.safetensors: output {packed}a.kvp exists (pass --force" in lines[0]
    assert "made with other settings (uniform 4-bit, group 64" in lines[0]

    # the local process pool reads and writes the same URLs
    code, stdout, _ = run(["compress", f"{store}[abc].safetensors", "-o", f"s3://{bucket}/pool/", *UNIFORM_4,
                           "--jobs", "2", *cli_options], capsys)  # fmt: skip
    assert code == 0 and "3 ok, 0 failed" in stdout
    assert fs.cat_file(f"{bucket}/pool/b.kvp") == fs.cat_file(f"{bucket}/packed/b.kvp")

    code, stdout, _ = run(["inspect", f"{packed}a.kvp", "--verify", *cli_options], capsys)
    assert code == 0 and f"{packed}a.kvp: kvpack container" in stdout
    out = f"s3://{bucket}/restored/a.safetensors"
    code, stdout, _ = run(["decompress", f"{packed}a.kvp", "-o", out, *cli_options], capsys)
    assert code == 0 and fs.exists(out.removeprefix("s3://"))
    _one_line(run(["decompress", f"{packed}a.kvp", "-o", out, *cli_options], capsys), "exists")


def test_a_reader_of_an_object_fetches_the_header_and_the_sections_asked_for(s3, real_dump, options):
    from kvpack import load_kvp
    from kvpack.formats.reader import KvpReader
    from kvpack.storage import READ_AHEAD_BYTES, storage_options

    fs, bucket = s3
    url = f"s3://{bucket}/one/a.kvp"
    with storage_options(options):
        from kvpack import compress_file

        compress_file(real_dump, url, None)  # lossless: the file is as large as the cache
        with KvpReader(url) as reader:
            assert reader.file_size == fs.size(url.removeprefix("s3://")) > 4_000_000
            header_only = reader._file.cache.total_requested_bytes
            assert header_only < 2 * (1 << 20) + reader.header_bytes + 64  # at most two read-ahead blocks
            reader.read_sections("layers.3.key")
            one_entry = reader._file.cache.total_requested_bytes
            entry = next(e for e in reader.entries() if e.name == "layers.3.key")
            assert one_entry - header_only <= entry.stored_bytes + 2 * READ_AHEAD_BYTES
            assert one_entry < reader.file_size // 4
    tensors, _ = load_kvp(url, layers=[3], storage_options=options)
    local, _ = load_kvp(_lossless_local(real_dump), layers=[3])
    assert all(tensors[name].equal(local[name]) for name in local)


def _lossless_local(dump: Path) -> Path:
    from kvpack import compress_file

    target = dump.parent / "lossless-local.kvp"
    if not target.exists():
        compress_file(dump, target, None)
    return target


def test_an_upload_interrupted_midway_leaves_no_object(s3, real_dump, options, tmp_path):
    from kvpack import compress_file
    from kvpack.storage import storage_options, upload

    fs, bucket = s3
    seen = []

    def interrupt(sent: int) -> None:
        seen.append(fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []))
        raise KeyboardInterrupt  # Ctrl-C after the first part went up

    with storage_options(options), pytest.raises(KeyboardInterrupt):
        upload(real_dump, f"s3://{bucket}/big.safetensors", progress=interrupt)
    assert len(seen) == 1 and len(seen[0]) == 1  # a multipart upload was under way
    assert not fs.exists(f"{bucket}/big.safetensors")
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []  # aborted

    # uploads from two threads at once (a Dask worker with 2 threads): each its own transaction
    def put(name: str, interrupted: bool) -> None:
        with storage_options(options):
            upload(real_dump, f"s3://{bucket}/{name}", progress=interrupt if interrupted else None)

    with ThreadPoolExecutor(2) as pool:
        done = pool.submit(put, "kept.safetensors", False)
        stopped = pool.submit(put, "stopped.safetensors", True)
        done.result()
        with pytest.raises(KeyboardInterrupt):
            stopped.result()
    assert fs.cat_file(f"{bucket}/kept.safetensors") == real_dump.read_bytes()
    assert not fs.exists(f"{bucket}/stopped.safetensors")
    fs.rm(f"{bucket}/kept.safetensors")

    def stop_at_layer_10(index: int, total: int, name: str) -> None:
        if index == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress_file(
            real_dump, f"s3://{bucket}/x.kvp", CodecConfig.build("uniform", 4, 64), progress=stop_at_layer_10,
            storage_options=options,
        )  # fmt: skip
    assert fs.ls(bucket, refresh=True) == []


def test_missing_bucket_bad_credentials_and_corrupted_objects_are_one_line_each(
    s3, store, options, cli_options, capsys, real_dump, tmp_path
):
    fs, bucket = s3
    _one_line(
        run(
            ["compress", "s3://kvpack-no-such-bucket/a.safetensors", "-o", f"s3://{bucket}/a.kvp", *cli_options], capsys
        ),
        "s3://kvpack-no-such-bucket/a.safetensors: no such object or bucket",
    )
    _one_line(
        run(["compress", f"{store}a.safetensors", "-o", "s3://kvpack-no-such-bucket/a.kvp", *cli_options], capsys),
        "no such bucket",
    )
    _one_line(
        run(["compress", store, "-o", "s3://kvpack-no-such-bucket/packed/", *cli_options], capsys), "no such bucket"
    )

    kept = tmp_path / "kept.kvp"
    kept.write_bytes(b"precious")  # a local output that exists: refused before the dump is downloaded
    _one_line(run(["compress", f"{store}a.safetensors", "-o", kept, *cli_options], capsys), "exists (pass --force")
    assert kept.read_bytes() == b"precious"

    with checking_credentials(options["endpoint_url"]):
        wrong = [a if not a.startswith("secret=") and not a.startswith("key=") else a.split("=")[0] + "=wrong"
                 for a in cli_options]  # fmt: skip
        _one_line(run(["inspect", f"{store}a.safetensors", *wrong], capsys), "access denied")
        _one_line(run(["compress", store, "-o", f"s3://{bucket}/p/", *wrong], capsys), "access denied")

    fs.pipe_file(f"{bucket}/bad/cut.safetensors", b"\x10" * 100)
    _one_line(
        run(["compress", f"s3://{bucket}/bad/cut.safetensors", *UNIFORM_4, *cli_options], capsys),
        f"s3://{bucket}/bad/cut.safetensors: not a readable safetensors file",
    )
    packed = _lossless_local(real_dump).read_bytes()
    flipped = bytearray(packed)
    flipped[len(packed) // 2] ^= 0xFF
    fs.pipe_file(f"{bucket}/bad/flipped.kvp", bytes(flipped))
    _one_line(
        run(["inspect", f"s3://{bucket}/bad/flipped.kvp", "--verify", *cli_options], capsys),
        f"s3://{bucket}/bad/flipped.kvp: checksum mismatch",
    )
    _one_line(
        run(
            ["decompress", f"s3://{bucket}/bad/flipped.kvp", "-o", f"s3://{bucket}/bad/out.safetensors", *cli_options],
            capsys,
        ),  # fmt: skip
        "checksum mismatch",
    )
    assert not fs.exists(f"{bucket}/bad/out.safetensors")


class checking_credentials:
    """The server checks credentials in this block (moto's ``/moto-api/reset-auth``: no request is
    let through unauthenticated), and trusts any again after it."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def _set(self, count: str) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    def __enter__(self) -> None:
        self._set("0")

    def __exit__(self, *exc) -> None:
        self._set("inf")


def _one_line(result: tuple[int, str, str], pattern: str) -> None:
    code, _, err = result
    assert_one_line_error(code, err, pattern)
