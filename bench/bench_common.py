"""Shared by the bench scripts: run a sweep, replace one ``## `` section of docs/benchmarks.md, import
kvpack internals that moved between versions, and time whole processes of several kvpack checkouts."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def sweep_parser(doc: str, config: Path) -> argparse.ArgumentParser:
    """The options every sweep-based bench script takes: --config, --out, --from-results, --merge."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", type=Path, default=config)
    parser.add_argument("--out", type=Path, default=config.parent.parent / "docs" / "benchmarks.md")
    parser.add_argument("--from-results", action="store_true", help="Render the last results.json again.")
    parser.add_argument(
        "--merge",
        type=Path,
        help="Merge another sweep's results.json (same protocol; same labels are replaced) into the last results "
        "and render (no evaluation).",
    )
    return parser


def run_sweep(config: Path, results_dir: Path) -> tuple[dict, float]:
    """``kvpack sweep --config CONFIG --output-dir RESULTS_DIR --force``; returns (results.json, minutes).

    Raises:
        SystemExit: the sweep failed (its exit code).
    """
    from kvpack.cli.app import main as kvpack_main

    started = time.perf_counter()
    code = kvpack_main(["sweep", "--config", str(config), "--output-dir", str(results_dir), "--force"])
    if code:
        raise SystemExit(code)
    return json.loads((results_dir / "results.json").read_text()), (time.perf_counter() - started) / 60


def merge_results(results_dir: Path, extra: Path, labels: set[str] | None = None) -> dict:
    """Merge another sweep's results.json (same protocol and reference) into ``results_dir``: its runs
    replace those of the same label, the rest are added, and with ``labels`` runs of other labels
    (no longer in the config) are dropped; results.json, results.csv and plot.png are written
    again. Returns the merged run.

    Raises:
        SystemExit: another protocol or reference.
    """
    from kvpack.cli.plots import csv_text, plot
    from kvpack.evaluation.sweep import mark_pareto

    run = json.loads((results_dir / "results.json").read_text())
    other = json.loads(extra.read_text())
    if other["protocol"] != run["protocol"] or other["ppl_ref"] != run["ppl_ref"]:
        raise SystemExit(f"{extra}: another protocol or reference; cannot merge")
    new = {r["label"]: r for r in other["methods"]}
    run["methods"] = [new.pop(r["label"], r) for r in run["methods"]] + list(new.values())
    if labels is not None:
        run["methods"] = [r for r in run["methods"] if r["label"] in labels]
    mark_pareto(run["methods"])
    (results_dir / "results.json").write_text(json.dumps(run, indent=1))
    (results_dir / "results.csv").write_text(csv_text(run["methods"]))
    plot(
        run["methods"], results_dir / "plot.png", f"{run.get('model', '')}: merged sweeps; ref PPL {run['ppl_ref']:.3f}"
    )
    return run


def replace_section(path: Path, marker: str, text: str, before: str | None = None) -> None:
    """Put ``text`` (which starts with ``marker``) where the section starting with ``marker`` is.

    A missing section goes before the section starting with ``before`` when there is one,
    else at the end.
    """
    existing = path.read_text() if path.exists() else "# Benchmarks\n"
    head, found, rest = existing.partition(marker)
    tail = rest[rest.find("\n## ") + 1 :] if found and "\n## " in rest else ""
    if not found and before and before in existing:
        head, found_before, rest_before = existing.partition(before)
        tail = found_before + rest_before
    path.write_text(head.rstrip("\n") + "\n\n" + text + ("\n" + tail if tail else ""))


# --- kvpack internals across versions -------------------------------------------------------------

#: Where the bench finds what the top-level API does not export: the first module (in this order)
#: that has the name wins. The restructured tree goes first, the layout before it second.
LOCATIONS = {
    "EntropyConfig": ("kvpack", "kvpack.formats.entropy", "kvpack.entropy"),
    "KvpReader": ("kvpack", "kvpack.formats.reader"),
    "SafetensorsSource": ("kvpack", "kvpack.formats.safetensors_io"),
    "write_safetensors": ("kvpack", "kvpack.formats.safetensors_io"),
    "load_model": ("kvpack.dump", "kvpack.model.dump"),
    "collect_cache": ("kvpack.dump", "kvpack.model.dump"),
    "model_identity": ("kvpack.dump", "kvpack.model.dump"),
    "tokenize": ("kvpack.dump", "kvpack.model.dump"),
}


