"""How each codec treats every group's largest-magnitude key value (the outlier channels).

Compresses the keys of a real SmolLM2 cache at 4 bits, group 64, and reports the mean
relative change of each group's largest |x| and the MSE at that position versus overall.

    .venv/bin/python bench/extremes.py CACHE.safetensors   (e.g. from `kvpack dump -o CACHE.safetensors`)
"""

import sys
import tempfile
from pathlib import Path

import torch

from kvpack.compress import compress_tensors
from kvpack.config import CodecConfig
from kvpack.formats.safetensors_io import SafetensorsSource
from kvpack.restore.files import load_kvp


def main() -> None:
    source = SafetensorsSource(sys.argv[1])
    layers = sum(1 for name in source.keys() if name.endswith(".key"))
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("uniform", "normal", "adaptive"):
            config = CodecConfig.build(method, 4, 64, **({"normalization": "minmax"} if method == "normal" else {}))
            shrink, err_top, err_all = [], [], []
            for i in range(layers):
                name = f"layers.{i}.key"
                x = source.get(name)
                compress_tensors({name: x}, Path(tmp) / "k.kvp", config, {}, force=True)
                y = load_kvp(Path(tmp) / "k.kvp")[0][name].float()
                groups = x.float().permute(0, 2, 1, 3).reshape(-1, 64)
                restored = y.permute(0, 2, 1, 3).reshape(-1, 64)
                where = groups.abs().argmax(1, keepdim=True)
                top, top_hat = groups.gather(1, where), restored.gather(1, where)
                shrink.append(((top_hat.abs() - top.abs()) / top.abs()).mean())
                err_top.append(((top_hat - top) ** 2).mean())
                err_all.append(((restored - groups) ** 2).mean())
            print(
                f"{config.describe()}: largest |x| of each group changes by {float(torch.stack(shrink).mean()):+.4f} "
                f"(relative, mean); MSE there {float(torch.stack(err_top).mean()):.3e}, "
                f"overall {float(torch.stack(err_all).mean()):.3e}"
            )


if __name__ == "__main__":
    main()
