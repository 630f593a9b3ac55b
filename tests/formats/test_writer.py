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
