"""The ``kvpack`` command line: one module per command; no numerics here."""

from kvpack.cli.app import app, main

__all__ = ["app", "main"]
