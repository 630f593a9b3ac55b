"""Compress / decompress throughput of every codec next to zstd-3 and a memory copy (writes docs/benchmarks.md).

Builds a KV cache of at least ``--size-gb`` GB of float16 from real SmolLM2-135M-Instruct
tensors: the model runs over consecutive 2,048-token windows of the WikiText-2 test text and
the windows' caches are joined along the token axis (distinct tokens, not a tiled copy, so zstd
finds no repeats that real caches do not have). Then, in one process on one machine, each
measurement is repeated ``--repeats`` times (median reported), in MB/s of float16 input:

- memory copy of the float16 bytes (``numpy.copyto``), tensor by tensor;
- zstd level 3 of the same bytes, compress (1 thread, as ``zstd -3``; and 2 threads, ``-T2``)
  and decompress, tensor by tensor;
- ``kvpack.compress_tensors`` (quantize, pack, entropy stage, write the ``.kvp`` to tmpfs) and
  ``kvpack.load_kvp`` (read, check, decode to float16) for each codec at 2 and 4 bits.

    .venv/bin/python bench/speed.py [--size-gb 1.0] [--repeats 5] [--work-dir /tmp/kvpack-speed]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import zstandard
from bench_common import replace_section

from kvpack import CodecConfig, compress_tensors, load_kvp
from kvpack.formats.entropy import EntropyConfig
from kvpack.formats.reader import KvpReader
from kvpack.formats.safetensors_io import SafetensorsSource, write_safetensors

ROOT = Path(__file__).resolve().parents[1]
MARKER = "## Speed (`bench/speed.py`)"
WINDOW = 2048
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
CODECS = {
    "uniform": {},
    "normal": {"normalization": "minmax"},
    "adaptive": {},
}
#: The targets of the issue, as ratios measured in the same run.
TARGETS = "uniform 4-bit compress >= 2x zstd-3 compress; uniform 4-bit decompress >= zstd-3 decompress; adaptive within 2x of uniform"


def build_cache(work_dir: Path, size_gb: float) -> Path:
    """The cache file (reused when it exists): windows of WikiText-2 through SmolLM2, joined along tokens."""
    path = work_dir / f"smollm2-wikitext-{size_gb:g}GB.safetensors"
    if path.exists():
        return path
    from kvpack.model.dump import load_model, model_identity, tokenize

    loaded = load_model()
    ids = tokenize(loaded.tokenizer, TEXT.read_text(encoding="utf-8"))
    per_token = None
    parts: dict[str, list[torch.Tensor]] = {}
    tokens = 0
    start = 0
    from kvpack.model.dump import collect_cache

    while per_token is None or tokens * per_token < size_gb * 1e9:
        window = ids[:, start : start + WINDOW]
        if window.shape[1] < WINDOW:
            raise SystemExit(f"{TEXT} has too few tokens for {size_gb} GB")
        tensors = collect_cache(loaded.model, window, "float16")
        for name, x in tensors.items():
            parts.setdefault(name, []).append(x)
        per_token = sum(x.numel() * 2 for x in tensors.values()) / WINDOW
        tokens += WINDOW
        start += WINDOW
        print(f"  window {start // WINDOW}: {tokens * per_token / 1e9:.2f} GB", flush=True)
    joined = {name: torch.cat(xs, dim=2) for name, xs in parts.items()}
    joined["token_ids"] = ids[:, :tokens].clone()
    metadata = model_identity(loaded.model, loaded.name, loaded.gguf_file, loaded.tokenizer)
    metadata.update(seq_len=str(tokens), dtype="float16", num_layers=str(len(parts) // 2))
    work_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, joined, metadata)
    return path


def median_rate(nbytes: int, run, repeats: int) -> tuple[float, list[float]]:
    """Median MB/s (10^6 bytes of float16 input per second) of ``run()`` over ``repeats`` runs."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return nbytes / 1e6 / statistics.median(seconds), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/kvpack-speed"))
    parser.add_argument("--scratch", type=Path, default=Path("/dev/shm"), help="Folder of the .kvp files (tmpfs).")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "speed" / "results.json")
    args = parser.parse_args()

    source_path = build_cache(args.work_dir, args.size_gb)
    with SafetensorsSource(source_path) as source:
        tensors = {name: source.get(name) for name in source.keys()}
        metadata = dict(source.metadata)
    kv = [x for name, x in tensors.items() if name.startswith("layers.")]
    nbytes = sum(x.numel() * 2 for x in kv)
    print(f"cache: {source_path} ({nbytes / 1e9:.2f} GB of float16 K/V, {kv[0].shape[2]} tokens, {len(kv)} tensors)")
    raw = [x.reshape(-1).view(torch.uint8).numpy() for x in kv]
    rows = []

    def record(label, direction, rate, seconds, bits=None, note=""):
        rows.append(
            {"label": label, "direction": direction, "mb_s": rate, "seconds": seconds, "bits": bits, "note": note}
        )
        print(f"  {label:28s} {direction:10s} {rate:9.0f} MB/s  " + (f"{bits:.3f} b/elem" if bits else ""), flush=True)

    copies = [np.empty_like(r) for r in raw]
    rate, sec = median_rate(nbytes, lambda: [np.copyto(t, r) for t, r in zip(copies, raw, strict=True)], args.repeats)
    record("memory copy", "copy", rate, sec)
    copies.clear()
    frames: dict[int, list[bytes]] = {}
    for threads in (0, 2):
        compressor = zstandard.ZstdCompressor(level=3, threads=threads)

        def zstd_compress(c=compressor, t=threads):
            frames[t] = [c.compress(r) for r in raw]

        rate, sec = median_rate(nbytes, zstd_compress, args.repeats)
        label = "zstd -3" if threads == 0 else "zstd -3 -T2"
        record(label, "compress", rate, sec, 16 * sum(len(f) for f in frames[threads]) / nbytes)
    decompressor = zstandard.ZstdDecompressor()
    rate, sec = median_rate(nbytes, lambda: [decompressor.decompress(f) for f in frames[0]], args.repeats)
    record("zstd -3", "decompress", rate, sec)
    frames.clear()

    path = args.scratch / "kvpack-speed.kvp"
    runs = [(method, bits, EntropyConfig()) for method in CODECS for bits in (4, 2)]
    runs.append(("uniform", 4, EntropyConfig.off()))
    try:
        for method, bits, entropy in runs:
            config = CodecConfig.build(method, bits, 64, **CODECS[method])
            label = f"{method} {bits}-bit g64" + (" minmax" if CODECS[method] else "")
            label += "" if entropy.enabled else ", no entropy stage"
            compress_tensors(tensors, path, config, metadata, force=True, entropy=entropy)  # warm-up (JIT)
            rate, sec = median_rate(
                nbytes,
                lambda c=config, e=entropy: compress_tensors(tensors, path, c, metadata, force=True, entropy=e),
                args.repeats,
            )
            with KvpReader(path) as reader:
                elements = sum(e.n_elements for e in reader.entries() if e.codec is not None)
                bits_per_element = reader.file_size * 8 / elements
            record(label, "compress", rate, sec, bits_per_element)
            load_kvp(path)
            rate, sec = median_rate(nbytes, lambda: load_kvp(path), args.repeats)
            record(label, "decompress", rate, sec)
    finally:
        path.unlink(missing_ok=True)

    run = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zstandard": zstandard.__version__,
        "cache": {"path": str(source_path), "float16_bytes": nbytes, "tokens": int(kv[0].shape[2]), "tensors": len(kv)},
        "repeats": args.repeats,
        "rows": rows,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(run, indent=1))
    replace_section(args.out, MARKER, render(run), before="## Codec size and error on a real cache")
    print(f"wrote {args.out} and {args.results}")


