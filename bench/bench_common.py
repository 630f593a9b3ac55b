"""Shared by the bench scripts: run a sweep, and replace one ``## `` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import time
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
    from kvpack.evaluation.sweep import csv_text, mark_pareto, plot

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
