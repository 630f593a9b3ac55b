"""``kvpack sweep``: run a grid of codecs and the baselines through ``eval``; table, CSV, JSON, plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvpack.cli.options import Force, JsonOut, check_json_path, command, json_only
from kvpack.cli.render import err_console, print_json, print_table, progress_bar, quality_table, say, write_json


def register(app: typer.Typer) -> None:
    command(app, "sweep")(sweep)


OUTPUT_FILES = ("results.csv", "results.json", "plot.png")


def sweep(
    config: Annotated[Path, typer.Option("--config", help="Sweep config (TOML).", dir_okay=False)],
    output_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--output-dir",
            help="Where results.csv, results.json and plot.png go (default: output.dir of the config).",
            file_okay=False,
        ),
    ] = None,
    json_path: JsonOut = None,
    force: Force = False,
) -> None:
    """Evaluate methods x bits x group sizes x symmetric x outlier ratios, single [[runs]] (transforms,
    presets), plus baselines, on one text.

    Writes results.csv, results.json and plot.png (ΔPPL and KL versus bits per element)
    and prints the table with the Pareto front (bits per element, KL) marked. See
    bench/quality.toml (a grid) and bench/toolbox.toml ([[runs]]) for example configs.

    The --json report is results.json: the protocol, ppl_ref, model, text_file, the config
    (config_file) and methods, the results list (one entry per method, as eval's report).

    Example: kvpack sweep --config bench/quality.toml --output-dir sweep-out
    """
    from kvpack.cli.plots import csv_text, plot, require_matplotlib
    from kvpack.errors import InvalidInputError
    from kvpack.evaluation.evaluate import check_methods, evaluate
    from kvpack.evaluation.sweep import load_sweep_config, mark_pareto, results_json, smallest_bits_within
    from kvpack.formats.atomic import atomic_output, check_output_path
    from kvpack.model.dump import load_model, tokenize

    settings = load_sweep_config(config)
    if settings.text_file is None:
        raise InvalidInputError(f"{config}: set eval.text_file")
    if not settings.text_file.is_file():
        raise InvalidInputError(
            f"{config}: eval.text_file {settings.source['eval']['text_file']!r} is {settings.text_file}, which "
            "does not exist; put the text there (paths in a config are relative to its folder)"
        )
    require_matplotlib()  # before the long run, not after
    folder = output_dir or settings.output_dir
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(f"{folder} exists and is not a folder")
    if folder.is_dir():
        for name in OUTPUT_FILES:
            check_output_path(folder / name, force)
    check_json_path(
        json_path, force, config, *(folder / name for name in OUTPUT_FILES), what="the config and results files"
    )
    from kvpack.cli.dump_cmd import read_text_file

    text = read_text_file(settings.text_file)
    with err_console.status("loading model"):
        loaded = load_model(settings.model, settings.gguf_file, settings.device)
    token_ids = tokenize(loaded.tokenizer, text)
    settings.protocol.offsets(token_ids.shape[1])
    check_methods(loaded, settings.methods)
    windows = settings.protocol.windows
    err_console.print(
        f"{len(settings.methods)} methods x {windows} window{'s' if windows != 1 else ''}", highlight=False
    )
    with progress_bar("sweep") as update:
        run = evaluate(loaded, token_ids, settings.methods, settings.protocol, progress=update)
    results = run["methods"]
    mark_pareto(results)
    run.update(model=loaded.name, text_file=str(settings.text_file))
    folder.mkdir(parents=True, exist_ok=True)
    title = (
        f"{loaded.name} on {settings.text_file.name}: {settings.protocol.windows} windows, prefix "
        f"{settings.protocol.prefix}, continuation {settings.protocol.continuation}; ref PPL {run['ppl_ref']:.3f}"
    )
    # all three are written to temporary files first: a failure leaves none of them behind
    with (
        atomic_output(folder / "plot.png", force=force) as png,
        atomic_output(folder / "results.json", force=force) as js,
        atomic_output(folder / "results.csv", force=force) as table,
    ):
        plot(results, png, title)
        js.write_text(results_json(run, settings), encoding="utf-8")
        table.write_text(csv_text(results), encoding="utf-8")
    if json_only(json_path):
        print_json(json.loads(results_json(run, settings)))
        return
    say(f"reference (fp16 cache) PPL {run['ppl_ref']:.4f} over {run['targets']:,} targets")
    ordered = sorted(results, key=lambda r: (r["bits_per_element"], r["delta_ppl_pct"]))
    print_table(quality_table("sweep (* = on the Pareto front of bits per element and KL)", ordered, pareto=True))
    for family, best in smallest_bits_within(results).items():
        say(
            f"{family}: "
            + (
                f"ΔPPL within 1% from {best['bits_per_element']:.3f} bits per element ({best['label']})"
                if best
                else "never within 1% in this sweep"
            )
        )
    say(f"wrote {folder / 'results.csv'}, {folder / 'results.json'}, {folder / 'plot.png'}")
    if json_path is not None:
        write_json(json_path, json.loads(results_json(run, settings)), force=force)
