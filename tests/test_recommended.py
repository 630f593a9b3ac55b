"""The codecs' recommended transforms: what a user gets naming only --method / --bits / --group-size."""

from __future__ import annotations

import pytest
import torch

from kvpack import load_kvp
from kvpack.codecs import Codec
from kvpack.compress import compress_file
from kvpack.config import TRANSFORM_DEFAULTS, CodecConfig
from kvpack.errors import InvalidInputError
from kvpack.formats.reader import KvpReader
from kvpack.formats.safetensors_io import write_safetensors
from kvpack.transforms.rope import RopeSpec, rope_metadata
from tests.cli_helpers import assert_one_line_error, run

GROUPED = sorted(name for name, cls in Codec.registry.items() if not cls.whole_tensor)
HEADS, HEAD_DIM, SEQ, LAYERS = 4, 16, 128, 2


def _cache(path, rope: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"layers.{i}.{role}": (torch.randn(1, HEADS, SEQ, HEAD_DIM, generator=gen) * 2).to(torch.float16)
        for i in range(LAYERS)
        for role in ("key", "value")
    }
    metadata = {"seq_len": str(SEQ)}
    if rope:
        inv_freq = tuple(float(10000 ** (-2 * i / HEAD_DIM)) for i in range(HEAD_DIM // 2))
        metadata.update(rope_metadata([RopeSpec(inv_freq)] * LAYERS))
    write_safetensors(path, tensors, metadata)
    return tensors


@pytest.mark.parametrize("method", GROUPED)
def test_recommended_fills_only_what_is_not_given(method):
    recommended = Codec.registry[method].recommended_transforms
    config = CodecConfig.build(method, recommended=True)
    for name, default in TRANSFORM_DEFAULTS.items():
        assert getattr(config, name) == recommended.get(name, default), name
    assert config.unrope_optional == bool(recommended.get("unrope"))
    # anything given wins, and a given un-RoPE is not optional
    given = CodecConfig.build(
        method, recommended=True, transforms={"key_axis": "token", "rotate": "none", "unrope": True}
    )
    assert (given.key_axis, given.rotate, given.unrope, given.unrope_optional) == ("token", "none", True, False)
    for name, value in Codec.registry[method].recommended_params.items():
        assert getattr(config.params, name) == value
    # the literal builder (the API, sweep configs, presets) is unchanged
    literal = CodecConfig.build(method)
    assert literal.transforms() == {} and literal.params == Codec.registry[method].Params()


def test_integer_codecs_recommend_channel_keys_before_rope():
    for method in ("uniform", "normal", "adaptive"):
        recommended = Codec.registry[method].recommended_transforms
        assert recommended.get("key_axis") == "channel" and recommended.get("unrope") is True


def test_optional_unrope_is_dropped_where_the_cache_records_no_rotary_parameters(tmp_path):
    cache = tmp_path / "c.safetensors"
    tensors = _cache(cache, rope=False)
    config = CodecConfig.build("uniform", 4, 32, recommended=True)
    report = compress_file(cache, tmp_path / "c.kvp", config)
    with KvpReader(tmp_path / "c.kvp") as reader:
        key = reader.entry("layers.0.key").codec
    assert key.key_axis == "channel" and not key.unrope
    restored = load_kvp(tmp_path / "c.kvp")[0]
    for name, x in tensors.items():  # 4-bit codes: every element within a group's step
        assert (restored[name].float() - x.float()).abs().max() < 1.0
    assert report["rows"]["all"]["rel_mse"] < 0.02
    # asked for explicitly, un-RoPE without rotary parameters is a clear error and no file
    with pytest.raises(InvalidInputError, match="rotary"):
        compress_file(cache, tmp_path / "d.kvp", CodecConfig.build("uniform", 4, 32, transforms={"unrope": True}))
    assert not (tmp_path / "d.kvp").exists()


def test_optional_unrope_applies_where_the_cache_allows(tmp_path):
    cache = tmp_path / "c.safetensors"
    _cache(cache, rope=True)
    compress_file(cache, tmp_path / "c.kvp", CodecConfig.build("adaptive", 4, 32, recommended=True))
    with KvpReader(tmp_path / "c.kvp") as reader:
        key = reader.entry("layers.1.key").codec
    assert key.unrope and key.rope_dim == HEAD_DIM and key.key_axis == "channel"


def test_cli_defaults_are_the_recommended_settings_and_presets_stay_literal(tmp_path, capsys):
    cache = tmp_path / "c.safetensors"
    _cache(cache, rope=True)
    code, out, err = run(["compress", cache, "-o", tmp_path / "a.kvp", "--method", "uniform", "--bits", "4"], capsys)
    assert code == 0, err
    with KvpReader(tmp_path / "a.kvp") as reader:
        key = reader.entry("layers.0.key").codec
    assert (key.key_axis, key.unrope, key.rotate) == ("channel", True, "hadamard")
    code, out, err = run(["compress", cache, "-o", tmp_path / "n.kvp", "--method", "normal"], capsys)
    assert code == 0, err
    with KvpReader(tmp_path / "n.kvp") as reader:
        assert reader.entry("layers.0.value").codec.params.normalization == "minmax"
    # the user's own flags win
    flags = ["--key-axis", "token", "--no-unrope", "--rotate", "none"]
    code, out, err = run(["compress", cache, "-o", tmp_path / "b.kvp", "--method", "uniform", *flags], capsys)
    assert code == 0, err
    with KvpReader(tmp_path / "b.kvp") as reader:
        assert reader.entry("layers.0.key").codec.transforms() == {}
    # a preset is the paper's recipe: nothing added
    code, out, err = run(["compress", cache, "-o", tmp_path / "k.kvp", "--preset", "kivi-4-r128"], capsys)
    assert code == 0, err
    with KvpReader(tmp_path / "k.kvp") as reader:
        key = reader.entry("layers.0.key").codec
    assert (key.key_axis, key.unrope, key.rotate, key.keep_last) == ("channel", False, "none", 128)
    # --level sizes token groups: no recommended channel axis, no conflict
    code, out, err = run(["compress", cache, "-o", tmp_path / "l.kvp", "--level", "head"], capsys)
    assert code == 0, err
    with KvpReader(tmp_path / "l.kvp") as reader:
        assert reader.entry("layers.0.key").codec.key_axis == "token"
    code, out, err = run(
        ["compress", cache, "-o", tmp_path / "m.kvp", "--level", "head", "--key-axis", "channel"], capsys
    )
    assert_one_line_error(code, err, "--level sets the size of token groups")
