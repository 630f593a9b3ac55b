"""Coverage-guided fuzzing of the ``.kvp`` reader with atheris (libFuzzer for Python).

Each input is read twice: as it is, and after :func:`fix_checksums` recomputed every CRC-32
(preamble, header, and each section the header names), so mutations also reach the header
validation and the decoders behind the checksums instead of stopping at them.

Transform-codec entries (format 1.6) decode with a calibration profile: the one the file embeds,
else the golden files' (``tests/golden/v1.6/transform-profile.safetensors``); an
:class:`~kvpack.errors.InvalidInputError` saying the file names another profile is a refusal too.

Any other exception than :class:`kvpack.errors.FormatError` is a crash and stops the run
with the input saved as ``crash-*`` in the working folder. The corpus starts from the golden
files. Run by hand (it is not part of CI)::

    .venv/bin/pip install -e '.[fuzz]'
    mkdir -p /tmp/kvp-corpus && cp tests/golden/v*/*.kvp /tmp/kvp-corpus/
    .venv/bin/python fuzz/fuzz_reader.py /tmp/kvp-corpus -max_total_time=600 -rss_limit_mb=2048

Results of past runs are in docs/fuzzing.md.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import zlib
from pathlib import Path

import atheris
import zstandard

with atheris.instrument_imports():
    from kvpack.errors import FormatError, InvalidInputError
    from kvpack.formats.constants import PREAMBLE, pack_preamble
    from kvpack.formats.reader import KvpReader
    from kvpack.profile import load_profile
    from kvpack.restore.decode import read_tensor
    from kvpack.restore.profiles import PROFILE_TENSOR, attach_profile
    from kvpack.restore.streaming import verify_entries

_FD, _PATH = tempfile.mkstemp(suffix=".kvp")
os.close(_FD)
#: The calibration profile of the golden transform-codec files that do not embed one.
_PROFILE = load_profile(
    Path(__file__).resolve().parents[1] / "tests" / "golden" / "v1.6" / "transform-profile.safetensors"
)


def fix_checksums(data: bytes) -> bytes:
    """``data`` with every CRC-32 recomputed where the structure allows (else unchanged)."""
    if len(data) < 64:
        return data
    try:
        _, major, minor, flags, offset, length, _, _ = PREAMBLE.unpack(data[:64])
        raw = data[offset : offset + length]
        text = zstandard.ZstdDecompressor().decompress(raw, max_output_size=1 << 20) if flags & 1 else raw
        header = json.loads(text)
        for tensor in header["tensors"].values():
            for section in tensor["sections"].values():
                start = section["offset"]
                section["crc32"] = zlib.crc32(data[start : start + min(section["length"], len(data))])
        raw = json.dumps(header).encode()
        if flags & 1:
            raw = zstandard.ZstdCompressor().compress(raw)
    except Exception:  # not structured enough to repair: only the preamble and header CRCs
        raw = data[offset : offset + length] if len(data) >= 64 else b""
    return pack_preamble(major, minor, flags, offset, len(raw), zlib.crc32(raw)) + data[64:offset] + raw


def read_everything(data: bytes) -> None:
    with open(_PATH, "wb") as handle:
        handle.write(data)
    try:
        with KvpReader(_PATH) as reader:
            try:  # the embedded profile, else the golden one (§6.5)
                attach_profile(reader, None if PROFILE_TENSOR in reader.keys() else _PROFILE)
            except InvalidInputError as exc:
                if "profile" not in str(exc):
                    raise
                return
            verify_entries(reader)  # the path of inspect --verify: every section checked, every entry decoded
            for name in reader.keys():
                read_tensor(reader, name)  # the path of load_kvp / stats: whole tensors
    except FormatError:
        pass


def test_one_input(data: bytes) -> None:
    read_everything(data)
    read_everything(fix_checksums(data))


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    try:
        atheris.Fuzz()
    finally:
        os.unlink(_PATH)
