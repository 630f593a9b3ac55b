"""`kvpack methods` (kvpack.cli.methods_cmd): the registry, presets, transforms and element formats."""

from tests.cli_helpers import run


def test_methods_lists_the_registry(capsys):
    code, out, _ = run(["methods"], capsys)
    assert code == 0 and all(name in out for name in ("uniform", "normal", "adaptive"))


def test_methods_lists_presets_transforms_and_element_formats(capsys):
    code, out, _ = run(["methods"], capsys)
    assert code == 0
    for text in ("kivi-2", "kvquant-3", "qaq-uniform", "--unrope", "--rotate hadamard", "mxfp4", "fp8-e5m2"):
        assert text in out
    assert "arXiv 2402.02750" in out and "OCP" in out
