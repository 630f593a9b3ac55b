"""Codec defaults: which transforms measure best per codec, and whether est. KL ranks codecs as the model does.

``texts``: writes the two non-WikiText texts: Python source (the standard library's ``argparse.py``
and ``json/decoder.py``, as this interpreter has them) and license prose (``--prose``, default the
GPL-3 and Apache-2.0 texts of ``/usr/share/common-licenses``). ``quality``: for each text, runs
``kvpack sweep`` over ``bench/defaults.toml`` (2 windows, prefix 1024, continuation 256; reference
the fp16 cache). ``weighted``: dumps the same windows' prefix caches and compresses each with every
run's codec, reporting est. KL (the profile-weighted error, :mod:`kvpack.weighted_error`) and
relative MSE beside the measured KL, with their rank correlations. Needs the model's profile
(``kvpack calibrate``; ``--profile`` or the profile directory).

    .venv/bin/python bench/defaults.py texts
    .venv/bin/python bench/defaults.py quality
    .venv/bin/python bench/defaults.py weighted --profile PROFILE
"""

from __future__ import annotations

import argparse
import json
import json.decoder
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "defaults"
TEXTS = ("code", "prose")
PROSE = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0")
EVAL = "\n[eval]\ntext_file = {text!r}\nprefix = 1024\ncontinuation = 256\nwindows = 2\n"


def write_texts(prose: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    sources = (argparse.__file__, json.decoder.__file__)
    (RESULTS / "code.txt").write_text("".join(Path(p).read_text() for p in sources))
    (RESULTS / "prose.txt").write_text("".join(Path(p).read_text() for p in prose))


def sweep_config(text: str) -> Path:
    config = RESULTS / f"{text}.toml"
    table = EVAL.format(text=str(RESULTS / f"{text}.txt")).replace("'", '"')
    body = (HERE / "defaults.toml").read_text().replace("baselines = []\n", "baselines = []\n" + table, 1)
    config.write_text(body)
    return config


def quality() -> None:
    for text in TEXTS:
        out = RESULTS / text
        subprocess.run(
            [
                sys.executable,
                "-m",
                "kvpack",
                "sweep",
                "--config",
                str(sweep_config(text)),
                "--output-dir",
                str(out),
                "--force",
            ],
            check=True,
        )


def weighted(profile_path: str | None) -> None:
    import numpy as np
    from scipy.stats import spearmanr

    from kvpack.compress import compress_file
    from kvpack.evaluation.sweep import load_sweep_config
    from kvpack.formats.safetensors_io import write_safetensors
    from kvpack.model.dump import dump_tokens, load_model, model_identity, tokenize
    from kvpack.profile import find_profile

    loaded = load_model()
    identity = model_identity(loaded.model, loaded.name, loaded.gguf_file)
    profile = find_profile(identity["weights_fingerprint"], model=identity["model"], path=profile_path)
    rows = []
    for text in TEXTS:
        sweep = load_sweep_config(sweep_config(text))
        measured = {m["label"]: m for m in json.loads((RESULTS / text / "results.json").read_text())["methods"]}
        ids = tokenize(loaded.tokenizer, Path(sweep.text_file).read_text())
        caches = []
        for window, offset in enumerate(sweep.protocol.offsets(ids.shape[1])):
            path = RESULTS / f"{text}.window{window}.safetensors"
            tensors, metadata = dump_tokens(loaded.model, ids[:, offset : offset + sweep.protocol.prefix])
            write_safetensors(path, tensors, {**identity, **metadata}, force=True)
            caches.append(path)
        for method in sweep.methods:
            reports = [
                compress_file(path, RESULTS / "scratch.kvp", method.config, force=True, profile=profile)["rows"]["all"]
                for path in caches
            ]
            m = measured[method.label]
            rows.append(
                {
                    "text": text,
                    "label": method.label,
                    "estimated_kl": float(np.mean([r["estimated_kl"] for r in reports])),
                    "rel_mse": float(np.mean([r["rel_mse"] for r in reports])),
                    "kl": m["kl_mean"],
                    "delta_ppl_pct": m["delta_ppl_pct"],
                    "file_bits": m["effective_bits_per_element"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        for path in caches:
            path.unlink()
    (RESULTS / "scratch.kvp").unlink(missing_ok=True)
    kl = [r["kl"] for r in rows]
    summary = {
        "profile": profile.fingerprint,
        "spearman_estimated_kl": float(spearmanr([r["estimated_kl"] for r in rows], kl)[0]),
        "spearman_rel_mse": float(spearmanr([r["rel_mse"] for r in rows], kl)[0]),
        "rows": rows,
    }
    (RESULTS / "weighted.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    texts = sub.add_parser("texts")
    texts.add_argument("--prose", nargs="+", default=list(PROSE))
    sub.add_parser("quality")
    weigh = sub.add_parser("weighted")
    weigh.add_argument("--profile", default=None)
    args = parser.parse_args()
    if args.command == "texts":
        write_texts(args.prose)
    elif args.command == "quality":
        quality()
    else:
        weighted(args.profile)


if __name__ == "__main__":
    main()
