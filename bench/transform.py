"""The transform codec: quality on the standard benchmark and speed / memory against zstd-3.

``quality``: runs ``kvpack sweep --config bench/transform.toml`` (SmolLM2-135M-Instruct, WikiText-2
test, prefix 1024, continuation 256, 8 windows: the protocol of ../shared/BASELINES.md) with the
model's profile from the profile directory (``kvpack calibrate`` makes it), and writes the table
and docs/transform.png. ``speed``: compresses a real cache of SmolLM2 (``bench/speed.py --build-only``
makes the 1 GB one) with the transform codec at 2 bits and restores it, each in its own process,
against zstd-3 on the same bytes; MB/s of fp16 input and peak RSS.

    KVPACK_PROFILES=DIR .venv/bin/python bench/transform.py quality
    KVPACK_PROFILES=DIR .venv/bin/python bench/transform.py speed --cache /tmp/kvpack-speed/smollm2-wikitext-1GB.safetensors
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from bench_common import replace_section, run_sweep

HERE = Path(__file__).resolve().parent
MARKER = "## Transform coding on WikiText-2 (`bench/transform.py`)"
SPEED_MARKER = "## Transform codec speed (`bench/transform.py speed`)"

_CHILD = """
import resource, sys, time, json
t = time.perf_counter()
{body}
print(json.dumps({{"seconds": time.perf_counter() - t, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
_COMPRESS = """
from kvpack.allocation.solver import Allocation
from kvpack.compress import compress_file
from kvpack.config import CodecConfig
compress_file(sys.argv[1], sys.argv[2], CodecConfig.build("transform"), force=True, allocation=Allocation(target_bits=2.0))
"""
_DECOMPRESS = """
from kvpack.restore.files import decompress_file
decompress_file(sys.argv[1], sys.argv[2], force=True)
"""
_ZSTD = """
import zstandard
data = open(sys.argv[1], "rb").read()
if sys.argv[3] == "compress":
    open(sys.argv[2], "wb").write(zstandard.ZstdCompressor(level=3).compress(data))
else:
    open(sys.argv[2], "wb").write(zstandard.ZstdDecompressor().decompress(data))
"""


def child(body: str, *args: str) -> dict:
    """Run ``body`` in a fresh interpreter (imports untimed: the clock starts after them is not what a
    user sees, so the whole body is timed, imports included); returns its seconds and peak RSS."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD.format(body=body), *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed(cache: Path, scratch: Path, repeats: int) -> list[str]:
    size = cache.stat().st_size
    packed, restored, zst, unz = (scratch / n for n in ("t.kvp", "t.safetensors", "t.zst", "t.raw"))
    rows = []
    for label, body, args in (
        ("transform compress (2.0 bits)", _COMPRESS, (cache, packed)),
        ("transform decompress", _DECOMPRESS, (packed, restored)),
        ("zstd-3 compress (1 thread)", _ZSTD, (cache, zst, "compress")),
        ("zstd-3 decompress", _ZSTD, (zst, unz, "decompress")),
    ):
        runs = [child(body, *map(str, args)) for _ in range(repeats)]
        best = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        rows.append(f"| {label} | {size / 1e6 / best['seconds']:.1f} | {best['seconds']:.1f} | {best['rss_mb']:.0f} |")
    for path in (packed, restored, zst, unz):
        path.unlink(missing_ok=True)
    return [
        SPEED_MARKER,
        "",
        f"Cache: `{cache.name}`, {size / 1e6:,.0f} MB of fp16 SmolLM2 K/V. Each row is a fresh process (imports "
        f"included), median of {repeats}; MB/s of fp16 input; peak RSS of the process. "
        f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores. Command: "
        f"`KVPACK_PROFILES=DIR .venv/bin/python bench/transform.py speed --cache {cache}`.",
        "",
        "| step | MB/s | seconds | peak RSS (MB) |",
        "|---|---:|---:|---:|",
        *rows,
        "",
    ]


def quality(config: Path, from_results: bool) -> list[str]:
    from kvpack.cli.plots import plot

    results_dir = HERE / "results" / "transform"
    if from_results:
        run, minutes = json.loads((results_dir / "results.json").read_text()), None
    else:
        run, minutes = run_sweep(config, results_dir)
        title = f"{run['model']}: transform codec vs grouped codecs, fp8, KIVI; ref PPL {run['ppl_ref']:.3f}"
        plot(run["methods"], HERE.parent / "docs" / "transform.png", title)
        shutil.copy(HERE.parent / "docs" / "transform.png", results_dir / "plot.png")
    lines = [
        MARKER,
        "",
        f"The standard benchmark (`kvpack sweep --config bench/transform.toml`; {run['protocol']['windows']} windows, "
        f"prefix {run['protocol']['prefix']}, continuation {run['protocol']['continuation']}; reference PPL "
        f"{run['ppl_ref']:.3f}). Bits are the file's: size × 8 / K-V elements, every byte counted; the profile "
        "(calibrated by `kvpack calibrate` on its bundled text, outside the 8 windows) is not in the files and is "
        f"listed apart. {datetime.date.today()}" + ("" if minutes is None else f", {minutes:.1f} minutes") + ".",
        "",
        "![ΔPPL and KL versus file bits](transform.png)",
        "",
        "| method | bits/el | ΔPPL % | KL | top-1 % | relMSE K | relMSE V |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(run["methods"], key=lambda r: (r["bits_per_element"], r["kl_mean"])):
        lines.append(
            f"| {r['label'].replace('|', '@')} | {r['bits_per_element']:.3f} | {r['delta_ppl_pct']:+.2f} | {r['kl_mean']:.4f} | "
            f"{r['top1_agreement_pct']:.2f} | {r['rel_mse_key']:.1e} | {r['rel_mse_value']:.1e} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("quality", "speed"))
    parser.add_argument("--config", type=Path, default=HERE / "transform.toml")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/kvpack-speed/smollm2-wikitext-1GB.safetensors"))
    parser.add_argument("--scratch", type=Path, default=Path("/tmp"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--from-results", action="store_true", help="quality: render the last results.json again.")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if args.what == "quality":
        replace_section(
            args.out,
            MARKER,
            "\n".join(quality(args.config, args.from_results)),
            before="## Model quality on WikiText-2",
        )
    else:
        replace_section(args.out, SPEED_MARKER, "\n".join(speed(args.cache, args.scratch, args.repeats)))


if __name__ == "__main__":
    main()
