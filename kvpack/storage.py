"""Where files live: local paths, or fsspec URLs (``s3://``, ``gs://``, ``memory://``, ``file://``) read by range and written in one complete upload.

A *location* is a :class:`~pathlib.Path` for a local file (``file://`` URLs included) or the URL
text for anything else (``Path`` would fold its ``//``); :func:`location` makes one from what a
user typed. Everything a URL needs goes through fsspec (``s3fs`` for ``s3://``, ``gcsfs`` for
``gs://``: the ``kvpack[s3]`` / ``kvpack[gcs]`` extras), with the storage options of the innermost
:func:`storage_options` block (credentials, ``endpoint_url``, ...).

Reads: :func:`open_read` returns a seekable file whose reads are ranged requests of what is read
(a ``.kvp``'s preamble, header and the sections asked for), with a small read-ahead.
:func:`local_copy` streams an object to a local temporary file a chunk at a time, for readers that
need a local file (safetensors' memory map, llama.cpp state files).

Writes: :func:`upload_on_success` yields a local temporary path; only when the block succeeds is
the file uploaded, in one fsspec transaction (for S3 a multipart upload completed only after its
last part), and any error or interrupt on the way aborts it, so no partial
object ever appears under the final name. Without ``force`` the object is created with
``mode="xb"`` (S3: ``If-None-Match: *``), so an object that appeared meanwhile is not overwritten
either.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path

from kvpack.errors import InvalidInputError, KvpackError, OutputExistsError

#: A local path or a URL.
Location = Path | str
#: Bytes per upload / download chunk: bounds the memory a transfer needs (S3 parts are at least 5 MiB).
TRANSFER_BYTES = 8 << 20
#: Read-ahead of a ranged reader: a section read fetches at most this much more than it asked for.
READ_AHEAD_BYTES = 1 << 20

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL_SCHEMES = {"file", "local"}
_OPTIONS: ContextVar[dict | None] = ContextVar("kvpack_storage_options", default=None)
#: Exceptions that are bugs (ours or a library's), never what a storage said: they keep their traceback.
_BUGS = (AttributeError, NameError, AssertionError, ImportError, SyntaxError)
#: The extra that installs each protocol's fsspec implementation.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def is_url(value: str | os.PathLike) -> bool:
    """True for a URL kvpack reads through fsspec (any ``scheme://`` except ``file://``); never for a Path."""
    if isinstance(value, os.PathLike):
        return False
    match = _URL.match(str(value))
    return match is not None and match.group(1).lower() not in _LOCAL_SCHEMES


def location(value: str | os.PathLike) -> Location:
    """What a user typed as a file, as a location: the URL text for a remote URL, else a Path
    (``file:///data/a.kvp`` -> ``/data/a.kvp``)."""
    if isinstance(value, os.PathLike):
        return Path(value)
    text = str(value)
    match = _URL.match(text)
    if match is None:
        return Path(text)
    if match.group(1).lower() in _LOCAL_SCHEMES:
        return Path(text[match.end() :] or "/")
    return text


def name_of(value: Location) -> str:
    """The last part of a location's name (``s3://b/store/a.safetensors`` -> ``a.safetensors``)."""
    return os.path.basename(str(value).rstrip("/")) if is_url(value) else Path(value).name


def with_suffix(value: Location, suffix: str) -> Location:
    """``value`` with its suffix replaced by ``suffix`` (added when it has none)."""
    if not is_url(value):
        return Path(value).with_suffix(suffix)
    text = str(value)
    head, name = text.rsplit("/", 1)
    stem = name[: name.rindex(".")] if "." in name.lstrip(".") else name
    return f"{head}/{stem}{suffix}"


def same_location(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file (local paths resolved; URLs compared as written)."""
    a, b = location(a), location(b)
    if is_url(a) or is_url(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def join(folder: Location, name: str) -> Location:
    """``folder/name`` for a local folder or a URL prefix."""
    return f"{str(folder).rstrip('/')}/{name}" if is_url(folder) else Path(folder) / name


@contextlib.contextmanager
def storage_options(options: Mapping | None) -> Iterator[dict]:
    """Use ``options`` (fsspec storage options: ``key``, ``secret``, ``endpoint_url``, ``anon``, ...,
    nested dicts for ``client_kwargs``) for every URL opened in this block, over the enclosing block's."""
    merged = {**(_OPTIONS.get() or {}), **(options or {})}
    token = _OPTIONS.set(merged)
    try:
        yield merged
    finally:
        _OPTIONS.reset(token)


def accepts_storage_options(function: Callable) -> Callable:
    """Decorate an API function whose keyword-only ``storage_options`` (a dict of fsspec options, or
    None) applies to every URL it opens (:func:`storage_options`)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with storage_options(kwargs.get("storage_options")):
            return function(*args, **kwargs)

    return wrapper


def current_options() -> dict:
    """The storage options in effect (see :func:`storage_options`)."""
    return dict(_OPTIONS.get() or {})


def parse_storage_options(items: Sequence[str]) -> dict:
    """``KEY=VALUE`` texts (``--storage-option``) as fsspec storage options: VALUE is text (``true`` /
    ``false`` are booleans: ``anon=true``), so a numeric secret stays a string; ``KEY:=JSON`` gives the
    parsed JSON value (``max_concurrency:=4``). Dotted KEYs nest (``client_kwargs.region_name=eu-west-1``).

    Raises:
        InvalidInputError: an item without ``=``, with an empty key, or a ``:=`` value that is not JSON.
    """
    options: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        as_json = key.endswith(":")
        key = key.removesuffix(":")
        if not sep or not key.strip() or any(not part for part in key.split(".")):
            raise InvalidInputError(
                f"--storage-option takes KEY=VALUE (e.g. endpoint_url=http://host:9000), got {item!r}"
            )
        if as_json:
            try:
                value = json.loads(text)
            except ValueError:
                raise InvalidInputError(f"--storage-option {item!r}: the value after := is not JSON") from None
        else:
            value = {"true": True, "false": False}.get(text, text)
        *parents, last = key.strip().split(".")
        node = options
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InvalidInputError(f"--storage-option {item!r}: {part} is given both as a value and as a group")
        node[last] = value
    return options


def filesystem(url: str, fresh: bool = False):
    """``(fsspec filesystem, path inside it)`` for ``url`` with the current storage options; ``fresh``: an
    instance of its own (fsspec shares one instance of an async file system such as s3fs among all the
    threads of a process, and with it its transaction state).

    Raises:
        InvalidInputError: an unknown protocol, its package not installed, or options it refuses.
    """
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **current_options(), **({"skip_instance_cache": True} if fresh else {}))
    except ImportError:
        scheme = url.split("://", 1)[0].lower()
        extra = _EXTRAS.get(scheme)
        hint = f"pip install 'kvpack[{extra}]'" if extra else f"install the fsspec package for {scheme}://"
        raise InvalidInputError(f"{url}: {scheme}:// URLs need their fsspec package ({hint})") from None
    except ValueError as exc:
        raise InvalidInputError(f"{url}: {exc}") from None
    except TypeError as exc:
        raise InvalidInputError(f"{url}: a storage option is not accepted ({exc})") from None


def _storage_error(url: str, exc: BaseException, doing: str = "cannot be read") -> KvpackError:
    """One readable error for what the storage said about ``url``."""
    if isinstance(exc, KvpackError):
        return exc
    if isinstance(exc, FileExistsError):
        return OutputExistsError(f"output {url} exists (pass `force=True` to overwrite it)")
    if isinstance(exc, FileNotFoundError):
        return InvalidInputError(f"{url}: no such object or bucket")
    if isinstance(exc, PermissionError):
        return InvalidInputError(
            f"{url}: access denied ({_first_line(exc)}; check the credentials: the storage options "
            "key / secret, or the AWS_* environment)"
        )
    kind = type(exc).__name__
    if isinstance(exc, TypeError) and "keyword argument" in str(exc):  # raised when the client is first made
        return InvalidInputError(f"{url}: a storage option is not accepted ({_first_line(exc)})")
    return InvalidInputError(f"{url}: {doing} ({kind}: {_first_line(exc)})")


@contextlib.contextmanager
def translated(url: str, doing: str = "cannot be read") -> Iterator[None]:
    """Turn what the storage raises for ``url`` in this block into one readable :class:`KvpackError`
    (KvpackErrors and interrupts pass through)."""
    try:
        yield
    except (KvpackError, *_BUGS):
        raise
    except Exception as exc:  # s3fs / botocore / aiohttp / gcsfs raise their own types besides OSError
        raise _storage_error(url, exc, doing) from None


def info(url: str, doing: str = "cannot be read") -> dict | None:
    """fsspec's ``info`` of ``url`` (``type``: ``file`` / ``directory``, ``size`` in bytes), or None
    when nothing is there.

    Raises:
        InvalidInputError: the storage cannot be asked (bucket missing is None; access denied, unreachable).
    """
    fs, path = filesystem(url)
    with translated(url, doing):
        try:
            return fs.info(path)
        except FileNotFoundError:
            return None


def is_file(value: Location) -> bool:
    """True when ``value`` is an existing regular file or object."""
    if not is_url(value):
        return os.path.isfile(value)
    found = info(str(value))
    return found is not None and found.get("type") == "file"


def size_of(value: Location) -> int:
    """The size in bytes of an existing file or object.

    Raises:
        InvalidInputError: nothing is there (or the storage cannot be asked).
    """
    if not is_url(value):
        return Path(value).stat().st_size
    found = info(str(value))
    if found is None:
        raise InvalidInputError(f"{value}: no such object or bucket")
    return int(found["size"])


def open_read(url: str):
    """A seekable binary file reading ``url`` by ranged requests (:data:`READ_AHEAD_BYTES` read-ahead);
    ``.size`` is the object's size in bytes.

    Raises:
        InvalidInputError: no such object, a directory, access denied, unreachable storage.
    """
    found = info(url)
    if found is None:
        raise InvalidInputError(f"{url}: no such object or bucket")
    if found.get("type") != "file":
        raise InvalidInputError(f"{url}: is a directory (a prefix), expected a file")
    fs, path = filesystem(url)
    with translated(url):
        return _ObjectReader(url, fs.open(path, "rb", block_size=READ_AHEAD_BYTES, cache_type="readahead"))


class _ObjectReader:
    """An fsspec file whose reads say what the storage said in one :class:`KvpackError` (a connection
    lost midway is not a traceback); everything else is the file's."""

    def __init__(self, url: str, handle):
        self._url, self._handle = url, handle

    def read(self, size: int = -1) -> bytes:
        with translated(self._url):
            return self._handle.read(size)

    def readinto(self, buffer) -> int:
        with translated(self._url):
            return self._handle.readinto(buffer)

    def seek(self, offset: int, whence: int = 0) -> int:
        with translated(self._url):
            return self._handle.seek(offset, whence)

    def __getattr__(self, name: str):
        return getattr(self._handle, name)

    def __enter__(self) -> _ObjectReader:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[Path]:
    """A local temporary copy of ``url``, streamed :data:`TRANSFER_BYTES` at a time (bounded memory),
    removed at the end of the block; it keeps ``url``'s name, so format checks by suffix still apply,
    and errors raised in the block that name the copy name ``url`` instead (:func:`named_as`).

    Raises:
        InvalidInputError: see :func:`open_read`; the copy cannot be written (local disk).
    """
    with tempfile.TemporaryDirectory(prefix="kvpack-download-") as folder:
        target = Path(folder) / (name_of(url) or "object")
        with open_read(url) as source, open(target, "wb") as out, translated(url):
            shutil.copyfileobj(source, out, TRANSFER_BYTES)
        with named_as(target, url):
            yield target


@contextlib.contextmanager
def named_as(local: Path, name: str) -> Iterator[None]:
    """Errors raised in this block that name the temporary ``local`` copy name ``name`` (the URL) instead."""
    try:
        yield
    except KvpackError as exc:
        text = str(exc)
        if str(local) not in text:
            raise
        renamed = type(exc)(text.replace(str(local), name))
        raise renamed from None


def check_output(url: str, force: bool) -> str:
    """Refuse an output URL before any work: one that exists (without ``force``), a prefix holding
    objects, or one whose bucket (or top folder) does not exist.

    Raises:
        OutputExistsError, InvalidInputError.
    """
    found = info(url, "cannot be written")
    if found is not None and found.get("type") != "file":
        raise InvalidInputError(f"output {url} is a directory (a prefix); choose an object name")
    if found is not None and not force:
        raise OutputExistsError(f"output {url} exists (pass `force=True` to overwrite it)")
    if found is None:
        check_output_folder(url.rsplit("/", 1)[0] if url.count("/") > 2 else url, url)
    return url


def check_output_folder(url: str, output: str | None = None) -> None:
    """Refuse an output folder URL whose bucket (its first part) does not exist; an object store has
    no folders, so a prefix that holds nothing yet is fine.

    Raises:
        InvalidInputError: no such bucket, access denied, unreachable storage.
    """
    fs, path = filesystem(url)
    top = path.strip("/").split("/", 1)[0]
    root = fs.root_marker + top if top else fs.root_marker or "/"
    with translated(output or url, "cannot be written"):
        if output is None and fs.isfile(path):
            raise InvalidInputError(f"output {url} is an object, not a prefix (end it with / for DIR/<name>.kvp)")
        if fs.isdir(path) or fs.exists(root):
            return
    raise InvalidInputError(f"output {output or url}: no such bucket (or folder) {top or root}")


@contextlib.contextmanager
def upload_on_success(url: str, force: bool = False) -> Iterator[Path]:
    """Yield a local temporary path; when the block succeeds, upload it to ``url`` (:func:`upload`).
    On any exception (interrupts included) nothing is uploaded and the temporary file is removed;
    errors raised in the block that name the temporary path name ``url`` instead (:func:`named_as`).

    Raises:
        OutputExistsError, InvalidInputError: see :func:`check_output` (before the block) and :func:`upload`.
    """
    check_output(url, force)
    with tempfile.TemporaryDirectory(prefix="kvpack-upload-") as folder:
        local = Path(folder) / (name_of(url) or "object")
        local.touch()  # as a local atomic output: the file exists, empty, for writers that open it "r+b"
        with named_as(local, url):
            yield local
        upload(local, url, force)


def upload(
    local: str | os.PathLike, url: str, force: bool = False, progress: Callable[[int], None] | None = None
) -> int:
    """Upload file ``local`` to ``url`` as one transaction and return its size in bytes.

    The object is written in an fsspec transaction (S3: a multipart upload of :data:`TRANSFER_BYTES`
    parts) committed after the last byte; any exception on the way, ``KeyboardInterrupt``
    included, discards it (S3: the multipart upload is aborted), so the final name never holds a
    partial object. Without ``force`` the object is created with ``mode="xb"`` where the file
    system supports it (S3: ``If-None-Match: *``): one created meanwhile is not overwritten.
    ``progress`` is called with the bytes sent so far after each chunk.

    Raises:
        OutputExistsError: the object exists and ``force`` is false.
        InvalidInputError: the storage refused the upload (no bucket, access denied, unreachable).
    """
    fs, path = filesystem(url, fresh=True)  # a transaction of its own, whatever other threads upload
    sent = 0
    with translated(url, "cannot be written"):
        handle = None
        try:
            with fs.transaction:  # committed when the block ends, discarded (S3: aborted) on any exception
                handle = _open_new(fs, path, force)
                with open(local, "rb") as source:
                    while chunk := source.read(TRANSFER_BYTES):
                        handle.write(chunk)
                        sent += len(chunk)
                        if progress is not None:
                            progress(sent)
                handle.close()
        except BaseException:
            if handle is not None and hasattr(handle, "_closed"):
                handle.closed = True  # discarded: its finalizer must not flush what is left
            raise
        with contextlib.suppress(Exception):
            fs.invalidate_cache(path)
    return sent


def _open_new(fs, path: str, force: bool):
    """A file of ``fs`` opened for writing (``xb`` without ``force`` where the file system has it)."""
    if not force:
        try:
            return fs.open(path, "xb", block_size=TRANSFER_BYTES)
        except (ValueError, NotImplementedError):  # no exclusive create here: the check before the work stands
            pass
    return fs.open(path, "wb", block_size=TRANSFER_BYTES)


def find(url: str, suffix: str) -> list[str]:
    """The objects directly under the prefix ``url`` whose name ends with ``suffix``, as URLs, sorted.

    Raises:
        InvalidInputError: the storage cannot be listed (no bucket, access denied, unreachable).
    """
    fs, path = filesystem(url)
    with translated(url, "cannot be listed"):
        found = fs.ls(path.rstrip("/") or fs.root_marker, detail=True)
    return sorted(
        _url_of(fs, url, entry["name"])
        for entry in found
        if entry.get("type") == "file" and entry["name"].endswith(suffix)
    )


def glob(pattern: str) -> list[str]:
    """The objects matching the glob ``pattern`` (``**`` recurses), as URLs, sorted; prefixes skipped.

    Raises:
        InvalidInputError: the storage cannot be listed.
    """
    fs, path = filesystem(pattern)
    with translated(pattern, "cannot be listed"):
        found = fs.glob(path, detail=True)
    return sorted(_url_of(fs, pattern, name) for name, entry in found.items() if entry.get("type") == "file")


def is_folder(url: str) -> bool:
    """True when ``url`` names a prefix that holds objects (or ends with ``/``)."""
    if url.endswith("/"):
        return True
    found = info(url)
    return found is not None and found.get("type") == "directory"


def is_directory(value: Location) -> bool:
    """True for an existing local directory, or a URL prefix (:func:`is_folder`)."""
    return is_folder(str(value)) if is_url(value) else Path(value).is_dir()


def has_pattern(url: str) -> bool:
    """True when ``url``'s path has glob characters (``*``, ``?``, ``[``)."""
    return any(char in url.split("://", 1)[1] for char in "*?[")


def _url_of(fs, like: str, path: str) -> str:
    """The URL of ``path`` inside ``fs``, with the scheme ``like`` was written with."""
    scheme = like.split("://", 1)[0]
    return f"{scheme}://{fs._strip_protocol(path).lstrip('/')}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
