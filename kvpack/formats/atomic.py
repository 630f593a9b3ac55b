"""Crash-safe output files: a temporary file in the target folder, fsynced, then renamed over the target.

Every file kvpack writes goes through :func:`atomic_output`: the data goes to a temporary
file in the target folder, is flushed and fsynced, and only then renamed over the target
(``os.replace``), so a failure at any point leaves either the previous file or nothing.
An existing target is refused unless ``force`` is given. A URL target (``s3://...``) is written
locally the same way and uploaded only when complete (:func:`kvpack.storage.upload_on_success`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kvpack.errors import InvalidInputError, OutputExistsError
from kvpack.storage import check_output, is_url, location, upload_on_success


def check_output_path(path: str | os.PathLike, force: bool) -> Path | str:
    """Refuse an existing output (without ``force``) or a missing folder, before any work.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
        InvalidInputError: the folder (a URL's bucket) does not exist, or ``path`` is a directory or
            not a regular file.

    Returns:
        The path to write: ``path``, or the file it links to; a URL as given.
    """
    path = location(path)
    if is_url(path):
        return check_output(str(path), force)
    if path.is_symlink():  # write the file the link points to (the link stays)
        try:
            path = path.resolve(strict=False)
        except (RuntimeError, OSError) as exc:  # a symlink loop
            raise InvalidInputError(f"output {path}: cannot follow the link ({exc})") from None
    if path.is_dir():
        raise InvalidInputError(f"output {path} is a directory")
    if path.exists() and not path.is_file():
        raise InvalidInputError(f"output {path} is not a regular file (a device, fifo or socket); choose a file path")
    if path.exists() and not force:
        raise OutputExistsError(f"output {path} exists (pass `force=True` to overwrite it)")
    if not path.parent.is_dir():
        raise InvalidInputError(f"output folder {path.parent} does not exist")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it to ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and
    ``path`` is untouched.

    A URL ``path``: the temporary file is local, and is uploaded (one complete upload, aborted on
    any error) only on success.

    Raises:
        OutputExistsError, InvalidInputError: see :func:`check_output_path`.
    """
    path = location(path)
    if is_url(path):
        with upload_on_success(str(path), force) as local:
            yield local
        return
    target = check_output_path(path, force)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise InvalidInputError(f"cannot write to {target.parent}: {exc.strerror}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates mode 0600; give the output the mode a plain open() would (or keep the old file's)
        mode = target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask()
        yield tmp
        os.chmod(tmp, mode)  # after writing: some writers (safetensors) replace the temp file with their own
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if force:
            os.replace(tmp, target)
        else:
            _link_new(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _link_new(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target`` only if ``target`` does not exist, atomically (no check-then-replace race).

    Raises:
        OutputExistsError: ``target`` appeared while the output was being written.
    """
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise OutputExistsError(f"output {target} exists (pass `force=True` to overwrite it)") from None
    except OSError:  # a file system without hard links: the best we can do is check, then rename
        check_output_path(target, force=False)
        os.replace(tmp, target)
        return
    tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
