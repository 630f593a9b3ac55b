"""Mixed precision (kvpack.transforms.mixed, format 1.4): per-group widths round-trip through the container
for every codec, each width class decodes like a fixed width, and hostile width maps are refused."""

import json

import pytest
import torch

from kvpack.config import CodecConfig
from kvpack.entry import decode_entry, encode_tensor
from kvpack.errors import FormatError, InvalidInputError
from kvpack.formats.header import TensorEntry
from kvpack.formats.reader import KvpReader
from kvpack.formats.writer import KvpWriter
from kvpack.grouping import to_groups
from kvpack.restore.decode import read_tensor
from kvpack.transforms.plan import plan_for
from tests.codec_settings import MIXED_CODECS
from tests.kvp_bytes import header_json, with_header


def random_widths(config, n_groups, seed=0):
    allowed = torch.tensor((0, *config.make_codec().widths()))
    return allowed[torch.randint(len(allowed), (n_groups,), generator=torch.Generator().manual_seed(seed))]


def mixed(method, options, widths):
    counts = tuple(torch.bincount(widths, minlength=9).tolist())
    return CodecConfig.build(method, None, None, transforms={"width_counts": counts}, **options)


@pytest.mark.model
@pytest.mark.parametrize("method, options", MIXED_CODECS)
def test_mixed_widths_round_trip_through_the_container(tmp_path, real_tensors, method, options):
    x = real_tensors["layers.5.key"]
    base = CodecConfig.build(method, None, None, **options)
    layout = plan_for(tuple(x.shape), "float16", "layers.5.key", base).layout
    widths = random_widths(base, layout.n_groups)
    config = mixed(method, options, widths)
    with KvpWriter(tmp_path / "m.kvp") as writer:
        writer.add_tensor(
            "layers.5.key", tuple(x.shape), "float16", config, encode_tensor("layers.5.key", x, config, widths)
        )
    with KvpReader(tmp_path / "m.kvp") as reader:
        assert reader.version >= (1, 4)
        assert reader.entry("layers.5.key").codec.width_counts == config.width_counts
        restored = read_tensor(reader, "layers.5.key").float()
    original, decoded = to_groups(x.float(), layout), to_groups(restored, layout)
    for width in widths.unique().tolist():
        chosen = widths == width
        error = float(((decoded[chosen] - original[chosen]) ** 2).sum() / (original[chosen] ** 2).sum())
        if width == 0:  # the zero-point (the group mean) or zeros, one value per group
            assert bool((decoded[chosen] == decoded[chosen][:, :1]).all())
            assert error <= 1.0 + 1e-6
        elif width == 8:
            assert error < 0.05, (width, error)  # normal's meanstd levels clip the tails: 0.035
        elif width >= 4:
            assert error < {4: 0.2, 5: 0.1, 6: 0.1, 7: 0.05}[width], (width, error)


@pytest.mark.model
def test_each_width_class_decodes_like_a_fixed_width_tensor(real_tensors):
    """The groups given width w decode exactly as the codec at w bits decodes them alone."""
    x = real_tensors["layers.9.value"].float()
    base = CodecConfig.build("uniform", 3, 64)
    layout = plan_for(tuple(x.shape), "float32", "layers.9.value", base).layout
    widths = random_widths(base, layout.n_groups, seed=3)
    config = mixed("uniform", {}, widths)
    entry = TensorEntry("layers.9.value", tuple(x.shape), "float32", config, {})
    decoded = to_groups(decode_entry(entry, encode_tensor("layers.9.value", x, config, widths)), layout)
    groups = to_groups(x, layout)
    for width in range(1, 9):
        chosen = widths == width
        fixed = CodecConfig.build("uniform", width, 64).make_codec()
        alone = fixed.decode(
            {k: v.float() if k != "codes" else v for k, v in fixed.encode(groups[chosen], layout, None).items()}, layout
        )
        assert torch.equal(decoded[chosen], alone), width


@pytest.mark.model
def test_hostile_bit_width_maps_are_refused(tmp_path, real_tensors):
    x = real_tensors["layers.1.value"][:, :, :16]
    base = CodecConfig.build("uniform", 4, 64)
    layout = plan_for(tuple(x.shape), "float16", "layers.1.value", base).layout
    widths = random_widths(base, layout.n_groups, seed=1)
    config = mixed("uniform", {}, widths)
    with KvpWriter(tmp_path / "m.kvp") as writer:
        writer.add_tensor(
            "layers.1.value", tuple(x.shape), "float16", config, encode_tensor("layers.1.value", x, config, widths)
        )
    data = (tmp_path / "m.kvp").read_bytes()
    header = json.loads(header_json(data))

    def refused(edit, message):
        edited = json.loads(json.dumps(header))
        edit(edited["tensors"]["layers.1.value"]["codec"])
        path = tmp_path / "bad.kvp"
        path.write_bytes(with_header(data, json.dumps(edited).encode()))
        with pytest.raises(FormatError, match=message):
            with KvpReader(path) as reader:
                read_tensor(reader, "layers.1.value")

    refused(lambda c: c.update(width_counts=[1] * 8), "width_counts must be 9 non-negative integers")
    refused(lambda c: c.update(width_counts=[layout.n_groups] + [0] * 8), "does not hold the widths")
    swapped = list(config.width_counts)
    swapped[2], swapped[3] = swapped[3], swapped[2]
    if swapped != list(config.width_counts):
        refused(lambda c: c.update(width_counts=swapped), "length|does not hold the widths")
    with pytest.raises(InvalidInputError, match="group widths that match width_counts"):
        encode_tensor("layers.1.value", x, config, torch.zeros(layout.n_groups, dtype=torch.long))
