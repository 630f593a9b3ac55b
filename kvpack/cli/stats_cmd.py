"""``kvpack stats``: compare two caches (safetensors or .kvp)."""

from __future__ import annotations

from typing import Annotated

import typer

from kvpack.cli.options import ForceJson, JsonOut, PerLayer, ProfilePath, check_json_path, command, json_only
from kvpack.cli.render import error_table, print_json, print_table, write_json
from kvpack.storage import location


def register(app: typer.Typer) -> None:
    command(app, "stats")(stats)


def stats(
    original: Annotated[
        str,
        typer.Argument(
            help="Reference cache (.safetensors or .kvp; a path or a URL).", metavar="ORIGINAL", parser=location
        ),
    ],
    reconstructed: Annotated[
        str,
        typer.Argument(
            help="Cache to compare (.safetensors or .kvp; a path or a URL).", metavar="RECONSTRUCTED", parser=location
        ),
    ],
    per_layer: PerLayer = False,
    profile: ProfilePath = None,
    json_path: JsonOut = None,
    force: ForceJson = False,
) -> None:
    """Error of RECONSTRUCTED against ORIGINAL: relative MSE, SNR, max abs error, cosine.

    Examples: kvpack stats cache.safetensors cache.kvp; kvpack stats cache.safetensors cache.kvp --json
    """
    from kvpack.report import compare_caches

    check_json_path(json_path, force, original, reconstructed, what="the caches compared")
    result = compare_caches(original, reconstructed, profile)
    if json_only(json_path):
        print_json(result)
        return
    rows = [(name, result["rows"][name]) for name in ("key", "value", "all")]
    if per_layer:
        rows += [(f"layer {row['layer']}", row) for row in result["layers"]]
    print_table(error_table(f"{reconstructed} vs {original} ({result['tensors']} K/V tensors)", rows))
    if json_path is not None:
        write_json(json_path, result, force=force)
