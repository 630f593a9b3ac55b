"""The typer application and the one place that maps known errors to exit code 2."""

from __future__ import annotations

import signal
import sys
import threading

import typer

from kvpack import __version__
from kvpack.cli import (
    calibrate_cmd,
    compress_cmd,
    decompress_cmd,
    dump_cmd,
    eval_cmd,
    generate_cmd,
    inspect_cmd,
    methods_cmd,
    render,
    stats_cmd,
    sweep_cmd,
)
from kvpack.cli.render import cli_terms
from kvpack.errors import KvpackError, error_message

app = typer.Typer(
    name="kvpack",
    help="Compress the KV caches of large language models.\n\n"
    "Example: kvpack dump -o cache.safetensors && kvpack compress cache.safetensors --method adaptive",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for module in (
    dump_cmd,
    calibrate_cmd,
    compress_cmd,
    decompress_cmd,
    inspect_cmd,
    stats_cmd,
    methods_cmd,
    generate_cmd,
    eval_cmd,
    sweep_cmd,
):
    module.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kvpack {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Compress the KV caches of large language models."""


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so every temporary output file is removed."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; known errors print ``error: <message>`` on stderr, exit 2.

    Ctrl-C prints ``error: interrupted`` (exit 130) and SIGTERM ``error: terminated`` (exit
    143); either way the outputs being written are removed and existing ones kept.
    """
    previous = (
        signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        return _run(argv)
    except Terminated:
        print("error: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


#: API option names whose flag has another name than the option's own.
_RENAMED = {"attention_stats": ("--last-n-queries", None, False)}


def _flag_table(command: str | None) -> dict[str, tuple[str, str | None, bool]]:
    """API option name -> ``(flag, negative flag, is a flag)`` from the commands' options, the
    running ``command``'s first (a library message names options in API terms)."""
    group = typer.main.get_command(app)
    commands = sorted(group.commands.items(), key=lambda item: item[0] != command)
    table: dict[str, tuple[str, str | None, bool]] = {}
    for _, cmd in commands:
        for param in cmd.params:
            longs = [o for o in param.opts if o.startswith("--")]
            if getattr(param, "param_type_name", "") != "option" or not longs or param.name in table:
                continue
            negative = next((o for o in param.secondary_opts if o.startswith("--")), None)
            table[param.name] = (longs[0], negative, bool(param.is_flag))
    if command == "dump":
        table.update(_RENAMED)
    return table


def _run(argv: list[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    render.flag_table = lambda: _flag_table(next((a for a in args if not a.startswith("-")), None))
    try:
        code = app(args=argv, prog_name="kvpack", standalone_mode=False)
    except KvpackError as exc:
        print(f"error: {cli_terms(error_message(exc))}", file=sys.stderr)
        return 2
    except typer.TyperException as exc:  # usage errors raised by the vendored Click
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()
            return 2
        print(f"error: {exc.format_message()} (see kvpack --help)", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment, not a bug: disk full, permissions, a vanished file
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    if code == 130:  # typer turns Ctrl-C into exit code 130 itself; say so, as for any error
        print("error: interrupted", file=sys.stderr)
    return code if isinstance(code, int) else 0
