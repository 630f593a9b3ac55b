"""Quality evaluation: what a codec's cache error does to a model's next-token predictions.

Protocol (``docs/benchmarks.md`` gives the numbers; ``../shared/BASELINES.md`` follows it):

1. Tokenize the text without special tokens (N tokens). Window ``i`` (``i = 0 .. W-1``)
   starts at token ``i * (N // W)`` and spans ``prefix + continuation + 1`` tokens; windows
   never overlap.
2. Run the prefix through the model with the cache enabled. The reference cache is that
   cache cast to float16 (what a plain ``kvpack dump`` keeps).
3. Feed the ``continuation`` tokens through (a) the reference cache and (b) each method's
   reconstruction of it (teacher forcing). Continuation position ``t`` predicts token
   ``prefix + t + 1`` of the window, so every window has ``continuation`` targets.
4. Pooled over all targets of all windows: perplexity with the reference cache
   (``ppl_ref``) and with the method (``ppl``), ``delta_ppl_pct = 100 (ppl / ppl_ref - 1)``,
   the mean KL(ref ‖ method) of the next-token distributions in nats, and top-1 agreement.
5. Bits per element of a codec come from the real ``.kvp`` written for each window (file
   size × 8 / K-V elements, all metadata included); a baseline counts its stored bits.
6. Attention-output error per layer: with the reference run's queries ``q`` of the
   continuation (captured in the attention call, after RoPE), over the prefix cache only,
   ``||softmax(s·qKᵀ)V − softmax(s·qK̂ᵀ)V̂||_F / ||softmax(s·qKᵀ)V||_F`` pooled over windows
   (``s`` the layer's attention scaling; softcapping and sliding windows are ignored here).

Everything runs in the model's dtype on its device with fixed seeds and is deterministic.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvpack.allocation.importance import attention_statistics
from kvpack.allocation.solver import Allocation
from kvpack.compress import compress_tensors, with_model_profile
from kvpack.config import CodecConfig
from kvpack.errors import InvalidInputError
from kvpack.evaluation.baselines import KIVI_GROUP, get_baseline
from kvpack.metrics import ErrorAccumulator
from kvpack.model.cache import build_cache, cache_tensors, layer_pairs, unwrap_model
from kvpack.model.dump import (
    cache_keyword,
    check_codec_fits,
    kv_head_shape,
    output_cache,
    rope_for_cache,
    weights_fingerprint,
)
from kvpack.model.queries import QueryCapture
from kvpack.model.rotary import RotaryCapture
from kvpack.names import parse_kv_name
from kvpack.restore.files import load_kvp

FP16 = "fp16"  # the lossless float16 file: the reference itself, through a real .kvp
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class EvalProtocol:
    """Window sizes of the evaluation, in tokens.

    Raises:
        InvalidInputError: a size below 1.
    """

    prefix: int = 1024
    continuation: int = 256
    windows: int = 8
    #: last prefix positions whose queries give the attention statistics of allocations
    stats_queries: int = 64

    def __post_init__(self) -> None:
        for name in ("prefix", "continuation", "windows", "stats_queries"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")

    @property
    def window_tokens(self) -> int:
        return self.prefix + self.continuation + 1

    def offsets(self, n_tokens: int) -> list[int]:
        """Start token of each window: ``i * (n_tokens // windows)``.

        Raises:
            InvalidInputError: the text is too short for non-overlapping windows.
        """
        stride = n_tokens // self.windows
        if stride < self.window_tokens:
            raise InvalidInputError(
                f"the text has {n_tokens:,} tokens; {self.windows} windows of {self.prefix} + "
                f"{self.continuation} + 1 tokens need {self.windows * self.window_tokens:,}. "
                "Use a longer text or fewer/shorter windows (`windows`, `prefix`, `continuation`)"
            )
        return [index * stride for index in range(self.windows)]


@dataclass(frozen=True)
class EvalMethod:
    """One method under evaluation: a codec config, ``fp16`` (lossless file) or a baseline name."""

    label: str
    config: CodecConfig | None = None
    baseline: str | None = None
    allocation: Allocation | None = None

    @classmethod
    def codec(cls, config: CodecConfig, label: str | None = None, allocation: Allocation | None = None) -> EvalMethod:
        return cls(label or codec_label(config, allocation), config=config, allocation=allocation)

    @classmethod
    def named_baseline(cls, name: str) -> EvalMethod:
        """``fp16`` or a name from :data:`kvpack.evaluation.baselines.BASELINES`.

        Raises:
            InvalidInputError: unknown name.
        """
        if name != FP16:
            get_baseline(name)
        return cls(name, baseline=name)

    def describe(self) -> dict[str, Any]:
        if self.config is None:
            return {"label": self.label, "kind": "baseline", "method": self.baseline}
        allocation = {} if self.allocation is None else {"allocation": dataclasses.asdict(self.allocation)}
        return {"label": self.label, "kind": "codec", **self.config.to_dict(), **allocation}


def codec_label(config: CodecConfig, allocation: Allocation | None = None) -> str:
    """Short label of a codec config (:meth:`CodecConfig.label`), e.g. ``uniform-4 g64``, with
    its allocation (:meth:`Allocation.label`), e.g. ``uniform-4 g64 target2.5``."""
    return config.label() + ("" if allocation is None else " " + allocation.label())


def attention_output(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """``softmax(scaling · q kᵀ) v`` with grouped-query heads; all float32.

    Args:
        query: ``(batch, num_heads, q_len, head_dim)``.
        key, value: ``(batch, num_kv_heads, kv_len, head_dim)``; ``num_heads`` a multiple of ``num_kv_heads``.

    Returns:
        ``(batch, num_heads, q_len, head_dim)``.
    """
    repeat = query.shape[1] // key.shape[1]
    key = key.to(torch.float32).repeat_interleave(repeat, dim=1)
    value = value.to(torch.float32).repeat_interleave(repeat, dim=1)
    weights = torch.softmax(query @ key.transpose(-1, -2) * scaling, dim=-1)
    return weights @ value


# --- accumulating results ---------------------------------------------------------------


@dataclass
class _Totals:
    n_layers: int
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    targets: int = 0
    stored_bits: float = 0.0  # dense: every section densely packed (comparable with counted baselines)
    effective_bits: float = 0.0  # what the file stores, after the entropy stage
    elements: int = 0
    seconds: float = 0.0
    attn_err: list[float] = field(default_factory=list)
    attn_ref: list[float] = field(default_factory=list)
    errors: dict[str, ErrorAccumulator] = field(
        default_factory=lambda: {"key": ErrorAccumulator(), "value": ErrorAccumulator()}
    )

    def __post_init__(self) -> None:
        self.attn_err = [0.0] * self.n_layers
        self.attn_ref = [0.0] * self.n_layers


def _reconstruct(
    method: EvalMethod,
    tensors: dict[str, torch.Tensor],
    workdir: Path,
    stats: dict[str, torch.Tensor] | None = None,
    rope: dict[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], float, float]:
    """``(reconstructed K/V tensors, dense bits, effective bits)`` of a method applied to the
    reference cache (``stats``: attention statistics of the prefix, for allocations; ``rope``: each
    layer's rotary parameters, for un-RoPE, :func:`~kvpack.model.dump.rope_for_cache`). Dense bits
    count every section of the file densely packed (header included), as the counted baselines
    count their numbers; effective bits are the file's size after the entropy stage (format 1.5)."""
    if method.config is not None or method.baseline == FP16:
        path = workdir / "window.kvp"
        entries = compress_tensors(
            tensors, path, method.config, {}, force=True, allocation=method.allocation, stats=stats, rope=rope
        )
        effective = path.stat().st_size * 8
        dense = effective + 8 * sum(e.dense_bytes - e.stored_bytes for e in entries)
        restored, _ = load_kvp(path, profile=method.config.profile if method.config is not None else None)
        path.unlink()
        return restored, float(dense), float(effective)
    baseline = get_baseline(method.baseline)
    restored, bits = {}, 0
    for name, x in tensors.items():
        restored[name], stored = baseline.reconstruct(name, x)
        bits += stored
    return restored, float(bits), float(bits)


def check_methods(model: Any, methods: list[EvalMethod]) -> list[EvalMethod]:
    """Refuse, before any work, a method that cannot encode this model's K/V tensors.

    Returns:
        The methods (codecs that un-RoPE keys take each layer's rotary parameters from the run
        over each window's prefix).

    Raises:
        InvalidInputError: a group size that does not divide ``num_kv_heads * head_dim``,
            or a KIVI baseline on a ``head_dim`` that is not a multiple of 32.
    """

    lm = unwrap_model(model)[0]
    head_dim = kv_head_shape(lm)[1]
    checked = []
    for method in methods:
        if method.config is not None:
            try:
                config = check_codec_fits(lm, method.config)
                if config.whole_tensor and config.profile is None:  # the model's profile from the profile directory
                    config = with_model_profile(config, {"weights_fingerprint": weights_fingerprint(lm)})
                method = dataclasses.replace(method, config=config)
            except InvalidInputError as exc:
                raise InvalidInputError(f"{method.label}: {exc}") from None
        elif (method.baseline or "").startswith("kivi") and head_dim and head_dim % KIVI_GROUP:
            raise InvalidInputError(f"{method.label}: KIVI needs head_dim divisible by {KIVI_GROUP}, got {head_dim}")
        checked.append(method)
    return checked


def _continue(lm: Any, tensors: dict[str, torch.Tensor], tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """Log-probabilities ``(continuation, vocab)`` float32 of ``tokens`` fed through a cache of ``tensors``."""

    param = next(lm.parameters())
    cache = build_cache(layer_pairs(tensors), lm, prefix, param.device, param.dtype)
    logits = lm(input_ids=tokens.to(param.device), use_cache=True, **{cache_keyword(lm): cache}).logits[0]
    return torch.log_softmax(logits.to(torch.float32), dim=-1)


@torch.no_grad()
def evaluate(
    model: Any,
    token_ids: torch.Tensor,
    methods: list[EvalMethod],
    protocol: EvalProtocol | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the protocol above for every method on the same windows.

    Args:
        model: a transformers causal LM or a :class:`~kvpack.model.dump.LoadedModel`.
        token_ids: int64 ``(1, n_tokens)`` or ``(n_tokens,)``, the tokenized text.
        methods: what to evaluate; labels must be unique.
        protocol: window sizes (default prefix 1024, continuation 256, 8 windows).
        progress: called with ``(done, total, label)`` after each step.

    Returns:
        ``{"ppl_ref", "targets", "protocol": {..., "offsets"}, "n_tokens", "methods": [...]}``;
        each method has ``label``, ``config``, ``bits_per_element``, ``ppl``,
        ``delta_ppl_pct``, ``kl_mean`` (nats), ``top1_agreement_pct``, ``rel_mse_key``,
        ``rel_mse_value``, ``attention_error`` (one value per layer),
        ``attention_error_mean`` and ``seconds``.

    Raises:
        InvalidInputError: no methods, duplicate labels, or a text too short for the windows.
    """

    protocol = protocol or EvalProtocol()
    lm = unwrap_model(model)[0]
    if not methods:
        raise InvalidInputError("nothing to evaluate: give at least one method")
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise InvalidInputError(f"method labels must be unique: {labels}")
    ids = torch.as_tensor(token_ids).reshape(1, -1).to(torch.int64)
    offsets = protocol.offsets(ids.shape[1])
    methods = check_methods(lm, methods)
    torch.manual_seed(0)
    totals: dict[str, _Totals] = {}
    ref_nll, n_targets = 0.0, 0
    steps, done = len(offsets) * (1 + len(methods)), 0
    started = time.perf_counter()
    # what a user's dump would hold: attention statistics only for the allocators that use them
    allocating = any(m.allocation is not None and not m.config.whole_tensor for m in methods)
    unroping = any(m.config is not None and m.config.unrope and m.config.rope_inv_freq is None for m in methods)
    with tempfile.TemporaryDirectory(prefix="kvpack-eval-") as tmp, QueryCapture(lm) as capture:
        for window, offset in enumerate(offsets):
            prefix = ids[:, offset : offset + protocol.prefix]
            tokens = ids[:, offset + protocol.prefix : offset + protocol.prefix + protocol.continuation]
            targets = ids[0, offset + protocol.prefix + 1 : offset + protocol.window_tokens]
            device = next(lm.parameters()).device
            capture.recording, capture.keep_last = allocating, protocol.stats_queries
            with RotaryCapture(lm) as rotary:
                out = lm(input_ids=prefix.to(device), use_cache=True, logits_to_keep=1)
            capture.recording, capture.keep_last = False, None
            reference = cache_tensors(output_cache(out), torch.float16)
            del out
            # each layer's rotary parameters as this prefix used them, for the codecs that un-RoPE keys
            rope = None
            if unroping:  # sliding-window layers hold the last tokens: their positions follow from seq_len
                rope = {**rope_for_cache(lm, prefix, rotary, len(reference) // 2), "seq_len": str(prefix.shape[1])}
            stats = {}
            if allocating:  # what dump --attention-stats records, from this prefix
                pairs = layer_pairs(reference)
                stats = attention_statistics(capture.take(), {i: k for i, (k, _) in enumerate(pairs)})
            if not all(bool(torch.isfinite(t).all()) for t in reference.values()):
                raise InvalidInputError(
                    f"window {window}: the prefix cache overflows float16 (the reference); this model's cache "
                    "cannot be evaluated against an fp16 reference"
                )
            capture.recording = True
            ref_logp = _continue(lm, reference, tokens, protocol.prefix)
            capture.recording = False
            queries = capture.take()
            targets = targets.to(ref_logp.device)
            ref_nll += float(-ref_logp.gather(1, targets[:, None]).sum())
            n_targets += targets.numel()
            ref_top1 = ref_logp.argmax(dim=-1)
            ref_prob = ref_logp.exp()
            pairs = layer_pairs(reference)
            ref_attn = {
                layer: attention_output(q, pairs[layer][0], pairs[layer][1], scale)
                for layer, (q, scale) in queries.items()
            }
            done += 1
            if progress:
                progress(done, steps, f"window {window + 1}/{len(offsets)} reference")
            for method in methods:
                tick = time.perf_counter()
                total = totals.setdefault(method.label, _Totals(len(pairs)))
                restored, bits, effective = _reconstruct(method, reference, Path(tmp), stats, rope)
                logp = _continue(lm, restored, tokens, protocol.prefix)
                total.nll += float(-logp.gather(1, targets[:, None]).sum())
                total.kl += float((ref_prob * (ref_logp - logp)).sum())
                total.agree += int((logp.argmax(dim=-1) == ref_top1).sum())
                total.targets += targets.numel()
                total.stored_bits += bits
                total.effective_bits += effective
                total.elements += sum(t.numel() for t in reference.values())
                restored_pairs = layer_pairs(restored)
                for layer, (q, scale) in queries.items():
                    approx = attention_output(q, restored_pairs[layer][0], restored_pairs[layer][1], scale)
                    total.attn_err[layer] += float((approx - ref_attn[layer]).pow(2).sum())
                    total.attn_ref[layer] += float(ref_attn[layer].pow(2).sum())
                for name, x in reference.items():
                    total.errors[parse_kv_name(name)[1]].add(x, restored[name])
                total.seconds += time.perf_counter() - tick
                done += 1
                if progress:
                    progress(done, steps, f"window {window + 1}/{len(offsets)} {method.label}")
    ppl_ref = math.exp(ref_nll / n_targets)
    return {
        "ppl_ref": ppl_ref,
        "targets": n_targets,
        "n_tokens": int(ids.shape[1]),
        "protocol": {
            "prefix": protocol.prefix,
            "continuation": protocol.continuation,
            "windows": protocol.windows,
            "offsets": offsets,
        },
        "seconds": time.perf_counter() - started,
        "methods": [_result(method, totals[method.label], ppl_ref) for method in methods],
    }


def _result(method: EvalMethod, total: _Totals, ppl_ref: float) -> dict[str, Any]:
    ppl = math.exp(total.nll / total.targets)
    attention = [
        math.sqrt(err / ref) if ref > 0 else 0.0 for err, ref in zip(total.attn_err, total.attn_ref, strict=True)
    ]
    return {
        "label": method.label,
        "config": method.describe(),
        # dense bits: the real .kvp with every section densely packed (header included), so kvpack's
        # methods compare with the counted baselines and the field's numbers on the same footing
        "bits_per_element": total.stored_bits / total.elements,
        # after the entropy stage (format 1.5): the size of the real file; counted baselines: the same
        "effective_bits_per_element": total.effective_bits / total.elements,
        # "file": from the real .kvp (header included); "count": the baseline's stored numbers
        "bits_source": "file" if method.config is not None or method.baseline == FP16 else "count",
        "ppl": ppl,
        "delta_ppl_pct": 100.0 * (ppl / ppl_ref - 1.0),
        "kl_mean": total.kl / total.targets,
        "top1_agreement_pct": 100.0 * total.agree / total.targets,
        "rel_mse_key": total.errors["key"].result()["rel_mse"],
        "rel_mse_value": total.errors["value"].result()["rel_mse"],
        "attention_error": attention,
        "attention_error_mean": sum(attention) / len(attention) if attention else 0.0,
        "seconds": total.seconds,
    }
