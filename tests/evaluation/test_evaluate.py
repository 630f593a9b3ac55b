"""The quality evaluation (kvpack.evaluation.evaluate): the window protocol, attention output, labels, and
PPL / KL / top-1 through the real model."""

from __future__ import annotations

import math

import pytest
import torch

from kvpack.config import CodecConfig
from kvpack.errors import InvalidInputError
from kvpack.evaluation.evaluate import EvalMethod, EvalProtocol, attention_output, codec_label


def test_window_offsets_follow_the_documented_rule():
    # the BASELINES.md protocol: 304,986 tokens, 8 windows at i * 38123
    assert EvalProtocol().offsets(304_986) == [i * 38123 for i in range(8)]
    assert EvalProtocol(10, 5, 3).offsets(48) == [0, 16, 32]  # 16 = 10 + 5 + 1 fits exactly
    with pytest.raises(InvalidInputError, match="need 48"):
        EvalProtocol(10, 5, 3).offsets(47)
    with pytest.raises(InvalidInputError, match="prefix must be a positive integer"):
        EvalProtocol(0, 5, 3)


def test_attention_output_matches_torch_sdpa():
    torch.manual_seed(0)
    q = torch.randn(1, 6, 5, 16)
    k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), scale=0.3
    )
    torch.testing.assert_close(attention_output(q, k, v, 0.3), expected)


def test_codec_labels_are_short_and_distinct():
    assert codec_label(CodecConfig.build("uniform", 4, 64)) == "uniform-4 g64"
    assert codec_label(CodecConfig.build("uniform", 3, 128, symmetric=True)) == "uniform-3 g128 sym"
    assert (
        codec_label(CodecConfig.build("adaptive", 2, 64, 0.02, normalization="meanstd"))
        == "adaptive-2 g64 o0.02 meanstd"
    )


@pytest.mark.model
def test_eval_lossless_is_exact_and_2bit_costs(smollm, wiki_ids):
    from kvpack.evaluation.evaluate import evaluate

    methods = [EvalMethod.named_baseline("fp16"), EvalMethod.codec(CodecConfig.build("uniform", 2, 64))]
    run = evaluate(smollm, wiki_ids, methods, EvalProtocol(96, 24, 2))
    lossless, two_bit = run["methods"]
    assert run["protocol"]["offsets"] == [0, wiki_ids.shape[1] // 2] and run["targets"] == 48
    assert math.isfinite(run["ppl_ref"]) and run["ppl_ref"] > 1
    assert lossless["ppl"] == run["ppl_ref"] and lossless["delta_ppl_pct"] == 0 and lossless["kl_mean"] == 0
    assert lossless["top1_agreement_pct"] == 100 and lossless["attention_error"] == [0.0] * 30
    # the float16 data plus the file's header, less what the entropy stage saves on float16 (about 8 %)
    assert 13 < lossless["bits_per_element"] < 16.1
    assert two_bit["kl_mean"] > 0.01 and two_bit["top1_agreement_pct"] < 100
    # 2-bit codes + fp16 scale and zero-point per 64 + header (2.5-2.6 dense), after the entropy stage
    assert 1.2 < two_bit["bits_per_element"] < 2.6
    assert len(two_bit["attention_error"]) == 30 and min(two_bit["attention_error"]) > 0
    assert 0 < two_bit["rel_mse_key"] < 1 and 0 < two_bit["rel_mse_value"] < 1
    # ppl_ref is the teacher-forced perplexity of tokens prefix+1 .. prefix+continuation of each
    # window; recomputed here in one plain forward pass (fp32 cache, so equal up to fp16 rounding)
    nll = []
    for offset in run["protocol"]["offsets"]:
        window = wiki_ids[:, offset : offset + 96 + 24 + 1]
        with torch.no_grad():
            logp = smollm.model(input_ids=window[:, :-1]).logits[0].log_softmax(-1)
        nll.append(-logp[96:].gather(1, window[0, 97:, None]))
    assert run["ppl_ref"] == pytest.approx(math.exp(float(torch.cat(nll).mean())), rel=2e-3)


def config(method="uniform", bits=4, group_size=64, ratio=0.0, **transforms):
    return CodecConfig.build(method, bits, group_size, ratio, transforms=transforms)


@pytest.mark.model
def test_eval_runs_a_transformed_codec_on_the_model(smollm, tmp_path):
    from kvpack.evaluation.evaluate import EvalMethod, EvalProtocol, evaluate
    from kvpack.model.dump import tokenize
    from tests.conftest import wikitext_excerpt

    ids = tokenize(smollm.tokenizer, wikitext_excerpt())
    methods = [
        EvalMethod.codec(config("uniform", 8, 32, key_axis="channel", unrope=True, rotate="hadamard")),
        EvalMethod.codec(config("uniform", 2, 32, key_axis="channel", unrope=True)),
    ]
    run_ = evaluate(smollm, ids, methods, EvalProtocol(96, 16, 2))
    near, coarse = run_["methods"]
    assert near["kl_mean"] < 1e-3 and abs(near["delta_ppl_pct"]) < 1
    assert coarse["kl_mean"] > near["kl_mean"]
    assert 2.0 < coarse["bits_per_element"] < 3.5
