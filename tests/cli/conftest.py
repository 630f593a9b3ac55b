"""Fixtures of the command-line tests."""

import pytest
import torch

from kvpack.formats.safetensors_io import write_safetensors


@pytest.fixture
def dump(tmp_path):
    """A small random dump: 2 layers of K and V, (1, 2, 10, 32) float16, and 10 token ids."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"layers.{i}.{r}": torch.randn(1, 2, 10, 32, generator=gen).half() for i in range(2) for r in ("key", "value")
    }
    tensors["token_ids"] = torch.arange(10).reshape(1, 10)
    path = tmp_path / "c.safetensors"
    write_safetensors(path, tensors, {"model": "unit", "seq_len": "10", "dtype": "float16"})
    return path
