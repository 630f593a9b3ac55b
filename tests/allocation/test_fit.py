"""Rate control on the written file (kvpack.allocation.fit, .measure): the search over dense budgets, the
error bound checked on the decoded file, and their end-to-end promise on small synthetic caches (the real
SmolLM2 caches are in test_plan.py)."""

import math
import os

import pytest
import torch

from kvpack.allocation.fit import CLOSE_ENOUGH, MAX_FILES, TOLERANCE, fit_error, fit_file_bits
from kvpack.allocation.importance import attention_statistics, is_stats_tensor
from kvpack.allocation.solver import Allocation
from kvpack.compress import compress_tensors
from kvpack.config import CodecConfig
from kvpack.errors import InvalidInputError
from kvpack.formats.entropy import EntropyConfig
from kvpack.restore.files import load_kvp
from tests.conftest import small_cache

NARROWEST = [torch.zeros(3, dtype=torch.long)]


def _search(target, file_of_dense, lowest=0.5, highest=8.5):
    """fit_file_bits on a made-up file size: the widths are the dense budget itself (a 0-d tensor)."""
    calls = []

    def file_bits(widths):
        calls.append(float(widths[0]))
        return file_of_dense(float(widths[0]))

    fitted = fit_file_bits(
        target,
        lambda dense: [torch.tensor(min(max(dense, lowest), highest), dtype=torch.float64)],
        file_bits,
        lowest,
        highest,
        [torch.tensor(lowest, dtype=torch.float64)],
        lambda smallest: f"below the {smallest:.3f} bits",
    )
    return fitted, calls


@pytest.mark.parametrize("target", [1.0, 2.0, 2.5, 3.0, 3.5, 6.0])
@pytest.mark.parametrize(
    "saving", [lambda d: 0.0, lambda d: 0.4, lambda d: 0.3 + 0.1 * d, lambda d: 0.1 * d * d / 4 + 0.2], ids=range(4)
)
def test_the_search_lands_close_on_smooth_file_sizes(target, saving):
    """The entropy stage saves a fixed amount, one growing with the width or bending: a few files each."""
    fitted, calls = _search(target, lambda d: d - saving(d))
    assert abs(fitted.file_bits - target) <= CLOSE_ENOUGH * target, (fitted.file_bits, calls)
    assert fitted.note is None and fitted.files == len(calls) <= 4


def test_coarse_steps_land_on_the_closest_file_below_and_say_so():
    """Files only every half bit (a tiny cache): no file within 2 % of 2.2, the one below is 2.0."""
    fitted, calls = _search(2.2, lambda d: math.floor(2 * d) / 2)
    assert fitted.file_bits == 2.0 and len(calls) <= MAX_FILES
    assert "out of reach within 2%" in fitted.note and "the file holds 2.000 bits per element" in fitted.note
    assert "coarse steps" in fitted.note


def test_a_target_above_the_widest_widths_gets_the_widest_file():
    fitted, calls = _search(12.0, lambda d: d - 0.5)
    assert fitted.file_bits == 8.0 and calls == [8.5]
    assert "every group at its widest usable width" in fitted.note


def test_a_target_below_the_narrowest_file_is_refused_and_one_within_tolerance_is_not():
    with pytest.raises(InvalidInputError, match="below the 0.400 bits"):
        _search(0.3, lambda d: d - 0.1)
    fitted, calls = _search(0.3 / (1 + TOLERANCE / 2), lambda d: d - 0.2)  # the narrowest file: 0.3
    assert fitted.file_bits == pytest.approx(0.3) and calls == [0.5]
    # the dense solvers stop at 0.5, the entropy stage takes the file lower: searched from there
    fitted, _ = _search(0.45, lambda d: d - 0.2)
    assert abs(fitted.file_bits - 0.45) <= CLOSE_ENOUGH * 0.45


def test_fit_error_tightens_until_the_measured_error_is_within_the_bound():
    asked = []

    def solve(bound):
        asked.append(bound)
        return [torch.tensor(bound)]

    fitted = fit_error(0.01, solve, lambda widths: 1.5 * float(widths[0]), NARROWEST, lambda e: f"gives {e}")
    assert fitted.error <= 0.01 and len(asked) == 2 and asked[1] < 0.01 / 1.5
    # the widest widths are the last resort, and above the bound the answer is one error line
    widest = [torch.tensor(0.001)]
    fitted = fit_error(0.01, solve, lambda widths: 0.005 if widths is widest else 0.5, widest, str)
    assert fitted.widths is widest and fitted.error == 0.005
    with pytest.raises(InvalidInputError, match="gives 0.5"):
        fit_error(0.01, solve, lambda widths: 0.5, widest, lambda e: f"gives {e}")


def _kv_elements(tensors):
    return sum(x.numel() for name, x in tensors.items() if name.startswith("layers."))


