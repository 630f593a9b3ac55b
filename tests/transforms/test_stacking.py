"""QAQ's token level: one group per token across every layer, stored as one stacked entry per role
(``stack_layers``, format 1.3), restored layer by layer by every reader."""

import json

import pytest
import torch

from kvpack.compress import compress_file, compress_tensors
from kvpack.config import CodecConfig
from kvpack.entry import entry_layout
from kvpack.errors import FormatError, InvalidInputError
from kvpack.formats.constants import FORMAT_MAJOR, FORMAT_MINOR
from kvpack.formats.entropy import EntropyConfig
from kvpack.formats.reader import KvpReader
from kvpack.model.cache import read_prompt_cache
from kvpack.report import compare_caches
from kvpack.restore.decode import read_tensor
from kvpack.restore.files import load_kvp
from kvpack.sources import open_cache
from kvpack.transforms.plan import MAX_STACKED_LAYERS
from tests.cli_helpers import run
from tests.kvp_bytes import header_json, with_header

LAYERS, HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M


def stacked(bits=3, group_size=LAYERS * HEADS * HEAD_DIM, method="uniform", **transforms):
    return CodecConfig.build(method, bits, group_size, transforms={"stack_layers": True, **transforms})


def distinct_per_token(tensors: dict, role: str) -> torch.Tensor:
    """How many distinct values each token has across every layer and head of ``role``."""
    rows = torch.cat([tensors[f"layers.{i}.{role}"][0].transpose(0, 1).flatten(1) for i in range(LAYERS)], dim=1)
    return torch.tensor([row.unique().numel() for row in rows])


