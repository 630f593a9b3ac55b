"""Sweep results as files: the CSV table and the plot of ΔPPL % and KL against bits per element (presentation only)."""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

from kvpack.config import TRANSFORM_DEFAULTS
from kvpack.errors import ModelUnavailableError
from kvpack.evaluation.sweep import series_name

CSV_COLUMNS = (
    "label",
    "kind",
    "method",
    "bits",
    "group_size",
    "outlier_ratio",
    "options",
    "bits_per_element",
    "effective_bits_per_element",
    "bits_source",
    "ppl",
    "delta_ppl_pct",
    "kl_mean",
    "top1_agreement_pct",
    "rel_mse_key",
    "rel_mse_value",
    "attention_error_mean",
    "pareto",
)


def csv_text(results: list[dict]) -> str:
    """One CSV row per method (columns :data:`CSV_COLUMNS`)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for result in results:
        config = result["config"]
        params = config.get("params") or {}
        writer.writerow(
            {
                **{k: result.get(k) for k in CSV_COLUMNS if k in result},
                "kind": config["kind"],
                "method": config["method"],
                "bits": config.get("bits", ""),
                "group_size": config.get("group_size", ""),
                "outlier_ratio": config.get("outlier_ratio", ""),
                "options": ";".join(
                    f"{k}={v}"
                    for k, v in {
                        **params,
                        **{k: v for k, v in config.items() if k in TRANSFORM_DEFAULTS},
                        **{k: v for k, v in (config.get("allocation") or {}).items() if v is not None},
                    }.items()
                ),
            }
        )
    return buffer.getvalue()


def require_matplotlib() -> None:
    """Raises: ModelUnavailableError: matplotlib (for the plot) is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ModelUnavailableError("the sweep plot needs matplotlib: pip install 'kvpack[models]'")


def plot(results: list[dict], path: Path, title: str) -> None:
    """PNG of ΔPPL % and KL versus bits per element: one line per codec series, baselines as markers."""
    require_matplotlib()
    import matplotlib  # optional heavy dependency (the models extra), loaded on first use

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend

    series: dict[str, list[dict]] = {}
    for result in results:
        series.setdefault(series_name(result), []).append(result)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = plt.get_cmap("tab20").colors if len(series) > 10 else plt.get_cmap("tab10").colors
    for axis, key, ylabel in (
        (axes[0], "delta_ppl_pct", "ΔPPL % vs fp16 cache (symlog)"),
        (axes[1], "kl_mean", "mean KL(ref ‖ method), nats (log; 0 drawn at 1e-6)"),
    ):
        for index, (name, points) in enumerate(series.items()):
            points = sorted(points, key=lambda r: r["bits_per_element"])
            xs = [p["bits_per_element"] for p in points]
            ys = [max(p[key], 1e-6) if key == "kl_mean" else p[key] for p in points]
            is_baseline = points[0]["config"]["kind"] != "codec"
            axis.plot(
                xs,
                ys,
                marker="s" if is_baseline else "o",
                linestyle="--" if is_baseline else "-",
                linewidth=1.2,
                markersize=6 if is_baseline else 4,
                label=name,
                color=colors[index % len(colors)],
            )
        axis.set_xscale("log", base=2)
        axis.set_xticks([2, 3, 4, 5, 8, 16], labels=["2", "3", "4", "5", "8", "16"])
        axis.set_xlabel("bits per element (all metadata counted)")
        axis.set_ylabel(ylabel)
        if key == "kl_mean":
            axis.set_yscale("log")
        else:
            axis.set_yscale("symlog", linthresh=1.0)
            lowest = min(r[key] for r in results)
            axis.set_ylim(bottom=min(-1.0, lowest * 1.5))
            axis.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
            axis.text(16, 1.0, "+1%", fontsize=7, color="grey", va="bottom", ha="right")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
