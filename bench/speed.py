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

That measures the kvpack this interpreter imports (printed). With ``--trees`` one run measures
several checkouts side by side, each as a user runs it, and writes the section "Speed across
checkouts" of docs/benchmarks.md (bench/startup.py has the whole-process part):

    .venv/bin/python bench/speed.py --trees before=/work/before,after=/work/main [--size-gb 1.0]

- the codec table above for every tree: this script again with ``--codecs-only`` in a
  subprocess whose ``PYTHONPATH`` is the tree (``--rounds N`` alternates the trees N times and
  takes the median over all rounds' runs), and each codec's change against the first tree;
- start-up and whole-process wall times of ``python -m kvpack`` under each tree beside the
  ``zstd`` CLI (bench/startup.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zstandard
from bench_common import Tree, check_tree, kvpack_attr, kvpack_location, replace_section

ROOT = Path(__file__).resolve().parents[1]
MARKER = "## Speed (`bench/speed.py`)"
TREES_MARKER = "## Speed across checkouts (`bench/speed.py --trees`)"
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
    load_model, model_identity, tokenize, collect_cache, write_safetensors = (
        kvpack_attr(name) for name in ("load_model", "model_identity", "tokenize", "collect_cache", "write_safetensors")
    )

    loaded = load_model()
    ids = tokenize(loaded.tokenizer, TEXT.read_text(encoding="utf-8"))
    per_token = None
    parts: dict[str, list[torch.Tensor]] = {}
    tokens = 0
    start = 0
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
    parser.add_argument("--repeats", type=int, default=5, help="Runs per codec row (median).")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/kvpack-speed"))
    parser.add_argument("--scratch", type=Path, default=Path("/dev/shm"), help="Folder of the .kvp files (tmpfs).")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--results", type=Path, help="JSON of the run (default: bench/results/speed/).")
    parser.add_argument("--codecs-only", action="store_true", help="Only the codec table: write --results, not --out.")
    parser.add_argument("--build-only", action="store_true", help="Only build the cache (print its path).")
    trees = parser.add_argument_group("several checkouts (--trees)")
    trees.add_argument(
        "--trees",
        type=lambda text: [Tree.parse(t) for t in text.split(",") if t],
        help="Comma-separated kvpack checkouts (PATH or LABEL=PATH) to measure side by side; the first is the "
        "reference of the changes.",
    )
    trees.add_argument(
        "--kvpack-root", type=Tree.parse, action="append", default=[], help="One more checkout (repeatable)."
    )
    trees.add_argument("--python", default=sys.executable, help="Interpreter of every tree (default: this one).")
    trees.add_argument("--rounds", type=int, default=1, help="Codec tables per tree, alternating the trees.")
    trees.add_argument("--startup-repeats", type=int, default=5, help="Runs per start-up row (median).")
    trees.add_argument("--process-repeats", type=int, default=3, help="Runs per whole-process row (median).")
    trees.add_argument("--warmup", type=int, default=1, help="Untimed runs before each process row.")
    trees.add_argument("--skip-codecs", action="store_true", help="Only the start-up and whole-process tables.")
    trees.add_argument("--skip-process", action="store_true", help="Only the codec tables.")
    trees.add_argument("--from-results", action="store_true", help="Render the last --results JSON again.")
    args = parser.parse_args()
    all_trees = (args.trees or []) + args.kvpack_root

    if all_trees or args.from_results:
        args.results = args.results or ROOT / "bench" / "results" / "speed" / "trees.json"
        run = json.loads(args.results.read_text()) if args.from_results else measure_trees(args, all_trees)
        replace_section(args.out, TREES_MARKER, render_trees(run), before="## Memory (`bench/memory.py`)")
        print(f"wrote {args.out} and {args.results}")
        return

    source_path = build_cache(args.work_dir, args.size_gb)
    if args.build_only:
        print(source_path)
        return
    run = measure_codecs(source_path, args.repeats, args.scratch)
    args.results = args.results or ROOT / "bench" / "results" / "speed" / "results.json"
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(run, indent=1))
    if args.codecs_only:
        print(f"wrote {args.results}")
        return
    replace_section(args.out, MARKER, render(run), before="## Codec size and error on a real cache")
    print(f"wrote {args.out} and {args.results}")


def measure_codecs(source_path: Path, repeats: int, scratch: Path) -> dict:
    """The codec table, in this process, with the kvpack it imports."""
    from kvpack import CodecConfig, compress_tensors, load_kvp

    EntropyConfig = kvpack_attr("EntropyConfig")
    KvpReader = kvpack_attr("KvpReader")
    SafetensorsSource = kvpack_attr("SafetensorsSource")

    print(f"kvpack: {kvpack_location()}", flush=True)
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
    rate, sec = median_rate(nbytes, lambda: [np.copyto(t, r) for t, r in zip(copies, raw, strict=True)], repeats)
    record("memory copy", "copy", rate, sec)
    copies.clear()
    frames: dict[int, list[bytes]] = {}
    for threads in (0, 2):
        compressor = zstandard.ZstdCompressor(level=3, threads=threads)

        def zstd_compress(c=compressor, t=threads):
            frames[t] = [c.compress(r) for r in raw]

        rate, sec = median_rate(nbytes, zstd_compress, repeats)
        label = "zstd -3" if threads == 0 else "zstd -3 -T2"
        record(label, "compress", rate, sec, 16 * sum(len(f) for f in frames[threads]) / nbytes)
    decompressor = zstandard.ZstdDecompressor()
    rate, sec = median_rate(nbytes, lambda: [decompressor.decompress(f) for f in frames[0]], repeats)
    record("zstd -3", "decompress", rate, sec)
    frames.clear()

    path = scratch / f"kvpack-speed-{os.getpid()}.kvp"
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
                repeats,
            )
            with KvpReader(path) as reader:
                elements = sum(e.n_elements for e in reader.entries() if e.codec is not None)
                bits_per_element = reader.file_size * 8 / elements
            record(label, "compress", rate, sec, bits_per_element)
            load_kvp(path)
            rate, sec = median_rate(nbytes, lambda: load_kvp(path), repeats)
            record(label, "decompress", rate, sec)
    finally:
        path.unlink(missing_ok=True)

    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zstandard": zstandard.__version__,
        "kvpack": kvpack_location(),
        "cache": {"path": str(source_path), "float16_bytes": nbytes, "tokens": int(kv[0].shape[2]), "tensors": len(kv)},
        "repeats": repeats,
        "rows": rows,
    }


