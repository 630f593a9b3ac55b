"""The size report (kvpack.report): every byte of the file accounted for by section kind."""

import pytest

from kvpack.compress import compress_tensors
from kvpack.config import CodecConfig
from kvpack.formats.entropy import EntropyConfig


def config(method="uniform", bits=4, group_size=64, ratio=0.0, **transforms):
    return CodecConfig.build(method, bits, group_size, ratio, transforms=transforms)


@pytest.mark.model
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
