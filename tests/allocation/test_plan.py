"""Rate control (kvpack.allocation.plan, .importance): every allocator lands on its target on real SmolLM2
caches, short ones included, and refuses what it cannot do in one line."""

import pytest
import torch
from safetensors import safe_open

from kvpack.allocation.solver import Allocation
from kvpack.compress import compress_file
from kvpack.config import CodecConfig
from kvpack.errors import InvalidInputError
from kvpack.formats.reader import KvpReader
from kvpack.restore.files import load_kvp
from kvpack.transforms.plan import plan_for
from tests.cli_helpers import run
from tests.codec_settings import MIXED_CODECS


@pytest.mark.model
@pytest.mark.parametrize("method, options", [c for c in MIXED_CODECS if c != ("uniform", {"symmetric": True})])
@pytest.mark.parametrize("target", [2.5, 3.0])
def test_target_bits_land_on_the_real_cache(tmp_path, real_dump, method, options, target):
    config = CodecConfig.build(method, None, None, **options)
    allocation = Allocation("target", target_bits=target)
    report = compress_file(real_dump, tmp_path / "a.kvp", config, allocation=allocation)
    total = report["rows"]["all"]["dense_bits_per_element"]  # the budget is of densely packed sections
    assert abs(total - target) <= 0.05, total
    stored = report["rows"]["all"]["bits_per_element"]["total"]  # what the file holds after the entropy stage
    assert stored < total
    assert stored * report["kv_elements"] / 8 == pytest.approx((tmp_path / "a.kvp").stat().st_size)
    assert report["rows"]["all"]["bits_per_element"]["bitmap"] > 0
    restored = load_kvp(tmp_path / "a.kvp")[0]
    assert set(restored) >= {"layers.0.key", "layers.29.value"}


@pytest.mark.model
def test_allocation_beats_the_same_bits_spread_evenly_in_relative_error(tmp_path, real_dump):
    """On its own objective (the mean relative error of the tensors) the allocation wins over fixed widths."""
    fixed = compress_file(real_dump, tmp_path / "f.kvp", CodecConfig.build("uniform", 3, 64))
    bits = fixed["rows"]["all"]["dense_bits_per_element"]
    allocated = compress_file(
        real_dump,
        tmp_path / "a.kvp",
        CodecConfig.build("uniform", 3, 64),
        allocation=Allocation("target", target_bits=bits),
    )
    assert allocated["rows"]["all"]["dense_bits_per_element"] <= bits + 0.01

    def mean_relative(report):
        return sum(row["rel_mse"] for row in report["layers"]) / len(report["layers"])

    assert mean_relative(allocated) < mean_relative(fixed)


@pytest.fixture(scope="module")
def stats_dump(smollm, tmp_path_factory):
    """A 384-token dump of the bundled passage with attention statistics of the last 64 queries."""
    from kvpack.formats.safetensors_io import write_safetensors
    from kvpack.model.dump import bundled_text, dump_cache

    path = tmp_path_factory.mktemp("stats") / "s.safetensors"
    tensors, metadata = dump_cache(smollm, bundled_text(), 384, attention_stats=64)
    write_safetensors(path, tensors, metadata)
    return path


@pytest.mark.model
@pytest.mark.parametrize("allocator", ["qaq", "importance", "target"])
@pytest.mark.parametrize("method, options", [("uniform", {}), ("adaptive", {}), ("mxfp4", {}), ("normal", {})])
def test_every_allocator_lands_on_its_target_with_every_codec(tmp_path, stats_dump, allocator, method, options):
    config = CodecConfig.build(method, None, None, **options)
    # mxfp4's widths are 0, 4, 6, 8: qaq reaches 3 bits only with width 0 allowed
    narrowest = 0 if (allocator, method) == ("qaq", "mxfp4") else None
    allocation = Allocation(allocator, target_bits=3.0, bits_min=narrowest)
    report = compress_file(stats_dump, tmp_path / "a.kvp", config, allocation=allocation)
    total = report["rows"]["all"]["dense_bits_per_element"]
    assert abs(total - 3.0) <= 0.05, total
    assert report["rows"]["all"]["rel_mse"] < 0.5


