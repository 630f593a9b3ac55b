"""Fixtures of the container tests."""

import pytest

from kvpack import CodecConfig, compress_tensors
from kvpack.formats.entropy import EntropyConfig
from tests.conftest import small_cache


@pytest.fixture
def sample(tmp_path):
    """A small dense .kvp (uniform 3-bit, outliers, metadata) written fresh for each test."""
    path = tmp_path / "s.kvp"
    # dense sections: the header edits below find their keys where a 1.4 writer put them
    compress_tensors(
        small_cache(), path, CodecConfig.build("uniform", 3, 16, 0.1), {"model": "m"}, entropy=EntropyConfig.off()
    )
    return path
