"""The tensor plan (kvpack.transforms.plan): group axes, protected tokens, outlier selection, the Hadamard
rotation and every codec with every transform, through the pipeline and the container."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.compress import compress_tensors
from kvpack.config import CodecConfig
from kvpack.entry import decode_entry, encode_tensor
from kvpack.errors import InvalidInputError
from kvpack.formats.header import TensorEntry
from kvpack.formats.reader import KvpReader
from kvpack.grouping import GroupLayout, from_groups, outliers_per_group, to_groups
from kvpack.restore.files import load_kvp
from kvpack.transforms.plan import hadamard_matrix, hadamard_rotate, hadamard_signs, plan_for
from kvpack.transforms.rope import RopeSpec


def config(method="uniform", bits=4, group_size=64, ratio=0.0, **transforms):
    return CodecConfig.build(method, bits, group_size, ratio, transforms=transforms)


def round_trip(name, x, codec):
    entry = TensorEntry(name, tuple(x.shape), "float32" if x.dtype == torch.float32 else "float16", codec, {})
    return decode_entry(entry, encode_tensor(name, x, codec), torch.float32)


# --- axes, protected tokens -----------------------------------------------------------------------


def test_channel_axis_groups_run_along_tokens():
    torch.manual_seed(1)
    # every channel constant over the tokens, channels very different: exact per channel, not per token
    x = (torch.randn(1, 2, 1, 8) * 100).half().float().expand(1, 2, 64, 8).contiguous()
    exact = round_trip("layers.0.key", x, config("uniform", 2, 16, key_axis="channel"))
    assert torch.equal(exact, x)
    per_token = round_trip("layers.0.key", x, config("uniform", 2, 16))
    assert float((per_token - x).abs().max()) > 1
    layout = GroupLayout((1, 2, 64, 8), 16, "channel")
    assert torch.equal(from_groups(to_groups(x, layout), layout), x)
    assert torch.equal(to_groups(x, layout)[0], x[0, 0, :16, 0])  # group 0 = the first 16 tokens of channel 0


@settings(max_examples=60, deadline=None)
@given(
    seq=st.integers(0, 40),
    keep_first=st.integers(0, 12),
    keep_last=st.integers(0, 12),
    group=st.sampled_from([1, 4, 8]),
    key_axis=st.sampled_from(["token", "channel"]),
)
def test_protected_and_remainder_tokens_are_exact_and_counted(seq, keep_first, keep_last, group, key_axis):
    torch.manual_seed(seq)
    x = torch.randn(1, 2, seq, 8).half()
    codec = config("uniform", 2, group, key_axis=key_axis, keep_first=keep_first, keep_last=keep_last)
    plan = plan_for(tuple(x.shape), "float16", "layers.0.key", codec)
    kf = min(keep_first, seq)
    middle = max(seq - kf - keep_last, 0)
    coded = middle - middle % group if key_axis == "channel" else middle
    assert (plan.kept_first, plan.coded_tokens) == (kf, coded)
    decoded = round_trip("layers.0.key", x, codec)
    assert torch.equal(decoded[:, :, :kf], x[:, :, :kf].float())
    assert torch.equal(decoded[:, :, kf + coded :], x[:, :, kf + coded :].float())
    specs = plan.section_specs()
    kept = specs.get("kept")
    assert (kept.count if kept else 0) == 2 * (seq - coded) * 8


# --- outliers -------------------------------------------------------------------------------------


def test_magnitude_outliers_keep_the_largest_values_exactly():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 30, 64)
    x[0, 1, 4, 9] = -500.0
    codec = config("uniform", 3, 64, 0.05, outlier_select="magnitude")
    assert outliers_per_group(0.05, 64, "magnitude") == 3 and outliers_per_group(0.05, 64, "tails") == 4
    assert outliers_per_group(0.01, 64, "magnitude") == 1
    decoded = round_trip("layers.0.value", x, codec)
    layout = GroupLayout(tuple(x.shape), 64)
    groups, out = to_groups(x, layout), to_groups(decoded, layout)
    top = groups.abs().topk(3, dim=1).indices
    assert torch.equal(out.gather(1, top), groups.gather(1, top))
    assert float(decoded[0, 1, 4, 9]) == -500.0
    with pytest.raises(InvalidInputError, match="fewer than 2"):
        outliers_per_group(0.3, 2, "magnitude")


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("select", ["tails", "magnitude"])
def test_outliers_work_on_every_axis(axis, select):
    torch.manual_seed(3)
    x = torch.randn(1, 2, 64, 32)
    x[0, 0, 10, 3] = 80.0
    codec = config("uniform", 2, 32, 0.05, key_axis=axis, outlier_select=select)
    decoded = round_trip("layers.0.key", x, codec)
    assert float(decoded[0, 0, 10, 3]) == 80.0
    assert float(((decoded - x) ** 2).sum() / (x**2).sum()) < 0.2


# --- rotation -----------------------------------------------------------------------------


def test_hadamard_matrix_is_orthogonal_and_symmetric():
    for size in (1, 2, 8, 64, 128):
        matrix = hadamard_matrix(size).double()
        assert torch.allclose(matrix @ matrix, torch.eye(size, dtype=torch.float64), atol=1e-6)
        assert torch.equal(matrix, matrix.T)
        assert torch.allclose(matrix.abs(), torch.full_like(matrix, size**-0.5))


@pytest.mark.parametrize("head_dim, block", [(64, 64), (96, 32), (80, 16), (6, 2)])
def test_hadamard_rotation_inverts_and_is_block_diagonal_for_other_head_dims(head_dim, block):
    torch.manual_seed(4)
    x = torch.randn(1, 2, 10, head_dim)
    signs = hadamard_signs(5, head_dim)
    rotated = hadamard_rotate(x, signs, inverse=False)
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(hadamard_rotate(rotated, signs, inverse=True), x, atol=1e-5)
    one_hot = torch.zeros(head_dim)
    one_hot[0] = 1
    spread = hadamard_rotate(one_hot.reshape(1, -1), torch.zeros(head_dim, dtype=torch.bool), inverse=False)
    assert int((spread.abs() > 1e-6).sum()) == block  # channel 0 only mixes within its block


@pytest.mark.model
def test_hadamard_rejects_an_odd_head_dim_and_spreads_outliers(real_tensors):
    with pytest.raises(InvalidInputError, match="even head_dim"):
        plan_for((1, 2, 4, 7), "float16", "layers.0.key", config("uniform", 4, 7, rotate="hadamard"))
    keys = real_tensors["layers.3.key"]
    plain = round_trip("layers.3.key", keys, config("uniform", 3, 64))
    rotated = round_trip("layers.3.key", keys, config("uniform", 3, 64, rotate="hadamard", rotate_seed=11))

    def rel(y):
        return float(((y - keys.float()) ** 2).sum() / (keys.float() ** 2).sum())

    assert rel(rotated) < rel(plain)  # the key outlier channels are spread over the head


@pytest.mark.model
def test_rotation_signs_are_stored_so_any_seed_decodes(tmp_path, real_tensors):
    tensors = {"layers.0.key": real_tensors["layers.0.key"]}
    for seed in (0, 123456789):
        path = tmp_path / f"r{seed}.kvp"
        compress_tensors(tensors, path, config("uniform", 8, 64, rotate="hadamard", rotate_seed=seed))
        with KvpReader(path) as reader:
            stored = reader.read_section("layers.0.key", "rotation_signs")
        expected = hadamard_signs(seed, 64).numpy()
        bits = [(int(stored[i // 8]) >> (i % 8)) & 1 for i in range(64)]
        assert bits == expected.astype(int).tolist()
        decoded = load_kvp(path)[0]["layers.0.key"].float()
        x = tensors["layers.0.key"].float()
        assert float(((decoded - x) ** 2).sum() / (x**2).sum()) < 1e-4


# --- every codec x every transform -----------------------------------------------------------


@pytest.mark.model
@pytest.mark.parametrize(
    "method, bits, group",
    [("uniform", 3, 32), ("normal", 3, 32), ("adaptive", 3, 32), ("fp8-e4m3", 8, 32), ("mxfp4", 4, 32)],
)
def test_every_codec_takes_every_transform(tmp_path, real_tensors, method, bits, group):
    rope = RopeSpec(tuple(1.0 / 100000 ** (torch.arange(0, 64, 2).float() / 64)), 1.0)
    codec = CodecConfig.build(
        method,
        bits,
        group,
        0.02,
        transforms={
            "key_axis": "channel",
            "value_axis": "token",
            "keep_first": 2,
            "keep_last": 5,
            "outlier_select": "magnitude",
            "rotate": "hadamard",
            "unrope": True,
        },
    ).with_rope(rope.inv_freq, 1.0)
    tensors = {n: real_tensors[n] for n in ("layers.1.key", "layers.1.value", "token_ids")}
    path = tmp_path / "all.kvp"
    compress_tensors(tensors, path, codec)
    restored, _ = load_kvp(path)
    assert torch.equal(restored["token_ids"], tensors["token_ids"])
    for name in ("layers.1.key", "layers.1.value"):
        x = tensors[name].float()
        rel = float(((restored[name].float() - x) ** 2).sum() / (x**2).sum())
        assert rel < {3: 0.1, 4: 0.05, 8: 0.002}[bits], (name, rel)
        assert torch.equal(restored[name][:, :, :2], tensors[name][:, :, :2])
        assert torch.equal(restored[name][:, :, -5:], tensors[name][:, :, -5:])
    with KvpReader(path) as reader:
        codec_dict = reader.entry("layers.1.key").codec.to_dict()
    assert codec_dict["key_axis"] == "channel" and codec_dict["unrope"] is True and codec_dict["rope_dim"] == 64


@pytest.mark.model
def test_transforms_in_chunks_equal_one_pass_and_leave_the_input_alone(monkeypatch, real_tensors):
    import kvpack.transforms.plan

    rope = RopeSpec(tuple(1.0 / 10000 ** (torch.arange(0, 48, 2).float() / 48)), 1.25)
    codec = config("uniform", 4, 32, key_axis="channel", keep_first=3, rotate="hadamard", unrope=True).with_rope(
        rope.inv_freq, rope.attention_scaling, offset=11
    )
    x = real_tensors["layers.2.key"].float()
    before = x.clone()
    whole = round_trip("layers.2.key", x, codec)
    monkeypatch.setattr(kvpack.transforms.plan, "TRANSFORM_CHUNK_ELEMENTS", 3 * 64 * 7)  # 7 tokens per chunk
    chunked = round_trip("layers.2.key", x, codec)
    assert torch.equal(x, before)
    assert torch.allclose(whole, chunked, atol=1e-6 * float(x.abs().max()))
    assert float(((whole - x) ** 2).sum() / (x**2).sum()) < 0.02
