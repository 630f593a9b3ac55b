"""Fuzzing the ``.kvp`` reader: mutations of the golden files must read or raise a named
``FormatError`` (never anything else), with a bounded memory peak, and the same hostile
files through the CLI give one line and exit code 2.

The mutation classes are those of docs/fuzzing.md; ``FUZZ_CASES`` (default 12,000) random
cases run after the deterministic ones. ``fuzz/fuzz_reader.py`` runs a coverage-guided
(atheris) version for longer by hand.
"""

from __future__ import annotations

import json
import os
import random
import re
import tracemalloc
import zlib
from collections import Counter
from pathlib import Path

import pytest
import zstandard

from kvpack.cli.app import main
from kvpack.errors import ChecksumMismatchError, FormatError
from tests.golden_files import GOLDEN_DIR
from tests.kvp_bytes import dumps, header_json, preamble_fields, read_everything, with_header

SEEDS = sorted(GOLDEN_DIR.glob("v*/*.kvp"))
FUZZ_CASES = int(os.environ.get("FUZZ_CASES", "12000"))
HOSTILE_VALUES = [
    -1,
    0,
    1,
    7,
    2**31,
    2**63,
    2**64 + 5,
    10**400,
    1e308,
    -0.0,
    0.5,
    "",
    "x" * 1000,
    "\u00e9",
    None,
    True,
    [],
    {},
    [[[[[]]]]],
    {"offset": 0},
]


# --- mutations: each takes (rng, file bytes) and returns new bytes --------------------------


def flip_bit(region: str):
    def mutate(rng: random.Random, data: bytes) -> bytes:
        _, _, _, _, header_offset, _, _, _ = preamble_fields(data)
        start, end = {"preamble": (0, 64), "data": (64, header_offset), "header": (header_offset, len(data))}[region]
        if end <= start:
            start, end = 0, len(data)
        out = bytearray(data)
        out[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
        return bytes(out)

    mutate.__name__ = f"bit flip in the {region}"
    return mutate


def edit_header(edit):
    """A JSON-level edit, re-checksummed, so only the reader's semantic checks can catch it."""

    def mutate(rng: random.Random, data: bytes) -> bytes:
        text = header_json(data)
        raw = edit(rng, json.loads(text), text)
        if rng.random() < 0.5:  # stored compressed, as kvpack writes it, or plain
            return with_header(data, zstandard.ZstdCompressor().compress(raw), flags=1)
        return with_header(data, raw, flags=0)

    mutate.__name__ = edit.__name__
    return mutate


def random_node(rng: random.Random, node, depth: int = 0):
    """A (container, key) somewhere inside the JSON value ``node``."""
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return None
        key = rng.choice(keys)
        child = node[key]
        if isinstance(child, (dict, list)) and child and rng.random() < 0.7:
            node = child
            continue
        return node, key


def replace_a_value(rng, header, text):
    found = random_node(rng, header)
    if found:
        container, key = found
        container[key] = rng.choice(HOSTILE_VALUES)
    return dumps(header)


def drop_a_key(rng, header, text):
    found = random_node(rng, header)
    if found:
        container, key = found
        del container[key]
    return dumps(header)


def section_offset_or_length(rng, header, text):
    tensors = list(header["tensors"].values())
    if not tensors:
        return dumps(header)
    sections = rng.choice(tensors)["sections"]
    section = sections[rng.choice(list(sections))]
    field = rng.choice(["offset", "length"])
    section[field] = rng.choice(
        [section[field] + rng.choice([-8, -1, 1, 8]), 0, 2**40, 2**63 - 1, 10**6, section[field] * 1000]
    )
    return dumps(header)


def shape_beyond_sections(rng, header, text):
    tensor = rng.choice(list(header["tensors"].values()))
    if tensor["shape"]:
        axis = rng.randrange(len(tensor["shape"]))
        tensor["shape"][axis] = rng.choice([tensor["shape"][axis] * 1000, 2**40, 0, tensor["shape"][axis] + 1])
    return dumps(header)


def unknown_codec_or_dtype(rng, header, text):
    tensor = rng.choice(list(header["tensors"].values()))
    if tensor["codec"] is not None and rng.random() < 0.6:
        field = rng.choice(["method", "bits", "group_size", "outlier_ratio", "params"])
        tensor["codec"][field] = rng.choice(["fp4", "uniform", "adaptive", 0, 9, 3, 1.5, {"symmetric": 1}, None])
    else:
        tensor["dtype"] = rng.choice(["complex64", "float8", "int4", "", "float16", "bool"])
    return dumps(header)


def duplicate_key(rng, header, text):
    """A key repeated at the start of the object that holds it (with another value)."""
    starts = [match.start() for match in re.finditer(r'\{"', text)]
    at = rng.choice(starts)
    key = text[at + 1 : text.index('":', at) + 2]
    return (text[: at + 1] + key + json.dumps(rng.choice(HOSTILE_VALUES)) + "," + text[at + 1 :]).encode()


def invalid_text(rng, header, text):
    raw = text.encode()
    at = rng.randrange(len(raw) + 1)
    junk = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b'"', b"{", b"\\ud800", b"NaN", b"\x00", b"]]]"])
    return raw[:at] + junk + raw[at + rng.choice([0, 1]) :]


