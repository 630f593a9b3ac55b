"""Strict JSON of reports: non-finite floats become ``null`` (no torch here: the CLI imports it at start-up)."""

from __future__ import annotations

import math


def json_safe(value):
    """A copy of nested dicts / lists with non-finite floats replaced by ``None`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