def kvpack_attr(name: str, *modules: str):
    """``name`` from the first of ``modules`` (default: ``LOCATIONS[name]``) that has it, so one
    bench script measures kvpack trees with different module layouts.

    Raises:
        ImportError: none of them has it (the message lists where it looked).
    """
    tried = []
    for module_name in modules or LOCATIONS[name]:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # only a missing candidate module is a miss; a broken import inside it is an error
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                tried.append(f"{module_name} (no such module)")
                continue
            raise
        try:
            return getattr(module, name)
        except AttributeError:
            tried.append(f"{module_name} (no {name})")
    raise ImportError(f"{name} not found in this kvpack ({kvpack_location()}): tried " + ", ".join(tried))


def kvpack_location() -> str:
    """The folder of the kvpack package this process imports."""
    import kvpack

    return str(Path(kvpack.__file__).resolve().parent)


# --- several checkouts side by side ---------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    """One kvpack checkout to measure: ``label`` in the tables, ``path`` on ``PYTHONPATH``."""

    label: str
    path: Path
    commit: str

    @classmethod
    def parse(cls, text: str) -> Tree:
        """``PATH`` or ``LABEL=PATH``; the default label is the folder name."""
        label, sep, path = text.partition("=")
        path = Path(path if sep else label).expanduser().resolve()
        if not (path / "kvpack" / "__init__.py").is_file():
            raise argparse.ArgumentTypeError(f"{path}: no kvpack/__init__.py (a kvpack checkout is needed)")
        return cls(label if sep else path.name, path, git_describe(path))

    def env(self, cache_root: Path) -> dict[str, str]:
        """The environment of a process that runs this tree's kvpack: ``PYTHONPATH`` is the tree,
        bytecode and numba's compiled kernels are cached under ``cache_root/LABEL`` (as an installed
        package caches them in ``__pycache__``, without writing into the tree)."""
        return tree_env(cache_root / safe_name(self.label), self.path)


def tree_env(cache: Path, tree: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's process reads cached bytecode
    env.pop("PYTHONPATH", None)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    env["PYTHONPYCACHEPREFIX"] = str(cache / "pycache")
    env["NUMBA_CACHE_DIR"] = str(cache / "numba")
    return env


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def git_describe(path: Path) -> str:
    """Short commit of a checkout, ``+changes`` when tracked files differ from it; ``?`` outside git."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return commit + ("+changes" if dirty else "")


def check_tree(tree: Tree, python: str, cache_root: Path, cwd: Path) -> None:
    """Make sure ``python -m kvpack`` under ``tree.env`` imports that tree's kvpack (not an
    editable install of another checkout, nor a ``kvpack`` folder in ``cwd``).

    Raises:
        SystemExit: it imports another one.
    """
    found = subprocess.run(
        [python, "-c", "import kvpack, os; print(os.path.dirname(os.path.realpath(kvpack.__file__)))"],
        env=tree.env(cache_root),
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if Path(found) != tree.path / "kvpack":
        raise SystemExit(f"tree {tree.label}: PYTHONPATH={tree.path} imports {found}, not {tree.path / 'kvpack'}")


# --- timing whole processes -------------------------------------------------------------------------


@dataclass
class Timing:
    """One process: wall seconds (fork to exit), CPU seconds (user + system, all threads), peak RSS."""

    wall: float
    cpu: float
    rss_mb: float


def run_timed(argv: list[str], env: dict[str, str] | None, cwd: Path, expect: int = 0) -> Timing:
    """Run ``argv`` once (stdout discarded) and time it, hyperfine-style but with plain
    ``subprocess`` + ``os.wait4``: wall time from spawn to exit and the child's own CPU time. Peak
    RSS comes from ``/usr/bin/time -f %M`` around the command (its fork is small: a child forked
    straight from this process would report this process's RSS as its peak); 0 without it.

    Raises:
        SystemExit: the exit code is not ``expect`` (with the end of its stderr).
    """
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as rss:
        wrapped = [GNU_TIME, "-f", "%M", "-o", rss.name, *argv] if GNU_TIME else argv
        started = time.perf_counter()
        process = subprocess.Popen(
            wrapped, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = code = os.waitstatus_to_exitcode(status)
        if code != expect:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"{' '.join(argv)}: exit {code}, expected {expect}\n{tail}")
        lines = rss.read().split()
    return Timing(wall, usage.ru_utime + usage.ru_stime, int(lines[-1]) / 1024 if GNU_TIME and lines else 0.0)


GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def median_timing(timings: list[Timing]) -> dict:
    """Medians of each field, and every wall time (for the JSON)."""
    return {
        "wall": statistics.median(t.wall for t in timings),
        "cpu": statistics.median(t.cpu for t in timings),
        "rss_mb": statistics.median(t.rss_mb for t in timings),
        "walls": [round(t.wall, 4) for t in timings],
    }


def venv_python() -> str:
    """The interpreter that runs every tree: this one (the project's .venv)."""
    return sys.executable
