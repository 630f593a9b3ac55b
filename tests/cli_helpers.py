"""Running the command line in-process in tests: the exit code, stdout and stderr; the one-line error rule."""

from kvpack.cli.app import main


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, pattern):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], err
    assert "Traceback" not in err
