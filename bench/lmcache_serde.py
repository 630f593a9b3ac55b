"""The LMCache serde "kvpack" on real SmolLM2 chunks: bytes per chunk, serialize / deserialize MB/s, error.

Dumps SmolLM2-135M-Instruct's KV cache (kvpack's own dump API, ``kvpack.model.dump.dump_cache``) on
the start of the WikiText-2 test text (``../shared/data/wikitext-2-raw-test.txt``; the bundled passage
when it is missing), cuts it into LMCache chunks ``[2, 30, 256, 192]`` float16 (the layout and default
chunk size of LMCache 0.5.6) and runs each codec through LMCache's serde API as LMCache calls it:
``estimate_serialized_size`` sizes a ``TensorMemoryObj`` byte buffer, ``serialize`` writes the chunk
into it, ``deserialize`` decodes it into a chunk buffer; bytes per chunk are what ``serialize`` returns
(what LMCache stores: the whole buffer with ``fixed_size``, the default, else the stream). LMCache's own
``fp8`` serde (a plain cast to float8_e4m3fn) runs beside it for reference.

MB/s are of float16 input (10⁶ bytes of the chunk per second), the median over ``--repeats`` passes
over all chunks, one chunk at a time, after one warm-up pass (numba kernels compile on first use).
Relative MSE is ``||x - x_hat||² / ||x||²`` over all chunks' keys and values. Writes
``bench/results/lmcache.json`` and the section "LMCache" of docs/benchmarks.md.

    .venv/bin/python bench/lmcache_serde.py [--tokens 2048] [--repeats 3] [--threads 1]

(Not ``bench/lmcache.py``: a script runs with its folder first on ``sys.path``, where a ``lmcache.py``
would stand in for the ``lmcache`` package.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_common import replace_section

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
MARKER = "## LMCache"
CHUNK = 256
HEAD_DIM = 64


def codecs():
    """(label, LMCache serde kwargs) of each kvpack codec measured: what ``"serde": {...}`` would hold."""
    return [
        ("kvpack uniform 4-bit g64 (default: fixed size)", {}),
        ("kvpack uniform 4-bit g64, stream length (zstd-1)", {"fixed_size": False}),
        ("kvpack adaptive 4-bit g64 (fixed size)", {"method": "adaptive"}),
        ("kvpack fp8-e4m3 g64 (fixed size)", {"method": "fp8-e4m3"}),
        ("kvpack lossless, stream length (zstd-1)", {"lossless": True, "fixed_size": False}),
    ]


def chunks_of(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    layers = sum(1 for name in tensors if name.startswith("layers.") and name.endswith(".key"))
    kv = torch.stack(
        [torch.stack([tensors[f"layers.{i}.{role}"][0] for i in range(layers)]) for role in ("key", "value")]
    )  # (2, L, H, T, D)
    kv = kv.transpose(2, 3).reshape(2, layers, kv.shape[3], -1)
    return [kv[:, :, s : s + CHUNK].contiguous() for s in range(0, kv.shape[2] - CHUNK + 1, CHUNK)]


def memory_obj(shape, dtype):
    from lmcache.v1.memory_management import MemoryObjMetadata, TensorMemoryObj

    size = torch.Size(shape)
    nbytes = size.numel() * dtype.itemsize
    meta = MemoryObjMetadata(
        shape=size, dtype=dtype, address=0, phy_size=nbytes, ref_count=1, shapes=[size], dtypes=[dtype]
    )
    return TensorMemoryObj(torch.zeros(nbytes, dtype=torch.uint8), meta, None)


def measure(label: str, serializer, deserializer, chunks: list[torch.Tensor], repeats: int) -> dict:
    from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey

    key = ObjectKey(chunk_hash=b"\0" * 32, model_name="SmolLM2-135M-Instruct", kv_rank=0)
    sources = [memory_obj(tuple(c.shape), c.dtype) for c in chunks]
    for source, chunk in zip(sources, chunks, strict=True):
        source.tensor.copy_(chunk)
    estimate = serializer.estimate_serialized_size(MemoryLayoutDesc([chunks[0].shape], [chunks[0].dtype]))
    buffers = [memory_obj((estimate,), torch.uint8) for _ in chunks]
    outputs = [memory_obj(tuple(c.shape), c.dtype) for c in chunks]
    written: list[int] = []
    ser_times, de_times = [], []
    for _ in range(repeats + 1):  # the first pass warms up (numba compiles)
        started = time.perf_counter()
        written = [serializer.serialize(s, b, key) for s, b in zip(sources, buffers, strict=True)]
        ser_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        for buffer, output in zip(buffers, outputs, strict=True):
            deserializer.deserialize(buffer, output, key)
        de_times.append(time.perf_counter() - started)
    raw = sum(c.numel() * c.element_size() for c in chunks)
    err, ref = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for chunk, output in zip(chunks, outputs, strict=True):
        x, y = chunk.double(), output.tensor.double()
        err += ((x - y) ** 2).sum(dim=(1, 2, 3))
        ref += (x**2).sum(dim=(1, 2, 3))
    result = {
        "codec": label,
        "chunks": len(chunks),
        "fp16_bytes_per_chunk": raw // len(chunks),
        "bytes_per_chunk": statistics.mean(written),
        "max_bytes_per_chunk": max(written),
        "estimate_bytes": estimate,
        "ratio_vs_fp16": raw / sum(written),
        "bits_per_element": 8 * sum(written) / sum(c.numel() for c in chunks),
        "serialize_mb_s": raw / statistics.median(ser_times[1:]) / 1e6,
        "deserialize_mb_s": raw / statistics.median(de_times[1:]) / 1e6,
        "rel_mse_key": float(err[0] / ref[0]),
        "rel_mse_value": float(err[1] / ref[1]),
    }
    print(json.dumps(result), flush=True)
    return result


def render(results: list[dict], setup: dict) -> str:
    rows = [
        f"| {r['codec']} | {r['bytes_per_chunk']:,.0f} | {r['ratio_vs_fp16']:.2f}× | {r['bits_per_element']:.3f} | "
        f"{r['estimate_bytes']:,} | {r['serialize_mb_s']:.1f} | {r['deserialize_mb_s']:.1f} | "
        f"{r['rel_mse_key']:.3e} | {r['rel_mse_value']:.3e} |"
        for r in results
    ]
    return "\n".join(
        [
            MARKER + " (`bench/lmcache_serde.py`)",
            "",
            f'The LMCache serde `"kvpack"` (`kvpack/integrations/lmcache.py`, lmcache {setup["lmcache"]}) on '
            f"{setup['chunks']} chunks `[2, 30, 256, 192]` float16 ({setup['fp16_bytes_per_chunk']:,} bytes each): "
            f"SmolLM2-135M-Instruct's cache of the first {setup['tokens']:,} tokens of {setup['text']}, dumped by "
            "`kvpack.model.dump.dump_cache`. Each codec runs through LMCache's serde API as LMCache calls it "
            "(`estimate_serialized_size` sizes the byte buffer, `serialize`, `deserialize` on `TensorMemoryObj`s); "
            "LMCache's own `fp8` serde (a cast to float8_e4m3fn) for reference. Bytes are what LMCache stores per "
            "chunk (`serialize`'s return: with a fixed size, the default, the whole buffer of the estimate; else the "
            "`.kvp` stream, header and checksums included); the estimate is the buffer LMCache allocates per chunk. "
            "MB/s of float16 input, median of "
            f"{setup['repeats']} passes after a warm-up, one chunk at a time, {setup['threads']} torch thread(s). "
            "Relative MSE `||x - x_hat||² / ||x||²` over all chunks.",
            "",
            f"Machine: {setup['machine']}, torch {setup['torch']}, Python {setup['python']}; {setup['date']}. "
            f"Command: `.venv/bin/python bench/lmcache_serde.py --tokens {setup['tokens']} --repeats {setup['repeats']} "
            f"--threads {setup['threads']}`. Results: `bench/results/lmcache.json`.",
            "",
            "| serde | bytes/chunk | vs fp16 | bits/el | estimate (bytes) | serialize MB/s | deserialize MB/s "
            "| rel MSE K | rel MSE V |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="Tokens of text to dump (chunks of 256).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine's cores are shared).")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "lmcache.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import lmcache._version
    from lmcache.v1.distributed.serde import Fp8QuantizationDeserializer, Fp8QuantizationSerializer

    from kvpack.integrations.lmcache import KvpackDeserializer, KvpackSerializer, codec_from_options
    from kvpack.model.dump import bundled_text, dump_cache, load_model

    text, source = (
        (WIKITEXT.read_text(encoding="utf-8"), "WikiText-2 (test)")
        if WIKITEXT.is_file()
        else (
            bundled_text(),
            "the bundled WikiText-2 passage",
        )
    )
    tensors, metadata = dump_cache(load_model(), text, max_tokens=args.tokens, dtype="float16")
    chunks = chunks_of(tensors)
    results = []
    for label, options in codecs():
        codec = codec_from_options({"head_dim": HEAD_DIM, **options})
        results.append(measure(label, KvpackSerializer(codec), KvpackDeserializer(codec), chunks, args.repeats))
    results.append(
        measure("LMCache fp8 (cast)", Fp8QuantizationSerializer(), Fp8QuantizationDeserializer(), chunks, args.repeats)
    )
    setup = {
        "lmcache": lmcache._version.__version__,
        "chunks": len(chunks),
        "fp16_bytes_per_chunk": results[0]["fp16_bytes_per_chunk"],
        "tokens": int(metadata["seq_len"]),
        "text": source,
        "repeats": args.repeats,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {platform.platform()}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")
    replace_section(args.out, MARKER, render(results, setup))


if __name__ == "__main__":
    main()
