"""``kvpack calibrate``: run a model over calibration text and write its transform-coding profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kvpack.cli.options import Device, Force, GgufFile, JsonOut, ModelName, check_json_path, command, json_only
from kvpack.cli.render import err_console, human_bytes, print_json, progress_bar, say, write_json
from kvpack.storage import location


def register(app: typer.Typer) -> None:
    command(app, "calibrate")(calibrate)


def calibrate(
    model: ModelName = None,
    gguf_file: GgufFile = None,
    text_file: Annotated[
        Optional[Path],
        typer.Option(
            "--text-file", help="UTF-8 calibration text (default: the text bundled with kvpack).", dir_okay=False
        ),
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Use at most this many tokens of the text.")] = 8192,
    output: Annotated[
        Optional[str],
        typer.Option(
            "--output",
            "-o",
            help="Profile file, a path or a URL (default: the profile directory, $KVPACK_PROFILES or "
            "~/.cache/kvpack/profiles, as <model weights fingerprint>.safetensors, where compress and decompress "
            "find it).",
            parser=location,
        ),
    ] = None,
    device: Device = "cpu",
    json_path: JsonOut = None,
    force: Force = False,
) -> None:
    """Calibrate the transform codec for a model: per-layer PCA bases and error weights, one profile file.

    Per layer: the PCA basis of its keys (before RoPE) and values, and how much each layer's errors
    move the model's predictions (measured).

    One profile serves every cache of its model (`kvpack compress --method transform`). Without
    --text-file, uses the bundled calibration text (WikiText-2 outside the evaluation windows and
    Python source). Takes a few minutes on a CPU for a 135M model.

    The --json report: output, fingerprint, model, weights_fingerprint, layers, features,
    calibration_tokens, profile_bytes.

    Example: kvpack calibrate; kvpack calibrate --model DIR --gguf-file model.gguf -o model.profile
    """
    from kvpack.cli.dump_cmd import read_text_file
    from kvpack.formats.atomic import atomic_output, check_output_path
    from kvpack.model.calibrate import calibrate as run_calibration
    from kvpack.model.calibrate import calibration_text
    from kvpack.model.dump import load_model
    from kvpack.profile import default_profile_path, link_aliases

    if max_tokens < 2:
        from kvpack.errors import InvalidInputError

        raise InvalidInputError(f"--max-tokens must be at least 2, got {max_tokens}")
    if output is not None:
        check_output_path(output, force)
    check_json_path(json_path, force, output, text_file, what="the profile and the text file")
    text = read_text_file(text_file) if text_file is not None else calibration_text()
    with err_console.status("loading model"):
        loaded = load_model(model, gguf_file, device)
    with progress_bar("calibrate tokens") as update:
        profile = run_calibration(loaded, text, max_tokens, progress=lambda done, total: update(done, total))
    target = output or default_profile_path(profile.model_fingerprint)
    if output is None:  # the profile directory is ours to create
        target.parent.mkdir(parents=True, exist_ok=True)
    data = profile.to_bytes()
    with atomic_output(target, force=force or output is None) as tmp:  # the directory's profile is replaced
        tmp.write_bytes(data)
    if output is None:  # llama.cpp state files find it by the GGUF's fingerprint
        link_aliases(target, profile)
    first = profile.layers[0]["key"]
    report = {
        "output": str(target),
        "fingerprint": profile.fingerprint,
        "model": profile.metadata.get("model"),
        "weights_fingerprint": profile.model_fingerprint,
        "layers": len(profile.layers),
        "features": first.features,
        "calibration_tokens": int(profile.metadata["calibration_tokens"]),
        "profile_bytes": len(data),
    }
    if json_only(json_path):
        print_json(report)
        return
    say(
        f"wrote {target}: profile {profile.fingerprint} of {report['model']} (weights {profile.model_fingerprint}), "
        f"{report['layers']} layers x {report['features']} features, {report['calibration_tokens']} calibration "
        f"tokens, {human_bytes(len(data))}"
    )
    if json_path is not None:
        write_json(json_path, report, force=force)