@pytest.mark.model
def test_qaq_spends_more_bits_for_a_smaller_error_tolerance(tmp_path, stats_dump):
    config = CodecConfig.build("uniform", 4, 64)
    bits = []
    for error in (0.5, 0.1, 0.02):
        report = compress_file(
            stats_dump, tmp_path / "q.kvp", config, force=True, allocation=Allocation("qaq", target_error=error)
        )
        bits.append(report["rows"]["all"]["bits_per_element"]["total"])
    assert bits[0] < bits[1] < bits[2]


def _file_widths(path) -> dict[str, torch.Tensor]:
    """Every K/V entry's per-group widths (int64), read from its ``bit_widths`` section."""
    from kvpack.packing import unpack

    out = {}
    with KvpReader(path) as reader:
        for name in reader.keys():
            entry = reader.entry(name)
            if name.startswith("layers.") and entry.plan.config.width_counts is not None:
                packed = reader.read_section(name, "bit_widths")
                out[name] = torch.from_numpy(unpack(packed, 4, entry.plan.layout.n_groups).astype("int64"))
    return out


@pytest.mark.model
def test_qaq_keeps_its_default_narrowest_width_and_names_what_a_budget_needs(tmp_path, stats_dump, capsys):
    from kvpack.allocation.solver import QAQ_BITS_MIN

    config = CodecConfig.build("uniform", 4, 64)
    compress_file(stats_dump, tmp_path / "q.kvp", config, allocation=Allocation("qaq", target_bits=3.0))
    widths = _file_widths(tmp_path / "q.kvp")
    assert QAQ_BITS_MIN == 1 and len(widths) == 60 and all(int(w.min()) >= QAQ_BITS_MIN for w in widths.values())
    # 1-bit asymmetric grids are worse than none (next test): 2 bits of codes + 0.5 of float16
    # scale and zero-point per 64 values do not fit 2.3 bits
    code, _, err = run(
        ["compress", stats_dump, "-o", tmp_path / "x.kvp", "-m", "uniform", "-g", "64", "--allocate", "qaq",
         "--target-bits", "2.3"], capsys)  # fmt: skip
    assert code == 2 and "below the 2.5" in err and "--bits-min 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.kvp").exists()


@pytest.mark.model
def test_qaq_never_hands_out_a_width_worse_than_a_narrower_one(tmp_path, stats_dump):
    """A 1-bit asymmetric uniform grid (the group's min and max) has a smaller largest error than
    the group mean, and a larger squared error: QAQ's max-error rule alone would pick it."""
    from kvpack.transforms.mixed import width_errors

    config = CodecConfig.build("uniform", 4, 64)
    with safe_open(str(stats_dump), "pt") as f:
        value = f.get_tensor("layers.5.value").float()
    plan = plan_for(tuple(value.shape), "float16", "layers.5.value", config)
    groups = value.reshape(-1, 64)
    widths, squared, largest = width_errors(config, groups, plan.layout, None, max_abs=True)
    assert widths[:2] == (0, 1)
    assert float(squared[:, 1].sum()) > float(squared[:, 0].sum())  # 1 bit is worse than none
    assert float(largest[:, 1].sum()) < float(largest[:, 0].sum())  # yet its largest error is smaller
    compress_file(stats_dump, tmp_path / "q.kvp", config, allocation=Allocation("qaq", target_bits=2.6, bits_min=0))
    counts = torch.bincount(torch.cat(list(_file_widths(tmp_path / "q.kvp").values())), minlength=9)
    assert int(counts[0]) > 0 and int(counts[1]) == 0, counts


@pytest.mark.model
def test_recent_tokens_keep_the_widest_width(tmp_path, stats_dump):
    config = CodecConfig.build("uniform", 4, 64)
    allocation = Allocation("target", target_bits=3.0, recent_tokens=32)
    compress_file(stats_dump, tmp_path / "r.kvp", config, allocation=allocation)
    with KvpReader(tmp_path / "r.kvp") as reader:
        entry = reader.entry("layers.4.value")
    per_group = _file_widths(tmp_path / "r.kvp")["layers.4.value"]
    token_of_group = torch.arange(entry.plan.layout.n_groups) // (entry.plan.layout.features // 64)
    recent = token_of_group >= entry.shape[2] - 32
    assert bool((per_group[recent] == 8).all()) and bool((per_group[~recent] < 8).any())


