"""The LMCache serde ``"kvpack"`` (kvpack/integrations/lmcache.py, chunks.py) through LMCache's own API.

Real SmolLM2 KV caches cut into LMCache chunks ``[2, layers, 256, hidden]`` go through the serializer
and the deserializer on LMCache ``TensorMemoryObj`` buffers and decode bit for bit as kvpack's own
``compress_tensors`` -> ``load_kvp`` round trip of the same tensors with the same codec; a chunk goes
through LMCache's ``fs`` L2 adapter behind its serde wrapper and comes back as the codec decodes it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "lmcache.v1.distributed.serde",
    reason="lmcache is not importable (the lmcache extra: pip install --no-deps lmcache==0.5.6, see README)",
)

from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey  # noqa: E402
from lmcache.v1.distributed.serde import (  # noqa: E402
    AsyncSerdeProcessor,
    SerdeConfig,
    create_serde_processor,
    get_registered_serde_types,
)
from lmcache.v1.memory_management import MemoryObjMetadata, TensorMemoryObj  # noqa: E402

from kvpack import CodecConfig, compress_tensors, load_kvp  # noqa: E402
from kvpack.errors import ChecksumMismatchError, FormatError, InvalidInputError, TruncatedFileError  # noqa: E402
from kvpack.integrations import chunks  # noqa: E402
from kvpack.integrations import lmcache as serde  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 256  # LMCache's default chunk size
HEAD_DIM = 64  # SmolLM2-135M: 3 kv heads of 64
KEY = ObjectKey(chunk_hash=b"\0" * 32, model_name="SmolLM2-135M-Instruct", kv_rank=0)
#: label -> (codec config, at most this fraction of the fp16 bytes stored with a fixed size; None: more)
CODECS = {
    "uniform-4 (default)": (None, 0.3),
    "adaptive-4": (CodecConfig.build("adaptive", 4, 64, recommended=True), 0.3),
    "fp8-e4m3": (CodecConfig.build("fp8-e4m3", recommended=True), 0.55),
    "uniform-8 group 1 (larger than fp16)": (CodecConfig.build("uniform", 8, 1), None),
    "adaptive-4 level token": (CodecConfig.build("adaptive", 4, 576, transforms={"stack_layers": True}), 0.3),
}
#: what a stream-length serde is measured with as well (zstd shrinks what the estimate counts densely)
STREAM_LENGTH = ("uniform-4 (default)", "uniform-8 group 1 (larger than fp16)")


def memory_obj(shape: tuple[int, ...], dtype: torch.dtype) -> TensorMemoryObj:
    """A CPU ``TensorMemoryObj`` as LMCache's L1 allocator hands them out (one group of ``shape``)."""
    size = torch.Size(shape)
    nbytes = size.numel() * dtype.itemsize
    meta = MemoryObjMetadata(
        shape=size, dtype=dtype, address=0, phy_size=nbytes, ref_count=1, shapes=[size], dtypes=[dtype]
    )
    return TensorMemoryObj(torch.zeros(nbytes, dtype=torch.uint8), meta, None)


def chunk_obj(chunk: torch.Tensor) -> TensorMemoryObj:
    obj = memory_obj(tuple(chunk.shape), chunk.dtype)
    obj.tensor.copy_(chunk)
    return obj


def lmcache_chunks(tensors: dict[str, torch.Tensor], tokens: int = CHUNK) -> list[torch.Tensor]:
    """A kvpack cache (``layers.{i}.key|value`` ``(1, H, T, D)``) as LMCache's chunks ``[2, L, tokens, H * D]``."""
    layers = sum(1 for name in tensors if name.endswith(".key"))
    keys = torch.stack([tensors[f"layers.{i}.key"][0] for i in range(layers)])
    values = torch.stack([tensors[f"layers.{i}.value"][0] for i in range(layers)])
    kv = torch.stack([keys, values]).transpose(2, 3)  # (2, L, T, H, D)
    kv = kv.reshape(*kv.shape[:3], -1)
    return [kv[:, :, start : start + tokens].contiguous() for start in range(0, kv.shape[2] - tokens + 1, tokens)]


