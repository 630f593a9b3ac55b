"""``kvpack methods``: the registered codecs and their options."""

from __future__ import annotations

import dataclasses

import typer

from kvpack.cli.render import say


def register(app: typer.Typer) -> None:
    app.command("methods")(methods)


def methods() -> None:
    """List the codecs (--method), their options and sources, and the evaluation baselines."""
    from kvpack.baselines import BASELINES
    from kvpack.codecs import Codec

    for name, codec in sorted(Codec.registry.items()):
        options = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(codec.Params)) or "none"
        say(f"{name}: {codec.summary}")
        say(f"    options (defaults): {options}")
        say(f"    source: {codec.source}")
    say("")
    say("baselines for `kvpack eval --baseline` and sweeps (not .kvp codecs):")
    say("fp16: the reference float16 cache, stored losslessly in a real .kvp")
    for name, baseline in BASELINES.items():
        say(f"{name}: {baseline.summary}")
        say(f"    source: {baseline.source}")
