"""Batch compress of a prompt-cache store: the local process pool against a Dask cluster (issue 19, item 4).

A store of ``--files`` copies of one real SmolLM2 dump (default: the bundled WikiText-2 passage, 1,136
tokens, 26 MB in float16), compressed with uniform 4-bit g64 (the codec's defaults) by
``kvpack.batch.run_jobs`` with 1 and 2 processes and by ``kvpack.batch_dask.run_jobs_dask`` on a
``LocalCluster`` of 1 and 2 single-threaded workers. Columns: wall seconds, files/s, MB/s of input,
and the peak resident memory of one worker (``ru_maxrss``: the pool's children, or each Dask worker).

    .venv/bin/python bench/scale_out.py [--files 64] [--dump PATH] [--engines local,dask] [--work-dir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(files: list[Path], out: Path, engine: str, workers: int) -> dict:
    for old in out.glob("*.kvp"):
        old.unlink()
    config = CodecConfig.build("uniform", 4, 64, recommended=True)
    jobs = [Job(f, o, config) for f, o in zip(files, plan_outputs(files, out), strict=True)]
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
    size = sum(f.stat().st_size for f in files)
    return {
        "engine": engine,
        "workers": workers,
        "files": len(files),
        "input MB": round(size / 1e6, 1),
        "wall s": round(wall, 1),
        "files/s": round(len(files) / wall, 2),
        "MB/s": round(size / 1e6 / wall, 1),
        "peak MB per worker": round(peak, 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--dump", help="the dump to copy (default: kvpack dump of the bundled passage)")
    parser.add_argument("--work-dir")
    parser.add_argument("--json")
    parser.add_argument("--engines", type=lambda s: s.split(","), default=["local", "dask"])
    args = parser.parse_args()
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
        rows = [measure(files, out, engine, workers) for engine in args.engines for workers in (1, 2)]
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