def kvpack_round_trip(chunk: torch.Tensor, config: CodecConfig | None, tmp_path: Path) -> torch.Tensor:
    """The chunk through kvpack's own file path: its K/V tensors -> ``compress_tensors`` -> ``load_kvp``."""
    path = tmp_path / "own.kvp"
    compress_tensors(chunks.split_chunk(chunk, HEAD_DIM), path, config, force=True)
    decoded, _ = load_kvp(path)
    out = torch.empty_like(chunk)
    chunks.join_chunk(decoded, out)
    return out


def rel_mse(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(((x - y) ** 2).sum() / (x**2).sum())


def serialized(codec: chunks.ChunkCodec, chunk: torch.Tensor) -> tuple[TensorMemoryObj, int, int]:
    """``chunk`` serialized as LMCache does: a buffer of the estimate, the bytes written, the estimate."""
    serializer = serde.KvpackSerializer(codec)
    estimate = serializer.estimate_serialized_size(MemoryLayoutDesc([chunk.shape], [chunk.dtype]))
    buffer = memory_obj((estimate,), torch.uint8)
    return buffer, serializer.serialize(chunk_obj(chunk), buffer, KEY), estimate


def wait(query, task_id, seconds: float = 120.0):
    """Poll an LMCache ``query_*`` until it answers (a bool or a bitmap)."""
    deadline = time.monotonic() + seconds
    while (result := query(task_id)) is None:
        assert time.monotonic() < deadline, "LMCache task did not finish"
        time.sleep(0.01)
    return result


def random_chunk(layers=2, tokens=64, heads=2, head_dim=16, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, layers, tokens, heads * head_dim, generator=gen).half()


def small_codec(**options) -> chunks.ChunkCodec:
    """A codec for ``random_chunk`` whose streams are as long as they are (the bad-input tests cut them)."""
    base = {"head_dim": 16, "method": "uniform", "bits": 4, "group_size": 16, "fixed_size": False}
    return chunks.codec_from_options({**base, **options})


# --- real SmolLM2 chunks ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_chunks(real_tensors) -> list[torch.Tensor]:
    cut = lmcache_chunks({n: x for n, x in real_tensors.items() if n.startswith("layers.")})
    assert len(cut) >= 2 and cut[0].shape == (2, 30, CHUNK, 192) and cut[0].dtype == torch.float16
    return cut


@pytest.mark.model
@pytest.mark.parametrize(
    "label, fixed_size",
    [(label, True) for label in CODECS] + [(label, False) for label in STREAM_LENGTH],
    ids=[f"{label}-fixed-size" for label in CODECS] + [f"{label}-stream-length" for label in STREAM_LENGTH],
)
def test_real_chunks_decode_as_kvpack_own_round_trip(label, fixed_size, real_chunks, tmp_path):
    """Serialize -> deserialize equals kvpack's own round trip of the same tensors bit for bit (whatever the
    entropy stage), stores fewer bytes than fp16 where the codec is smaller, and stays within the estimate
    (fills it exactly with ``fixed_size``)."""
    config, fraction = CODECS[label]
    codec = chunks.ChunkCodec(HEAD_DIM, config, fixed_size=fixed_size)
    own_config = chunks.default_config() if config is None else config
    for chunk in real_chunks[:2]:
        buffer, written, estimate = serialized(codec, chunk)
        assert written == estimate if fixed_size else written < estimate
        out = memory_obj(tuple(chunk.shape), chunk.dtype)
        serde.KvpackDeserializer(codec).deserialize(buffer, out, KEY)
        own = kvpack_round_trip(chunk, own_config, tmp_path)
        assert torch.equal(out.tensor, own)
        assert rel_mse(chunk, out.tensor) == rel_mse(chunk, own)
        if fraction is not None:
            assert written < fraction * chunk.numel() * chunk.element_size()


@pytest.mark.model
def test_real_chunk_lossless_is_exact_and_saves_bytes_as_stream_length(real_chunks):
    chunk = real_chunks[0]
    raw = chunk.numel() * chunk.element_size()
    for fixed_size in (False, True):
        codec = chunks.ChunkCodec(HEAD_DIM, lossless=True, fixed_size=fixed_size)
        buffer, written, estimate = serialized(codec, chunk)
        out = memory_obj(tuple(chunk.shape), chunk.dtype)
        serde.KvpackDeserializer(codec).deserialize(buffer, out, KEY)
        assert torch.equal(out.tensor, chunk)
        if fixed_size:
            assert written == estimate > raw  # checksums, no savings
        else:
            assert written < raw


@pytest.mark.model
def test_registered_factory_round_trips_through_lmcache_async_processor(real_chunks):
    """LMCache's registry builds the serde from its JSON keys; its async processor narrows a stream-length
    buffer to the stream, and a buffer of the estimate with stale bytes after the stream still decodes."""
    assert serde.SERDE_NAME in get_registered_serde_types()
    serde.register()  # again: a no-op, not LMCache's "already registered"
    options = {"head_dim": HEAD_DIM, "method": "uniform", "bits": 4, "fixed_size": False}
    processor = create_serde_processor(SerdeConfig(type="kvpack", kwargs=options))
    try:
        assert isinstance(processor, AsyncSerdeProcessor)
        chunk = real_chunks[1]
        estimate = processor.estimate_serialized_size(MemoryLayoutDesc([chunk.shape], [chunk.dtype]))
        codec = chunks.codec_from_options(options)
        assert estimate == codec.size_bound(tuple(chunk.shape), chunk.dtype)
        buffer = memory_obj((estimate,), torch.uint8)
        buffer.raw_data.fill_(0xA5)
        task = processor.submit_serialize([chunk_obj(chunk)], [buffer], [KEY])
        assert wait(processor.query_serialize_result, task) is True
        stream = buffer.tensor.clone()  # narrowed by LMCache to the bytes written
        assert stream.numel() < estimate and buffer.get_size() == stream.numel()
        loaded = memory_obj((estimate,), torch.uint8)  # what an L2 load fills: the stream, then stale bytes
        loaded.raw_data.fill_(0x5A)
        loaded.raw_data[: stream.numel()].copy_(stream)
        out = memory_obj(tuple(chunk.shape), chunk.dtype)
        task = processor.submit_deserialize([loaded], [out], [KEY])
        assert wait(processor.query_deserialize_result, task) is True
        expected = torch.empty_like(chunk)
        codec.decode_into(stream, expected)
        assert torch.equal(out.tensor, expected)
        assert rel_mse(chunk, out.tensor) < 0.02
    finally:
        processor.close()


# --- LMCache's fs L2 adapter -----------------------------------------------------------------------


def fs_adapter(folder: Path, serde_options: dict):
    """LMCache's ``fs`` L2 adapter behind its serde wrapper, configured by ``--l2-adapter`` JSON as the
    server parses it, with an L1 manager on the CPU for the temporary buffers (as the storage manager does)."""
    pytest.importorskip(
        "lmcache.v1.distributed.l2_adapters.fs_l2_adapter", reason="LMCache's fs adapter needs aiofiles"
    )
    from lmcache.v1.distributed.config import L1ManagerConfig, L1MemoryManagerConfig
    from lmcache.v1.distributed.l1_manager import L1Manager
    from lmcache.v1.distributed.l2_adapters.config import add_l2_adapters_args, parse_args_to_l2_adapters_config
    from lmcache.v1.distributed.l2_adapters.factory import create_l2_adapter_from_registry
    from lmcache.v1.distributed.l2_adapters.serde_wrapper import SerdeL2AdapterWrapper

    spec = {"type": "fs", "base_path": str(folder), "serde": {"type": "kvpack", **serde_options}}
    parser = argparse.ArgumentParser()
    add_l2_adapters_args(parser)
    config = parse_args_to_l2_adapters_config(parser.parse_args(["--l2-adapter", json.dumps(spec)])).adapters[0]
    memory = L1MemoryManagerConfig(size_in_bytes=64 << 20, use_lazy=False, shm_name="")
    l1 = L1Manager(L1ManagerConfig(memory_config=memory))
    inner = create_l2_adapter_from_registry(config)
    return SerdeL2AdapterWrapper(inner=inner, serde=create_serde_processor(config.serde_config), l1_manager=l1)


def store_and_load(adapter, chunk: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """Store ``chunk`` through the adapter and load it back: (bytes stored, the loaded chunk or None)."""
    task = adapter.submit_store_task([KEY], [chunk_obj(chunk)])
    deadline = time.monotonic() + 120
    while task not in (done := adapter.pop_completed_store_tasks()):
        assert time.monotonic() < deadline, "store did not finish"
        time.sleep(0.01)
    assert done[task].is_successful()
    assert wait(adapter.query_lookup_and_lock_result, adapter.submit_lookup_and_lock_task([KEY], {})).test(0)
    out = memory_obj(tuple(chunk.shape), chunk.dtype)
    loaded = wait(adapter.query_load_result, adapter.submit_load_task([KEY], [out])).test(0)
    adapter.submit_unlock([KEY])
    return done[task].bytes_transferred(), out.tensor if loaded else None


def test_a_chunk_goes_through_lmcache_fs_adapter_and_back(tmp_path):
    """The default (fixed size) through LMCache 0.5.6's ``fs`` adapter: the file holds the estimate's bytes
    and the chunk loads back as the codec decodes it. A stream-length serde stores, but that adapter loads
    only a file that fills its buffer: why ``fixed_size`` is the default."""
    options = {"head_dim": 16, "method": "uniform", "bits": 4, "group_size": 16}
    chunk = random_chunk()
    adapter = fs_adapter(tmp_path / "fixed", options)
    try:
        stored, loaded = store_and_load(adapter, chunk)
    finally:
        adapter.close()
    codec = chunks.codec_from_options(options)
    assert stored == codec.size_bound(tuple(chunk.shape), chunk.dtype) < chunk.numel() * chunk.element_size()
    assert [f.stat().st_size for f in (tmp_path / "fixed").rglob("*.data")] == [stored]
    expected = torch.empty_like(chunk)
    codec.decode_into(codec.encode(chunk), expected)
    assert loaded is not None and torch.equal(loaded, expected)

    adapter = fs_adapter(tmp_path / "stream", {**options, "fixed_size": False})
    try:
        stored, loaded = store_and_load(adapter, chunk)
    finally:
        adapter.close()
    assert stored < codec.size_bound(tuple(chunk.shape), chunk.dtype) and loaded is None


# --- bad input: one named error, never a wrong decode (small random chunks, no model) -------------


def test_split_and_join_are_inverse_and_follow_lmcache_layout():
    chunk = random_chunk()
    tensors = chunks.split_chunk(chunk, 16)
    assert list(tensors)[:2] == ["layers.0.key", "layers.0.value"]
    assert tensors["layers.1.value"].shape == (1, 2, 64, 16)
    # head 1 of token 5 is features 16..31 of that token (vLLM's [tokens, heads, head_dim] paging)
    assert torch.equal(tensors["layers.1.value"][0, 1, 5], chunk[1, 1, 5, 16:32])
    out = torch.empty_like(chunk)
    chunks.join_chunk(tensors, out)
    assert torch.equal(out, chunk)


def test_fixed_size_pads_the_stream_with_zeros_to_the_estimate():
    chunk = random_chunk()
    codec = small_codec(fixed_size=True)
    fixed, stream = codec.encode(chunk), small_codec(zstd_level=0).encode(chunk)
    assert len(fixed) == codec.size_bound(tuple(chunk.shape), chunk.dtype) > len(stream)
    assert fixed[len(stream) :] == bytes(len(fixed) - len(stream))
    assert chunks.stream_length(torch.frombuffer(bytearray(fixed), dtype=torch.uint8)) == len(stream)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 2, 64), r"shape \[2, layers, tokens, hidden\]"),
        ((3, 2, 64, 32), r"shape \[2, layers, tokens, hidden\]"),
        ((2, 2, 64, 40), "not a multiple of `head_dim=16`"),
    ],
)
def test_wrong_shapes_are_refused(shape, message):
    codec = small_codec()
    with pytest.raises(InvalidInputError, match=message):
        codec.encode(torch.zeros(shape, dtype=torch.float16))
    with pytest.raises(InvalidInputError, match=message):
        serde.KvpackSerializer(codec).estimate_serialized_size(MemoryLayoutDesc([torch.Size(shape)], [torch.float16]))


