"""``kvpack eval``: perplexity, KL and attention-output error of a codec on real text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kvpack.cli.option_groups import ALLOCATION, CODEC, SharedOptions, with_options
from kvpack.cli.options import (
    Continuation,
    Device,
    Force,
    GgufFile,
    JsonOut,
    ModelName,
    Prefix,
    ProfilePath,
    Windows,
    check_json_path,
    command,
    json_only,
)
from kvpack.cli.render import err_console, print_json, print_table, progress_bar, quality_table, say, write_json
from kvpack.errors import InvalidInputError


def register(app: typer.Typer) -> None:
    command(app, "eval")(evaluate)


@with_options(CODEC, ALLOCATION)
def evaluate(
    text_file: Annotated[Path, typer.Option("--text-file", help="UTF-8 text to evaluate on.", dir_okay=False)],
    model: ModelName = None,
    gguf_file: GgufFile = None,
    device: Device = "cpu",
    prefix: Prefix = 1024,
    continuation: Continuation = 256,
    windows: Windows = 8,
    *,
    shared: SharedOptions,
    config_file: Annotated[
        Optional[Path],
        typer.Option("--config", help="Codec config file (JSON or TOML), instead of codec options.", dir_okay=False),
    ] = None,
    baseline: Annotated[
        Optional[str],
        typer.Option(
            "--baseline",
            help="Evaluate a reference method instead: fp16, fp8-e4m3, fp8-e5m2, kivi-2-r0, kivi-4-r0 (KIVI's "
            "quantizer, no recent tokens in full precision; see `kvpack methods`).",
        ),
    ] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Print the attention-output error per layer.")] = False,
    profile: ProfilePath = None,
    json_path: JsonOut = None,
    force: Force = False,
) -> None:
    """Measure what a codec costs the model: PPL, ΔPPL, KL and top-1 agreement against the fp16 cache.

    Windows of prefix + continuation + 1 tokens start at i * (text tokens // windows). The
    prefix cache (cast to fp16: the reference) and its compress -> decompress round trip
    each predict the continuation; see docs/benchmarks.md for the protocol.

    Example: kvpack eval --text-file wiki.test.raw --method uniform --bits 4 --json result.json
    """
    from kvpack.cli.dump_cmd import read_text_file
    from kvpack.config_files import load_codec_config
    from kvpack.evaluation.evaluate import EvalMethod, EvalProtocol
    from kvpack.evaluation.evaluate import evaluate as run_evaluation
    from kvpack.model.dump import load_model, tokenize

    protocol = EvalProtocol(prefix, continuation, windows)
    allocation = shared.allocation()
    codec_given = shared.given("codec")
    if config_file is not None and baseline is not None:
        raise InvalidInputError("give --config or --baseline, not both")
    if (config_file is not None or baseline is not None) and codec_given:
        raise InvalidInputError(f"{', '.join(codec_given)} cannot be combined with --config or --baseline")
    if baseline is not None:
        if allocation is not None:
            raise InvalidInputError("--allocate applies to a codec, not to --baseline")
        chosen = EvalMethod.named_baseline(baseline)
    else:
        config = load_codec_config(config_file) if config_file is not None else shared.codec()
        if profile is not None:
            from kvpack.profile import load_profile

            config = config.with_profile(load_profile(profile))
        chosen = EvalMethod.codec(config, allocation=allocation)
    json_to_stdout = json_only(json_path)
    check_json_path(json_path, force, text_file, config_file, what="the text and config files")
    text = read_text_file(text_file)
    with err_console.status("loading model"):
        loaded = load_model(model, gguf_file, device)
    if shared["level"] is not None and chosen.config is not None:
        from kvpack.model.dump import cache_dims

        chosen = EvalMethod.codec(shared.codec(cache_dims(loaded.model)), allocation=allocation)
    elif profile is not None and chosen.config is not None and not chosen.config.whole_tensor:
        raise InvalidInputError("--profile applies to --method transform")
    token_ids = tokenize(loaded.tokenizer, text)
    protocol.offsets(token_ids.shape[1])  # too short a text fails before any work
    with progress_bar("eval") as update:
        run = run_evaluation(loaded, token_ids, [chosen], protocol, progress=update)
    result = run["methods"][0]
    report = {
        "model": loaded.name,
        "text_file": str(text_file),
        **{k: v for k, v in run.items() if k != "methods"},
        **result,
    }
    if json_to_stdout:
        print_json(report)
        return
    say(
        f"{text_file}: {run['n_tokens']:,} tokens, {windows} window{'s' if windows != 1 else ''} of {prefix} + "
        f"{continuation} tokens, "
        f"{run['targets']:,} targets; reference (fp16 cache) PPL {run['ppl_ref']:.4f}"
    )
    print_table(quality_table("quality against the fp16 cache", run["methods"]))
    attention = result["attention_error"]
    if attention:
        worst = max(range(len(attention)), key=attention.__getitem__)
        say(
            f"attention-output error: mean over layers {result['attention_error_mean']:.4f}, "
            f"worst layer {worst} ({attention[worst]:.4f})"
        )
    if per_layer:
        for layer, value in enumerate(attention):
            say(f"  layer {layer:3d}  attention-output error {value:.5f}")
    if json_path is not None:
        write_json(json_path, report, force=force)
