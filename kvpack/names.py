"""Tensor names with a meaning: K/V tensors of one layer, and stacked entries of all layers (docs/format.md §4)."""

from __future__ import annotations

import re

KV_NAME = re.compile(r"layers\.(0|[1-9][0-9]{0,8})\.(key|value)")
STACKED_NAME = re.compile(r"layers\.all\.(key|value)")
#: The two roles of a K/V tensor, in file order.
ROLES = ("key", "value")


def kv_tensor_name(layer: int, role: str) -> str:
    return f"layers.{layer}.{role}"


def parse_kv_name(name: str) -> tuple[int, str] | None:
    """``(layer, "key" | "value")`` for a KV tensor name, else ``None``.

    A KV name is exactly ``layers.<i>.key`` or ``layers.<i>.value``, ``<i>`` in ASCII digits
    without leading zeros (docs/format.md §4).
    """
    match = KV_NAME.fullmatch(name)
    return (int(match.group(1)), match.group(2)) if match else None


def stacked_name(role: str) -> str:
    """Name of the entry that stacks every layer's ``role`` tensor (``stack_layers``)."""
    return f"layers.all.{role}"


def parse_stacked_name(name: str) -> str | None:
    """``"key"`` / ``"value"`` for ``layers.all.key`` / ``layers.all.value``, else ``None``."""
    match = STACKED_NAME.fullmatch(name)
    return match.group(1) if match else None


def tensor_order(name: str) -> tuple:
    """Sort key: K/V tensors by layer (numerically), key before value, then other tensors by name."""
    parsed = parse_kv_name(name)
    return (0, parsed[0], parsed[1] != "key", "") if parsed else (1, 0, False, name)