def measure_trees(args: argparse.Namespace, trees: list[Tree]) -> dict:
    """Every tree's codec table (this script with ``--codecs-only`` under the tree's ``PYTHONPATH``)
    and the start-up / whole-process tables (bench/startup.py), in one run."""
    import startup

    labels = [t.label for t in trees]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"two trees share a label ({', '.join(labels)}): give LABEL=PATH")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache_root = work / "tree-caches"
    for tree in trees:
        check_tree(tree, args.python, cache_root, work)
        print(f"tree {tree.label}: {tree.path} at {tree.commit}", flush=True)
    started = time.perf_counter()
    load = [os.getloadavg()[0]]  # 1-minute load average between the stages: is the machine quiet?
    big = work / f"smollm2-wikitext-{args.size_gb:g}GB.safetensors"
    if not big.exists():  # built once, with the first tree's kvpack
        child(args, trees[0], ["--build-only"], cache_root, work)
    small = None if args.skip_process else startup.small_dump(args.python, trees[0], cache_root, work)

    codecs: dict[str, list[dict]] = {t.label: [] for t in trees}
    if not args.skip_codecs:
        for round_ in range(args.rounds):
            for tree in trees if round_ % 2 == 0 else trees[::-1]:
                out = work / f"codecs-{tree.label}-{round_}.json"
                print(f"== codec table, tree {tree.label}, round {round_ + 1}/{args.rounds}", flush=True)
                child(
                    args,
                    tree,
                    ["--codecs-only", "--results", str(out), "--repeats", str(args.repeats)],
                    cache_root,
                    work,
                )
                codecs[tree.label].append(json.loads(out.read_text()))
                load.append(os.getloadavg()[0])
                if codecs[tree.label][-1]["kvpack"] != str(tree.path / "kvpack"):
                    raise SystemExit(f"tree {tree.label}: the codec run imported {codecs[tree.label][-1]['kvpack']}")
    process = None
    if not args.skip_process:
        process = startup.measure(
            trees,
            python=args.python,
            cache_root=cache_root,
            work=work,
            scratch=args.scratch,
            small=small,
            big=big,
            startup_repeats=args.startup_repeats,
            process_repeats=args.process_repeats,
            warmup=args.warmup,
        )
        load.append(os.getloadavg()[0])
    run = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "python": platform.python_version(),
        "python_path": args.python,
        "command": "bench/speed.py " + " ".join(sys.argv[1:]),
        "size_gb": args.size_gb,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "minutes": (time.perf_counter() - started) / 60,
        "load": load,
        "trees": [{"label": t.label, "path": str(t.path), "commit": t.commit} for t in trees],
        "codecs": {label: merge_rounds(runs) for label, runs in codecs.items() if runs},
        "process": process,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(run, indent=1))
    return run


def child(args: argparse.Namespace, tree: Tree, extra: list[str], cache_root: Path, work: Path) -> None:
    """This script under ``tree``'s ``PYTHONPATH`` (cwd: the work dir, so no other kvpack is found)."""
    argv = [args.python, str(Path(__file__).resolve()), "--size-gb", f"{args.size_gb:g}", "--work-dir", str(work)]
    argv += ["--scratch", str(args.scratch), *extra]
    subprocess.run(argv, env=tree.env(cache_root), cwd=work, check=True)


