"""The codec toolbox: group axes, protected tokens, outlier selection, Hadamard rotation,
un-RoPE, levels and presets, through the pipeline, the container, the API and the CLI."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.cli.app import main
from kvpack.compress import compress_tensors
from kvpack.config import CodecConfig
from kvpack.entry import decode_entry, encode_tensor
from kvpack.errors import InvalidInputError
from kvpack.formats.entropy import EntropyConfig
from kvpack.formats.header import TensorEntry
from kvpack.formats.reader import KvpReader
from kvpack.grouping import GroupLayout, from_groups, outliers_per_group, to_groups
from kvpack.presets import PRESETS
from kvpack.restore.files import load_kvp
from kvpack.transforms.plan import hadamard_matrix, hadamard_rotate, hadamard_signs, plan_for
from kvpack.transforms.rope import RopeSpec, rope_from_metadata, rope_from_model, rotate_keys


def config(method="uniform", bits=4, group_size=64, ratio=0.0, **transforms):
    return CodecConfig.build(method, bits, group_size, ratio, transforms=transforms)


def round_trip(name, x, codec):
    entry = TensorEntry(name, tuple(x.shape), "float32" if x.dtype == torch.float32 else "float16", codec, {})
    return decode_entry(entry, encode_tensor(name, x, codec), torch.float32)


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- un-RoPE ------------------------------------------------------------------------------


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


def test_unrope_recovers_the_models_pre_rope_keys(smollm):
    """Un-RoPE of the cached keys equals what k_proj produced before the model applied RoPE."""
    from kvpack.model.dump import cache_layers

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
    cached = cache_layers(out.past_key_values)
    for i, pre_rope in captured.items():
        keys = cached[i][0].float()
        expected = pre_rope.reshape(1, 80, keys.shape[1], 64).transpose(1, 2).float()
        unroped = rotate_keys(keys, torch.tensor(rope.inv_freq), rope.attention_scaling, 0, inverse=True)
        scale = expected.abs().amax()
        assert float((unroped - expected).abs().max()) <= 1e-4 * float(scale), i
        # and the cached keys really are rotated (the test is not vacuous)
        assert float((keys - expected).abs().max()) > 0.05 * float(scale)


def test_unrope_needs_the_rotary_frequencies(tmp_path, real_tensors):
    tensors = {"layers.0.key": real_tensors["layers.0.key"]}
    with pytest.raises(InvalidInputError, match="does not record"):
        compress_tensors(tensors, tmp_path / "x.kvp", config(unrope=True), {})
    assert not (tmp_path / "x.kvp").exists()
    with pytest.raises(InvalidInputError, match="malformed"):
        rope_from_metadata({"rope_inv_freq": "[1, 'x']"})
    with pytest.raises(InvalidInputError, match="finite"):
        RopeSpec((float("nan"),))


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


# --- axes, protected tokens ----------------------------------------------------------------


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


def test_exact_tokens_show_in_the_bits_per_element(tmp_path, real_tensors):
    tensors = {n: t for n, t in real_tensors.items() if n.startswith("layers.0.")}
    seq = tensors["layers.0.key"].shape[2]
    entries = compress_tensors(
        tensors, tmp_path / "k.kvp", config("uniform", 2, 32, keep_first=4, keep_last=60), entropy=EntropyConfig.off()
    )
    from kvpack.report import build_report

    bits = build_report(entries, (tmp_path / "k.kvp").stat().st_size, None)["rows"]["all"]["bits_per_element"]
    assert bits["exact"] == pytest.approx(16 * 64 / seq)
    assert bits["codes"] == pytest.approx(2 * (seq - 64) / seq)
    assert bits["total"] * 2 * tensors["layers.0.key"].numel() / 8 == pytest.approx((tmp_path / "k.kvp").stat().st_size)


# --- outliers -------------------------------------------------------------------------------


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


def test_hadamard_rejects_an_odd_head_dim_and_spreads_outliers(real_tensors):
    with pytest.raises(InvalidInputError, match="even head_dim"):
        plan_for((1, 2, 4, 7), "float16", "layers.0.key", config("uniform", 4, 7, rotate="hadamard"))
    keys = real_tensors["layers.3.key"]
    plain = round_trip("layers.3.key", keys, config("uniform", 3, 64))
    rotated = round_trip("layers.3.key", keys, config("uniform", 3, 64, rotate="hadamard", rotate_seed=11))

    def rel(y):
        return float(((y - keys.float()) ** 2).sum() / (keys.float() ** 2).sum())

    assert rel(rotated) < rel(plain)  # the key outlier channels are spread over the head


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


def test_config_round_trips_and_refuses_bad_transforms():
    codec = config("adaptive", 3, 32, 0.01, key_axis="channel", keep_first=1, rotate="hadamard", unrope=True)
    assert CodecConfig.from_dict(json.loads(json.dumps(codec.to_dict()))) == codec
    assert "key_axis" not in config().to_dict()  # defaults are not written
    bad = [
        ({"key_axis": "diagonal"}, r"key_axis \(--key-axis\) must be one of token, channel"),
        ({"keep_first": -1}, r"keep_first \(--keep-first\) must be an integer"),
        ({"keep_last": 1.5}, r"keep_last \(--keep-last\) must be an integer"),
        ({"rotate": "random"}, r"rotate \(--rotate\) must be one of none, hadamard"),
        ({"outlier_select": "top"}, r"outlier_select \(--outlier-select\) must be one of"),
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


# --- CLI --------------------------------------------------------------------------------------


def test_cli_compress_with_every_flag_and_presets(tmp_path, real_dump, capsys):
    out = tmp_path / "x.kvp"
    args = ["compress", real_dump, "-o", out, "--json", "-"]
    flags = [
        "--method", "uniform", "--bits", "3", "--group-size", "32", "--key-axis", "channel", "--value-axis", "token",
        "--keep-first", "2", "--keep-last", "16", "--outlier-ratio", "0.03", "--outlier-select", "magnitude",
        "--rotate", "hadamard", "--rotate-seed", "9", "--unrope",
    ]  # fmt: skip
    code, stdout, err = run(args + flags, capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["config"]["unrope"] is True and report["config"]["rope_dim"] == 64
    assert report["config"]["rotate_seed"] == 9 and report["config"]["keep_last"] == 16
    assert report["rows"]["all"]["bits_per_element"]["exact"] > 0
    assert report["rows"]["key"]["rel_mse"] < 0.05
    for preset in PRESETS:
        code, stdout, err = run(
            ["compress", real_dump, "-o", out, "--force", "--json", "-", "--preset", preset], capsys
        )
        assert code == 0, (preset, err)
    # a flag overrides the preset
    code, stdout, _ = run(
        ["compress", real_dump, "-o", out, "--force", "--json", "-", "--preset", "kivi-2", "-b", "3"], capsys
    )
    cfg = json.loads(stdout)["config"]
    assert (cfg["bits"], cfg["key_axis"], cfg["group_size"], cfg["keep_last"]) == (3, "channel", 32, 128)
    code, stdout, _ = run(
        ["compress", real_dump, "-o", out, "--force", "--json", "-", "-m", "uniform", "--level", "layer"], capsys
    )
    assert json.loads(stdout)["config"]["group_size"] == 3 * 64
    # a level replaces a preset's group size; an explicit --group-size subdivides the level
    for extra, expected in ((["--level", "layer"], 192), (["--level", "layer", "-g", "96"], 96)):
        code, stdout, _ = run(
            ["compress", real_dump, "-o", out, "--force", "--json", "-", "--preset", "qaq-uniform", *extra], capsys
        )
        assert json.loads(stdout)["config"]["group_size"] == expected
    # an element format's block subdivides the level
    code, stdout, _ = run(
        ["compress", real_dump, "-o", out, "--force", "--json", "-", "-m", "mxfp4", "--level", "head"], capsys
    )
    assert code == 0 and json.loads(stdout)["config"]["group_size"] == 32
    # a .kvp input is named as such, also when --level needs the dump's shape
    code, _, err = run(["compress", out, "-o", tmp_path / "again.kvp", "--level", "head"], capsys)
    assert code == 2 and "already a .kvp file" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--key-axis", "diagonal"], "key_axis (--key-axis) must be one of"),
        (["--level", "layer", "--key-axis", "channel"], "--level sets the size of token groups"),
        (["--level", "head", "--group-size", "48"], "does not subdivide the head level"),
        (["--preset", "kivi-9"], "unknown preset"),
        (["--method", "mxfp4", "--bits", "3"], "4-bit elements"),
        (["--method", "uniform", "--group-size", "7", "--rotate", "hadamard"], "does not divide"),
        (["--keep-first", "-3"], "keep_first (--keep-first) must be an integer"),
        (["--rotate-seed", "5"], "rotate_seed (--rotate-seed) only applies"),
        (["--outlier-select", "magnitude"], "outlier_select (--outlier-select) only applies"),
    ],
)
def test_cli_refuses_bad_toolbox_flags_in_one_line(tmp_path, real_dump, capsys, flags, message):
    code, out, err = run(["compress", real_dump, "-o", tmp_path / "x.kvp", *flags], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.kvp").exists()


def test_cli_unrope_on_a_dump_without_rotary_frequencies(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"layers.0.key": torch.randn(1, 1, 8, 8).half(), "layers.0.value": torch.randn(1, 1, 8, 8).half()}, path)
    code, _, err = run(["compress", path, "-m", "uniform", "-g", "8", "--unrope"], capsys)
    assert code == 2 and "does not record" in err and "Traceback" not in err


def test_methods_lists_presets_transforms_and_element_formats(capsys):
    code, out, _ = run(["methods"], capsys)
    assert code == 0
    for text in ("kivi-2", "kvquant-3", "qaq-uniform", "--unrope", "--rotate hadamard", "mxfp4", "fp8-e5m2"):
        assert text in out
    assert "arXiv 2402.02750" in out and "OCP" in out


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


def test_every_transform_key_is_known_to_the_reader_and_the_cli():
    """The transform keys are listed by hand in three places; they must agree."""
    from kvpack.cli.options import _TRANSFORMS, CODEC_FLAGS
    from kvpack.config import TRANSFORM_DEFAULTS
    from kvpack.formats.constants import KNOWN_REQUIRED_KEYS

    assert set(TRANSFORM_DEFAULTS) <= KNOWN_REQUIRED_KEYS
    # rope_*: from the model; stack_layers: set by --level token; width_counts: by the allocators
    assert set(_TRANSFORMS) == {k for k in TRANSFORM_DEFAULTS if not k.startswith("rope_")} - {
        "stack_layers",
        "width_counts",
    }
    assert set(_TRANSFORMS) <= set(CODEC_FLAGS)
