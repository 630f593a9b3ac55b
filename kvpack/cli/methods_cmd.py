"""``kvpack methods``: the registered codecs and their options."""

from __future__ import annotations

import dataclasses

import typer

from kvpack.cli.options import ForceJson, JsonOut, check_json_path, command, json_only
from kvpack.cli.render import print_json, say, write_json


def register(app: typer.Typer) -> None:
    command(app, "methods")(methods)


def methods(json_path: JsonOut = None, force: ForceJson = False) -> None:
    """List the codecs (--method), the transforms every codec takes, the presets (--preset) and the baselines.

    The --json report: codecs (name, summary, options with their defaults, fixed_bits,
    block_size, source), transforms (flag, description), presets (name, summary, source,
    options, flags) and baselines (name, summary, source).

    Example: kvpack methods --json
    """
    check_json_path(json_path, force)
    if json_only(json_path):
        print_json(registry_report())
        return
    _print_methods()
    if json_path is not None:
        write_json(json_path, registry_report(), force=force)


def registry_report() -> dict:
    """What ``kvpack methods`` lists, as JSON-ready data."""
    from kvpack.codecs import Codec
    from kvpack.evaluation.baselines import BASELINES
    from kvpack.presets import PRESETS

    return {
        "codecs": [
            {
                "name": name,
                "summary": codec.summary,
                "options": {f.name: f.default for f in dataclasses.fields(codec.Params) if f.metadata.get("cli", True)},
                "fixed_bits": codec.fixed_bits,
                "block_size": codec.block_size,
                "transforms": {**codec.default_transforms, **codec.recommended_transforms},
                "recommended_options": dict(codec.recommended_params),
                "source": codec.source,
            }
            for name, codec in sorted(Codec.registry.items())
        ],
        "transforms": [{"flag": flag, "description": text} for flag, text in TRANSFORM_HELP],
        "presets": [
            {
                "name": p.name,
                "summary": p.summary,
                "source": p.source,
                "options": p.options,
                "flags": preset_flags(p.options),
            }
            for p in PRESETS.values()
        ],
        "baselines": [{"name": "fp16", "summary": FP16_SUMMARY, "source": None}]
        + [{"name": name, "summary": b.summary, "source": b.source} for name, b in BASELINES.items()],
    }


FP16_SUMMARY = "the reference float16 cache, stored losslessly in a real .kvp"


def _print_methods() -> None:
    from kvpack.codecs import Codec
    from kvpack.evaluation.baselines import BASELINES
    from kvpack.presets import PRESETS

    for name, codec in sorted(Codec.registry.items()):
        options = (
            ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(codec.Params) if f.metadata.get("cli", True))
            or "none"
        )
        say(f"{name}: {codec.summary}")
        say(f"    options (defaults): {options}")
        fixed = []
        if codec.fixed_bits is not None:
            fixed.append(f"{codec.fixed_bits}-bit elements")
        if codec.block_size is not None:
            fixed.append(f"blocks of {codec.block_size}")
        if fixed:
            say(f"    fixed by its spec: {', '.join(fixed)}")
        transforms = {**codec.recommended_params, **codec.default_transforms, **codec.recommended_transforms}
        if transforms:
            chosen = ", ".join(f"{key}={value}" for key, value in transforms.items())
            say(f"    from the command line, unless given: {chosen}")
        say(f"    source: {codec.source}")
    say("")
    say("transforms, with every codec (flags of compress, eval and dump):")
    for flag, text in TRANSFORM_HELP:
        say(f"  {flag}: {text}")
    say("")
    say("presets (--preset NAME; flags given with it override it):")
    for preset in PRESETS.values():
        say(f"{preset.name}: {preset.summary}")
        say(f"    expands to: {preset_flags(preset.options)}")
        say(f"    source: {preset.source}")
    say("")
    say("baselines for `kvpack eval --baseline` and sweeps (not .kvp codecs):")
    say(f"fp16: {FP16_SUMMARY}")
    for name, baseline in BASELINES.items():
        say(f"{name}: {baseline.summary}")
        say(f"    source: {baseline.source}")


TRANSFORM_HELP = (
    (
        "--key-axis / --value-axis token|channel",
        "groups along each token's features, or along G consecutive tokens of one channel "
        "(KIVI arXiv 2402.02750, KVQuant arXiv 2401.18079); channel-axis remainder tokens are stored exactly",
    ),
    (
        "--level head|layer|token",
        "QAQ (arXiv 2403.04643) group of one token and head / one token and layer / one token across all layers "
        "(K and V then stored as one stacked entry each, format 1.3)",
    ),
    ("--keep-first N / --keep-last N", "tokens stored exactly (attention sinks / most recent), counted in the bits"),
    ("--outlier-ratio R --outlier-select tails|magnitude", "values kept exactly per group (QAQ tails, KVQuant |x|)"),
    (
        "--rotate hadamard [--rotate-seed S]",
        "seeded sign flip + normalized Walsh-Hadamard on each head vector (QuaRot arXiv 2404.00456); "
        "a head_dim that is not a power of two is rotated in blocks of its largest power-of-two divisor",
    ),
    ("--unrope", "keys quantized before RoPE, rotated back exactly on decode (KVQuant pre-RoPE keys)"),
)


def preset_flags(options: dict) -> str:
    """A preset's options written as command-line flags."""
    flat = {k: v for k, v in options.items() if k != "transforms"} | options.get("transforms", {})
    parts = []
    for key, value in flat.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)
