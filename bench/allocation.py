"""Bit allocation on the standard benchmark: fixed widths against the qaq, importance and target
allocators at matched bits, for uniform, normal and adaptive, and a group-size ablation.

Runs ``kvpack sweep --config bench/allocation.toml`` (SmolLM2-135M-Instruct, the WikiText-2 test
split from ../shared/data, prefix 1024, continuation 256, 8 windows) and writes the tables and a
plot into docs/benchmarks.md and docs/allocation.png. ``--from-results`` re-renders the last run.

    .venv/bin/python bench/allocation.py [--from-results] [--merge OTHER/results.json] [--out docs/benchmarks.md]

``--write-config`` regenerates bench/allocation.toml from the lists below.
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import torch
from bench_common import merge_results, replace_section, run_sweep, sweep_parser

MARKER = "## Bit allocation on WikiText-2"
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "allocation"
CODECS = ("uniform", "normal", "adaptive")
#: "qaq w0": QAQ's rule with width 0 allowed (--bits-min 0); plain "qaq" keeps kvpack's default
#: narrowest width 1, which needs 2.57 bits per element at groups of 64 (1-bit grids are left out)
ALLOCATORS = ("qaq w0", "qaq", "importance", "target")
BUDGETS = (2.0, 2.5, 3.0, 4.0)
QAQ_BUDGETS = (3.0, 4.0)
FIXED_BITS = (2, 3, 4)
#: 128 does not divide the 192 features of a SmolLM2 token (one group size serves keys and values)
ABLATION_GROUPS = (16, 32, 64, 96)
#: Every run uses the best fixed-width transforms of the toolbox benchmark.
TRANSFORMS = {"key_axis": "channel", "unrope": True, "rotate": "hadamard"}
EVAL = {"text_file": "../../shared/data/wikitext-2-raw-test.txt", "prefix": 1024, "continuation": 256, "windows": 8}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def runs(ablation_allocator: str = "target", ablation_codec: str = "uniform") -> list[dict]:
    out = []
    for codec in CODECS:
        for bits in FIXED_BITS:
            out.append({"label": f"{codec} fixed | {bits}-bit codes", "method": codec, "bits": bits, **TRANSFORMS})
        for allocator in ALLOCATORS:
            for budget in QAQ_BUDGETS if allocator == "qaq" else BUDGETS:
                out.append(
                    {
                        "label": f"{codec} {allocator} | {budget:g}",
                        "method": codec,
                        **TRANSFORMS,
                        "allocate": allocator.split()[0],
                        "target_bits": budget,
                        **({"bits_min": 0} if allocator.endswith("w0") else {}),
                    }
                )
    for group in ABLATION_GROUPS:
        out.append(
            {
                "label": f"ablation {ablation_codec} {ablation_allocator} 2.5 | g{group}",
                "method": ablation_codec,
                "group_size": group,
                **TRANSFORMS,
                "allocate": ablation_allocator,
                "target_bits": 2.5,
            }
        )
    return out


def write_config(path: Path) -> None:
    lines = [
        "# Bit allocation on the standard benchmark; written by `bench/allocation.py --write-config`.",
        "[eval]",
        *(f"{k} = {toml_value(v)}" for k, v in EVAL.items()),
    ]
    for run in runs():
        lines += ["", "[[runs]]", *(f"{k} = {toml_value(v)}" for k, v in run.items())]
    path.write_text("\n".join(lines) + "\n")


def cell(result: dict | None) -> str:
    if result is None:
        return "–"
    return f"{result['bits_per_element']:.2f} b: {result['delta_ppl_pct']:+.2f} % / {result['kl_mean']:.4f}"


def render(run: dict, minutes: float | None) -> str:
    by_label = {r["label"]: r for r in run["methods"]}
    lines = [
        MARKER + " (`bench/allocation.py`)",
        "",
        f"Every group of every K/V tensor gets its own width ([allocation.md](allocation.md)); the bit map is "
        f"counted. Same protocol as the sections below ({run['protocol']['windows']} windows, prefix "
        f"{run['protocol']['prefix']}, continuation {run['protocol']['continuation']}; reference PPL "
        f"{run['ppl_ref']:.3f}); every run uses keys per channel, un-RoPE and a Hadamard rotation, groups of 64. "
        "Cells: `bits/el: ΔPPL % / KL`; allocated runs are asked for the column's bits per element. "
        "`qaq w0` is QAQ's rule with width 0 allowed (`--bits-min 0`); `qaq` keeps its default narrowest "
        "width, which needs 2.57 bits per element here (–).",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"{datetime.date.today().isoformat()}"
        + (f"; {minutes:.1f} minutes" if minutes is not None else "")
        + ". Command: `.venv/bin/python bench/allocation.py` (CSV and JSON in `bench/results/allocation/`).",
        "",
        "| codec | allocation | " + " | ".join(f"{b:g} bits" for b in BUDGETS) + " |",
        "|---|---|" + "---|" * len(BUDGETS),
    ]
    for codec in CODECS:
        for allocator in ALLOCATORS:
            cells = [cell(by_label.get(f"{codec} {allocator} | {b:g}")) for b in BUDGETS]
            lines.append(f"| {codec} | {allocator} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Fixed widths with the same transforms, for comparison (their bits follow from the code width):",
        "",
        "| codec | " + " | ".join(f"{bits}-bit codes" for bits in FIXED_BITS) + " |",
        "|---|" + "---|" * len(FIXED_BITS),
    ]
    for codec in CODECS:
        fixed = [cell(by_label.get(f"{codec} fixed | {bits}-bit codes")) for bits in FIXED_BITS]
        lines.append(f"| {codec} | " + " | ".join(fixed) + " |")
    ablation = [r for r in run["methods"] if r["label"].startswith("ablation")]
    if ablation:
        name = ablation[0]["label"].split(" | ")[0].removeprefix("ablation ")
        lines += ["", f"Group size ablation ({name} bits per element):", "", "| group size | result |", "|---:|---|"]
        lines += [f"| {r['label'].split(' | g')[1]} | {cell(r)} |" for r in ablation]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = sweep_parser(__doc__, HERE / "allocation.toml")
    parser.add_argument("--write-config", action="store_true", help="Regenerate bench/allocation.toml and stop.")
    args = parser.parse_args()
    if args.write_config:
        write_config(args.config)
        return
    minutes = None
    if args.merge:
        run = merge_results(RESULTS, args.merge, {r["label"] for r in runs()})
    elif args.from_results:
        run = json.loads((RESULTS / "results.json").read_text())
    else:
        run, minutes = run_sweep(args.config, RESULTS)
    if not args.from_results:
        (args.out.parent / "allocation.png").write_bytes((RESULTS / "plot.png").read_bytes())
    replace_section(args.out, MARKER, render(run, minutes), before="## Codec toolbox on WikiText-2")


if __name__ == "__main__":
    main()
