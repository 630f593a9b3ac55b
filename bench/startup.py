"""Start-up and whole-process wall times of the kvpack CLI beside the zstd CLI, per kvpack checkout.

Measures kvpack as a user runs it: one fresh process per run, ``python -m kvpack ...`` with
``PYTHONPATH=<tree>`` and one interpreter for every tree (bytecode and numba's kernels cached per
tree outside it, as an installed package caches them). Wall time is from spawn to exit (plain
``subprocess`` + ``os.wait4``, hyperfine-style; ``--warmup`` untimed runs first), median of the
repeats; runs alternate between the trees so drift of the machine hits them alike. Two tables:

- start-up, on a real 1,024-token SmolLM2 dump (``kvpack dump --max-tokens 1024``, made once):
  ``kvpack --help``, an argument error (``kvpack compress``, exit 2), ``inspect``, ``compress``
  (uniform 4-bit g64) and ``decompress``; beside ``python -c pass``, ``import torch``,
  ``zstd -3 -T1`` and ``zstd -d`` of the same file;
- whole-process throughput on the ``--size-gb`` cache of bench/speed.py: ``compress ... --method
  uniform --bits 4 --group-size 64 --force`` and ``decompress ... --force`` against ``zstd -3 -T1``
  and ``zstd -d``, in MB/s of the float16 safetensors file.

Outputs go to ``--scratch`` (tmpfs: no disk in the numbers; kvpack's fsync is nearly free there).

    .venv/bin/python bench/startup.py --trees before=/work/before,after=/work/main [--size-gb 1.0]

writes the tables into the section "Speed across checkouts" of docs/benchmarks.md; bench/speed.py
``--trees`` runs this and the per-tree codec tables in one command.
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
import time
from pathlib import Path

from bench_common import Timing, Tree, check_tree, median_timing, run_timed, safe_name, tree_env

ROOT = Path(__file__).resolve().parents[1]
ZSTD = shutil.which("zstd") or "/usr/bin/zstd"
SMALL_TOKENS = 1024
CODEC = ["--method", "uniform", "--bits", "4", "--group-size", "64"]


def small_dump(python: str, tree: Tree, cache_root: Path, work: Path) -> Path:
    """The 1,024-token SmolLM2 dump (made once with ``tree``'s ``kvpack dump``; needs the model)."""
    path = work / f"smollm2-{SMALL_TOKENS}.safetensors"
    if not path.exists():
        argv = [python, "-m", "kvpack", "dump", "--max-tokens", str(SMALL_TOKENS), "-o", str(path), "--force"]
        subprocess.run(argv, env=tree.env(cache_root), cwd=work, check=True)
    return path


def measure(
    trees: list[Tree],
    *,
    python: str,
    cache_root: Path,
    work: Path,
    scratch: Path,
    small: Path,
    big: Path | None,
    startup_repeats: int,
    process_repeats: int,
    warmup: int,
) -> dict:
    """Both tables (``big=None``: start-up only). Each row: per tree (``None``: tree-independent)
    the median wall / CPU seconds and peak RSS."""
    out = scratch / f"kvpack-startup-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    plain = tree_env(cache_root / "_plain", None)

    def kvpack(*args: object) -> list[str]:
        return [python, "-m", "kvpack", *map(str, args)]

    def files(tree: Tree, stem: str) -> tuple[Path, Path]:
        return out / f"{stem}.{safe_name(tree.label)}.kvp", out / f"{stem}.{safe_name(tree.label)}.restored.safetensors"

    def row(table: list, name: str, argv_for, repeats: int, per_tree=True, expect=0, nbytes=None, direction=None):
        """Time one command: warm-up runs, then ``repeats`` rounds, each over every tree in turn."""
        targets = trees if per_tree else [None]
        timings: dict[str | None, list[Timing]] = {None if t is None else t.label: [] for t in targets}
        for target in targets:
            env = plain if target is None else target.env(cache_root)
            for _ in range(warmup):
                run_timed(argv_for(target), env, work, expect)
        for i in range(repeats):
            for target in targets if i % 2 == 0 else targets[::-1]:
                env = plain if target is None else target.env(cache_root)
                timings[None if target is None else target.label].append(run_timed(argv_for(target), env, work, expect))
        entry = {"command": name, "direction": direction, "expect": expect, "nbytes": nbytes, "trees": {}}
        for label, ts in timings.items():
            entry["trees"][label or ""] = median_timing(ts)
            m = entry["trees"][label or ""]
            print(
                f"  {name:58s} {label or '-':10s} {m['wall']:7.2f} s  cpu {m['cpu']:6.2f} s  rss {m['rss_mb']:5.0f} MB",
                flush=True,
            )
        table.append(entry)

    small_zst, small_back = out / "small.zst", out / "small.unzstd"
    big_zst, big_back = out / "big.zst", out / "big.unzstd"
    startup: list[dict] = []
    process: list[dict] = []
    try:
        print(f"== start-up ({small.name}, {small.stat().st_size / 2**20:.1f} MiB)", flush=True)
        row(startup, "python -c pass", lambda t: [python, "-c", "pass"], startup_repeats, per_tree=False)
        row(startup, "python -c 'import torch'", lambda t: [python, "-c", "import torch"], startup_repeats, False)
        row(startup, "kvpack --help", lambda t: kvpack("--help"), startup_repeats)
        row(startup, "kvpack compress (no arguments: exit 2)", lambda t: kvpack("compress"), startup_repeats, expect=2)
        row(
            startup,
            f"kvpack compress {small.name} -o small.kvp {' '.join(CODEC)} --force",
            lambda t: kvpack("compress", small, "-o", files(t, "small")[0], *CODEC, "--force"),
            startup_repeats,
            nbytes=small.stat().st_size,
        )
        row(startup, "kvpack inspect small.kvp", lambda t: kvpack("inspect", files(t, "small")[0]), startup_repeats)
        row(
            startup,
            "kvpack decompress small.kvp -o small.restored.safetensors --force",
            lambda t: kvpack("decompress", files(t, "small")[0], "-o", files(t, "small")[1], "--force"),
            startup_repeats,
            nbytes=small.stat().st_size,
        )
        row(
            startup,
            f"zstd -3 -T1 {small.name}",
            lambda t: [ZSTD, "-3", "-T1", "-q", "-f", str(small), "-o", str(small_zst)],
            startup_repeats,
            per_tree=False,
            nbytes=small.stat().st_size,
        )
        row(
            startup,
            "zstd -d",
            lambda t: [ZSTD, "-d", "-q", "-f", str(small_zst), "-o", str(small_back)],
            startup_repeats,
            per_tree=False,
            nbytes=small.stat().st_size,
        )
        if big is not None:
            size = big.stat().st_size
            print(f"== whole process ({big.name}, {size / 1e9:.2f} GB)", flush=True)
            row(
                process,
                f"kvpack compress big.safetensors -o big.kvp {' '.join(CODEC)} --force",
                lambda t: kvpack("compress", big, "-o", files(t, "big")[0], *CODEC, "--force"),
                process_repeats,
                nbytes=size,
                direction="compress",
            )
            row(
                process,
                "kvpack decompress big.kvp -o out.safetensors --force",
                lambda t: kvpack("decompress", files(t, "big")[0], "-o", files(t, "big")[1], "--force"),
                process_repeats,
                nbytes=size,
                direction="decompress",
            )
            for t in trees:  # the restored files are 1 GB of tmpfs each
                files(t, "big")[1].unlink(missing_ok=True)
            row(
                process,
                "zstd -3 -T1 big.safetensors",
                lambda t: [ZSTD, "-3", "-T1", "-q", "-f", str(big), "-o", str(big_zst)],
                process_repeats,
                per_tree=False,
                nbytes=size,
                direction="compress",
            )
            row(
                process,
                "zstd -d big.zst",
                lambda t: [ZSTD, "-d", "-q", "-f", str(big_zst), "-o", str(big_back)],
                process_repeats,
                per_tree=False,
                nbytes=size,
                direction="decompress",
            )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    zstd_version = subprocess.run([ZSTD, "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "zstd": zstd_version,
        "small": {"path": str(small), "bytes": small.stat().st_size, "tokens": SMALL_TOKENS},
        "big": {"path": str(big), "bytes": big.stat().st_size} if big is not None else None,
        "startup_repeats": startup_repeats,
        "process_repeats": process_repeats,
        "warmup": warmup,
        "scratch": str(scratch),
        "startup": startup,
        "process": process,
    }


def render(run: dict, trees: list[str]) -> list[str]:
    """Markdown lines: the start-up table, then the whole-process table."""
    first = trees[0]
    lines = [
        "### Start-up (whole processes)",
        "",
        f"One fresh process per run, wall time from spawn to exit, median of {run['startup_repeats']} "
        f"(after {run['warmup']} untimed warm-up run per command and tree); CPU = user + system seconds of all "
        f"threads; outputs to `{run['scratch']}` (tmpfs). Input: a real {run['small']['tokens']:,}-token SmolLM2 "
        f"dump (`kvpack dump --max-tokens {run['small']['tokens']}`, {run['small']['bytes'] / 2**20:.1f} MiB). "
        f"{run['zstd'].strip('* ')}.",
        "",
        "| command | tree | wall s | CPU s | peak RSS MB | Δ wall vs " + first + " |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for entry in run["startup"]:
        lines += _rows(entry, first)
    if run.get("process"):
        size = run["big"]["bytes"]
        help_wall = {label: m["wall"] for label, m in _by_command(run["startup"], "kvpack --help").items()}
        zstd = {
            "compress": _by_command(run["process"], "zstd -3 -T1")[""]["wall"],
            "decompress": _by_command(run["process"], "zstd -d")[""]["wall"],
        }
        lines += [
            "",
            "### Whole-process throughput",
            "",
            f"The `bench/speed.py` cache ({size / 1e9:.2f} GB safetensors, input in the page cache), median of "
            f"{run['process_repeats']} runs after {run['warmup']} warm-up, outputs to tmpfs. MB/s = the float16 "
            "safetensors file's bytes (10⁶) over the wall time, for compress and decompress alike. × zstd: against "
            "`zstd -3 -T1` (compress) or `zstd -d` (decompress) of the same file in the same run. "
            "*After start-up*: wall time minus the same tree's `kvpack --help` (interpreter, imports, CLI).",
            "",
            "| command | tree | wall s | MB/s | × zstd | MB/s after start-up | CPU s | peak RSS MB | Δ wall vs "
            + first
            + " |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for entry in run["process"]:
            direction = entry["direction"]
            for label, m in entry["trees"].items():
                work = m["wall"] - help_wall[label] if label in help_wall else None
                ref = entry["trees"].get(first)
                cells = [
                    f"`{entry['command']}`",
                    label or "–",
                    f"{m['wall']:.2f}",
                    f"{size / 1e6 / m['wall']:,.0f}",
                    f"{zstd[direction] / m['wall']:.2f}",
                    f"{size / 1e6 / work:,.0f}" if work and work > 0 else "",
                    f"{m['cpu']:.2f}",
                    f"{m['rss_mb']:,.0f}",
                    f"{100 * (m['wall'] / ref['wall'] - 1):+.1f} %" if ref and label and label != first else "",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _by_command(entries: list[dict], prefix: str) -> dict:
    return next(e["trees"] for e in entries if e["command"].startswith(prefix))


def _rows(entry: dict, first: str) -> list[str]:
    ref = entry["trees"].get(first)
    out = []
    for label, m in entry["trees"].items():
        delta = f"{100 * (m['wall'] / ref['wall'] - 1):+.1f} %" if ref and label and label != first else ""
        out.append(
            f"| `{entry['command']}` | {label or '–'} | {m['wall']:.2f} | {m['cpu']:.2f} | {m['rss_mb']:,.0f} | {delta} |"
        )
    return out


def main() -> None:
    from bench_common import replace_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", required=True, type=lambda s: [Tree.parse(t) for t in s.split(",") if t])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--size-gb", type=float, default=1.0, help="The bench/speed.py cache (0: start-up only).")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/kvpack-speed"))
    parser.add_argument("--scratch", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--startup-repeats", type=int, default=5)
    parser.add_argument("--process-repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "speed" / "startup.json")
    args = parser.parse_args()
    started = time.perf_counter()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache_root = work / "tree-caches"
    for tree in args.trees:
        check_tree(tree, args.python, cache_root, work)
    big = None
    if args.size_gb:
        big = work / f"smollm2-wikitext-{args.size_gb:g}GB.safetensors"
        if not big.exists():
            argv = [args.python, str(ROOT / "bench" / "speed.py"), "--build-only", "--size-gb", f"{args.size_gb:g}"]
            subprocess.run(argv + ["--work-dir", str(work)], env=args.trees[0].env(cache_root), cwd=work, check=True)
    small = small_dump(args.python, args.trees[0], cache_root, work)
    process = measure(
        args.trees,
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
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(process, indent=1))
    import speed

    run = {
        "date": process["date"],
        "machine": process["machine"],
        "python": platform.python_version(),
        "python_path": args.python,
        "command": "bench/startup.py " + " ".join(sys.argv[1:]),
        "minutes": (time.perf_counter() - started) / 60,
        "trees": [{"label": t.label, "path": str(t.path), "commit": t.commit} for t in args.trees],
        "process": process,
    }
    replace_section(args.out, speed.TREES_MARKER, speed.render_trees(run), before="## Memory (`bench/memory.py`)")
    print(f"wrote {args.out} and {args.results}")


if __name__ == "__main__":
    main()
