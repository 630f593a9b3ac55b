"""Rate control (kvpack.allocation.plan, .importance, .fit): every allocator's written file lands on its target
on real SmolLM2 caches, short ones included, with the entropy stage on and off; --max-error holds on the decoded
file; what cannot be done is refused in one line."""

import math
import os

import pytest
import torch
from safetensors import safe_open

from kvpack.allocation.solver import Allocation
from kvpack.compress import compress_file
from kvpack.config import CodecConfig
from kvpack.errors import InvalidInputError
from kvpack.formats.entropy import EntropyConfig
from kvpack.formats.reader import KvpReader
from kvpack.restore.files import load_kvp
from kvpack.transforms.plan import plan_for
from tests.cli_helpers import assert_one_line_error, run
from tests.codec_settings import MIXED_CODECS


def kv_elements(dump) -> int:
    """The K/V elements of a dump, from its shapes."""
    with safe_open(str(dump), "pt") as f:
        return sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys() if n.startswith("layers."))


def file_bits(path, dump) -> float:
    """What the user compares with --target-bits: the file's size in bits per K/V element."""
    return os.path.getsize(path) * 8 / kv_elements(dump)


def mean_relative_error(path, dump) -> float:
    """The decoded file's relative squared error, averaged over the K/V tensors (computed here, apart)."""
    from safetensors.torch import load_file

    restored, original = load_kvp(path)[0], load_file(dump)
    errors = [
        float(((restored[n].double() - x.double()) ** 2).sum() / (x.double() ** 2).sum())
        for n, x in original.items()
        if n.startswith("layers.")
    ]
    return sum(errors) / len(errors)


@pytest.mark.model
@pytest.mark.parametrize("method, options", [c for c in MIXED_CODECS if c != ("uniform", {"symmetric": True})])
@pytest.mark.parametrize("target", [2.5, 3.0])
def test_target_bits_land_on_the_real_cache(tmp_path, real_dump, method, options, target):
    config = CodecConfig.build(method, None, None, **options)
    allocation = Allocation("target", target_bits=target)
    report = compress_file(real_dump, tmp_path / "a.kvp", config, allocation=allocation)
    bits = file_bits(tmp_path / "a.kvp", real_dump)
    assert abs(bits - target) <= 0.02 * target, bits  # the file, after the entropy stage, header included
    assert report["rows"]["all"]["bits_per_element"]["total"] == pytest.approx(bits)  # what the report shows
    assert report["allocation"]["file_bits_per_element"] == pytest.approx(bits) and report["allocation"]["note"] is None
    assert report["rows"]["all"]["dense_bits_per_element"] > bits  # the entropy stage saved bits: more were spent
    assert report["rows"]["all"]["bits_per_element"]["bitmap"] > 0
    restored = load_kvp(tmp_path / "a.kvp")[0]
    assert set(restored) >= {"layers.0.key", "layers.29.value"}


@pytest.mark.model
def test_allocation_beats_the_same_bits_spread_evenly_in_relative_error(tmp_path, real_dump):
    """On its own objective (the mean relative error of the tensors) the allocation wins over fixed widths
    in a file of the same size, both densely packed: what the solvers optimize. (After the entropy stage
    it need not: zstd saved 15 % of fixed 3-bit codes' file and 10 % of the allocated one's on this
    cache, so at 2.99 file bits the fixed widths had 0.072 against 0.082; docs/allocation.md.)"""
    dense = EntropyConfig.off()
    fixed = compress_file(real_dump, tmp_path / "f.kvp", CodecConfig.build("uniform", 3, 64), entropy=dense)
    bits = file_bits(tmp_path / "f.kvp", real_dump)
    allocated = compress_file(
        real_dump,
        tmp_path / "a.kvp",
        CodecConfig.build("uniform", 3, 64),
        allocation=Allocation("target", target_bits=bits),
        entropy=dense,
    )
    assert file_bits(tmp_path / "a.kvp", real_dump) <= bits * 1.02

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
@pytest.mark.parametrize("level", [1, 0], ids=["entropy", "dense"])
@pytest.mark.parametrize("target", [2.0, 2.5, 3.0, 3.5])
@pytest.mark.parametrize("allocator", ["qaq", "importance", "target"])
def test_every_allocator_writes_a_file_of_its_target_bits(tmp_path, stats_dump, allocator, target, level):
    """os.path.getsize(out) * 8 / K/V elements within 2 % of --target-bits, with the entropy stage on or off.
    Without it, qaq's narrowest usable uniform width is 2 (1-bit grids are worse than none): 2.57 bits per
    element at groups of 64, so 2.0 and 2.5 are refused, naming what the file needs."""
    config, out = CodecConfig.build("uniform", None, None), tmp_path / "a.kvp"
    entropy = EntropyConfig(level=level)
    if allocator == "qaq" and level == 0 and target < 2.57:
        with pytest.raises(InvalidInputError, match=r"below the 2\.5\d\d bits per element this file needs"):
            compress_file(
                stats_dump, out, config, allocation=Allocation(allocator, target_bits=target), entropy=entropy
            )
        assert not out.exists()
        return
    report = compress_file(
        stats_dump, out, config, allocation=Allocation(allocator, target_bits=target), entropy=entropy
    )
    bits = file_bits(out, stats_dump)
    assert abs(bits - target) <= 0.02 * target, (bits, report["allocation"])
    assert report["allocation"]["file_bits_per_element"] == pytest.approx(bits)
    assert report["rows"]["all"]["bits_per_element"]["total"] == pytest.approx(bits)