@pytest.mark.model
def test_max_error_delivers_the_mean_relative_error_asked_for(tmp_path, real_dump):
    config = CodecConfig.build("uniform", 3, 64)
    for bound in (0.05, 0.005):
        report = compress_file(
            real_dump, tmp_path / "e.kvp", config, force=True, allocation=Allocation("target", max_error=bound)
        )
        restored = load_kvp(tmp_path / "e.kvp")[0]
        from safetensors.torch import load_file

        original = load_file(real_dump)
        errors = [
            float(((restored[n].double() - x.double()) ** 2).sum() / (x.double() ** 2).sum())
            for n, x in original.items()
            if n.startswith("layers.")
        ]
        assert sum(errors) / len(errors) <= bound * 1.02, (bound, sum(errors) / len(errors))
        assert report["rows"]["all"]["bits_per_element"]["total"] < 8


@pytest.mark.model
@pytest.mark.parametrize(
    "tokens, method, options, target, tolerance",
    [
        (64, "uniform", {}, 3.0, 0.05),
        (64, "adaptive", {}, 3.0, 0.05),
        (64, "mxfp4", {}, 3.0, 0.05),
        (16, "mxfp4", {}, 4.0, 0.05),
        (128, "adaptive", {"codebook_scope": "head"}, 0.8, 0.05),
        # one float16 codebook per width and tensor: the 8-bit one alone costs 0.67 bits per
        # element of a 32-token cache, so the widths that can occur come in coarse steps
        (32, "adaptive", {"codebook_scope": "tensor"}, 4.0, 0.1),
        (16, "adaptive", {"codebook_scope": "tensor"}, 4.0, 0.2),
    ],
)
def test_target_bits_land_on_short_caches(
    tmp_path, real_dump, real_tensors, tokens, method, options, target, tolerance
):
    """Short caches: the header (one section per width that occurs) and metadata are a large
    share of the file and must be budgeted; shared codebooks only for the widths used."""
    from kvpack.compress import compress_tensors
    from kvpack.report import size_breakdown

    with safe_open(str(real_dump), "pt") as f:
        metadata = f.metadata()
    short = {n: x[:, :, :tokens] if n.startswith("layers.") else x[:, :tokens] for n, x in real_tensors.items()}
    config = CodecConfig.build(method, None, None, **options)
    entries = compress_tensors(short, tmp_path / "s.kvp", config, metadata, allocation=Allocation(target_bits=target))
    row = size_breakdown(entries, (tmp_path / "s.kvp").stat().st_size)["rows"]["all"]
    total, header = row["dense_bits_per_element"], row["bits_per_element"]["header"]
    # Above the target, the miss is a part of the header: the allocator budgets the header from an
    # estimate made before anything is written (stand-in checksums and width counts, the zstd frame
    # of a JSON it has not seen), and when no candidate fits that estimate it keeps the closest one
    # above. The header's share grows as the cache shrinks (0.18 bits per element at 16 tokens, 0.05
    # at 64), and its exact bytes follow the cache's values, i.e. the text real_dump was made from
    # (the shared WikiText-2 copy or the bundled passage; the test controls neither): 16 tokens of
    # mxfp4 landed at 4.0488 to 4.0501 for a 4.0 target. So the bound is 0.05 bits per element or
    # half the header's share, whichever is larger: an allocator that left the header out of the
    # budget would miss by all of it.
    above = max(0.05, header / 2)
    assert target - tolerance <= total <= target + above, (method, tokens, total, header)