def _synthetic_cache(seed: int) -> dict[str, torch.Tensor]:
    """Two layers of 256 tokens, an outlier channel in the first keys (as keys have), token ids, and
    attention statistics of 32 random queries (4 query heads per kv head) over those keys."""
    tensors = small_cache(seed=seed, seq=256, heads=2, dim=64, layers=2)
    tensors["layers.0.key"][..., 3] *= 20
    gen = torch.Generator().manual_seed(seed + 100)
    queries = {layer: (torch.randn(1, 8, 32, 64, generator=gen), 0.125) for layer in range(2)}
    keys = {layer: tensors[f"layers.{layer}.key"] for layer in range(2)}
    return tensors | attention_statistics(queries, keys)


def _mean_relative_error(path, tensors) -> float:
    """The decoded file's relative squared error, averaged over the K/V tensors (computed here, apart)."""
    restored = load_kvp(path)[0]
    errors = [
        float(((restored[n].double() - x.double()) ** 2).sum() / (x.double() ** 2).sum())
        for n, x in tensors.items()
        if n.startswith("layers.")
    ]
    return sum(errors) / len(errors)


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("method", ["uniform", "adaptive", "mxfp4"])
@pytest.mark.parametrize("target", [2.0, 4.5])
def test_the_written_file_lands_on_target_bits_on_a_synthetic_cache(tmp_path, method, target, level):
    tensors = {n: x for n, x in _synthetic_cache(1).items() if not is_stats_tensor(n)}
    path = tmp_path / "a.kvp"
    compress_tensors(
        tensors, path, CodecConfig.build(method, None, None), allocation=Allocation(target_bits=target),
        entropy=EntropyConfig(level=level),
    )  # fmt: skip
    bits = os.path.getsize(path) * 8 / _kv_elements(tensors)
    assert abs(bits - target) <= TOLERANCE * target, bits


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("target", [2.0, 2.5, 3.0, 4.0])
@pytest.mark.parametrize("allocator", ["target", "importance", "qaq"])
def test_every_allocator_writes_a_file_of_its_target_bits_on_a_synthetic_cache(tmp_path, allocator, target, level):
    """os.path.getsize * 8 / K/V elements within 2 % of --target-bits for every allocator (with attention
    statistics, which importance and qaq need), the entropy stage on and off. Without that stage qaq's
    narrowest usable width is 2 (1-bit grids are worse than none): 2.48 bits per element, so 2.0 is
    refused, naming what the file needs."""
    tensors = _synthetic_cache(3)
    path = tmp_path / "a.kvp"
    if (allocator, target, level) == ("qaq", 2.0, 0):
        with pytest.raises(InvalidInputError, match=r"is below the 2\.4\d\d bits per element this file needs"):
            compress_tensors(
                tensors, path, CodecConfig.build("uniform", None, None), allocation=Allocation(allocator, target_bits=2),
                entropy=EntropyConfig(level=level),
            )  # fmt: skip
        assert not path.exists()
        return
    compress_tensors(
        tensors, path, CodecConfig.build("uniform", None, None), allocation=Allocation(allocator, target_bits=target),
        entropy=EntropyConfig(level=level),
    )  # fmt: skip
    bits = os.path.getsize(path) * 8 / _kv_elements(tensors)
    assert abs(bits - target) <= TOLERANCE * target, bits
    assert not any(is_stats_tensor(n) for n in load_kvp(path)[0])  # the statistics are not stored


@pytest.mark.parametrize("allocator", ["target", "importance", "qaq"])
def test_a_target_below_the_narrowest_file_is_one_error_naming_what_it_needs(tmp_path, allocator):
    tensors = _synthetic_cache(4)
    with pytest.raises(InvalidInputError) as caught:
        compress_tensors(
            tensors, tmp_path / "a.kvp", CodecConfig.build("uniform", None, None),
            allocation=Allocation(allocator, target_bits=0.05),
        )  # fmt: skip
    message = str(caught.value)
    assert message.startswith("`target_bits=0.05` is below the ") and "\n" not in message
    assert not (tmp_path / "a.kvp").exists()
    # the bits it names are enough (within the tolerance): that target is written
    needed = float(message.split("below the ")[1].split()[0])
    compress_tensors(
        tensors, tmp_path / "a.kvp", CodecConfig.build("uniform", None, None),
        allocation=Allocation(allocator, target_bits=needed),
    )  # fmt: skip
    assert os.path.getsize(tmp_path / "a.kvp") * 8 / _kv_elements(tensors) <= needed * (1 + TOLERANCE)


@pytest.mark.parametrize("allocator, with_stats", [("target", False), ("target", True), ("importance", True)])
def test_max_error_is_checked_on_the_decoded_file(tmp_path, allocator, with_stats):
    """The solver spends bits by its own (attention-weighted, coded-values-only) errors; the bound holds on
    the decoded file's plain relative error all the same."""
    tensors = _synthetic_cache(2)
    if not with_stats:
        tensors = {n: x for n, x in tensors.items() if not is_stats_tensor(n)}
    for bound in (0.05, 0.002):
        compress_tensors(
            tensors, tmp_path / "e.kvp", CodecConfig.build("uniform", None, None), force=True,
            allocation=Allocation(allocator, max_error=bound),
        )  # fmt: skip
        assert _mean_relative_error(tmp_path / "e.kvp", tensors) <= bound
