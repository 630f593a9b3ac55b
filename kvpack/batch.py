"""Compress many dumps at once: expand the inputs, plan the outputs, run the files in a process pool.

The CLI (``kvpack compress A B DIR 'store/*.safetensors' --jobs N``) renders what this module
returns; nothing here knows about terminals. Each file is compressed by
:func:`kvpack.compress.compress_file` exactly as a single file would be (same checks, same atomic
output), and its outcome is a plain, picklable record::

    {"input": str, "output": str | None, "ok": bool, "error": str | None,
     "report": dict | None, "seconds": float, "skipped": bool}

``error`` is the one-line message kvpack prints for that failure on its own
(:func:`kvpack.errors.error_message`); ``report`` is :func:`~kvpack.compress.compress_file`'s
report; ``seconds`` is the wall time spent on the file (0 for one that never ran); ``skipped``: the
output was already there and verified (:func:`skip_verified`: a rerun resumes), so nothing ran.

Interrupts: in a pool, the workers ignore SIGINT and the caller's process stops them with
SIGTERM (:func:`run_jobs`); a stopped worker unwinds out of the file it is writing, so its
temporary output is removed, then exits without a traceback.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvpack.allocation.solver import Allocation
from kvpack.compress import compress_file, metadata_for_file
from kvpack.config import CodecConfig
from kvpack.errors import InvalidInputError, KvpackError, error_message
from kvpack.formats.entropy import EntropyConfig
from kvpack.formats.reader import KvpReader
from kvpack.restore.profiles import attach_profile
from kvpack.restore.streaming import verify_entries
from kvpack.storage import (
    Location,
    check_output_folder,
    find,
    has_pattern,
    is_file,
    is_folder,
    is_url,
    join,
    location,
    name_of,
    storage_options,
    with_suffix,
)
from kvpack.storage import glob as storage_glob

#: Suffix of the dumps a directory argument stands for.
DUMP_SUFFIX = ".safetensors"
#: Seconds a stopped worker gets to remove its temporary output before it is killed.
STOP_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class Expansion:
    """The files a command line's input arguments stand for.

    Attributes:
        files: every file once (the first time it is named), in argument order; a directory's
            dumps and a pattern's matches sorted by name. Plain file arguments are kept even if
            they do not exist (compressing them reports why).
        errors: ``(argument, message)`` for each directory or pattern that matched no file.
        batch: false only for exactly one argument naming a file (or nothing) without
            pattern characters: the single-file form of ``kvpack compress``.
    """

    files: list[Location] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    batch: bool = True


def is_pattern(argument: str | os.PathLike) -> bool:
    """True for a glob pattern the shell left alone (``'store/*.safetensors'``): it has pattern
    characters (``*``, ``?``, ``[``) and no file of that exact name exists."""
    text = os.fspath(argument)
    return glob.has_magic(text) and not os.path.lexists(text)


def expand_inputs(arguments: Sequence[str | os.PathLike]) -> Expansion:
    """The files named by input arguments: files, directories (their ``*.safetensors`` files,
    not recursive, sorted) and glob patterns (``**`` recurses; matched directories are skipped).
    A URL argument (:mod:`kvpack.storage`) is a prefix when it ends with ``/`` or holds objects,
    a pattern when it has pattern characters, else an object; its files are URLs.

    Duplicates (the same name in the same real folder) are kept once. No file is read.

    Raises:
        InvalidInputError: a URL's storage cannot be listed (no bucket, access denied, unreachable).
    """
    files: list[Location] = []
    errors: list[tuple[str, str]] = []
    seen: set[Location] = set()
    batch = len(arguments) != 1
    for argument in arguments:
        text = os.fspath(argument)
        found: list[Location]
        if is_url(text):
            if has_pattern(text):
                batch = True
                found = list(storage_glob(text))
                if not found:
                    errors.append((text, f"no object matches {text}"))
            elif is_folder(text):
                batch = True
                found = list(find(text, DUMP_SUFFIX))
                if not found:
                    errors.append((text, f"{text} holds no *{DUMP_SUFFIX} object"))
            else:
                found = [text]
        elif os.path.isdir(text):
            batch = True
            found = sorted(
                Path(p) for p in glob.glob(os.path.join(glob.escape(text), "*" + DUMP_SUFFIX)) if os.path.isfile(p)
            )
            if not found:
                errors.append((text, f"directory {text} holds no *{DUMP_SUFFIX} file"))
        elif is_pattern(text):
            batch = True
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if not os.path.isdir(p))
            if not found:
                errors.append((text, f"no file matches {text}"))
        else:
            found = [location(text)]
        for path in found:
            key = same_file_key(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    return Expansion(files, errors, batch)


def same_file_key(path: Location) -> Location:
    """``path`` with its folder resolved (links, ``..``): two names of one key are one file;
    a link to a file is a file of its own (its output is named after the link). A URL is its own key."""
    if is_url(path):
        return str(path)
    path = Path(path)
    return path.absolute().parent.resolve() / path.name


def output_path(input_path: Location, output_dir: Location | None = None) -> Location:
    """Where a batch writes ``input_path``'s ``.kvp``: ``output_dir/<stem>.kvp``, or beside the input
    (``cache.safetensors`` -> ``cache.kvp``); either may be a URL."""
    beside = with_suffix(input_path, ".kvp")
    return beside if output_dir is None else join(output_dir, name_of(beside))


def plan_outputs(files: Sequence[Location], output_dir: Location | None = None) -> list[Location]:
    """The output of each file (:func:`output_path`), checked before any work.

    Raises:
        InvalidInputError: ``output_dir`` is given and is not an existing directory (a URL: its
            bucket does not exist); two files would write the same output; an output is one of the inputs.
    """
    if output_dir is not None and is_url(output_dir):
        check_output_folder(str(output_dir))
    elif output_dir is not None and not Path(output_dir).is_dir():
        raise InvalidInputError(
            f"-o {output_dir} must be an existing directory when compressing several files (outputs go to DIR/<name>.kvp)"
        )
    outputs = [output_path(path, output_dir) for path in files]
    inputs = {same_file_key(path): path for path in files}
    claimed: dict[Location, Location] = {}
    for path, output in zip(files, outputs, strict=True):
        key = same_file_key(output)
        if key in claimed:
            raise InvalidInputError(
                f"{claimed[key]} and {path} would both be written to {output}; "
                "rename one or compress them into different folders"
            )
        if key in inputs:
            raise InvalidInputError(f"the output of {path}, {output}, is also an input")
        claimed[key] = path
    return outputs


@dataclass(frozen=True)
class Job:
    """One file to compress: ``compress_file(input, output, config, force=..., allocation=..., entropy=...)``,
    with ``storage_options`` for its URLs (:func:`kvpack.storage.storage_options`)."""

    input: Location
    output: Location
    config: CodecConfig
    allocation: Allocation | None = None
    force: bool = False
    entropy: EntropyConfig | None = None
    storage_options: dict | None = None


def record(
    source: str | os.PathLike,
    target: str | os.PathLike | None,
    error: str | None = None,
    report: dict | None = None,
    seconds: float = 0.0,
    skipped: bool = False,
) -> dict:
    """A result record (see the module docstring) for input ``source`` and output ``target``;
    ``ok`` when there is no error."""
    return {
        "input": os.fspath(source),
        "output": None if target is None else os.fspath(target),
        "ok": error is None,
        "error": error,
        "report": report,
        "seconds": seconds,
        "skipped": skipped,
    }


def skip_verified(job: Job) -> dict | None:
    """What a rerun of a batch does with ``job``'s existing output, before any work.

    Returns:
        ``None`` when the job must run: ``force``, or no output yet (or the storage cannot say: the job
        then reports it). A skipped record when the output is a ``.kvp`` whose every section and tensor
        verifies and that was made with the job's codec and allocation (the file's ``codec`` /
        ``allocation`` metadata, :func:`kvpack.compress.metadata_for_file`; the transform codec's
        settings depend on its profile and are not compared). Otherwise an error record saying why it
        is kept: it does not verify, or it was made with other settings (``force`` replaces it).
    """
    with storage_options(job.storage_options):
        try:
            if job.force or not is_file(job.output):
                return None
        except (KvpackError, OSError):
            return None
        exists = f"output {job.output} exists (pass `force=True` to overwrite it)"
        try:
            with KvpReader(job.output) as reader:
                made_with = {key: reader.metadata.get(key) for key in _SETTINGS}
                attach_profile(reader)  # a transform-coded output decodes with its profile
                verify_entries(reader)
        except (KvpackError, OSError) as exc:
            return record(job.input, job.output, error=f"{exists}: it does not verify ({error_message(exc)})")
    expected = metadata_for_file({}, job.config, job.allocation)
    if not job.config.whole_tensor and any(made_with[key] != expected.get(key) for key in _SETTINGS):
        return record(job.input, job.output, error=f"{exists}: it was made with other settings ({made_with['codec']})")
    return record(job.input, job.output, skipped=True)


#: The metadata of a file that say which settings made it (:func:`kvpack.compress.metadata_for_file`).
_SETTINGS = ("codec", "allocation")


def run_job(job: Job) -> dict:
    """Compress one file and return its record; never raises for a failing file.

    Known errors (:class:`~kvpack.errors.KvpackError`, ``OSError``) become the record's
    ``error``, worded as kvpack words them for one file. Any other exception is a bug: its
    record says so and carries the traceback text under ``"traceback"``. In a pool worker,
    SIGTERM ends the process once the file's temporary output is removed.
    """

    start = time.perf_counter()
    try:
        with storage_options(job.storage_options):
            report = compress_file(
                job.input, job.output, job.config, force=job.force, allocation=job.allocation, entropy=job.entropy
            )
    except _WorkerStopped as exc:  # the output's temp file is gone (atomic_output); end the worker quietly
        os._exit(exc.code)
    except (KvpackError, OSError) as exc:
        return record(job.input, job.output, error=error_message(exc), seconds=time.perf_counter() - start)
    except Exception as exc:  # a bug: keep the other files going, keep the traceback in the record
        result = record(
            job.input,
            job.output,
            error=f"unexpected {type(exc).__name__}: {exc} (a bug in kvpack; please report it)",
            seconds=time.perf_counter() - start,
        )
        result["traceback"] = traceback.format_exc()
        return result
    return record(job.input, job.output, report=report, seconds=time.perf_counter() - start)


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def resolve_jobs(jobs: int) -> int:
    """``--jobs``: ``0`` means one per CPU core (:func:`cpu_cores`).

    Raises:
        InvalidInputError: ``jobs`` is negative.
    """
    if jobs < 0:
        raise InvalidInputError(f"`jobs` must be 0 (one per CPU core) or a positive number of processes, got {jobs}")
    return jobs or cpu_cores()


def run_jobs(jobs: Sequence[Job], workers: int, on_result: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Run every job and return their records in the order of ``jobs``.

    Args:
        jobs: the files to compress.
        workers: processes; ``min(workers, len(jobs)) <= 1`` runs the jobs one after the other
            in this process (torch's thread count untouched). Otherwise a pool of spawned
            processes, each with ``max(1, cores // processes)`` torch threads.
        on_result: called with ``(index into jobs, record)`` as each file finishes (in the
            order they finish).

    Raises:
        KeyboardInterrupt (and any ``BaseException`` raised while waiting, e.g. from
            ``on_result``): after stopping the pool. Every worker is sent SIGTERM and waited
            for; files not started are never started, files being written leave nothing.
    """
    results: list[dict | None] = [None] * len(jobs)
    processes = min(workers, len(jobs))

    def done(index: int, result: dict) -> None:
        results[index] = result
        if on_result is not None:
            on_result(index, result)

    if processes <= 1:
        for index, job in enumerate(jobs):
            done(index, run_job(job))
        return results
    threads = max(1, cpu_cores() // processes)
    children_before = set(multiprocessing.active_children())
    executor = None
    try:
        with sigint_blocked():  # the workers start with SIGINT blocked and ignore it: Ctrl-C is ours to handle
            executor = ProcessPoolExecutor(
                max_workers=processes,
                mp_context=multiprocessing.get_context("spawn"),  # no fork of a process running torch threads
                initializer=_init_worker,
                initargs=(threads,),
            )
            futures = {executor.submit(run_job, job): index for index, job in enumerate(jobs)}
        for future in as_completed(futures):
            index = futures[future]
            try:
                result = future.result()
            except BrokenProcessPool:
                result = record(
                    jobs[index].input,
                    jobs[index].output,
                    error="a worker process died (killed, or out of memory?); the file was not written",
                )
            done(index, result)
    except BaseException:
        _stop_pool(executor, children_before)
        raise
    executor.shutdown(wait=True)
    return results


class _WorkerStopped(SystemExit):
    """SIGTERM in a pool worker: unwinds the file being written (removing its temp file), then exits."""


def _on_sigterm(signum, frame) -> None:
    # the signal may land inside a finalizer (numba's compiler cleans up in __del__): the worker is
    # stopping on purpose and the parent reports the one line, so such finalizers' errors stay silent
    sys.unraisablehook = lambda _: None
    raise _WorkerStopped(128 + signum)


def _init_worker(threads: int) -> None:
    """Pool worker setup: ``threads`` torch and numba threads; SIGINT ignored, SIGTERM unwinds (see :func:`run_job`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a Ctrl-C pending since start is dropped
    use_threads(threads)


def use_threads(threads: int) -> None:
    """This process's torch and numba (fused kernels) thread counts: a worker's share of the cores, since
    N workers x N threads would oversubscribe them."""
    from kvpack.codecs.kernels import set_threads  # first use of numba, in the worker only

    torch.set_num_threads(threads)
    set_threads(threads)


class sigint_blocked:
    """Block SIGINT in this thread (children started meanwhile inherit the mask); a Ctrl-C that arrives
    meanwhile is delivered when the block ends."""

    def __enter__(self) -> None:
        self.previous = None
        if hasattr(signal, "pthread_sigmask"):
            self.previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.previous)


def _stop_pool(executor: ProcessPoolExecutor | None, children_before: set) -> None:
    """Cancel the files not started, SIGTERM the workers and wait until they have exited."""
    if executor is None:
        return
    executor.shutdown(wait=False, cancel_futures=True)
    workers = [p for p in multiprocessing.active_children() if p not in children_before]
    for process in workers:
        process.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in workers:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