@pytest.mark.model
def test_allocation_refuses_what_it_cannot_do_in_one_line(tmp_path, real_dump, real_tensors, capsys):
    from safetensors.torch import save_file

    from kvpack.compress import compress_tensors

    # an element format has no width between 1 and 3: refused, not a file of zeros
    code, _, err = run(
        ["compress", real_dump, "-o", tmp_path / "x.kvp", "-m", "mxfp4", "--allocate", "target",
         "--target-bits", "3", "--bits-max", "3"], capsys)  # fmt: skip
    assert code == 2 and "no width of this codec (4, 6, 8) lies in [0, 3]" in err, err
    # NaN is named as without allocation
    bad = dict(real_tensors)
    bad["layers.2.key"] = bad["layers.2.key"].clone()
    bad["layers.2.key"][0, 0, 5, 3] = float("nan")
    save_file(bad, tmp_path / "nan.safetensors")
    code, _, err = run(
        ["compress", tmp_path / "nan.safetensors", "-o", tmp_path / "x.kvp", "-m", "uniform", "--allocate",
         "target", "--target-bits", "3"], capsys)  # fmt: skip
    assert code == 2 and "'layers.2.key' holds 1 NaN" in err and len(err.strip().splitlines()) == 1, err
    # a cache without tokens has nothing to allocate
    empty = {n: x[:, :, :0] if n.startswith("layers.") else x[:, :0] for n, x in real_tensors.items()}
    with pytest.raises(InvalidInputError, match="the cache holds none"):
        compress_tensors(empty, tmp_path / "e.kvp", CodecConfig.build("uniform"), allocation=Allocation(target_bits=3))
    assert not (tmp_path / "x.kvp").exists() and not (tmp_path / "e.kvp").exists()


@pytest.mark.model
def test_qaq_handles_all_zero_tensors(tmp_path, stats_dump):
    from safetensors.torch import load_file, save_file

    tensors = load_file(stats_dump)
    with safe_open(str(stats_dump), "pt") as f:
        metadata = f.metadata()
    for name in tensors:
        if name.startswith("layers.") and name.endswith(".value"):
            tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, tmp_path / "z.safetensors", metadata=metadata)
    config = CodecConfig.build("uniform", 4, 64)
    for allocation in (Allocation("qaq", target_bits=3.0), Allocation("qaq", target_error=0.1)):
        report = compress_file(
            tmp_path / "z.safetensors", tmp_path / "z.kvp", config, force=True, allocation=allocation
        )
        restored = load_kvp(tmp_path / "z.kvp")[0]
        assert all(bool((restored[n] == 0).all()) for n in restored if n.endswith(".value"))
        # zero values need no more than the narrowest width: their bits go to the keys
        widths = _file_widths(tmp_path / "z.kvp")
        assert all(int(w.max()) == 1 for n, w in widths.items() if n.endswith(".value")), allocation
        if allocation.target_bits:
            assert abs(report["rows"]["all"]["dense_bits_per_element"] - 3.0) <= 0.05


@pytest.mark.model
def test_bad_attention_statistics_are_refused_in_one_line(tmp_path, stats_dump, capsys):
    from safetensors.torch import load_file, save_file

    tensors = load_file(stats_dump)
    from safetensors import safe_open

    with safe_open(str(stats_dump), "pt") as f:
        metadata = f.metadata()
    del tensors["queries.3.channel_ms"]
    save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    code, _, err = run(
        ["compress", tmp_path / "bad.safetensors", "-m", "uniform", "--allocate", "qaq", "--target-bits", "3"], capsys
    )
    assert code == 2 and "queries.3.channel_ms is missing" in err and len(err.strip().splitlines()) == 1


@pytest.mark.model
def test_allocation_copes_with_entries_without_groups(tmp_path, real_tensors, stats_dump):
    """Every token kept exact leaves no group to allocate; the file is exact."""
    from kvpack.compress import compress_tensors

    short = {n: x[:, :, :64] if n.startswith("layers.") else x[:, :64] for n, x in real_tensors.items()}
    config = CodecConfig.build("uniform", 4, 64, transforms={"keep_first": 32, "keep_last": 32})
    compress_tensors(short, tmp_path / "k.kvp", config, allocation=Allocation(target_bits=17.0))
    restored = load_kvp(tmp_path / "k.kvp")[0]
    assert all(torch.equal(restored[n], x) for n, x in short.items() if n.startswith("layers."))
    # a width range with no usable width for qaq (1-bit uniform grids are left out) is refused in one line
    with pytest.raises(InvalidInputError, match=r"no width in \[1, 1\] is usable"):
        compress_file(
            stats_dump, tmp_path / "q.kvp", CodecConfig.build("uniform", 4, 64),
            allocation=Allocation("qaq", target_bits=3.0, bits_min=1, bits_max=1),
        )  # fmt: skip
    assert not (tmp_path / "q.kvp").exists()