@pytest.mark.model
@pytest.mark.parametrize("allocator", ["qaq", "importance", "target"])
@pytest.mark.parametrize("method", ["adaptive", "mxfp4", "normal"])
def test_every_allocator_lands_on_its_target_with_every_codec(tmp_path, stats_dump, allocator, method):
    config = CodecConfig.build(method, None, None)
    # mxfp4's widths are 0, 4, 6, 8: qaq reaches 3 bits only with width 0 allowed
    narrowest = 0 if (allocator, method) == ("qaq", "mxfp4") else None
    allocation = Allocation(allocator, target_bits=3.0, bits_min=narrowest)
    report = compress_file(stats_dump, tmp_path / "a.kvp", config, allocation=allocation)
    bits = file_bits(tmp_path / "a.kvp", stats_dump)
    assert abs(bits - 3.0) <= 0.06, bits
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
    # scale and zero-point per 64 values do not fit 2.3 bits of dense sections
    code, _, err = run(
        ["compress", stats_dump, "-o", tmp_path / "x.kvp", "-m", "uniform", "-g", "64", "--allocate", "qaq",
         "--target-bits", "2.3", "--zstd-level", "0"], capsys)  # fmt: skip
    assert_one_line_error(code, err, "below the 2.5")
    assert "--bits-min 1" in err
    # the entropy stage packs the same widths into fewer bits: the refusal names what that file needs
    code, _, err = run(
        ["compress", stats_dump, "-o", tmp_path / "x.kvp", "-m", "uniform", "-g", "64", "--allocate", "qaq",
         "--target-bits", "1.2"], capsys)  # fmt: skip
    assert_one_line_error(code, err, "--target-bits 1.2 is below the ")
    needed = float(err.split("below the ")[1].split()[0])
    assert 1.2 * 1.02 < needed < 2.5, err
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
        measured = mean_relative_error(tmp_path / "e.kvp", real_dump)
        assert measured <= bound and report["allocation"]["mean_rel_mse"] == pytest.approx(measured, rel=1e-6)
        assert report["rows"]["all"]["bits_per_element"]["total"] < 8


@pytest.mark.model
@pytest.mark.parametrize("allocator", ["target", "importance"])
def test_max_error_holds_on_the_decoded_file_with_attention_statistics(tmp_path, stats_dump, allocator):
    """With statistics the solver spends bits by attention-weighted errors; the bound is still the plain
    error of the decoded file (a weighted 0.01 once gave files of 0.083)."""
    for bound in (0.02, 0.002):
        compress_file(
            stats_dump, tmp_path / "e.kvp", CodecConfig.build("uniform", 4, 64), force=True,
            allocation=Allocation(allocator, max_error=bound),
        )  # fmt: skip
        assert mean_relative_error(tmp_path / "e.kvp", stats_dump) <= bound


@pytest.mark.model
@pytest.mark.parametrize(
    "tokens, method, options, target, level, coarse",
    [
        (64, "uniform", {}, 3.0, 1, 0),
        (64, "adaptive", {}, 3.0, 1, 0),
        (64, "mxfp4", {}, 3.0, 1, 0),
        (16, "mxfp4", {}, 4.0, 1, 0),
        (16, "mxfp4", {}, 4.0, 0, 0),
        (16, "uniform", {}, 2.0, 0, 0),
        (128, "adaptive", {"codebook_scope": "head"}, 0.8, 1, 0),
        # one float16 codebook per width and tensor: the 8-bit one alone costs 0.67 bits per
        # element of a 32-token cache, so the widths that can occur may come in coarse steps
        (32, "adaptive", {"codebook_scope": "tensor"}, 4.0, 1, 0.1),
        (16, "adaptive", {"codebook_scope": "tensor"}, 4.0, 1, 0.2),
    ],
)
def test_target_bits_land_on_short_caches(
    tmp_path, real_dump, real_tensors, tokens, method, options, target, level, coarse
):
    """Short caches: the header (one section per width that occurs) and metadata are a large share of
    the file (0.18 bits per element at 16 tokens), and rate control measures them with the rest. Where
    the widths come in coarse steps (``coarse``), a file within 2 % may not exist: then the closest
    below the target, at most ``coarse`` bits per element below."""
    from kvpack.compress import compress_tensors

    with safe_open(str(real_dump), "pt") as f:
        metadata = f.metadata()
    short = {n: x[:, :, :tokens] if n.startswith("layers.") else x[:, :tokens] for n, x in real_tensors.items()}
    config = CodecConfig.build(method, None, None, **options)
    out = tmp_path / "s.kvp"
    compress_tensors(
        short, out, config, metadata, allocation=Allocation(target_bits=target), entropy=EntropyConfig(level=level)
    )
    bits = out.stat().st_size * 8 / sum(x.numel() for n, x in short.items() if n.startswith("layers."))
    assert abs(bits - target) <= 0.02 * target or target - coarse <= bits <= target, (method, tokens, bits)


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
        compress_file(tmp_path / "z.safetensors", tmp_path / "z.kvp", config, force=True, allocation=allocation)
        restored = load_kvp(tmp_path / "z.kvp")[0]
        assert all(bool((restored[n] == 0).all()) for n in restored if n.endswith(".value"))
        # zero values need no more than the narrowest width: their bits go to the keys
        widths = _file_widths(tmp_path / "z.kvp")
        assert all(int(w.max()) == 1 for n, w in widths.items() if n.endswith(".value")), allocation
        if allocation.target_bits:
            assert abs(file_bits(tmp_path / "z.kvp", tmp_path / "z.safetensors") - 3.0) <= 0.06


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
