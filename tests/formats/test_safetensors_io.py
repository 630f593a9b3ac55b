"""safetensors dumps (kvpack.formats.safetensors_io): the layout of awkward tensors reads back."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from kvpack.errors import InvalidInputError
from kvpack.formats.safetensors_io import safetensors_layout, write_safetensors


def header_of(path) -> tuple[int, dict]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length])


def test_safetensors_layout_of_awkward_tensors_reads_back(tmp_path):
    tensors = {
        "half": torch.randn(3, dtype=torch.float16),
        "ids": torch.arange(5),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
        "bf16": torch.randn(2, 3, dtype=torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
        "bytes": torch.arange(7, dtype=torch.uint8),
    }
    path = tmp_path / "t.safetensors"
    size = write_safetensors(path, tensors, {"k": "v"})
    got = load_file(str(path))
    assert size == path.stat().st_size and set(got) == set(tensors)
    for name, x in tensors.items():
        assert got[name].dtype == x.dtype and torch.equal(got[name], x), name
    _, header = header_of(path)
    for value in header.values():  # every tensor starts at a multiple of its element size
        if "dtype" in value:
            item = {"I64": 8, "F32": 4, "F16": 2, "BF16": 2}.get(value["dtype"], 1)
            assert value["data_offsets"][0] % item == 0
    with pytest.raises(InvalidInputError, match="unique"):
        safetensors_layout([("a", (1,), "float16"), ("a", (1,), "float16")], None)
    assert "__metadata__" not in header_of_layout([("a", (2,), "float32")], None)


def header_of_layout(tensors, metadata) -> dict:
    layout = safetensors_layout(tensors, metadata)
    return json.loads(layout.header[8:])
