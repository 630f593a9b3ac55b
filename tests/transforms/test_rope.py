"""Un-RoPE (kvpack.transforms.rope): the rotary frequencies per layer, the rotation and its inverse on real keys."""

import json

import pytest
import torch

from kvpack.compress import compress_tensors
from kvpack.config import CodecConfig
from kvpack.entry import decode_entry, encode_tensor
from kvpack.errors import InvalidInputError
from kvpack.formats.header import TensorEntry
from kvpack.transforms.plan import plan_for
from kvpack.transforms.rope import (
    RopeSpec,
    cached_first_position,
    rope_for_layer,
    rope_from_metadata,
    rope_metadata,
    rotate_keys,
)


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


def test_interleaved_layout_is_rotate_half_on_channels_taken_in_pairs():
    torch.manual_seed(0)
    keys = torch.randn(1, 2, 30, 12)
    inv_freq = torch.rand(5)  # rope_dim 10 of head_dim 12
    pairs = torch.cat([torch.arange(0, 10, 2), torch.arange(1, 10, 2), torch.arange(10, 12)])
    interleaved = rotate_keys(keys, inv_freq, 1.25, 7, inverse=False, layout="interleaved")
    half = rotate_keys(keys[..., pairs], inv_freq, 1.25, 7, inverse=False)
    assert torch.allclose(interleaved[..., pairs], half, atol=1e-6)
    assert torch.allclose(rotate_keys(interleaved, inv_freq, 1.25, 7, True, "interleaved"), keys, atol=1e-5)
    with pytest.raises(InvalidInputError, match="rotary layout must be one of rotate_half, interleaved"):
        rotate_keys(keys, inv_freq, 1.0, 0, inverse=True, layout="gptj")


def test_per_layer_metadata_is_one_list_of_distinct_specs_and_an_index_per_layer():
    local, full = RopeSpec((1.0, 0.1)), RopeSpec((1.0, 0.01), 1.5)
    layers = [local] * 5 + [full] + [local] * 5 + ["its keys are not RoPE"]
    metadata = rope_metadata(layers)
    assert json.loads(metadata["rope_layers"]) == [0] * 5 + [1] + [0] * 5 + [2]
    assert json.loads(metadata["rope_specs"]) == [
        {"inv_freq": [1.0, 0.1], "attention_scaling": 1.0, "layout": "rotate_half"},
        {"inv_freq": [1.0, 0.01], "attention_scaling": 1.5, "layout": "rotate_half"},
        {"unsupported": "its keys are not RoPE"},
    ]
    assert [rope_for_layer(metadata, i) for i in (0, 5, 10)] == [local, full, local]
    with pytest.raises(InvalidInputError, match="^layer 11 has no rotary parameters kvpack can undo: its keys are not"):
        rope_for_layer(metadata, 11)
    with pytest.raises(InvalidInputError, match="^layer 12 is out of range: the dump records rotary parameters for 12"):
        rope_for_layer(metadata, 12)
    with pytest.raises(InvalidInputError, match="layer index must be a non-negative integer, got -1"):
        rope_for_layer(metadata, -1)
    with pytest.raises(InvalidInputError, match="layers 0 and 5 of this dump use different rotary parameters"):
        rope_from_metadata(metadata)
    # every layer alike: one spec, which callers without a layer may take
    uniform = rope_metadata([full] * 30)
    assert json.loads(uniform["rope_specs"]) == [full.to_dict()] and rope_from_metadata(uniform) == full
    assert sorted(uniform) == ["rope_layers", "rope_specs"]  # not the single-spec keys of earlier dumps
    interleaved = RopeSpec((1.0,), layout="interleaved")
    assert rope_for_layer(rope_metadata([interleaved]), 0).layout == "interleaved"


def test_dumps_of_earlier_versions_hold_one_spec_for_every_layer():
    old = {"rope_inv_freq": "[1.0, 0.5]", "rope_attention_scaling": "1.25", "num_layers": "30"}
    assert rope_for_layer(old, 29) == rope_from_metadata(old) == RopeSpec((1.0, 0.5), 1.25)
    with pytest.raises(InvalidInputError, match="layer 30 is out of range"):
        rope_for_layer(old, 30)
    assert rope_for_layer({"rope_inv_freq": "[1.0]"}, 1000) == RopeSpec((1.0,))  # no layer count: any layer
    with pytest.raises(InvalidInputError, match="does not record"):
        rope_for_layer({"seq_len": "40"}, 0)


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"rope_specs": "[]"}, "'rope_layers'"),
        ({"rope_specs": "[]", "rope_layers": "[0]"}, "rope_layers must index rope_specs"),
        ({"rope_specs": '[{"inv_freq": [1]}]', "rope_layers": "[true]"}, "rope_layers must index"),
        ({"rope_specs": '[{"inv_freq": ["1"]}]', "rope_layers": "[0]"}, "inv_freq list of numbers"),
        ({"rope_specs": '[{"inv_freq": [-1]}]', "rope_layers": "[0]"}, "finite non-negative"),
        ({"rope_specs": '[{"inv_freq": [1], "layout": "x"}]', "rope_layers": "[0]"}, "layout must be one of"),
        ({"rope_specs": '[{"inv_freq": [1], "extra": 1}]', "rope_layers": "[0]"}, "unknown rotary spec"),
        ({"rope_specs": "[" * 100000, "rope_layers": "[0]"}, "malformed"),
        ({"rope_inv_freq": "[1, 'x']"}, "malformed"),
        ({"rope_inv_freq": "[1]", "rope_attention_scaling": "nan"}, "scaling must be a positive number"),
    ],
)
def test_malformed_rotary_metadata_is_refused_in_one_line(metadata, message):
    with pytest.raises(InvalidInputError, match="the dump's rotary parameters are malformed") as info:
        rope_for_layer(metadata, 0)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_sliding_window_layer_starts_where_its_last_tokens_do():
    assert cached_first_position({"seq_len": "40"}, 15) == 25
    assert cached_first_position({"seq_len": "40"}, 40) == cached_first_position({}, 15) == 0
    assert cached_first_position({"seq_len": "-3"}, 2) == cached_first_position({"seq_len": "9" * 40}, 2) == 0


@pytest.mark.model
def test_unrope_recovers_the_models_pre_rope_keys(smollm):
    """Un-RoPE of the cached keys equals what k_proj produced before the model applied RoPE."""
    from kvpack.model.dump import cache_layers, output_cache, rope_for_cache

    lm = smollm.model
    ids = torch.arange(100, 180).reshape(1, -1)
    metadata = rope_for_cache(lm, ids)
    rope = rope_from_metadata(metadata)
    assert rope.rope_dim == 64 and rope.layout == "rotate_half"
    captured = {}
    layers = lm.model.layers
    hooks = [
        layers[i].self_attn.k_proj.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
        for i in (0, 11, 29)
    ]
    try:
        with torch.no_grad():
            out = lm(input_ids=ids, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    cached = cache_layers(output_cache(out))
    for i, pre_rope in captured.items():
        keys = cached[i][0].float()
        expected = pre_rope.reshape(1, 80, keys.shape[1], 64).transpose(1, 2).float()
        spec = rope_for_layer(metadata, i)
        unroped = rotate_keys(keys, torch.tensor(spec.inv_freq), spec.attention_scaling, 0, inverse=True)
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
