"""The codec toolbox on the standard benchmark: each knob in isolation at 2, 3 and 4 bits, combinations,
presets and element formats, and the best setting per bit budget.

Runs ``kvpack sweep --config bench/toolbox.toml`` (SmolLM2-135M-Instruct, the WikiText-2 test
split from ../shared/data, prefix 1024, continuation 256, 8 windows) and writes the tables into
docs/benchmarks.md. ``--from-results`` re-renders the last run without evaluating again.

    .venv/bin/python bench/toolbox.py [--from-results] [--merge OTHER/results.json] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import datetime
import json
import platform
import re
from pathlib import Path

import torch
from bench_common import merge_results, replace_section, run_sweep, sweep_parser

MARKER = "## Codec toolbox on WikiText-2"
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "toolbox"
BUDGETS = (2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
#: A budget admits its own value plus this: the header and the rotary frequencies cost ~0.005-0.01 bits.
HEADER_SLACK = 0.01
BASE = "base (per-token g64)"


def cell(result: dict | None) -> str:
    if result is None:
        return "–"
    return f"{result['bits_per_element']:.2f} b: {result['delta_ppl_pct']:+.2f} % / {result['kl_mean']:.4f}"


def knob_table(results: list[dict], knobs: list[str]) -> list[str]:
    by_label = {r["label"]: r for r in results}
    lines = [
        "| setting (uniform asym, groups of 64 unless named) | 2-bit codes | 3-bit codes | 4-bit codes |",
        "|---|---|---|---|",
    ]
    for knob in knobs:
        cells = [cell(by_label.get(f"{knob} | b{bits}")) for bits in (2, 3, 4)]
        lines.append(f"| {knob} | " + " | ".join(cells) + " |")
    return lines


def flat_table(results: list[dict]) -> list[str]:
    lines = [
        "| method | bits/el | ΔPPL % | KL | top-1 % | relMSE K | relMSE V |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: r["bits_per_element"]):
        lines.append(
            f"| {r['label']} | {r['bits_per_element']:.3f} | {r['delta_ppl_pct']:+.2f} | {r['kl_mean']:.4f} | "
            f"{r['top1_agreement_pct']:.2f} | {r['rel_mse_key']:.1e} | {r['rel_mse_value']:.1e} |"
        )
    return lines


def readable(label: str) -> str:
    """``knob | b3`` -> ``knob, 3-bit codes`` (a table cell cannot hold a bar)."""
    knob, _, bits = label.partition(" | b")
    return f"{knob}, {bits}-bit codes" if bits else label


def best_per_budget(results: list[dict]) -> list[str]:
    lines = [
        "| budget (bits/el) | best by KL | bits/el | ΔPPL % | KL | best by ΔPPL | bits/el | ΔPPL % | KL |",
        "|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for budget in BUDGETS:
        within = [
            r for r in results if r["bits_per_element"] <= budget + HEADER_SLACK and r["config"]["kind"] == "codec"
        ]
        if not within:
            lines.append(f"| ≤ {budget} | none | | | | | | | |")
            continue
        by_kl = min(within, key=lambda r: r["kl_mean"])
        by_ppl = min(within, key=lambda r: abs(r["delta_ppl_pct"]))
        lines.append(
            f"| ≤ {budget} | {readable(by_kl['label'])} | {by_kl['bits_per_element']:.3f} | "
            f"{by_kl['delta_ppl_pct']:+.2f} | {by_kl['kl_mean']:.4f} | {readable(by_ppl['label'])} | "
            f"{by_ppl['bits_per_element']:.3f} | "
            f"{by_ppl['delta_ppl_pct']:+.2f} | {by_ppl['kl_mean']:.4f} |"
        )
    return lines


def render(run: dict, minutes: float | None) -> str:
    results = run["methods"]
    labels = [r["label"] for r in results]
    knobs = list(dict.fromkeys(label.split(" | ")[0] for label in labels if " | b" in label))
    isolation = [k for k in knobs if not any(ch in re.sub(r"\(.*?\)", "", k) for ch in (",", ":"))]
    combos = [k for k in knobs if k not in isolation]
    others = [r for r in results if " | b" not in r["label"]]
    proto = run["protocol"]
    took = f"; {minutes:.1f} minutes" if minutes is not None else ""
    return "\n".join(
        [
            MARKER + " (`bench/toolbox.py`)",
            "",
            f"The knobs of the codec toolbox, measured with the protocol of the quality section below "
            f"(`kvpack sweep`; SmolLM2-135M-Instruct, WikiText-2 test, {proto['windows']} windows, prefix "
            f"{proto['prefix']}, continuation {proto['continuation']}, {run['targets']:,} targets; reference = the "
            f"fp16 cache, PPL {run['ppl_ref']:.3f}). Bits per element come from the real `.kvp` of each window: "
            "codes, scales and zero-points, outlier positions and values, exact tokens, rotation signs, rotary "
            "frequencies and the header are all counted. Cells: `bits/el: ΔPPL % / KL`.",
            "",
            f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
            f"{datetime.date.today().isoformat()}{took}. Command: `.venv/bin/python bench/toolbox.py` (runs "
            "`kvpack sweep --config bench/toolbox.toml`; CSV and JSON in `bench/results/toolbox/`).",
            "",
            "### Each knob in isolation",
            "",
            *knob_table(results, [BASE] + [k for k in isolation if k != BASE]),
            "",
            "### Combinations",
            "",
            *knob_table(results, combos),
            "",
            "### Presets, element formats and baselines",
            "",
            *flat_table(others),
            "",
            "### Best setting per bit budget (every codec run above)",
            "",
            *best_per_budget(results),
            "",
        ]
    )


def main() -> None:
    parser = sweep_parser(__doc__, HERE / "toolbox.toml")
    args = parser.parse_args()
    minutes = None
    if args.merge:
        run = merge_results(RESULTS, args.merge)
    elif args.from_results:
        run = json.loads((RESULTS / "results.json").read_text())
    else:
        run, minutes = run_sweep(args.config, RESULTS)
    text = render(run, minutes)
    replace_section(args.out, MARKER, text, before="## Model quality on WikiText-2")
    print("\n".join(best_per_budget(run["methods"])))


if __name__ == "__main__":
    main()