@pytest.mark.parametrize("lossless", [False, True])
def test_nan_is_refused_naming_the_layer(lossless):
    chunk = random_chunk()
    chunk[1, 1, 3, 7] = float("nan")
    codec = chunks.ChunkCodec(16, lossless=True) if lossless else small_codec()
    with pytest.raises(InvalidInputError, match=r"^tensor 'layers\.1\.value' holds 1 NaN or Inf values; refusing"):
        codec.encode(chunk)


def test_a_corrupted_byte_is_a_checksum_error_not_a_wrong_decode():
    codec = small_codec()
    data = bytearray(codec.encode(random_chunk()))
    out = torch.zeros(2, 2, 64, 32, dtype=torch.float16)
    for position in (100, len(data) // 2, len(data) - 10):  # a code section, further on, the header
        broken = bytearray(data)
        broken[position] ^= 0x10
        with pytest.raises(ChecksumMismatchError) as caught:
            codec.decode_into(bytes(broken), out)
        message = str(caught.value)
        assert message.startswith("serialized chunk: ") and "\n" not in message and "kvpack-lmcache-" not in message
    assert not out.any()  # nothing was written into the destination


def test_no_stream_truncated_stream_and_small_buffers_are_named_errors():
    codec = small_codec()
    chunk = random_chunk()
    data = codec.encode(chunk)
    out = torch.empty_like(chunk)
    with pytest.raises(FormatError, match="does not start with the .kvp magic bytes"):
        codec.decode_into(bytes(len(data)), out)
    with pytest.raises(TruncatedFileError, match=f"declares {len(data)} bytes, its buffer holds {len(data) - 1}"):
        codec.decode_into(data[:-1], out)
    with pytest.raises(InvalidInputError, match="size the buffer with `estimate_serialized_size`"):
        codec.encode_into(chunk, torch.empty(len(data) - 1, dtype=torch.uint8))
    with pytest.raises(InvalidInputError, match=r"is a chunk of shape \[2, 2, 64, 32\], the destination chunk"):
        codec.decode_into(data, torch.empty(2, 2, 32, 32, dtype=torch.float16))


def test_trailing_bytes_after_the_stream_are_ignored():
    codec = small_codec()
    chunk = random_chunk()
    data = codec.encode(chunk)
    clean, stale = torch.empty_like(chunk), torch.empty_like(chunk)
    codec.decode_into(data, clean)
    codec.decode_into(data + b"\xff" * 1000, stale)
    assert torch.equal(clean, stale)


def test_options_that_cannot_apply_to_a_chunk_are_refused():
    with pytest.raises(InvalidInputError, match="needs `head_dim`"):
        chunks.codec_from_options({"method": "uniform"})
    with pytest.raises(InvalidInputError, match="cannot be un-RoPE'd"):
        chunks.codec_from_options({"head_dim": 64, "unrope": True})
    with pytest.raises(InvalidInputError, match="does not carry its tokens' positions"):
        chunks.ChunkCodec(64, CodecConfig.build("transform"))
    with pytest.raises(InvalidInputError, match="takes no codec options"):
        chunks.codec_from_options({"head_dim": 64, "lossless": True, "bits": 4})
    with pytest.raises(InvalidInputError, match="`fixed_size` must be true or false"):
        chunks.codec_from_options({"head_dim": 64, "fixed_size": "no"})
    with pytest.raises(InvalidInputError, match="unknown key"):
        chunks.codec_from_options({"head_dim": 64, "bitz": 4})
    with pytest.raises(InvalidInputError, match="`max_workers` must be a positive integer"):
        serde.create_serde({"head_dim": 64, "max_workers": 0})


def test_options_build_the_recommended_defaults_or_a_literal_preset():
    default = chunks.codec_from_options({"head_dim": 64})
    assert default.config == chunks.chunk_config(chunks.default_config()) and default.config.method == "uniform"
    assert default.fixed_size and default.entropy.level == 0
    assert chunks.codec_from_options({"head_dim": 64, "fixed_size": False}).entropy.level == 1
    recommended = chunks.codec_from_options({"head_dim": 64, "method": "adaptive"}).config
    assert recommended.key_axis == "channel" and recommended.rotate == "hadamard" and not recommended.unrope
    preset = chunks.codec_from_options({"head_dim": 64, "preset": "kivi-4-r128"}).config
    assert preset.key_axis == "channel" and preset.keep_last == 128
    assert chunks.codec_from_options({"head_dim": 64, "lossless": True}).config is None


def test_import_kvpack_never_imports_lmcache_and_a_missing_lmcache_is_one_clear_import_error():
    code = (
        "import sys, kvpack, kvpack.integrations.chunks, kvpack.compress, kvpack.restore.files\n"
        "assert not any(m.split('.')[0] == 'lmcache' for m in sys.modules), 'lmcache imported'\n"
        "sys.modules['lmcache'] = None\n"
        "try:\n    import kvpack.integrations.lmcache\nexcept ImportError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "pip install 'kvpack[lmcache]'" in result.stdout
