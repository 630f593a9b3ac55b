"""One tensor <-> its sections (kvpack.entry): what encode refuses, and decode with the entry the writer returned."""

import pytest
import torch

from kvpack.compress import compress_tensors
from kvpack.config import CodecConfig
from kvpack.entry import decode_entry, encode_tensor
from kvpack.errors import InvalidInputError
from kvpack.formats.reader import KvpReader
from kvpack.restore.decode import read_tensor
from tests.codec_settings import CODECS


def test_encode_rejects_nan_inf_and_bad_shapes():
    config = CodecConfig.build("uniform", 4, 8)
    bad = torch.zeros(1, 1, 4, 8)
    bad[0, 0, 2, 3] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        encode_tensor("layers.0.key", bad, config)
    bad[0, 0, 2, 3] = float("inf")
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        encode_tensor("layers.0.key", bad, config)
    with pytest.raises(InvalidInputError, match="shape"):
        encode_tensor("layers.0.key", torch.zeros(4, 8), config)
    with pytest.raises(InvalidInputError, match="does not divide"):
        encode_tensor("layers.0.key", torch.zeros(1, 1, 4, 12), config)
    with pytest.raises(InvalidInputError, match="float16 range"):
        encode_tensor("layers.0.key", torch.full((1, 1, 4, 8), 1e6), config)


@pytest.mark.model
def test_decode_entry_needs_the_entry_transposes(real_tensors, tmp_path):
    """What compress_file does: decode the bytes just written with the entry the writer returned."""
    x = real_tensors["layers.1.key"]
    config = CODECS["uniform-2"]
    compress_tensors({"layers.1.key": x}, tmp_path / "x.kvp", config)
    with KvpReader(tmp_path / "x.kvp") as reader:
        entry = reader.entry("layers.1.key")
        from_file = read_tensor(reader, "layers.1.key")
        sections = reader.read_sections("layers.1.key")
    assert entry.sections["codes"].transpose == x.shape[1] * x.shape[3]
    assert torch.equal(decode_entry(entry, sections), from_file)
