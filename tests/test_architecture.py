"""The architecture contract (docs/architecture.md): import-linter's layers, no cycles, no CLI in the library."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """`lint-imports` (configured in pyproject.toml) passes: every layer imports only from below, no cycles."""
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if command is None:
        pytest.fail("lint-imports is missing: install the dev extra (pip install -e '.[dev]')")
    result = subprocess.run([command, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_library_module_is_longer_than_500_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for path in (ROOT / "kvpack").rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > 500
    }
    assert not long, long


def test_kvpack_help_loads_no_torch():
    """`kvpack --help` stays fast: the command line imports the library only when a command runs."""
    code = (
        "import sys; from kvpack.cli.app import main; main(['--help']); print('torch' in sys.modules, file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr.strip().splitlines()[-1] == "False", result.stderr
