"""Grids of settings (kvpack.evaluation.sweep): the config file, its errors, the Pareto front."""

from __future__ import annotations

import pytest

from kvpack.errors import InvalidInputError
from kvpack.evaluation.evaluate import EvalProtocol
from kvpack.evaluation.sweep import load_sweep_config, pareto_front


def test_pareto_front():
    points = [(2.0, 1.0), (3.0, 0.5), (3.0, 0.6), (4.0, 0.5), (8.0, 0.01), (2.5, 2.0)]
    assert pareto_front(points) == [True, True, False, False, True, False]


SWEEP_OK = """
baselines = ["fp16", "kivi-2-r0"]
[eval]
text_file = "text.txt"
prefix = 64
continuation = 16
windows = 2
[grid]
methods = ["uniform", "adaptive"]
bits = [2, 3]
group_sizes = [64, 192]
symmetric = [false, true]
[grid.options.adaptive]
normalization = ["minmax", "meanstd"]
[output]
dir = "out"
"""


def test_sweep_config_takes_bool_options(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(
        "[grid]\nmethods = ['uniform']\nbits = [3]\ngroup_sizes = [64]\n[grid.options.uniform]\nsymmetric = [true, false]\n"
    )
    assert [m.label for m in load_sweep_config(path).methods] == ["uniform-3 g64 sym", "uniform-3 g64"]


def test_sweep_config_expands_the_grid(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP_OK)
    config = load_sweep_config(path)
    labels = [m.label for m in config.methods]
    # 2 baselines + uniform 2 bits x 2 groups x 2 symmetric + adaptive 2 x 2 x 2 x 2 normalizations
    assert len(labels) == len(set(labels)) == 2 + 8 + 16
    assert labels[:2] == ["fp16", "kivi-2-r0"]
    assert "adaptive-3 g192 sym meanstd" in labels
    assert config.protocol == EvalProtocol(64, 16, 2)
    assert config.text_file == tmp_path / "text.txt"
    assert config.output_dir == tmp_path / "out"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[grid]\nmethods = ['uniform']\nbits = [2]\ngroup_sizes = [64]\nbitz = [3]\n", "unknown key.*bitz"),
        ("[grid]\nmethods = ['uniform']\nbits = [2]\n", r"\[grid\] needs group_sizes"),
        ("[grid]\nmethods = ['nope']\nbits = [2]\ngroup_sizes = [64]\n", "unknown method 'nope'"),
        ("[grid]\nmethods = ['uniform']\nbits = ['2']\ngroup_sizes = [64]\n", "grid.bits must hold int"),
        ("[grid]\nmethods = ['uniform']\nbits = []\ngroup_sizes = [64]\n", "grid.bits must be a non-empty list"),
        ("[grid]\nmethods = ['uniform']\nbits = [9]\ngroup_sizes = [64]\n", "combination uniform bits=9.*bits must be"),
        ("[grid]\nmethods = ['uniform']\nbits = [2]\ngroup_sizes = [0]\n", "group size must be"),
        ("[grid]\nmethods = ['uniform']\nbits = [2]\ngroup_sizes = [64]\nsymmetric = [1]\n", "must hold bool"),
        (
            "[grid]\nmethods = ['uniform']\nbits = [2]\ngroup_sizes = [64]\n[grid.options.uniform]\nnormalization = ['minmax']\n",
            "unknown option.*normalization",
        ),
        (
            "[grid]\nmethods = ['uniform']\nbits = [2]\ngroup_sizes = [64]\n[grid.options.normal]\nnormalization = ['minmax']\n",
            "not in grid.methods: normal",
        ),
        ("baselines = ['fp4']\n", "unknown baseline 'fp4'"),
        (
            "[eval]\nprefix = 'long'\n[grid]\nmethods = ['uniform']\nbits = [2]\ngroup_sizes = [64]\n",
            "eval.prefix must be an integer",
        ),
        ("[eval]\nwindows = 0\nbaselines = 1\n", "unknown key.*baselines"),
        ("[grid\n", "not valid TOML"),
        ("", "nothing to run"),
        ("colour = 'red'\n", "unknown key.*colour"),
    ],
)
def test_sweep_config_errors(tmp_path, text, message):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=message):
        load_sweep_config(path)
