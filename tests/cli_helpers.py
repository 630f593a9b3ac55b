"""Helpers of the tests: the command line run in-process (exit code, stdout, stderr), the one-line error rule, a store of dumps."""

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


def write_store(real_dump, folder):
    """A prompt-cache store in ``folder`` (made): a, b, c, d (copies of ``real_dump``) and bad (cut in half)."""
    import shutil

    folder.mkdir()
    for name in ("a", "b", "c", "d"):
        shutil.copyfile(real_dump, folder / f"{name}.safetensors")
    (folder / "bad.safetensors").write_bytes(real_dump.read_bytes()[: real_dump.stat().st_size // 2])
    return folder
