"""Batch compress of a prompt-cache store: the local process pool against a Dask cluster, on local disk and in S3 (issue 19, item 4).

A store of ``--files`` copies of one real SmolLM2 dump (default: the bundled WikiText-2 passage, 1,136
tokens, 26 MB in float16), compressed with uniform 4-bit g64 (the codec's defaults) by
``kvpack.batch.run_jobs`` with 1 and 2 processes and by ``kvpack.batch_dask.run_jobs_dask`` on a
``LocalCluster`` of 1 and 2 single-threaded workers. ``--stores local,s3``: the store and the outputs
in a local folder, and in a bucket of an S3 API server on 127.0.0.1 (moto's ``ThreadedMotoServer``, in
this process, through s3fs: every input downloaded, every output uploaded). Columns: wall seconds,
files/s, MB/s of input, and the peak resident memory of one worker (``ru_maxrss``: the pool's children,
or each Dask worker).

    .venv/bin/python bench/scale_out.py [--files 64] [--dump PATH] [--engines local,dask] [--stores local,s3]
        [--work-dir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvpack.batch import Job, plan_outputs, run_jobs  # noqa: E402
from kvpack.batch_dask import run_jobs_dask  # noqa: E402
from kvpack.config import CodecConfig  # noqa: E402
from kvpack.storage import storage_options  # noqa: E402


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(files: list, out, engine: str, workers: int, size: int, store: str, options=None) -> dict:
    """One row: ``files`` (paths, or URLs with their storage ``options``) compressed to ``out`` (empty)."""
    config = CodecConfig.build("uniform", 4, 64, recommended=True)
    with storage_options(options):
        outputs = plan_outputs(files, out)
    jobs = [Job(f, o, config, storage_options=options) for f, o in zip(files, outputs, strict=True)]
    start = time.perf_counter()
    if engine == "local":
        results = run_jobs(jobs, workers)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if workers > 1 else _peak_rss_mb()
    else:
        import distributed

        with (
            distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            client.run(lambda: None)  # workers up before the clock starts
            start = time.perf_counter()
            results = run_jobs_dask(jobs, client=client)
            peak = max(client.run(_peak_rss_mb).values())
    wall = time.perf_counter() - start
    assert all(r["ok"] for r in results), [r["error"] for r in results if not r["ok"]][:3]
    return {
        "store": store,
        "engine": engine,
        "workers": workers,
        "files": len(files),
        "input MB": round(size / 1e6, 1),
        "wall s": round(wall, 1),
        "files/s": round(len(files) / wall, 2),
        "MB/s": round(size / 1e6 / wall, 1),
        "peak MB per worker": round(peak, 0),
    }


@contextlib.contextmanager
def s3_store(files: list[Path]):
    """The store uploaded to bucket ``kvpack-bench`` of an S3 API server on 127.0.0.1: ``(URLs, (s3fs, options))``."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench"}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("kvpack-bench")
        urls = []
        for path in files:
            fs.put_file(str(path), f"kvpack-bench/store/{path.name}")
            urls.append(f"s3://kvpack-bench/store/{path.name}")
        yield urls, (fs, options)
    finally:
        server.stop()


def run_row(files: list[str], out: str, engine: str, workers: int, size: int, store: str, options=None) -> dict:
    """:func:`measure` in a fresh process: its peak memory is its own (not the dump's, nor the S3 server's)."""
    spec = json.dumps([files, out, engine, workers, size, store, options])
    done = subprocess.run([sys.executable, __file__, "--row", spec], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--dump", help="the dump to copy (default: kvpack dump of the bundled passage)")
    parser.add_argument("--work-dir")
    parser.add_argument("--json")
    parser.add_argument("--engines", type=lambda s: s.split(","), default=["local", "dask"])
    parser.add_argument("--stores", type=lambda s: s.split(","), default=["local", "s3"])
    parser.add_argument("--row", help=argparse.SUPPRESS)  # one measurement, in a process of its own
    args = parser.parse_args()
    if args.row:
        files, out, engine, workers, size, store, options = json.loads(args.row)
        files = [f if "://" in f else Path(f) for f in files]
        print(json.dumps(measure(files, out if "://" in out else Path(out), engine, workers, size, store, options)))
        return
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        work = Path(work)
        dump = Path(args.dump) if args.dump else work / "dump.safetensors"
        if not args.dump:  # kvpack dump of the bundled passage, as the README's first command makes it
            subprocess.run([sys.executable, "-m", "kvpack", "dump", "-o", str(dump)], check=True, capture_output=True)
        store, out = work / "store", work / "out"
        store.mkdir()
        out.mkdir()
        files = []
        for i in range(args.files):
            files.append(store / f"cache{i:03d}.safetensors")
            shutil.copyfile(dump, files[-1])
        size = sum(f.stat().st_size for f in files)
        rows = []
        if "local" in args.stores:
            for engine in args.engines:
                for workers in (1, 2):
                    for old in out.glob("*.kvp"):
                        old.unlink()
                    rows.append(run_row([str(f) for f in files], str(out), engine, workers, size, "local"))
        if "s3" in args.stores:
            with s3_store(files) as (urls, (fs, options)):
                for engine in args.engines:
                    for workers in (1, 2):
                        if fs.exists("kvpack-bench/out"):
                            fs.rm("kvpack-bench/out", recursive=True)
                        rows.append(run_row(urls, "s3://kvpack-bench/out/", engine, workers, size, "s3", options))
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
