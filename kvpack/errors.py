"""The kvpack exception hierarchy.

Every error kvpack raises on purpose derives from :class:`KvpackError`; the CLI turns
those into one ``error: ...`` line and exit code 2. Anything else is a bug.
"""

from __future__ import annotations


class KvpackError(Exception):
    """Root of every error kvpack raises on purpose."""


class InvalidInputError(KvpackError, ValueError):
    """An argument, option, tensor or input file is not acceptable (wrong shape, NaN/Inf, bad option)."""


class FormatError(KvpackError):
    """A ``.kvp`` or safetensors file is not readable as what it claims to be."""


class TruncatedFileError(FormatError):
    """The file ends before a field, the header or a section it declares."""


class UnsupportedVersionError(FormatError):
    """The file's format version is newer than this reader understands."""


class ChecksumMismatchError(FormatError):
    """A header or data section does not match its recorded CRC-32."""


class HeaderLimitError(FormatError):
    """The header declares a size, count or shape beyond the reader's limits."""


class OutputExistsError(KvpackError, FileExistsError):
    """The output file exists and ``force`` was not given."""


class ModelMismatchError(KvpackError):
    """A cache file was made by a different model than the one it is loaded into."""


class ModelUnavailableError(KvpackError):
    """The requested model (or the optional model dependencies) cannot be loaded."""


def error_message(exc: KvpackError | OSError) -> str:
    """The text kvpack prints after ``error: `` for a known error, on one line.

    A :class:`KvpackError` says what went wrong itself; an ``OSError`` (the environment: disk
    full, permissions, a vanished file) gives its reason and the file it concerns.
    """
    if isinstance(exc, KvpackError):
        text = str(exc)
    else:
        text = f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
    return " ".join(text.splitlines())


def option(name: str, value: object = None) -> str:
    """An option of the Python API named in a message: ``target_bits``, or ``force=True`` with a
    value. Messages name options this way only; the command line shows the flag instead
    (``--target-bits``, ``--force``: :func:`kvpack.cli.app.cli_terms`)."""
    return f"`{name}`" if value is None else f"`{name}={value}`"


def brief_list(values, most: int = 5) -> str:
    """Up to ``most`` values, each cut by :func:`brief`, then "and N more"."""
    values = list(values)
    shown = ", ".join(brief(v) for v in values[:most])
    return shown + (f" and {len(values) - most} more" if len(values) > most else "")


def brief_text(text: str, limit: int = 80) -> str:
    """``text`` as it is when printable (else its repr), cut to ``limit`` characters."""
    shown = text if text.isprintable() else repr(text)
    return shown if len(shown) <= limit else f"{shown[: limit - 3]}..."


def brief(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages echo values read from files."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def lookup(table: dict, name, kind: str, also: tuple[str, ...] = (), sort: bool = True):
    """``table[name]``, or an :class:`InvalidInputError` naming the ``kind`` and the choices.

    Raises:
        InvalidInputError: ``name`` is not a key of ``table``.
    """
    try:
        return table[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name from a file
        choices = [*also, *(sorted(table) if sort else table)]
        raise InvalidInputError(f"unknown {kind} {brief(name)}; available: {', '.join(choices)}") from None
