"""The fused path (kvpack.fused) gives the torch path's bytes and values, bit for bit."""

import pytest
import torch

from kvpack import CodecConfig
from kvpack import fused as fastpath
from kvpack.codecs.adaptive import LLOYD_SAMPLES
from kvpack.entry import decode_entry, encode_tensor
from kvpack.errors import InvalidInputError
from kvpack.formats.entropy import EntropyConfig, section_transposes
from kvpack.formats.header import SectionEntry, TensorEntry

CONFIGS = (
    [
        CodecConfig.build("uniform", bits, group, symmetric=sym)
        for bits in (1, 2, 3, 4, 8)
        for group, sym in ((64, False), (16, True), (192, False))
    ]
    + [
        CodecConfig.build("normal", bits, 64, normalization="minmax", symmetric=sym)
        for bits in (2, 4)
        for sym in (False, True)
    ]
    + [CodecConfig.build("adaptive", bits, 32, codebook_scope=scope) for bits in (2, 4) for scope in ("tensor", "head")]
)


def both_paths(name, x, config, monkeypatch):
    dtype = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[x.dtype]
    transposes = section_transposes(name, tuple(x.shape), dtype, config, EntropyConfig())
    assert fastpath.can_encode(x, config, TensorEntry(name, tuple(x.shape), dtype, config, {}).plan, transposes)
    fast = encode_tensor(name, x, config, transposes=transposes)
    with monkeypatch.context() as patch:
        patch.setattr(fastpath, "can_encode", lambda *args: False)
        slow = encode_tensor(name, x, config, transposes=transposes)
    entry = TensorEntry(
        name, tuple(x.shape), dtype, config, {"codes": SectionEntry(0, 0, 0, transpose=transposes["codes"])}
    )
    return fast, slow, entry


def bits_of(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32) if x.dtype == torch.float32 else x.view(torch.int16)


@pytest.mark.model
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_fast_path_bytes_and_values_equal_the_torch_path(config, real_tensors, monkeypatch):
    key = real_tensors["layers.4.key"]
    cases = {
        "layers.4.key": key,
        "layers.4.value": real_tensors["layers.4.value"][:, :, :37],  # 37 tokens: codes end inside a byte
        "layers.5.key": torch.cat([key, key.flip(2)]).to(torch.bfloat16),  # batch 2, bfloat16
    }
    for name, x in cases.items():
        fast, slow, entry = both_paths(name, x, config, monkeypatch)
        assert fast == slow, name
        for out_dtype in (None, torch.float32, torch.bfloat16, torch.float16):
            values = decode_entry(entry, fast, out_dtype)
            with monkeypatch.context() as patch:
                patch.setattr(fastpath, "can_decode", lambda *args: False)
                reference = decode_entry(entry, fast, out_dtype)
            assert values.dtype == reference.dtype and torch.equal(bits_of(values), bits_of(reference)), (
                name,
                out_dtype,
            )


@pytest.mark.model
def test_long_adaptive_tensors_learn_from_the_same_sampled_tokens(real_tensors, monkeypatch):
    x = real_tensors["layers.7.key"]
    long = torch.cat(
        [x, x.flip(2)] * (1 + LLOYD_SAMPLES // (x.shape[2] * x.shape[3])), dim=2
    )  # > LLOYD_SAMPLES per head
    config = CodecConfig.build("adaptive", 3, 64)
    fast, slow, _ = both_paths("layers.7.key", long, config, monkeypatch)
    assert fast == slow


@pytest.mark.model
def test_fast_path_refuses_what_the_torch_path_refuses(real_tensors, monkeypatch):
    config = CodecConfig.build("uniform", 4, 64)
    x = real_tensors["layers.0.value"].clone()
    x[0, 1, 5, 7] = float("nan")
    with pytest.raises(InvalidInputError, match="holds 1 NaN or Inf"):
        both_paths("layers.0.value", x, config, monkeypatch)
    big = real_tensors["layers.0.value"].to(torch.bfloat16).clone()
    big[0, 0, 3, 3] = 1e6
    with pytest.raises(InvalidInputError, match="exceed the float16 range"):
        both_paths("layers.0.value", big, config, monkeypatch)


@pytest.mark.model
def test_other_layouts_take_the_torch_path(real_tensors):
    x = real_tensors["layers.0.key"]
    entropy = EntropyConfig()
    for config in (
        CodecConfig.build("uniform", 4, 64, 0.02),
        CodecConfig.build("uniform", 2, 32, transforms={"key_axis": "channel"}),
        CodecConfig.build("uniform", 4, 64, transforms={"rotate": "hadamard"}),
        CodecConfig.build("normal", 4, 64),  # meanstd
        CodecConfig.build("adaptive", 4, 64, codebook_scope="group"),
    ):
        transposes = section_transposes("layers.0.key", tuple(x.shape), "float16", config, entropy)
        plan = TensorEntry("layers.0.key", tuple(x.shape), "float16", config, {}).plan
        assert not fastpath.can_encode(x, config, plan, transposes), config.describe()
    plain = CodecConfig.build("uniform", 4, 64)
    plan = TensorEntry("layers.0.key", tuple(x.shape), "float16", plain, {}).plan
    assert not fastpath.can_encode(x.float(), plain, plan, {"codes": 192})  # float32 input
    assert not fastpath.can_encode(x, plain, plan, {})  # codes in group order (--no-transpose)


@pytest.mark.model
def test_signed_zeros_give_the_same_bytes_on_both_paths(real_tensors, monkeypatch):
    """Groups whose min or max is a zero of either sign: the stored zero-point is +0.0 on both paths."""
    x = real_tensors["layers.6.value"][:, :, :40].clone()
    x[:, :, :, :32] = torch.where(torch.rand(x[:, :, :, :32].shape) < 0.5, -0.0, 0.0).half()
    x[:, :, :3] = -0.0
    for config in (
        CodecConfig.build("uniform", 4, 32),
        CodecConfig.build("normal", 3, 64, normalization="minmax"),
        CodecConfig.build("adaptive", 2, 32),
    ):
        fast, slow, _ = both_paths("layers.6.value", x, config, monkeypatch)
        assert fast == slow, config.describe()


@pytest.mark.model
def test_the_fast_path_names_the_tensor_it_refuses(real_tensors, monkeypatch):
    big = real_tensors["layers.0.value"].to(torch.bfloat16).clone()
    big[0, 0, 3, 3] = 1e6
    with pytest.raises(InvalidInputError, match="tensor 'layers.0.value': values up to"):
        both_paths("layers.0.value", big, CodecConfig.build("uniform", 4, 64), monkeypatch)
