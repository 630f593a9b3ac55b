"""The streaming writer (kvpack.formats.writer): what it refuses to write, leaving nothing behind."""

import os

import pytest
import torch

from kvpack import CodecConfig, KvpWriter, compress_tensors, load_kvp
from kvpack.entry import encode_tensor
from kvpack.errors import (
    InvalidInputError,
)
from kvpack.formats.entropy import EntropyConfig
from tests.codec_settings import CODECS


def test_writer_refuses_sections_that_do_not_match(tmp_path):
    config = CodecConfig.build("uniform", 4, 16)
    with pytest.raises(InvalidInputError, match="bytes, expected"):
        with KvpWriter(tmp_path / "w.kvp") as writer:
            sections = encode_tensor("layers.0.key", torch.zeros(1, 1, 2, 16), config)
            sections["codes"] = sections["codes"][:-1]
            writer.add_tensor("layers.0.key", (1, 1, 2, 16), "float32", config, sections)
    assert os.listdir(tmp_path) == []


def test_writer_refuses_reserved_names_and_bad_metadata(tmp_path):
    with pytest.raises(InvalidInputError, match="invalid tensor name"):
        compress_tensors({"__metadata__": torch.zeros(2)}, tmp_path / "a.kvp", CodecConfig.build("uniform"))
    with pytest.raises(InvalidInputError, match="not valid Unicode"):
        compress_tensors({"x": torch.zeros(2)}, tmp_path / "b.kvp", CodecConfig.build("uniform"), {"m": "\ud800"})
    assert os.listdir(tmp_path) == []


@pytest.mark.model
def test_writer_refuses_a_transpose_that_does_not_fit(real_tensors, tmp_path):
    from kvpack.formats.writer import KvpWriter

    x = real_tensors["layers.0.key"]
    config = CODECS["uniform-4"]
    sections = encode_tensor("layers.0.key", x, config)
    with KvpWriter(tmp_path / "x.kvp") as writer:
        with pytest.raises(InvalidInputError, match="cannot be transposed"):
            writer.add_tensor("layers.0.key", tuple(x.shape), "float16", config, sections, {"scale": 2})
        writer.add_tensor("layers.0.key", tuple(x.shape), "float16", config, sections)  # nothing was written before
    compress_tensors({"layers.0.key": x}, tmp_path / "y.kvp", config, entropy=EntropyConfig(transpose=False))
    assert torch.equal(load_kvp(tmp_path / "x.kvp")[0]["layers.0.key"], load_kvp(tmp_path / "y.kvp")[0]["layers.0.key"])


def test_transform_entries_are_stored_without_the_entropy_stage(tmp_path):
    """docs/format.md §6.4: a transform entry's sections carry no `encoding` or `transpose`, even when
    the writer's entropy stage would shrink them; other entries still go through it."""
    from kvpack.formats.reader import KvpReader
    from tests.golden_files import write_golden

    path = tmp_path / "t.kvp"
    write_golden("transform-unrope-keep1-1", path)  # the default entropy stage: zstd on every kind
    with KvpReader(path) as reader:
        coded = [e for e in reader.entries() if e.codec is not None]
        sections = {name: bytes(data) for name, data in reader.read_sections("layers.0.key").items()}
        assert len(coded) == 4
        assert all(s.encoding is None and not s.transpose for e in coded for s in e.sections.values())
        assert reader.entry("token_ids").sections["data"].encoding == "zstd"
        entry = reader.entry("layers.0.key")
    with KvpWriter(tmp_path / "u.kvp") as writer:
        with pytest.raises(InvalidInputError, match="cannot be transposed"):
            writer.add_tensor(entry.name, entry.shape, entry.dtype, entry.codec, sections, {"scales": 16})
        writer.abort()


@pytest.mark.parametrize("level", [0, 1, 19])
@pytest.mark.parametrize("codec", sorted(CODECS))
def test_the_sizer_gives_the_size_of_the_file_the_writer_writes(tmp_path, codec, level):
    """KvpSizer lays sections, padding and header out as KvpWriter writes them: the same size to the
    byte, for every kind of section, one tensor at mixed widths, the entropy stage on or off; an
    entry sized once can be placed in another sizer without its bytes, not in a writer."""
    from kvpack.entry import encode_for_file
    from kvpack.formats.writer import KvpSizer
    from kvpack.transforms.mixed import candidate_widths
    from kvpack.transforms.plan import plan_for
    from tests.conftest import small_cache

    tensors = small_cache(seed=3, seq=64, heads=2, dim=64)
    config, entropy, metadata = CODECS[codec], EntropyConfig(level=level), {"model": "test", "note": "ü"}
    n_groups = plan_for((1, 2, 64, 64), "float16", "layers.1.value", config).layout.n_groups
    offered = torch.tensor(candidate_widths(config))
    widths = offered[torch.arange(n_groups) % len(offered)]
    sizer, again = KvpSizer(metadata, entropy), KvpSizer(metadata, entropy)
    with KvpWriter(tmp_path / "w.kvp", metadata, entropy=entropy) as writer:
        for name, x in tensors.items():
            chosen = widths if name == "layers.1.value" else None
            codec_of = None if name == "token_ids" else config if chosen is None else config.with_widths(chosen)
            codec_of, sections, transposes = encode_for_file(name, x, codec_of, chosen, entropy)
            shape, dtype = tuple(x.shape), str(x.dtype).removeprefix("torch.")
            entry = writer.add_tensor(name, shape, dtype, codec_of, sections, transposes)
            stored = sizer.stage(name, shape, dtype, codec_of, sections, transposes)
            assert sizer.place(name, shape, dtype, codec_of, stored) == entry
            again.place(name, shape, dtype, codec_of, {k: s.sized() for k, s in stored.items()})
    assert sizer.file_size() == again.file_size() == os.path.getsize(tmp_path / "w.kvp")
    with KvpWriter(tmp_path / "x.kvp") as writer:
        with pytest.raises(InvalidInputError, match="without its bytes"):
            writer.place("token_ids", (1, 64), "int64", None, {"data": stored["data"].sized()})


@pytest.mark.parametrize("level", [0, 1])
def test_the_sizer_sizes_transform_entries_as_the_writer_stores_them(tmp_path, level):
    """A whole-tensor (transform) entry goes through encode_for_file with the codec config its encoder
    sets (``stream_bytes``) and is stored without the entropy stage: the sizer agrees to the byte."""
    from kvpack.dtypes import dtype_name
    from kvpack.entry import encode_for_file
    from kvpack.formats.writer import KvpSizer
    from tests.golden_files import GOLDEN, golden_inputs

    config, kind = GOLDEN["transform-unrope-keep1-1"]
    entropy, metadata = EntropyConfig(level=level), {"profile": config.profile.fingerprint}
    sizer = KvpSizer(metadata, entropy)
    with KvpWriter(tmp_path / "t.kvp", metadata, entropy=entropy) as writer:
        for name, x in golden_inputs(kind).items():
            codec = config if name.startswith("layers.") else None
            codec, sections, transposes = encode_for_file(name, x, codec, None, entropy)
            assert not transposes
            shape, dtype = tuple(x.shape), dtype_name(x.dtype)
            entry = writer.add_tensor(name, shape, dtype, codec, sections, transposes)
            assert sizer.place(name, shape, dtype, codec, sizer.stage(name, shape, dtype, codec, sections)) == entry
    assert sizer.file_size() == os.path.getsize(tmp_path / "t.kvp")