def deep_nesting(rng, header, text):
    depth = rng.choice([100, 10_000, 200_000])
    return text.replace('"metadata":', '"x":' + "[" * depth + "]" * depth + ',"metadata":', 1).encode()


TRANSFORM_VALUES = {
    "key_axis": ["channel", "token", "diagonal"],
    "value_axis": ["channel", "token"],
    "keep_first": [1, 3, 5, 2**39, -1],
    "keep_last": [1, 6, 2**40, 0],
    "outlier_select": ["magnitude", "tails", "median"],
    "rotate": ["hadamard", "none", "givens"],
    "rotate_seed": [1, 2**62, -5],
    "unrope": [True, False, 1],
    "rope_dim": [2, 64, 66, 2**15, 3],
    "rope_offset": [1, 2**39, 2**41],
    "rope_scaling": [2.0, 1e-300, 1e300, 0],
    "stack_layers": [True, False, 1],
}


def transform_keys(rng, header, text):
    """A codec config gains transform keys (format 1.2+) with plausible or hostile values."""
    codecs = [t["codec"] for t in header["tensors"].values() if isinstance(t.get("codec"), dict)]
    if codecs:
        codec = rng.choice(codecs)
        for key in rng.sample(sorted(TRANSFORM_VALUES), rng.randint(1, 3)):
            codec[key] = rng.choice(TRANSFORM_VALUES[key])
    return dumps(header)


def required_keys(rng, header, text):
    header["required"] = rng.choice([["entropy_coder"], "x", [1], [], ["required"]])
    return dumps(header)


def preamble_fields_lie(rng: random.Random, data: bytes) -> bytes:
    """Version, flags, header offset/length set to other values, with the preamble CRC recomputed."""
    from kvpack.formats.constants import pack_preamble

    _, major, minor, flags, offset, length, crc, _ = preamble_fields(data)
    choice = rng.randrange(5)
    if choice == 0:
        major, minor = rng.choice([(0, 9), (1, 0), (1, 9), (2, 0), (65535, 65535)])
    elif choice == 1:
        flags = rng.choice([0, 2, 3, 1 << 31])
    elif choice == 2:
        length = rng.choice([0, length - 1, length + 1, 64 << 20, (64 << 20) + 1, 2**63, 2**64 - 1])
    elif choice == 3:
        offset = rng.choice([0, 63, offset - 8, offset + 8, 2**64 - 1])
    else:
        crc ^= 1 << rng.randrange(32)
    return pack_preamble(major, minor, flags, offset, length, crc) + data[64:]


def zstd_frame_games(rng: random.Random, data: bytes) -> bytes:
    text = header_json(data).encode()
    choice = rng.randrange(4)
    if choice == 0:
        raw = zstandard.ZstdCompressor(write_content_size=False).compress(text)
    elif choice == 1:
        raw = zstandard.ZstdCompressor().compress(text) + b"\0" * rng.randrange(1, 9)
    elif choice == 2:
        raw = zstandard.ZstdCompressor(level=19).compress(b" " * rng.choice([1 << 20, 70 << 20]))
    else:
        frame = bytearray(zstandard.ZstdCompressor().compress(text))
        frame[rng.randrange(len(frame))] ^= 0xFF
        raw = bytes(frame)
    return with_header(data, raw, flags=1)


def splice_bytes(rng: random.Random, data: bytes) -> bytes:
    at = rng.randrange(len(data) + 1)
    if rng.random() < 0.5:
        return data[:at] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16))) + data[at:]
    return data[:at] + data[at + rng.randrange(1, 16) :]


MUTATIONS = [
    flip_bit("preamble"),
    flip_bit("data"),
    flip_bit("header"),
    preamble_fields_lie,
    zstd_frame_games,
    splice_bytes,
    *(
        edit_header(edit)
        for edit in (
            replace_a_value,
            drop_a_key,
            section_offset_or_length,
            shape_beyond_sections,
            unknown_codec_or_dtype,
            duplicate_key,
            invalid_text,
            deep_nesting,
            required_keys,
            transform_keys,
        )
    ),
]


