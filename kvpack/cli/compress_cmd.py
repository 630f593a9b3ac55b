"""``kvpack compress``: quantize every K/V tensor of a dump into a ``.kvp`` container."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kvpack.cli.option_groups import ALLOCATION, CODEC, ENTROPY, SharedOptions, with_options
from kvpack.cli.options import (
    Force,
    GgufModelPath,
    Jobs,
    JsonOut,
    PerLayer,
    ProfilePath,
    check_json_path,
    command,
    json_only,
)
from kvpack.cli.render import (
    allocation_summary,
    bits_table,
    entropy_summary,
    error_table,
    human_bytes,
    print_json,
    print_table,
    progress_bar,
    report_rows,
    say,
    write_json,
)
from kvpack.errors import InvalidInputError
from kvpack.storage import location


def register(app: typer.Typer) -> None:
    command(app, "compress")(compress)


@with_options(CODEC, ALLOCATION, ENTROPY)
def compress(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Input .safetensors dump(s) or llama.cpp state file (with --model): files, directories (their "
            "*.safetensors) or quoted glob patterns; local paths or URLs (s3://bucket/store/, gs://..., memory://...).",
            metavar="INPUT",
            parser=location,
        ),
    ],
    output: Annotated[
        Optional[str],
        typer.Option(
            "--output",
            "-o",
            help="Output .kvp (default: INPUT with .kvp); with several inputs an existing directory (DIR/<name>.kvp) "
            "or a URL prefix (s3://bucket/packed/).",
            parser=location,
        ),
    ] = None,
    jobs: Jobs = 1,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="Batch: local (a process pool, --jobs) or dask (a Dask cluster: --scheduler, else a local one of "
            "--jobs workers). Outputs that exist and verify are skipped (a rerun resumes).",
        ),
    ] = "local",
    scheduler: Annotated[
        Optional[str], typer.Option("--scheduler", help="--engine dask: the scheduler's address, tcp://HOST:8786.")
    ] = None,
    *,
    shared: SharedOptions,
    per_layer: PerLayer = False,
    model: GgufModelPath = None,
    lossless: Annotated[
        bool, typer.Option("--lossless", help="Store K/V exactly (in their dtype), no codec: a byte-exact archive.")
    ] = False,
    profile: ProfilePath = None,
    embed_profile: Annotated[
        bool,
        typer.Option("--embed-profile", help="Transform codec: store the profile in the file (counted in its bits)."),
    ] = False,
    json_path: JsonOut = None,
    force: Force = False,
) -> None:
    """Quantize every K and V tensor of a dump into a bit-packed .kvp file and report size and error.

    Examples: kvpack compress cache.safetensors --method adaptive --bits 3 --group-size 64;
    kvpack compress cache.safetensors --preset kivi-2-r128;
    kvpack compress cache.safetensors --method uniform --bits 3 --key-axis channel --unrope --keep-first 1;
    kvpack compress cache.safetensors --method transform --target-bits 2 (after kvpack calibrate);
    kvpack compress slot.bin --model SmolLM2.gguf -o slot.kvp (a llama.cpp slot or session file);
    kvpack compress store/ 'more/*.safetensors' -o packed/ --jobs 0 (many files: a summary table, exit 2 if any failed)
    """
    from kvpack.batch import expand_inputs, output_path, resolve_jobs
    from kvpack.compress import compress_file
    from kvpack.sources import kv_dims
    from kvpack.storage import is_directory, with_suffix

    allocation = shared.allocation()
    entropy = shared.entropy()
    config = shared.codec()  # every flag checked before the input is read
    if lossless:
        given = shared.given("codec") + shared.given("allocation")
        if given:
            raise InvalidInputError(f"--lossless stores K/V exactly; drop {', '.join(given)}")
        config = None
    workers = resolve_jobs(jobs)
    expansion = expand_inputs(inputs)
    if model is not None and expansion.batch:
        raise InvalidInputError("--model applies to one llama.cpp state file at a time")
    if lossless and (expansion.batch or embed_profile or profile is not None):
        raise InvalidInputError("--lossless applies to one input, without --profile / --embed-profile")
    if embed_profile and (config is None or not config.whole_tensor):
        raise InvalidInputError("--embed-profile applies to --method transform")
    if engine not in ("local", "dask"):
        raise InvalidInputError(f"--engine must be local or dask, got {engine!r}")
    if scheduler is not None and engine != "dask":
        raise InvalidInputError("--scheduler goes with --engine dask")
    if expansion.batch or engine == "dask":
        if config is None or model is not None:
            raise InvalidInputError("the batch form takes safetensors dumps and a codec (not --lossless or --model)")
        if profile is not None and not config.whole_tensor:
            raise InvalidInputError("--profile weighs the report of one input at a time (other codecs than transform)")
        if profile is not None or embed_profile:
            from kvpack.profile import load_profile

            config = config.with_profile(load_profile(profile)) if profile is not None else config
            if embed_profile:
                raise InvalidInputError("--embed-profile applies to one input at a time")
        from kvpack.cli.compress_batch import compress_many

        compress_many(
            expansion, output, shared, config, allocation, workers, json_path, force, entropy, engine, scheduler
        )
        return
    input = expansion.files[0]
    if output is not None and is_directory(output):  # as in the batch form: DIR/<name>.kvp
        output = output_path(input, output)
    if shared["level"] is not None:
        config = shared.codec(kv_dims(input, model))
    output = output or with_suffix(input, ".kvp")
    json_to_stdout = json_only(json_path)
    check_json_path(json_path, force, input, output)
    with progress_bar("compress") as update:
        report = compress_file(
            input,
            output,
            config,
            force=force,
            progress=update,
            allocation=allocation,
            entropy=entropy,
            profile=profile,
            embed_profile=embed_profile,
            model=model,
        )
    if json_to_stdout:
        print_json(report)
        return
    say(
        f"{input} ({human_bytes(report['input_bytes'])}) -> {output} ({human_bytes(report['file_bytes'])}): "
        f"{config.describe() if config is not None else 'lossless'}{_budget(config, allocation)}, "
        f"{entropy.describe()}; "
        + (
            f"{report['ratio_vs_input']:.2f}x smaller than the input"
            if report["ratio_vs_input"] >= 1
            else f"{1 / report['ratio_vs_input']:.2f}x larger than the input"
        )
        + (f", {report['ratio_vs_fp16']:.2f}x vs fp16" if report["ratio_vs_fp16"] else ", no K/V elements")
    )
    if "profile" in report:
        say(
            f"profile {report['profile']['fingerprint']}: {human_bytes(report['profile']['bytes'])} per model, "
            + (
                "embedded (counted in the bits above)"
                if report["profile"]["embedded"]
                else "not in the file (--embed-profile)"
            )
        )
    if "weighted_by" in report:
        say(
            f"est. KL: the error weighted by profile {report['weighted_by']} (query and output-projection "
            "statistics, measured layer sensitivity), an estimate of the KL divergence it causes"
        )
    else:
        say("est. KL: no profile of this model (`kvpack calibrate` makes one; --profile PATH)")
    if entropy_summary(report["rows"]["all"]):
        say(entropy_summary(report["rows"]["all"]))
    for line in allocation_summary(report["allocation"]) if "allocation" in report else []:
        say(line)
    rows = report_rows(report, per_layer)
    print_table(bits_table("bits per element (every byte of the file counted)", rows))
    print_table(error_table("reconstruction error (bytes: stored, header share included)", rows))
    all_bits = report["rows"]["all"]["bits_per_element"]
    exact = all_bits["exact"] / all_bits["total"] if all_bits["total"] else 0.0
    if exact > 0.5:
        say(
            f"warning: {100 * exact:.0f}% of the file's K/V bits are tokens stored exactly (--keep-first/--keep-last, "
            "or channel-axis tokens that do not fill a group of --group-size); use fewer or smaller groups"
        )
    for role in ("key", "value"):
        rel = report["rows"][role].get("rel_mse")
        if rel is not None and rel >= 1:
            say(
                f"warning: {role}s reconstruct worse than all zeros (relative MSE {rel:.3g}); use more bits or smaller groups"
            )
    if json_path is not None:
        write_json(json_path, report, force=force)


def _budget(config, allocation) -> str:
    """How the file's bits were budgeted, for the summary line."""
    if config is not None and config.whole_tensor:
        from kvpack.compress import transform_target

        return f", {transform_target(allocation):g} bits per element of the file"
    return "" if allocation is None else ", " + allocation.describe()