def merge_rounds(runs: list[dict]) -> dict:
    """One codec table from several rounds: each row's MB/s is over the median of all rounds' runs."""
    merged = dict(runs[0], rounds=len(runs), rows=[])
    nbytes = runs[0]["cache"]["float16_bytes"]
    for i, row in enumerate(runs[0]["rows"]):
        seconds = [s for run in runs for s in run["rows"][i]["seconds"]]
        merged["rows"].append(dict(row, seconds=seconds, mb_s=nbytes / 1e6 / statistics.median(seconds)))
    return merged


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


def render_trees(run: dict) -> str:
    """The section of a ``--trees`` run: codec tables side by side, then start-up and whole-process."""
    import startup

    trees = [t["label"] for t in run["trees"]]
    first = trees[0]
    lines = [
        TREES_MARKER,
        "",
        f"Generated by `{Path(run['python_path']).name} {run['command']}` on {run['date']} "
        f"({run['minutes']:.0f} minutes): {run['machine']}, Python {run['python']}. Trees, each run as "
        f"`python -m kvpack` / in-process API with `PYTHONPATH=<tree>` and the same interpreter "
        f"(`{run['python_path']}`):",
        "",
    ]
    lines += [f"- **{t['label']}**: `{t['path']}` at {t['commit']}" for t in run["trees"]]
    if run.get("load"):
        cores = int(run["machine"].split(", ")[1].split()[0])
        peak = max(run["load"])
        lines += ["", f"1-minute load average between the stages: {', '.join(f'{x:.1f}' for x in run['load'])}."]
        if peak > cores:
            lines[-1] += (
                f" **The machine was busy (load {peak:.1f} on {cores} cores): these MB/s are far below a quiet "
                "run's (numba's parallel kernels wait for descheduled threads) and the changes between trees "
                "are not trustworthy; run again on a quiet machine.**"
            )
    codecs = run.get("codecs") or {}
    if codecs:
        ref = codecs[first]
        lines += [
            "",
            "### Codec kernels in-process (the table of `## Speed`, per tree)",
            "",
            f"`bench/speed.py --codecs-only` under each tree: {ref['cache']['float16_bytes'] / 1e9:.2f} GB of "
            f"float16 K/V ({ref['cache']['tokens']:,} tokens), MB/s of float16 input, median of "
            f"{run['repeats']} runs × {run['rounds']} round(s) (rounds alternate the trees); torch {ref['torch']} "
            f"with {ref['torch_threads']} threads. Δ: change against {first}; Δ vs zstd: change of the ratio to "
            "the same process's zstd-3 row (takes out drift of the machine between the trees' runs).",
            "",
        ]
        header = ["what", "direction"] + [f"{t} MB/s" for t in trees if t in codecs]
        for t in trees[1:]:
            if t in codecs:
                header += [f"Δ {t}", f"Δ {t} vs zstd"]
        lines += ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
        by = {t: {(r["label"], r["direction"]): r for r in c["rows"]} for t, c in codecs.items()}
        worst: dict[str, tuple[float, str]] = {}
        for row in ref["rows"]:
            key = (row["label"], row["direction"])
            zkey = ("zstd -3", "decompress" if row["direction"] == "decompress" else "compress")
            cells = [row["label"], row["direction"]]
            cells += [f"{by[t][key]['mb_s']:,.0f}" if key in by[t] else "–" for t in trees if t in codecs]
            for t in trees[1:]:
                if t not in codecs:
                    continue
                if key not in by[t]:
                    cells += ["–", "–"]
                    continue
                change = by[t][key]["mb_s"] / row["mb_s"] - 1
                relative = (by[t][key]["mb_s"] / by[t][zkey]["mb_s"]) / (row["mb_s"] / by[first][zkey]["mb_s"]) - 1
                cells += [f"{100 * change:+.1f} %", f"{100 * relative:+.1f} %"]
                kvpack_row = row["direction"] in ("compress", "decompress") and not row["label"].startswith("zstd")
                if kvpack_row and change < worst.get(t, (0.0, ""))[0]:
                    worst[t] = (change, f"{row['label']} {row['direction']}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for t in trees[1:]:
            if t not in codecs:
                continue
            change, what = worst.get(t, (0.0, ""))
            verdict = "met" if change >= -0.05 else "**not met**"
            lines.append(
                f"Criterion (no codec's compress or decompress MB/s drops by more than 5 %), {t} against {first}: "
                + (f"largest drop {100 * change:+.1f} % ({what}): {verdict}." if what else "no codec row dropped: met.")
            )
        lines.append("")
    if run.get("process"):
        lines += startup.render(run["process"], trees)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