def field_boundaries(data: bytes) -> list[int]:
    """Every length at which a field, a section or the header starts or ends."""
    _, _, _, _, offset, _, _, _ = preamble_fields(data)
    header = json.loads(header_json(data))
    cuts = {0, 1, 8, 10, 12, 16, 24, 32, 36, 40, 63, 64, offset, offset + 1, len(data) - 1}
    for tensor in header["tensors"].values():
        for section in tensor["sections"].values():
            cuts |= {section["offset"], section["offset"] + 1, section["offset"] + section["length"] - 1}
    return sorted(c for c in cuts if 0 <= c < len(data))


# --- the harness -------------------------------------------------------------------------------


class Outcomes:
    def __init__(self):
        self.read, self.refused, self.crashes, self.worst_peak_ratio = Counter(), Counter(), [], 0.0
        self.readable: list[bytes] = []  # a sample of mutants that read, for the CLI

    def run(self, path: Path, data: bytes, label: str) -> None:
        path.write_bytes(data)
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        try:
            read_everything(path)
            self.read[label] += 1
            if len(self.readable) < 60 and self.read[label] <= 5:
                self.readable.append(data)
        except FormatError:
            self.refused[label] += 1
        except Exception as exc:  # anything else is a crash: record it with what caused it
            self.crashes.append((label, f"{type(exc).__name__}: {exc}"[:300]))
        peak = tracemalloc.get_traced_memory()[1] - before
        # allocations are bounded by the file: a generous multiple of it plus a fixed allowance
        self.worst_peak_ratio = max(self.worst_peak_ratio, peak / (64 * len(data) + (8 << 20)))

    @property
    def total(self) -> int:
        return sum(self.read.values()) + sum(self.refused.values()) + len(self.crashes)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> Outcomes:
    path = tmp_path_factory.mktemp("fuzz") / "case.kvp"
    result = Outcomes()
    rng = random.Random(20261122)
    seeds = [(seed, seed.read_bytes()) for seed in SEEDS]
    for _, data in seeds:  # warm-up: compiling the numba kernels is not what reading a file allocates
        path.write_bytes(data)
        read_everything(path)
    tracemalloc.start()
    try:
        for _, data in seeds:
            for cut in field_boundaries(data):
                result.run(path, data[:cut], "truncation at a field boundary")
        for _ in range(FUZZ_CASES):
            _, data = rng.choice(seeds)
            mutate = rng.choice(MUTATIONS)
            result.run(path, mutate(rng, data), mutate.__name__)
    finally:
        tracemalloc.stop()
    return result


def test_fuzzed_files_only_raise_format_errors(outcomes):
    assert outcomes.total >= 10_000
    assert outcomes.crashes == []
    assert set(outcomes.read) | set(outcomes.refused) == {"truncation at a field boundary"} | {
        m.__name__ for m in MUTATIONS
    }
    print(
        f"\nfuzz: {outcomes.total} cases, {sum(outcomes.refused.values())} refused with a FormatError, "
        f"{sum(outcomes.read.values())} read (harmless edits), 0 crashes"
    )
    for label in sorted(set(outcomes.read) | set(outcomes.refused)):
        print(f"  {label}: {outcomes.refused[label]} refused, {outcomes.read[label]} read")


def test_truncations_and_raw_bit_flips_are_never_read(outcomes):
    # every byte of a file is covered by a checksum or a layout rule: such damage never reads
    for label in ("truncation at a field boundary", "bit flip in the preamble", "bit flip in the data"):
        assert outcomes.read[label] == 0 and outcomes.refused[label] > 0, label
    assert outcomes.read["bit flip in the header"] == 0


def test_fuzz_memory_peak_is_bounded_by_the_file_size(outcomes):
    assert outcomes.worst_peak_ratio <= 1.0


