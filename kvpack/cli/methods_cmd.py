"""``kvpack methods``: the registered codecs and their options."""

from __future__ import annotations

import dataclasses

import typer
from rich.table import Table

from kvpack.cli.render import console


def register(app: typer.Typer) -> None:
    app.command("methods")(methods)


def methods() -> None:
    """List the codecs (--method), their options and sources."""
    from kvpack.codecs import Codec

    table = Table(title="methods", title_justify="left")
    for column in ("method", "what it does", "options (default)", "source"):
        table.add_column(column)
    for name, codec in sorted(Codec.registry.items()):
        options = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(codec.Params))
        table.add_row(name, codec.summary, options or "-", codec.source)
    console.print(table)