@pytest.mark.model
def test_cli_token_level_shares_one_grid_per_token_across_all_layers(tmp_path, real_dump, capsys):
    out, restored = tmp_path / "token.kvp", tmp_path / "token.safetensors"
    code, stdout, err = run(
        [
            "compress",
            real_dump,
            "-o",
            out,
            "-m",
            "uniform",
            "--rotate",
            "none",  # the rotation's signs and rotary frequencies would count in the scales
            "--no-unrope",
            "-b",
            "3",
            "--level",
            "token",
            "--zstd-level",
            "0",
            "--json",
            "-",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["config"]["stack_layers"] is True and report["config"]["group_size"] == LAYERS * HEADS * HEAD_DIM
    bits = report["rows"]["all"]["bits_per_element"]
    assert bits["codes"] == pytest.approx(3.0) and bits["scales"] == pytest.approx(32 / (LAYERS * HEADS * HEAD_DIM))
    assert len(report["layers"]) == LAYERS and all(row["rel_mse"] > 0 for row in report["layers"])
    with KvpReader(out) as reader:
        assert reader.version == (FORMAT_MAJOR, FORMAT_MINOR)
        assert [e.name for e in reader.entries()] == ["layers.all.key", "layers.all.value", "token_ids"]
        assert reader.entry("layers.all.key").shape[:3] == (LAYERS, 1, HEADS)
    assert json.loads(header_json(out.read_bytes()))["required"] == ["stack_layers"]  # a 1.2 reader refuses it
    assert run(["decompress", out, "-o", restored], capsys)[0] == 0
    tensors = load_kvp(out)[0]
    # 3-bit codes on one scale and zero-point per token: at most 8 values per token over all 30 layers
    for role in ("key", "value"):
        assert int(distinct_per_token(tensors, role).max()) <= 8
    code, stdout, _ = run(
        ["compress", real_dump, "-o", tmp_path / "layer.kvp", "-m", "uniform", "-b", "3", "--level", "layer"], capsys
    )
    assert code == 0 and int(distinct_per_token(load_kvp(tmp_path / "layer.kvp")[0], "key").min()) > 8
    # every reader restores the layers under their own names
    stats = compare_caches(real_dump, restored)
    assert stats["tensors"] == 2 * LAYERS and 0 < stats["rows"]["all"]["rel_mse"] < 1
    assert compare_caches(real_dump, out)["rows"] == stats["rows"]
    code, stdout, _ = run(["inspect", out, "--tensors"], capsys)
    assert code == 0 and "layers.all.key" in stdout


@pytest.mark.model
def test_token_level_subdivided_at_layer_boundaries_equals_the_layer_level(tmp_path, real_tensors):
    """Groups of num_kv_heads * head_dim never cross a layer, so the stacked file decodes exactly as per-layer groups."""
    per_layer = CodecConfig.build("uniform", 3, HEADS * HEAD_DIM)
    dense = EntropyConfig.off()  # the sizes compared below are of dense sections
    compress_tensors(real_tensors, tmp_path / "layer.kvp", per_layer, entropy=dense)
    compress_tensors(real_tensors, tmp_path / "stacked.kvp", stacked(group_size=HEADS * HEAD_DIM), entropy=dense)
    layer, stack = load_kvp(tmp_path / "layer.kvp")[0], load_kvp(tmp_path / "stacked.kvp")[0]
    assert sorted(stack) == sorted(layer)
    assert all(torch.equal(stack[name], layer[name]) for name in layer)
    assert (tmp_path / "stacked.kvp").stat().st_size < (tmp_path / "layer.kvp").stat().st_size  # one header entry


@pytest.mark.model
@pytest.mark.parametrize(
    "method, bits, transforms",
    [
        ("adaptive", 3, {"codebook_scope": "head"}),
        ("normal", 4, {}),
        ("mxfp4", None, {"rotate": "hadamard"}),
        ("uniform", 2, {"key_axis": "channel", "keep_first": 4, "unrope": True}),
    ],
)
def test_every_codec_and_transform_works_across_layers(tmp_path, real_dump, real_tensors, method, bits, transforms):
    options = {k: v for k, v in transforms.items() if k == "codebook_scope"}
    transforms = {k: v for k, v in transforms.items() if k != "codebook_scope"}
    group = 32 if method == "mxfp4" else 64 if transforms.get("key_axis") == "channel" else 2 * HEADS * HEAD_DIM
    config = CodecConfig.build(method, bits, group, transforms={"stack_layers": True, **transforms}, **options)
    per_layer = CodecConfig.build(method, bits, min(group, HEADS * HEAD_DIM), transforms=transforms, **options)
    kv = [name for name in real_tensors if name != "token_ids"]

    def cache_error(path):  # over the whole cache
        restored = load_kvp(path)[0]
        assert sorted(restored) == sorted(real_tensors)
        assert torch.equal(restored["token_ids"], real_tensors["token_ids"])
        error = sum(float(((restored[n].float() - real_tensors[n].float()) ** 2).sum()) for n in kv)
        return error / sum(float((real_tensors[n].float() ** 2).sum()) for n in kv)

    report = compress_file(real_dump, tmp_path / "x.kvp", config)
    assert report["rows"]["all"]["bits_per_element"]["total"] * report["kv_elements"] / 8 == pytest.approx(
        (tmp_path / "x.kvp").stat().st_size
    )
    compress_file(real_dump, tmp_path / "layer.kvp", per_layer)
    if group <= HEADS * HEAD_DIM:  # no group crosses a layer: the same groups, the same values
        stack, layer = load_kvp(tmp_path / "x.kvp")[0], load_kvp(tmp_path / "layer.kvp")[0]
        assert all(torch.equal(stack[name], layer[name]) for name in real_tensors)
    # groups of two layers are coarser than groups of one, but not much on this cache (measured:
    # adaptive-3 0.041 vs 0.039, normal-4 0.139 vs 0.135)
    assert cache_error(tmp_path / "x.kvp") <= 1.25 * cache_error(tmp_path / "layer.kvp") + 1e-6


@pytest.mark.model
def test_readers_restore_single_layers_of_a_stacked_file(tmp_path, real_dump, real_tensors):
    compress_file(real_dump, tmp_path / "x.kvp", stacked(bits=4))
    whole = load_kvp(tmp_path / "x.kvp")[0]
    assert sorted(whole) == sorted(real_tensors)
    with open_cache(tmp_path / "x.kvp") as source:
        assert sorted(source.keys()) == sorted(real_tensors)
        seventh = source.get("layers.7.value")
        seventh.zero_()  # a copy: the reader's decoded stack is not touched
        assert torch.equal(source.get("layers.7.value"), whole["layers.7.value"])
        assert torch.equal(source.get("layers.29.key"), whole["layers.29.key"])
    tensors, metadata = read_prompt_cache(tmp_path / "x.kvp")
    assert torch.equal(tensors["layers.3.key"], whole["layers.3.key"]) and metadata["num_layers"] == "30"
    with KvpReader(tmp_path / "x.kvp") as reader:
        with pytest.raises(InvalidInputError, match="no tensor named 'layers.30.key'"):
            read_tensor(reader, "layers.30.key")


def test_stacking_refuses_caches_whose_layers_differ(tmp_path, capsys):
    from safetensors.torch import save_file

    def shapes(tensors):
        return {name: (tuple(x.shape), "float16") for name, x in tensors.items()}

    even = {f"layers.{i}.{r}": torch.randn(1, 2, 8, 16).half() for i in range(3) for r in ("key", "value")}
    gap = {n: x for n, x in even.items() if not n.startswith("layers.1.")}
    with pytest.raises(InvalidInputError, match="missing layers.1.key"):
        entry_layout(shapes(gap), stacked(group_size=32))
    uneven = dict(even, **{"layers.2.value": torch.randn(1, 2, 4, 16).half()})
    with pytest.raises(InvalidInputError, match="one shape and dtype: 'layers.2.value'"):
        entry_layout(shapes(uneven), stacked(group_size=32))
    path = tmp_path / "uneven.safetensors"
    save_file(uneven, path)
    code, _, err = run(["compress", path, "-m", "uniform", "--level", "token"], capsys)
    assert code == 2 and "one shape and dtype" in err and len(err.strip().splitlines()) == 1
    assert not path.with_suffix(".kvp").exists()
    code, _, err = run(["compress", path, "-m", "uniform", "--level", "token", "-g", "64"], capsys)
    assert code == 2 and "does not subdivide the token level (96 values)" in err
    # without stacking the same cache compresses
    assert run(["compress", path, "-m", "uniform", "-g", "16"], capsys)[0] == 0


@pytest.mark.model
def test_hostile_stacked_headers_are_refused(tmp_path, real_tensors):
    small = {n: x[:, :, :4] if n.startswith("layers.") else x for n, x in real_tensors.items()}
    compress_tensors(small, tmp_path / "x.kvp", stacked(group_size=64))
    data = (tmp_path / "x.kvp").read_bytes()
    header = json.loads(header_json(data))

    def refused(edit, message):
        edited = json.loads(json.dumps(header))
        edit(edited)
        path = tmp_path / "bad.kvp"
        path.write_bytes(with_header(data, json.dumps(edited).encode()))
        with pytest.raises(FormatError, match=message):
            with KvpReader(path) as reader:
                for name in reader.tensor_names():
                    read_tensor(reader, name)

    def rename(old, new):  # in place, so the sections keep their file order
        return lambda h: h.update(tensors={new if n == old else n: e for n, e in h["tensors"].items()})

    # a plain tensor that is also a layer of the stacked entry
    refused(rename("token_ids", "layers.3.key"), "is also layer 3 of 'layers.all.key'")
    # more layers than the limit, hidden behind a zero-length dimension
    refused(
        lambda h: h["tensors"]["layers.all.key"].update(shape=[MAX_STACKED_LAYERS + 1, 1, 3, 0, 64]),
        "num_layers from 1 to 65536",
    )
    # stack_layers on a 4-D entry or another name
    refused(lambda h: h["tensors"]["layers.all.key"].update(shape=[1, 90, 4, 64]), "a stacked entry has shape")
    refused(rename("layers.all.key", "layers.0.key"), "stack_layers applies to the entries layers.all.key")


def test_writer_refuses_a_layer_that_is_also_in_a_stacked_entry(tmp_path):
    from kvpack.entry import encode_tensor
    from kvpack.formats.writer import KvpWriter

    config = stacked(group_size=32)
    keys = torch.randn(3, 1, 2, 4, 16).half()
    with pytest.raises(InvalidInputError, match="cannot write .* is also layer 0 of 'layers.all.key'"):
        with KvpWriter(tmp_path / "x.kvp") as writer:
            writer.add_tensor(
                "layers.all.key", (3, 1, 2, 4, 16), "float16", config, encode_tensor("layers.all.key", keys, config)
            )
            writer.add_tensor(
                "layers.0.key", (1, 2, 4, 16), "float16", None, encode_tensor("layers.0.key", keys[0], None)
            )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.model
def test_a_stacked_entry_for_one_role_beside_per_layer_tensors(tmp_path, real_tensors):
    """Valid by the spec: keys stacked, values per layer; the reader restores both kinds."""
    from kvpack.entry import encode_tensor
    from kvpack.formats.writer import KvpWriter

    config, per_layer = stacked(bits=4, group_size=HEADS * HEAD_DIM), CodecConfig.build("uniform", 4, 64)
    keys = torch.stack([real_tensors[f"layers.{i}.key"][:, :, :16] for i in range(2)])
    values = [real_tensors[f"layers.{i}.value"][:, :, :16] for i in range(2)]
    with KvpWriter(tmp_path / "x.kvp") as writer:
        encoded = encode_tensor("layers.all.key", keys, config)
        writer.add_tensor("layers.all.key", tuple(keys.shape), "float16", config, encoded)
        for i in range(2):
            name = f"layers.{i}.value"
            writer.add_tensor(
                name, tuple(values[i].shape), "float16", per_layer, encode_tensor(name, values[i], per_layer)
            )
    restored = load_kvp(tmp_path / "x.kvp")[0]
    assert list(restored) == ["layers.0.key", "layers.0.value", "layers.1.key", "layers.1.value"]
    for i in range(2):
        for name, x in ((f"layers.{i}.key", keys[i]), (f"layers.{i}.value", values[i])):
            error = float(((restored[name].float() - x.float()) ** 2).sum() / (x.float() ** 2).sum())
            assert error < 0.05, (name, error)  # 4-bit groups of a token's layer or head


def test_stacking_names_the_limits_and_the_bad_layer(tmp_path, capsys):
    from safetensors.torch import save_file

    # 80 layers x 8 kv heads x 128: a token level of 81,920 values, beyond the group size limit
    big = {f"layers.{i}.{r}": torch.zeros(1, 8, 1, 128).half() for i in range(80) for r in ("key", "value")}
    save_file(big, tmp_path / "big.safetensors")
    code, _, err = run(["compress", tmp_path / "big.safetensors", "-m", "uniform", "--level", "token"], capsys)
    assert code == 2 and "81920 values per group, more than the limit of 65536" in err and "e.g. 40960" in err
    code, _, err = run(
        ["compress", tmp_path / "big.safetensors", "-m", "uniform", "--level", "token", "-g", "40960"], capsys
    )
    assert code == 0, err
    # keys and values may differ in shape: each role is its own entry
    mixed = {f"layers.{i}.key": torch.randn(1, 2, 4, 32).half() for i in range(2)}
    mixed |= {f"layers.{i}.value": torch.randn(1, 2, 4, 16).half() for i in range(2)}
    compress_tensors(mixed, tmp_path / "mixed.kvp", stacked(group_size=32))
    assert sorted(load_kvp(tmp_path / "mixed.kvp")[0]) == sorted(mixed)
    # a NaN is named with its layer; a tensor already named like a stacked entry is refused
    mixed["layers.1.value"][0, 1, 2, 3] = float("nan")
    with pytest.raises(InvalidInputError, match=r"'layers.all.value' \(layer 1\) holds 1 NaN"):
        compress_tensors(mixed, tmp_path / "nan.kvp", stacked(group_size=32))
    with pytest.raises(InvalidInputError, match="holds a tensor named 'layers.all.key'"):
        compress_tensors({**mixed, "layers.all.key": torch.zeros(1)}, tmp_path / "named.kvp", stacked(group_size=32))
    assert not (tmp_path / "nan.kvp").exists() and not (tmp_path / "named.kvp").exists()