def test_every_single_bit_flip_anywhere_in_a_file_is_detected(tmp_path):
    """Exhaustive over a small file: preamble, data sections, padding and header."""
    data = (GOLDEN_DIR / "v1.1" / "uniform-a4-g64-outliers.kvp").read_bytes()
    path = tmp_path / "flip.kvp"
    _, _, _, _, header_offset, _, _, _ = preamble_fields(data)
    owner = {}  # byte -> the section holding it
    for name, tensor in json.loads(header_json(data))["tensors"].items():
        for section, where in tensor["sections"].items():
            owner.update(
                {
                    b: f"section {section} of tensor {name!r}"
                    for b in range(where["offset"], where["offset"] + where["length"])
                }
            )
    detected = Counter()
    for byte in range(len(data)):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[byte] ^= 1 << bit
            path.write_bytes(bytes(mutated))
            with pytest.raises(FormatError) as info:
                read_everything(path)
            message = str(info.value)
            if byte in owner:  # inside a data section: always that section's own checksum
                assert isinstance(info.value, ChecksumMismatchError) and owner[byte] in message, (byte, message)
                region = "section"
            elif 64 <= byte < header_offset:
                assert "non-zero padding" in message, (byte, message)
                region = "padding"
            elif byte >= header_offset:
                assert isinstance(info.value, ChecksumMismatchError) and "header checksum" in message
                region = "header"
            else:
                region = "preamble"
            detected[(region, type(info.value).__name__)] += 1
    assert sum(detected.values()) == 8 * len(data)
    print(f"\nbit flips: {len(data)} bytes x 8 = {8 * len(data)}, all detected: {dict(detected)}")


