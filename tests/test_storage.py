"""fsspec URLs as file names (kvpack.storage): parsing, naming, and whole files through ``memory://``
(fsspec's in-memory file system: the same code paths as any object store, no server)."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest
import torch

from kvpack import compress_tensors, load_kvp
from kvpack.config import CodecConfig
from kvpack.errors import InvalidInputError, OutputExistsError
from kvpack.storage import current_options as options_now
from kvpack.storage import (
    find,
    glob,
    is_url,
    join,
    location,
    name_of,
    parse_storage_options,
    same_location,
    storage_options,
    upload,
    with_suffix,
)


def test_locations_keep_urls_and_make_local_names_paths():
    assert location("s3://bucket/store/a.safetensors") == "s3://bucket/store/a.safetensors"
    assert location("file:///data/a.kvp") == Path("/data/a.kvp")
    assert location("a/b.kvp") == Path("a/b.kvp")
    assert is_url("gs://b/x") and is_url("memory://x") and not is_url("file:///x") and not is_url(Path("s3:/b"))
    assert with_suffix("s3://b/store/a.safetensors", ".kvp") == "s3://b/store/a.kvp"
    assert with_suffix("s3://b/a.kvp", ".restored.safetensors") == "s3://b/a.restored.safetensors"
    assert with_suffix(Path("x/a.safetensors"), ".kvp") == Path("x/a.kvp")
    assert join("s3://b/packed/", "a.kvp") == "s3://b/packed/a.kvp"
    assert name_of("s3://b/store/a.safetensors") == "a.safetensors"
    assert same_location("s3://b/a.kvp", "s3://b/a.kvp") and not same_location("s3://b/a.kvp", "a.kvp")


def test_storage_options_parse_json_values_and_dotted_keys():
    parsed = parse_storage_options(
        [
            "endpoint_url=http://127.0.0.1:9000",
            "anon=true",
            "client_kwargs.region_name=eu-west-1",
            "retries:=3",
            "secret=1e5",
            'config_kwargs.s3:={"addressing_style": "path"}',
        ]
    )
    assert parsed == {
        "endpoint_url": "http://127.0.0.1:9000",
        "anon": True,
        "client_kwargs": {"region_name": "eu-west-1"},
        "retries": 3,
        "secret": "1e5",  # a secret that looks like a number stays its text
        "config_kwargs": {"s3": {"addressing_style": "path"}},
    }
    for bad in ("novalue", "=x", "a..b=1"):
        with pytest.raises(InvalidInputError, match="KEY=VALUE"):
            parse_storage_options([bad])
    with pytest.raises(InvalidInputError, match="not JSON"):
        parse_storage_options(["retries:=three"])
    with storage_options({"a": 1}), storage_options({"b": 2}):
        assert options_now() == {"a": 1, "b": 2}
    assert options_now() == {}


def test_unknown_protocol_is_one_clear_error():
    with pytest.raises(InvalidInputError, match="nosuchproto"):
        load_kvp("nosuchproto://bucket/a.kvp")


@pytest.fixture
def memory_folder():
    """A fresh folder of fsspec's in-memory file system: ``(url, filesystem)``."""
    fs = fsspec.filesystem("memory")
    folder = f"/kvpack-{uuid.uuid4().hex[:8]}"
    fs.mkdir(folder)
    yield f"memory:/{folder}", fs
    fs.rm(folder, recursive=True)


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        f"layers.{i}.{role}": torch.randn(1, 2, 40, 16, generator=generator).to(torch.float16)
        for i in range(2)
        for role in ("key", "value")
    }


def test_a_kvp_written_to_and_read_from_a_url_round_trips_exactly(memory_folder, tmp_path):
    url, fs = memory_folder
    tensors = _tensors()
    compress_tensors(tensors, f"{url}/lossless.kvp", None)  # no codec: exact
    compress_tensors(tensors, tmp_path / "local.kvp", None)
    assert fs.cat_file(f"{url}/lossless.kvp".removeprefix("memory:/")) == (tmp_path / "local.kvp").read_bytes()
    restored, _ = load_kvp(f"{url}/lossless.kvp")
    assert all(torch.equal(restored[name], x) for name, x in tensors.items())

    config = CodecConfig.build("uniform", 4, 16)
    with pytest.raises(OutputExistsError, match="exists"):
        compress_tensors(tensors, f"{url}/lossless.kvp", config)
    assert load_kvp(f"{url}/lossless.kvp")[0]["layers.0.key"].equal(tensors["layers.0.key"])  # untouched
    compress_tensors(tensors, f"{url}/lossless.kvp", config, force=True)
    lossy, _ = load_kvp(f"{url}/lossless.kvp")
    error = (lossy["layers.0.key"].float() - tensors["layers.0.key"].float()).abs().max()
    assert 0 < error < 0.5  # 4 bits of a unit normal: a quantized file replaced the exact one


def test_listing_a_prefix_and_a_pattern(memory_folder):
    url, fs = memory_folder
    for name in ("b.safetensors", "a.safetensors", "note.txt"):
        fs.pipe_file(f"{url}/store/{name}".removeprefix("memory:/"), b"x")
    assert find(f"{url}/store/", ".safetensors") == [f"{url}/store/a.safetensors", f"{url}/store/b.safetensors"]
    assert glob(f"{url}/store/*.txt") == [f"{url}/store/note.txt"]


def test_an_interrupted_upload_leaves_nothing(memory_folder, tmp_path):
    url, fs = memory_folder
    local = tmp_path / "big.bin"
    local.write_bytes(b"\1" * (20 << 20))

    def interrupt(sent: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upload(local, f"{url}/big.bin", progress=interrupt)
    assert not fs.exists(f"{url}/big.bin".removeprefix("memory:/"))
    assert upload(local, f"{url}/big.bin") == 20 << 20
    with pytest.raises(OutputExistsError):
        upload(local, f"{url}/big.bin")
