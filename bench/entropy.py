"""What the entropy stage saves, per codec, on real SmolLM2 caches (writes docs/benchmarks.md).

Two real caches: the README's default (SmolLM2-135M-Instruct on the bundled WikiText-2
passage, 1,136 tokens) and a long one (the first ``--long-tokens`` tokens of the cache
``bench/speed.py`` builds from 2,048-token WikiText-2 windows). Each codec writes the same
cache with the entropy stage off (dense packing) and on (default: zstd level 1, token-axis
codes feature-major), plus variants (zstd level 3 and 19, codes in group order); the table
gives code bits per code and total bits per element (every byte of the file), from the files.

    .venv/bin/python bench/entropy.py [--long-tokens 16384]
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import numpy as np
from bench_common import replace_section

from kvpack import CodecConfig, compress_tensors
from kvpack.formats.entropy import EntropyConfig
from kvpack.formats.reader import KvpReader
from kvpack.formats.safetensors_io import SafetensorsSource
from kvpack.model.dump import bundled_text, dump_cache, load_model
from kvpack.packing import unpack

ROOT = Path(__file__).resolve().parents[1]
MARKER = "## Entropy coding (`bench/entropy.py`)"
SPEED_CACHE = Path("/tmp/kvpack-speed/smollm2-wikitext-1GB.safetensors")
CODECS = {
    "uniform 4-bit g64": CodecConfig.build("uniform", 4, 64),
    "uniform 3-bit g64": CodecConfig.build("uniform", 3, 64),
    "uniform 2-bit g64": CodecConfig.build("uniform", 2, 64),
    "uniform 4-bit g64, Hadamard": CodecConfig.build("uniform", 4, 64, transforms={"rotate": "hadamard"}),
    "KIVI-2 (keys per channel, g32)": CodecConfig.build("uniform", 2, 32, transforms={"key_axis": "channel"}),
    "normal 4-bit g64 (minmax)": CodecConfig.build("normal", 4, 64, normalization="minmax"),
    "adaptive 4-bit g64": CodecConfig.build("adaptive", 4, 64),
    "adaptive 2-bit g64": CodecConfig.build("adaptive", 2, 64),
    "mxfp4": CodecConfig.build("mxfp4", None, None),
    "fp8-e4m3 g64": CodecConfig.build("fp8-e4m3", None, 64),
}
VARIANTS = {
    "zstd 1, feature-major (default)": EntropyConfig(),
    "zstd 3, feature-major": EntropyConfig(level=3),
    "zstd 19, feature-major": EntropyConfig(level=19),
    "zstd 1, group order": EntropyConfig(transpose=False),
}


def feature_entropy(path: Path) -> float | None:
    """Bits per code of an ideal coder with one order-0 model per feature (column of a token row) and
    tensor, model not counted: what an ANS / arithmetic coder with stored per-feature models could
    approach. ``None`` when the codes are not token-axis rows (channel axis)."""
    total_bits, total_codes = 0.0, 0
    with KvpReader(path) as reader:
        for entry in reader.entries():
            if entry.codec is None:
                continue
            plan = entry.plan
            if plan.layout.axis != "token" or "codes" not in entry.sections:
                return None
            codes = unpack(reader.read_section(entry.name, "codes"), entry.codec.bits, plan.layout.n_elements)
            rows = codes.reshape(-1, plan.layout.features).astype(np.int64)
            levels = 1 << entry.codec.bits
            counts = np.stack([np.bincount(column, minlength=levels) for column in rows.T])
            p = counts / counts.sum(axis=1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                total_bits += float(-(counts * np.where(p > 0, np.log2(p), 0)).sum())
            total_codes += codes.size
    return total_bits / total_codes


def measure(tensors: dict, config: CodecConfig, entropy: EntropyConfig, path: Path) -> dict:
    compress_tensors(tensors, path, config, force=True, entropy=entropy)
    with KvpReader(path) as reader:
        entries = [e for e in reader.entries() if e.codec is not None]
        elements = sum(e.n_elements for e in entries)
        codes = [s for e in entries for name, s in e.sections.items() if name.startswith("codes")]
        coded = sum(s.decoded_length for s in codes) * 8 / config.bits  # codes in the file (kept tokens excluded)
        return {
            "code_bits": sum(s.length for s in codes) * 8 / coded,
            "total_bits": reader.file_size * 8 / elements,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long-tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "entropy" / "results.json")
    args = parser.parse_args()
    caches = {"default (1,136 tokens)": dump_cache(load_model(), bundled_text(), dtype="float16")[0]}
    if SPEED_CACHE.exists():
        with SafetensorsSource(SPEED_CACHE) as source:
            long = {n: source.get(n)[..., : args.long_tokens, :] for n in source.keys() if n.startswith("layers.")}
        caches[f"long ({long['layers.0.key'].shape[2]:,} tokens)"] = {n: x.contiguous() for n, x in long.items()}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.kvp"
        for cache_label, tensors in caches.items():
            for codec_label, config in CODECS.items():
                dense = measure(tensors, config, EntropyConfig.off(), path)
                dense["feature_entropy"] = feature_entropy(path)
                row = {"cache": cache_label, "codec": codec_label, "bits": config.bits, "dense": dense, "variants": {}}
                for variant, entropy in VARIANTS.items():
                    row["variants"][variant] = measure(tensors, config, entropy, path)
                results.append(row)
                best = row["variants"]["zstd 1, feature-major (default)"]
                print(
                    f"{cache_label:24s} {codec_label:32s} codes {config.bits} -> {best['code_bits']:.3f}  "
                    f"total {dense['total_bits']:.3f} -> {best['total_bits']:.3f}",
                    flush=True,
                )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1))
    replace_section(args.out, MARKER, render(results), before="## Codec size and error on a real cache")
    print(f"wrote {args.out}")


def render(results: list[dict]) -> str:
    lines = [
        MARKER,
        "",
        f"Generated by `.venv/bin/python bench/entropy.py` on {datetime.date.today().isoformat()}. Code bits per code "
        "and total bits per element (every byte of the file: codes, scales, zero-points, codebooks, header) with the "
        "entropy stage off (dense) and on. Default stage: zstd level 1 on every section, token-axis codes "
        "feature-major (format 1.5 §6.3). Decoded tensors are identical either way. *Per-feature entropy*: the "
        "order-0 entropy of the codes with one model per feature (token-row column) and tensor, the model itself not "
        "counted: what an ANS or arithmetic coder with stored per-feature models (e.g. `constriction`) could at best "
        "reach.",
        "",
    ]
    for cache in dict.fromkeys(r["cache"] for r in results):
        lines += [
            f"### {cache}",
            "",
            "| codec | code bits: dense | default | saved | zstd 3 | zstd 19 | group order | per-feature entropy "
            "| total bits: dense | default |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (r for r in results if r["cache"] == cache):
            v = r["variants"]
            default = v["zstd 1, feature-major (default)"]
            lines.append(
                f"| {r['codec']} | {r['bits']} | {default['code_bits']:.3f} | "
                f"{100 * (1 - default['code_bits'] / r['bits']):.1f}% | {v['zstd 3, feature-major']['code_bits']:.3f} | "
                f"{v['zstd 19, feature-major']['code_bits']:.3f} | {v['zstd 1, group order']['code_bits']:.3f} | "
                + ("–" if r["dense"]["feature_entropy"] is None else f"{r['dense']['feature_entropy']:.3f}")
                + f" | {r['dense']['total_bits']:.3f} | {default['total_bits']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
