"""Replace one ``## `` section of docs/benchmarks.md, leaving the others as they are."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, marker: str, text: str, before: str | None = None) -> None:
    """Put ``text`` (which starts with ``marker``) where the section starting with ``marker`` is.

    A missing section goes before the section starting with ``before`` when there is one,
    else at the end.
    """
    existing = path.read_text() if path.exists() else "# Benchmarks\n"
    head, found, rest = existing.partition(marker)
    tail = rest[rest.find("\n## ") + 1 :] if found and "\n## " in rest else ""
    if not found and before and before in existing:
        head, found_before, rest_before = existing.partition(before)
        tail = found_before + rest_before
    path.write_text(head.rstrip("\n") + "\n\n" + text + ("\n" + tail if tail else ""))