def hostile_files(folder: Path) -> dict[str, Path]:
    """One file per bad-input class, for the CLI."""
    from kvpack.formats.constants import pack_preamble

    data = (GOLDEN_DIR / "v1.1" / "uniform-a3-g16.kvp").read_bytes()
    _, _, _, _, offset, _, crc, _ = preamble_fields(data)
    text = header_json(data)
    header = json.loads(text)
    fp4 = {n: {**t, "codec": t["codec"] and {**t["codec"], "method": "fp4"}} for n, t in header["tensors"].items()}
    past_end = json.loads(text)
    past_end["tensors"]["token_ids"]["sections"]["data"]["offset"] = 10**9
    cases = {
        "truncated": data[: len(data) // 2],
        "bit flip in a section": bytes(data[:100]) + bytes([data[100] ^ 4]) + data[101:],
        "huge header length": pack_preamble(1, 1, 1, offset, 2**63, crc) + data[64:],
        "newer major version": pack_preamble(2, 0, 1, offset, len(data) - offset, crc) + data[64:],
        "unknown codec": with_header(data, dumps({**header, "tensors": fp4})),
        "unknown codec, newer minor version": with_header(data, dumps({**header, "tensors": fp4}), version=(1, 4)),
        "section past the end": with_header(data, dumps(past_end)),
        "invalid UTF-8": with_header(data, b'{"metadata":{"\xff":"x"},"tensors":{}}'),
        "duplicate keys": with_header(data, text.replace('{"metadata":', '{"metadata":{},"metadata":', 1).encode()),
        "decompression bomb": with_header(data, zstandard.ZstdCompressor(level=19).compress(b" " * (70 << 20)), 1),
        "empty file": b"",
        "not a kvp file": b"PK\x03\x04" + data[4:],
    }
    paths = {}
    for index, (label, content) in enumerate(cases.items()):
        paths[label] = folder / f"hostile-{index}.kvp"
        paths[label].write_bytes(content)
    return paths


CLI_COMMANDS = ["inspect", "inspect-verify", "decompress", "stats"]


def cli_args(command: str, path: Path, out: Path) -> list[str]:
    """The arguments of one of CLI_COMMANDS reading ``path`` (``out``: where decompress writes)."""
    return {
        "inspect": ["inspect", str(path)],
        "inspect-verify": ["inspect", "--verify", str(path)],
        "decompress": ["decompress", str(path), "-o", str(out)],
        "stats": ["stats", str(path), str(path)],
    }[command]


@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_hostile_files_through_the_cli_give_one_line_and_exit_2(command, tmp_path, capsys):
    for label, path in hostile_files(tmp_path).items():
        out = tmp_path / "out.safetensors"
        code = main(cli_args(command, path, out))
        captured = capsys.readouterr()
        if code == 0:  # only possible where the damage is outside what the command reads
            assert command == "inspect" and label == "bit flip in a section", label
            continue
        lines = captured.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (label, captured.err)
        assert "Traceback" not in captured.err + captured.out
        assert not out.exists()


def test_hostile_file_through_a_real_subprocess(tmp_path):
    import subprocess
    import sys

    path = hostile_files(tmp_path)["section past the end"]
    result = subprocess.run(
        [sys.executable, "-m", "kvpack", "decompress", str(path), "-o", str(tmp_path / "o.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("hostile-")) == []


@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_harmless_mutants_through_the_cli_succeed_or_fail_in_one_line(outcomes, command, tmp_path, capsys):
    """Files the reader accepts (edited metadata, optional keys, odd but valid shapes) must not
    trip anything behind the reader: exit 0, or one error line and exit 2."""
    assert len(outcomes.readable) >= 20
    for index, data in enumerate(outcomes.readable):
        path = tmp_path / f"mutant-{index}.kvp"
        path.write_bytes(data)
        out = tmp_path / f"mutant-{index}.safetensors"
        code = main(cli_args(command, path, out))
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err + captured.out
        assert code == 0 or (code == 2 and len(captured.err.strip().splitlines()) == 1), (index, captured.err)


def test_empty_and_zero_width_tensors_through_stats(tmp_path, capsys):
    """A valid file whose K/V tensor has head_dim 0 (found by a review's CLI fuzzing: it crashed stats)."""
    import torch

    from kvpack import compress_tensors

    path = tmp_path / "zero.kvp"
    compress_tensors(
        {"layers.0.key": torch.zeros(1, 1, 1, 0), "token_ids": torch.zeros(1, 1, dtype=torch.int64)}, path, None
    )
    assert main(["stats", str(path), str(path)]) == 0
    assert "Traceback" not in capsys.readouterr().err


RSS_PROBE = """
import sys
from kvpack.errors import FormatError
from kvpack.formats.reader import KvpReader
from kvpack.restore.decode import read_tensor
import torch  # imported before the baseline: only what reading allocates counts
from kvpack.codecs import kernels  # numba too (the kernels come compiled from its disk cache, see the warm-up)


def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # reset the peak to the current resident size
base = peak_kib()
try:
    with KvpReader(sys.argv[1]) as reader:
        reader.verify()
        tensors = [read_tensor(reader, name) for name in reader.keys()]
    outcome = "read"
except FormatError as exc:
    outcome = "refused: " + str(exc)[-80:]
print(peak_kib() - base, outcome)
"""


def test_process_memory_for_worst_case_files_is_bounded(tmp_path):
    """Peak RSS growth (what tracemalloc cannot see: torch buffers) for the worst cases:
    1-bit codes decoded to float32 (plain, and through un-RoPE and a rotation, whose float64
    temporaries work piece by piece), and a small zstd header that inflates to the most JSON
    the limits allow. Bound: 128 x the file size + 64 MiB (docs/format.md section 9)."""
    import subprocess
    import sys

    import torch

    from kvpack import CodecConfig, compress_tensors
    from kvpack.formats.constants import pack_preamble

    one_bit = tmp_path / "one-bit.kvp"
    compress_tensors({"layers.0.key": torch.randn(1, 1, 512, 8192)}, one_bit, CodecConfig.build("uniform", 1, 8192))
    # random hex makes the frame big enough to allow a large expansion; then as much text and as
    # many JSON values (under a key the reader ignores) as the limits let through
    pad = os.urandom(150_000).hex()
    text = '{"metadata":{},"tensors":{},"pad":"' + pad + '","a":"' + "a" * 4_500_000 + '","x":['
    text += "[]," * 30_000 + "[]]}"
    raw = zstandard.ZstdCompressor(level=19).compress(text.encode())
    json_heavy = tmp_path / "json-heavy.kvp"
    json_heavy.write_bytes(pack_preamble(1, 1, 1, 64, len(raw), zlib.crc32(raw)) + raw)
    # the same with un-RoPE and a rotation, as one long sequence and as many one-token rows
    transformed = CodecConfig.build("uniform", 1, 1024, transforms={"rotate": "hadamard", "unrope": True})
    transformed = transformed.with_rope(tuple(0.9**i for i in range(512)), 1.0)
    long_rows = tmp_path / "one-bit-transformed-long.kvp"
    compress_tensors({"layers.0.key": torch.randn(1, 1, 4096, 1024)}, long_rows, transformed)
    many_rows = tmp_path / "one-bit-transformed-batch.kvp"
    compress_tensors({"layers.0.key": torch.randn(4096, 1, 1, 1024)}, many_rows, transformed)
    # warm-up: a plain file decoded once writes numba's disk cache of the kernels (compiling is not reading)
    warm = tmp_path / "warm.kvp"
    compress_tensors({"layers.0.key": torch.randn(1, 1, 16, 64)}, warm, CodecConfig.build("uniform", 1, 64))
    subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(warm)], capture_output=True, text=True, timeout=300, check=True
    )
    for path in (one_bit, json_heavy, long_rows, many_rows):
        result = subprocess.run(
            [sys.executable, "-c", RSS_PROBE, str(path)], capture_output=True, text=True, timeout=300, check=True
        )
        grown_kib, outcome = result.stdout.split(" ", 1)
        size = path.stat().st_size
        print(f"\n{path.name}: {size:,} bytes, peak RSS grew {int(grown_kib) * 1024:,} bytes, {outcome.strip()}")
        assert int(grown_kib) * 1024 <= 128 * size + (64 << 20)
