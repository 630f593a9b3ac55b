"""Each layer's rotary parameters (kvpack.model.rotary, recorded by kvpack.model.dump): on real transformers model
code with tiny random configs, un-RoPE of the dumped keys gives back the keys the model computed before RoPE."""

import json
import math

import pytest
import torch

from kvpack.transforms.rope import RopeSpec, cached_first_position, rope_for_layer, rotate_keys
from tests.tiny_models import TINY_MODELS, VOCAB, PreRopeKeys, tiny_model

TOKENS = 40


def dump(model, tokens=TOKENS):
    """kvpack's dump of ``tokens`` random tokens (float32) and the pre-RoPE keys of the same run."""
    from kvpack.model.dump import dump_tokens

    ids = torch.randint(3, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(1))
    with PreRopeKeys(model) as pre:
        tensors, metadata = dump_tokens(model, ids, "float32")
    return tensors, metadata, pre.keys


@pytest.mark.model
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_unrope_of_dumped_keys_gives_the_models_pre_rope_keys(name):
    model = tiny_model(name)
    tensors, metadata, pre_rope = dump(model)
    assert len(json.loads(metadata["rope_layers"])) == len(pre_rope) == int(metadata["num_layers"])
    for layer, expected in pre_rope.items():
        keys = tensors[f"layers.{layer}.key"]
        spec = rope_for_layer(metadata, layer)
        first = cached_first_position(metadata, keys.shape[2])  # a sliding-window layer: its last tokens
        expected = expected[:, :, first:]
        inv_freq = torch.tensor(spec.inv_freq)
        unroped = rotate_keys(keys, inv_freq, spec.attention_scaling, first, inverse=True, layout=spec.layout)
        scale = float(expected.abs().max())
        assert float((unroped - expected).abs().max()) <= 2e-6 * scale, (name, layer)
        rerotated = rotate_keys(unroped, inv_freq, spec.attention_scaling, first, inverse=False, layout=spec.layout)
        assert float((rerotated - keys).abs().max()) <= 2e-6 * float(keys.abs().max()), (name, layer)
        if spec != RopeSpec((0.0,)):  # not vacuous: the dumped keys are rotated
            assert float((keys - expected).abs().max()) > 0.05 * scale, (name, layer)


@pytest.mark.model
def test_each_layer_records_the_rotary_parameters_it_used():
    def specs(name, **overrides):
        metadata = dump(tiny_model(name, **overrides))[1]
        return [rope_for_layer(metadata, i) for i in range(int(metadata["num_layers"]))], metadata

    # Gemma 3: five local layers (theta 1e4) and a global one (theta 1e6), recorded once each
    gemma, metadata = specs("gemma3")
    assert json.loads(metadata["rope_layers"]) == [0, 0, 0, 0, 0, 1] and len(json.loads(metadata["rope_specs"])) == 2
    assert gemma[0].inv_freq[1] == pytest.approx(1e4 ** (-2 / 16)) and gemma[5].inv_freq[1] == pytest.approx(
        1e6 ** (-2 / 16)
    )
    # dynamic NTK past the original context: the frequencies of the dumped length, not the model's initial ones
    model = tiny_model("llama-dynamic")
    initial = tuple(model.model.rotary_emb.original_inv_freq.tolist())
    dynamic = rope_for_layer(dump(model)[1], 0)
    assert dynamic.inv_freq[0] == initial[0] == 1.0 and dynamic.inv_freq[-1] < 0.9 * initial[-1]
    # scaled variants record their cos / sin factor; partial rotary its rope_dim; GLM its interleaved pairs
    assert specs("llama-yarn")[0][0].attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
    assert specs("llama-longrope")[0][0].inv_freq[0] == 0.5
    assert specs("stablelm-partial")[0][0].rope_dim == 4 and specs("phi-partial")[0][0].rope_dim == 8
    assert {s.layout for s in specs("glm-interleaved")[0]} == {"interleaved"}
    # SmolLM3's NoPE layer: no rotation to undo (one zero frequency: un-RoPE is the identity)
    nope = specs("smollm3-nope")[0]
    assert nope[1] == RopeSpec((0.0,)) and nope[0].rope_dim == 16 and nope[0] == nope[2]
    # a model with one spec for every layer records it once
    metadata = specs("llama")[1]
    assert json.loads(metadata["rope_layers"]) == [0] * 4 and len(json.loads(metadata["rope_specs"])) == 1


@pytest.mark.model
def test_frequencies_that_change_between_prefill_chunks_are_refused_by_name():
    from kvpack.model.dump import probe_forward
    from kvpack.model.rotary import RotaryCapture, rotary_layers

    model = tiny_model("llama-dynamic")
    ids = torch.randint(3, VOCAB, (1, 40))
    with RotaryCapture(model) as capture:  # two chunks past the original 16 positions: two frequency sets
        probe_forward(model)(ids[:, :20], torch.arange(20)[None])
        probe_forward(model)(ids[:, 20:], torch.arange(20, 40)[None])
    layers = rotary_layers(model, ids, probe_forward(model), capture, 4)
    assert all(isinstance(r, str) and "changed during the prefill" in r for r in layers)


@pytest.mark.model
def test_models_without_a_readable_rotary_embedding_record_why():
    from transformers import GPT2Config, GPT2LMHeadModel

    from kvpack.errors import InvalidInputError
    from kvpack.model.dump import dump_tokens

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2)).eval()
    metadata = dump_tokens(gpt2, torch.randint(3, VOCAB, (1, 12)), "float32")[1]
    with pytest.raises(InvalidInputError, match="layer 1 has no rotary parameters kvpack can undo: the model has no"):
        rope_for_layer(metadata, 1)


@pytest.mark.model
def test_check_codec_fits_refuses_layers_it_cannot_unrope_before_any_work():
    from kvpack.config import CodecConfig
    from kvpack.errors import InvalidInputError
    from kvpack.model.dump import check_codec_fits

    unrope = CodecConfig.build("uniform", 4, 16, transforms={"unrope": True, "key_axis": "channel"})
    assert check_codec_fits(tiny_model("gemma3"), unrope) is unrope  # per layer: the metadata carries them
    stacked = CodecConfig.build("uniform", 4, 16, transforms={"unrope": True, "stack_layers": True})
    with pytest.raises(InvalidInputError, match="but layers 0 and 5 use different rotary parameters"):
        check_codec_fits(tiny_model("gemma3"), stacked)
    with pytest.raises(InvalidInputError, match="rotates interleaved channel pairs"):
        check_codec_fits(tiny_model("glm-interleaved"), unrope)