def render(run: dict) -> str:
    rows = run["rows"]
    by = {(r["label"], r["direction"]): r for r in rows}
    zstd_c, zstd_d = by[("zstd -3", "compress")]["mb_s"], by[("zstd -3", "decompress")]["mb_s"]
    lines = [
        MARKER,
        "",
        f"Generated by `.venv/bin/python bench/speed.py --size-gb {run['cache']['float16_bytes'] / 1e9:.2g}` on "
        f"{run['date']}: {run['machine']}; torch {run['torch']} with {run['torch_threads']} threads, "
        f"zstandard {run['zstandard']}. Cache: {run['cache']['float16_bytes'] / 1e9:.2f} GB of float16 K/V "
        f"({run['cache']['tokens']:,} tokens of WikiText-2 through SmolLM2-135M-Instruct in 2,048-token windows, "
        f"{run['cache']['tensors']} tensors). MB/s of float16 input (10⁶ bytes/s), median of {run['repeats']} runs; "
        "compress = `compress_tensors` (quantize, pack, entropy stage, write the file to tmpfs), decompress = "
        "`load_kvp` (read, check every CRC, decode to float16). zstd runs tensor by tensor on the same bytes.",
        "",
        "| what | compress MB/s | decompress MB/s | × zstd-3 compress | × zstd-3 decompress | bits/element |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label in dict.fromkeys(r["label"] for r in rows):
        copy, c, d = (by.get((label, direction)) for direction in ("copy", "compress", "decompress"))
        if copy:
            lines.append(f"| {label} | {copy['mb_s']:,.0f} (copy) | | {copy['mb_s'] / zstd_c:.1f} | | 16 |")
            continue
        cells = [
            label,
            f"{c['mb_s']:,.0f}" if c else "",
            f"{d['mb_s']:,.0f}" if d else "",
            f"{c['mb_s'] / zstd_c:.2f}" if c else "",
            f"{d['mb_s'] / zstd_d:.2f}" if d else "",
            f"{c['bits']:.3f}" if c and c["bits"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    u4c, u4d = by[("uniform 4-bit g64", "compress")]["mb_s"], by[("uniform 4-bit g64", "decompress")]["mb_s"]
    a4c = by[("adaptive 4-bit g64", "compress")]["mb_s"]
    lines += [
        "",
        f"Targets ({TARGETS}): uniform 4-bit compress is **{u4c / zstd_c:.2f}×** zstd-3 compress, decompress "
        f"**{u4d / zstd_d:.2f}×** zstd-3 decompress; adaptive 4-bit compress is **{u4c / a4c:.2f}×** slower than uniform.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
