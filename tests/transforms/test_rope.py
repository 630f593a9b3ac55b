"""Un-RoPE (kvpack.transforms.rope): the rotary frequencies, the rotation and its inverse on real keys."""

import pytest
import torch

from kvpack.compress import compress_tensors
from kvpack.config import CodecConfig
from kvpack.entry import decode_entry, encode_tensor
from kvpack.errors import InvalidInputError
from kvpack.formats.header import TensorEntry
from kvpack.transforms.plan import plan_for
from kvpack.transforms.rope import RopeSpec, rope_from_metadata, rope_from_model, rotate_keys


def config(method="uniform", bits=4, group_size=64, ratio=0.0, **transforms):
    return CodecConfig.build(method, bits, group_size, ratio, transforms=transforms)


def round_trip(name, x, codec):
    entry = TensorEntry(name, tuple(x.shape), "float32" if x.dtype == torch.float32 else "float16", codec, {})
    return decode_entry(entry, encode_tensor(name, x, codec), torch.float32)


@pytest.mark.model
def test_unrope_then_rerope_reproduces_real_keys_within_float32_rounding(real_tensors, real_dump):
    from kvpack.formats.safetensors_io import SafetensorsSource

    with SafetensorsSource(real_dump) as source:
        rope = rope_from_metadata(source.metadata)
    assert rope.rope_dim == 64 and rope.attention_scaling == 1.0
    inv_freq = torch.tensor(rope.inv_freq)
    for layer in (0, 17, 29):
        keys = real_tensors[f"layers.{layer}.key"].float()
        back = rotate_keys(rotate_keys(keys, inv_freq, 1.0, 0, inverse=True), inv_freq, 1.0, 0, inverse=False)
        ulp = torch.finfo(torch.float32).eps * keys.abs().amax(dim=-1, keepdim=True)
        assert torch.all((back - keys).abs() <= 2 * ulp)


def test_rope_rotation_is_orthogonal_with_scaling_and_partial_dims():
    torch.manual_seed(0)
    keys = torch.randn(1, 2, 40, 16)
    inv_freq = torch.rand(6)  # rope_dim 12 of head_dim 16: the last 4 channels pass through
    rotated = rotate_keys(keys, inv_freq, 1.5, 100, inverse=False)
    assert torch.equal(rotated[..., 12:], keys[..., 12:])
    assert torch.allclose(rotated[..., :12].norm(dim=-1), 1.5 * keys[..., :12].norm(dim=-1), rtol=1e-5)
    assert torch.allclose(rotate_keys(rotated, inv_freq, 1.5, 100, inverse=True), keys, atol=1e-5)
    with pytest.raises(InvalidInputError, match="exceeds head_dim"):
        rotate_keys(keys, torch.rand(9), 1.0, 0, inverse=True)


@pytest.mark.model
def test_unrope_recovers_the_models_pre_rope_keys(smollm):
    """Un-RoPE of the cached keys equals what k_proj produced before the model applied RoPE."""
    from kvpack.model.dump import cache_layers, output_cache

    lm = smollm.model
    rope = rope_from_model(lm)
    assert rope is not None and rope.rope_dim == 64
    captured = {}
    layers = lm.model.layers
    hooks = [
        layers[i].self_attn.k_proj.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
        for i in (0, 11, 29)
    ]
    try:
        with torch.no_grad():
            out = lm(input_ids=torch.arange(100, 180).reshape(1, -1), use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    cached = cache_layers(output_cache(out))
    for i, pre_rope in captured.items():
        keys = cached[i][0].float()
        expected = pre_rope.reshape(1, 80, keys.shape[1], 64).transpose(1, 2).float()
        unroped = rotate_keys(keys, torch.tensor(rope.inv_freq), rope.attention_scaling, 0, inverse=True)
        scale = expected.abs().amax()
        assert float((unroped - expected).abs().max()) <= 1e-4 * float(scale), i
        # and the cached keys really are rotated (the test is not vacuous)
        assert float((keys - expected).abs().max()) > 0.05 * float(scale)


@pytest.mark.model
def test_unrope_needs_the_rotary_frequencies(tmp_path, real_tensors):
    tensors = {"layers.0.key": real_tensors["layers.0.key"]}
    with pytest.raises(InvalidInputError, match="does not record"):
        compress_tensors(tensors, tmp_path / "x.kvp", config(unrope=True), {})
    assert not (tmp_path / "x.kvp").exists()
    with pytest.raises(InvalidInputError, match="malformed"):
        rope_from_metadata({"rope_inv_freq": "[1, 'x']"})
    with pytest.raises(InvalidInputError, match="finite"):
        RopeSpec((float("nan"),))


@pytest.mark.model
def test_unrope_round_trips_through_the_container_at_an_offset(tmp_path, real_tensors):
    rope = RopeSpec(tuple(1.0 / 100000 ** (torch.arange(0, 64, 2).float() / 64)), 1.0)
    codec = config("uniform", 8, 64, key_axis="channel", keep_first=3, unrope=True).with_rope(
        rope.inv_freq, 1.0, offset=7
    )
    keys = real_tensors["layers.5.key"]
    decoded = round_trip("layers.5.key", keys, codec)
    rel = float(((decoded - keys.float()) ** 2).sum() / (keys.float() ** 2).sum())
    assert rel < 1e-4
    assert torch.equal(decoded[:, :, :3], keys[:, :, :3].float())
    # values are never un-RoPE'd: their entry has no rope section
    specs = plan_for(tuple(keys.shape), "float16", "layers.5.value", codec).section_specs()
    assert "rope_inv_freq" not in specs
    assert "rope_inv_freq" in plan_for(tuple(keys.shape), "float16", "layers.5.key", codec).section_specs()
