"""Peak memory and time of compress, decompress, inspect --verify and stats as the cache grows.

Builds fp16 caches of the requested sizes by tiling the real K/V tensors of one SmolLM2 dump
(`kvpack dump` on the bundled passage, 1,136 tokens) along the token axis, then runs each
command in a fresh process under `/usr/bin/time -v`:

- `compress ORIG -o X.kvp --method uniform --bits 4 --group-size 64`
- `decompress X.kvp -o X.restored.safetensors`
- `decompress X.kvp --layers 0-3 --tokens 1000:2000` (a partial read)
- `inspect X.kvp --verify`
- `stats ORIG X.restored.safetensors`

and a baseline process that only imports torch and kvpack. Peak RSS is `time -v`'s "Maximum
resident set size". It counts file pages mapped into the process (kvpack reads K/V tensors with
positioned reads, but safetensors' `safe_open` still maps the file for its header and small
tensors), so the script also samples the process's `/proc/PID/status` every 20 ms and reports
the peak of `RssAnon` (memory the process allocated) and of `RssFile` (mapped file pages) apart.
MB/s is the fp16 cache size (the original file) over the wall time.

    .venv/bin/python bench/memory.py [WORK_DIR] [--sizes 256M,1G,4G] [--keep]

Writes the table to stdout and to bench/results/memory/results.md (and results.json). The
commands run as `python -m kvpack` from this checkout (so they test this tree's code).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's kvpack, not another installed one
RESULTS = ROOT / "bench" / "results" / "memory"
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``256M`` / ``1G`` / ``4G`` -> bytes (binary units)."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([KMG])", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected a number and K, M or G (e.g. 256M, 1G)")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def size_label(size: int) -> str:
    return f"{size / UNITS['G']:g} GiB" if size >= UNITS["G"] else f"{size / UNITS['M']:g} MiB"


def kvpack_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "kvpack", *map(str, args)]


def base_dump(work: Path) -> Path:
    """The dump of SmolLM2 on the bundled passage (made once)."""
    path = work / "base.safetensors"
    if not path.exists():
        subprocess.run(kvpack_cmd("dump", "-o", path, "--force"), cwd=ROOT, check=True)
    return path


def tiled_cache(base: Path, work: Path, size: int) -> Path:
    """A cache of about ``size`` bytes of fp16 K/V: every K/V tensor and token_ids of ``base``
    repeated along the token axis (written one tensor at a time)."""
    from kvpack.formats.safetensors_io import SafetensorsSource, safetensors_writer
    from kvpack.names import parse_kv_name

    with SafetensorsSource(base) as source:
        names = source.keys()
        per_token = sum(
            math.prod(source.shape_dtype(n)[0][:2] + source.shape_dtype(n)[0][3:]) * 2
            for n in names
            if parse_kv_name(n)
        )
        tokens = max(1, round(size / per_token))
        path = work / f"cache-{tokens}.safetensors"
        if path.exists():
            return path
        metadata = dict(source.metadata, seq_len=str(tokens))
        specs = []
        for name in names:
            shape, dtype = source.shape_dtype(name)
            axis = 2 if parse_kv_name(name) else len(shape) - 1
            specs.append((name, (*shape[:axis], tokens, *shape[axis + 1 :]), dtype))
        with safetensors_writer(path, specs, metadata, force=True) as stream:
            for name, _, _ in specs:
                x = source.get(name)
                axis = 2 if parse_kv_name(name) else x.ndim - 1
                reps = [1] * x.ndim
                reps[axis] = -(-tokens // x.shape[axis])
                stream.write(name, x.repeat(*reps).narrow(axis, 0, tokens).contiguous())
                del x
    return path


class StatusSampler:
    """Peak RssAnon / RssFile (kB) of the process ``/usr/bin/time`` runs, sampled from /proc."""

    def __init__(self, time_pid: int, interval: float = 0.02):
        self.time_pid, self.interval = time_pid, interval
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _child(self) -> int | None:
        try:
            children = Path(f"/proc/{self.time_pid}/task/{self.time_pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def _run(self) -> None:
        while not self._stop.is_set():
            pid = self._child()
            if pid is not None:
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        key, _, value = line.partition(":")
                        if key in self.peak:
                            self.peak[key] = max(self.peak[key], int(value.split()[0]))
                except (OSError, ValueError):
                    pass
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(args: list[str]) -> dict:
    """Run ``args`` under ``/usr/bin/time -v``: peak RSS (MB), sampled peak anon / file RSS (MB), seconds."""
    proc = subprocess.Popen(
        ["/usr/bin/time", "-v", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    sampler = StatusSampler(proc.pid)
    _, err = proc.communicate()
    peak = sampler.stop()
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{err[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([0-9:.]+)", err).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    return {
        "peak_rss_mb": rss / 1024,
        "peak_anon_mb": peak["RssAnon"] / 1024,
        "peak_file_mb": peak["RssFile"] / 1024,
        "seconds": seconds,
    }


def run_size(base: Path, work: Path, size: int, keep: bool) -> list[dict]:
    original = tiled_cache(base, work, size)
    cache_bytes = original.stat().st_size
    kvp = original.with_suffix(".kvp")
    restored = original.with_suffix(".restored.safetensors")
    partial = original.with_suffix(".partial.safetensors")
    commands = [
        ("compress (uniform 4-bit, g64)", kvpack_cmd("compress", original, "-o", kvp, "--method", "uniform",
                                                     "--bits", 4, "--group-size", 64, "--force")),
        ("decompress", kvpack_cmd("decompress", kvp, "-o", restored, "--force")),
        ("decompress --layers 0-3 --tokens 1000:2000", kvpack_cmd("decompress", kvp, "-o", partial, "--layers", "0-3",
                                                              "--tokens", "1000:2000", "--force")),
        ("inspect --verify", kvpack_cmd("inspect", kvp, "--verify")),
        ("stats ORIG RESTORED", kvpack_cmd("stats", original, restored)),
    ]  # fmt: skip
    rows = []
    for label, args in commands:
        result = measure(args)
        result.update(size=size_label(size), cache_mb=cache_bytes / 1e6, command=label)
        result["mb_per_s"] = cache_bytes / 1e6 / result["seconds"] if result["seconds"] else None
        rows.append(result)
        print(format_row(result), flush=True)
    rows[0]["kvp_mb"] = kvp.stat().st_size / 1e6
    if not keep:
        for path in (original, kvp, restored, partial):
            path.unlink(missing_ok=True)
    return rows


HEADER = (
    "| cache (fp16 K/V) | command | peak RSS MB | peak anon MB | peak file MB | seconds | MB/s |\n"
    "|---|---|---:|---:|---:|---:|---:|"
)


def format_row(row: dict) -> str:
    speed = f"{row['mb_per_s']:.0f}" if row.get("mb_per_s") else "–"
    return (
        f"| {row['size']} | {row['command']} | {row['peak_rss_mb']:.0f} | {row['peak_anon_mb']:.0f} | "
        f"{row['peak_file_mb']:.0f} | {row['seconds']:.1f} | {speed} |"
    )


DOCS_MARKER = "## Memory (`bench/memory.py`)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", nargs="?", type=Path, default=Path("/tmp/kvpack-memory"))
    parser.add_argument(
        "--sizes", default="256M,1G,4G", help="Comma-separated cache sizes of fp16 K/V (K, M, G: binary units)."
    )
    parser.add_argument("--keep", action="store_true", help="Keep the caches and outputs in WORK_DIR.")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Folder for results.md and results.json.")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md", help="Where the table goes.")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    base = base_dump(args.work_dir)
    print(HEADER, flush=True)
    baseline = measure([sys.executable, "-c", "import torch, kvpack.compress, kvpack.restore.files, kvpack.cli.app"])
    baseline.update(size="–", command="baseline: import torch + kvpack", mb_per_s=None, cache_mb=0.0)
    print(format_row(baseline), flush=True)
    rows = [baseline]
    for size in sizes:
        rows += run_size(base, args.work_dir, size, args.keep)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, Python {platform.python_version()}"
    )
    note = (
        f"`bench/memory.py --sizes {args.sizes}` at commit {commit.strip() or '?'} ({machine}). Peak RSS: `/usr/bin/time -v`; "
        "anon / file: peaks of RssAnon / RssFile sampled every 20 ms (mapped input pages count as file RSS). "
        "MB/s: the fp16 cache file size over the wall time."
    )
    table = "\n".join([HEADER, *(format_row(r) for r in rows)])
    print("\n" + note)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(f"{table}\n\n{note}\n")
    (args.out / "results.json").write_text(json.dumps({"note": note, "rows": rows}, indent=1))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import replace_section

    replace_section(
        args.docs,
        DOCS_MARKER,
        f"{DOCS_MARKER}\n\n{note}\n\n{table}\n\n",
        before="## Codec size and error on a real cache",
    )


if __name__ == "__main__":
    main()
