"""CodecConfig (kvpack.config): validation messages, dict and file round trips, the transform keys."""

from __future__ import annotations

import json
import math

import pytest

from kvpack.config import CodecConfig
from kvpack.config_files import load_codec_config
from kvpack.errors import InvalidInputError


def test_config_validation_messages():
    with pytest.raises(InvalidInputError, match="bits must be an integer from 1 to 8"):
        CodecConfig.build("uniform", 9)
    with pytest.raises(InvalidInputError, match="unknown method 'zip'"):
        CodecConfig.build("zip")
    with pytest.raises(InvalidInputError, match="unknown option"):
        CodecConfig.build("uniform", codebook_scope="head")
    with pytest.raises(InvalidInputError, match="codebook_scope must be one of"):
        CodecConfig.build("adaptive", codebook_scope="layer")
    with pytest.raises(InvalidInputError, match="outlier ratio"):
        CodecConfig.build("uniform", outlier_ratio=float("nan"))
    config = CodecConfig.build("adaptive", 3, 32, 0.05, codebook_scope="group")
    assert CodecConfig.from_dict(config.to_dict()) == config


def config(method="uniform", bits=4, group_size=64, ratio=0.0, **transforms):
    return CodecConfig.build(method, bits, group_size, ratio, transforms=transforms)


def test_config_round_trips_and_refuses_bad_transforms():
    codec = config("adaptive", 3, 32, 0.01, key_axis="channel", keep_first=1, rotate="hadamard", unrope=True)
    assert CodecConfig.from_dict(json.loads(json.dumps(codec.to_dict()))) == codec
    assert "key_axis" not in config().to_dict()  # defaults are not written
    bad = [
        ({"key_axis": "diagonal"}, r"`key_axis` must be one of token, channel"),
        ({"keep_first": -1}, r"`keep_first` must be an integer"),
        ({"keep_last": 1.5}, r"`keep_last` must be an integer"),
        ({"rotate": "random"}, r"`rotate` must be one of none, hadamard"),
        ({"outlier_select": "top"}, r"`outlier_select` must be one of"),
        ({"rope_scaling": math.nan}, "rope_scaling must be a positive number"),
        ({"rope_dim": 3}, "rope_dim must be even"),
        ({"unrope": 1}, "unrope must be true or false"),
        ({"frobnicate": 1}, "unknown option"),
    ]
    for transforms, message in bad:
        with pytest.raises(InvalidInputError, match=message):
            CodecConfig.build("uniform", 4, 64, transforms=transforms)
    with pytest.raises(InvalidInputError, match="4-bit elements"):
        CodecConfig.build("mxfp4", 3)
    with pytest.raises(InvalidInputError, match="blocks of 32"):
        CodecConfig.build("mxfp8", None, 64)
    assert CodecConfig.build("mxfp6-e3m2").bits == 6 and CodecConfig.build("mxfp6-e3m2").group_size == 32


def test_every_transform_key_is_known_to_the_reader_and_the_cli():
    """The transform keys are listed by hand in three places; they must agree."""
    from kvpack.cli.option_groups import TRANSFORM_OPTIONS, codec_parameters
    from kvpack.config import TRANSFORM_DEFAULTS
    from kvpack.formats.constants import KNOWN_REQUIRED_KEYS

    assert set(TRANSFORM_DEFAULTS) <= KNOWN_REQUIRED_KEYS
    # rope_*: from the model; stack_layers: set by --level token; width_counts: by the allocators
    assert set(TRANSFORM_OPTIONS) == {k for k in TRANSFORM_DEFAULTS if not k.startswith("rope_")} - {
        "stack_layers",
        "width_counts",
    }
    assert set(TRANSFORM_OPTIONS) <= {p.name for p in codec_parameters()}


def test_codec_config_files(tmp_path):
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"config": CodecConfig.build("normal", 3, 32, normalization="minmax").to_dict()}))
    assert load_codec_config(full) == CodecConfig.build("normal", 3, 32, normalization="minmax")
    flat = tmp_path / "flat.toml"
    flat.write_text('method = "uniform"\nbits = 2\nsymmetric = true\n')
    assert load_codec_config(flat) == CodecConfig.build("uniform", 2, 64, symmetric=True)
    bad = tmp_path / "bad.toml"
    bad.write_text('method = "uniform"\nbitz = 2\n')
    with pytest.raises(InvalidInputError, match="bad.toml: unknown key.s. 'bitz'; accepted: method, bits, group_size"):
        load_codec_config(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(InvalidInputError, match="broken.json: not a valid json"):
        load_codec_config(broken)
