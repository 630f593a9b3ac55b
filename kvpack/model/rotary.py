"""Which rotary parameters each attention layer of a transformers model applies to its keys, read while it runs.

transformers computes RoPE's cos / sin in a module whose class name ends in ``RotaryEmbedding``
(one per model, one per layer type such as Gemma 3's ``sliding_attention`` / ``full_attention``
buffers ``{type}_inv_freq``, or several modules in older releases) and hands them to every
attention layer as ``position_embeddings``. :class:`RotaryCapture` hooks both ends: each call of
a rotary module records the frequencies and scaling it used *at that call* (dynamic NTK and
LongRoPE change them with the sequence length) and checks that its cos / sin follow from them,
and each module with a ``layer_idx`` records which call's output it received.

Which channels the attention pairs is decided in its own code (GLM emits Llama's cos layout and
rotates interleaved pairs), so :func:`rotary_layers` also runs a probe: the same few tokens at
positions ``0..n-1`` and ``s..s+n-1``. Attention scores depend on relative positions only, so
every layer's pre-RoPE keys are the same in both runs and its cached keys differ by the rotation
of ``s`` positions alone; the layout (``rotate_half``, ``interleaved``, or none at all for NoPE
layers) is the one that maps the first run's keys onto the second's.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch

from kvpack.errors import InvalidInputError
from kvpack.transforms.rope import INTERLEAVED, LAYOUTS, ROTATE_HALF, RopeSpec, rotate_keys

ROTARY_CLASS_SUFFIX = "RotaryEmbedding"
PROBE_TOKENS = 8
#: Positions the second probe run is moved by (small: dynamic RoPE variants keep their base frequencies).
PROBE_SHIFT = 5
#: Largest relative error ``||predicted - keys|| / ||keys||`` of the layout the probe accepts
#: (float32 models: ~1e-6; bfloat16: ~1e-2; a wrong layout: ~0.3 and more).
PROBE_TOLERANCE = 0.05
NO_ROPE = "none"
#: forward(token ids (1, n), position ids (1, n) or None) -> the cached keys of every layer.
Forward = Callable[[torch.Tensor, torch.Tensor | None], list[torch.Tensor]]


class RotaryCapture:
    """Records, during forward passes of ``model``, the rotary parameters each cache layer receives.

    A context manager; hooks are removed on exit. :meth:`layer_specs` gives the result.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._records: dict[RopeSpec | str, int] = {}  # distinct call results -> index
        self._outputs: dict[int, tuple[weakref.ref, int]] = {}  # id(cos) -> (its tensor, record index)
        self._layers: dict[int, set[int]] = {}  # layer_idx -> record indices (-1: an unknown source)
        self._handles: list[Any] = []
        self._rotary_modules = 0

    def __enter__(self) -> RotaryCapture:
        for module in self.model.modules():
            if type(module).__name__.endswith(ROTARY_CLASS_SUFFIX):
                self._rotary_modules += 1
                self._handles.append(module.register_forward_hook(self._rotary_call, with_kwargs=True))
            elif type(getattr(module, "layer_idx", None)) is int:
                self._handles.append(module.register_forward_pre_hook(self._layer_call, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _rotary_call(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        cos = output[0] if isinstance(output, (tuple, list)) and output else output
        if not isinstance(cos, torch.Tensor):
            return
        record = _call_spec(module, args, kwargs, output)
        index = self._records.setdefault(record, len(self._records))
        self._outputs = {key: value for key, value in self._outputs.items() if value[0]() is not None}
        self._outputs[id(cos)] = (weakref.ref(cos), index)

    def _layer_call(self, module: Any, args: tuple, kwargs: dict) -> None:
        embeddings = kwargs.get("position_embeddings")
        if embeddings is None:  # passed by position: an argument that is a recorded rotary output
            embeddings = next((a for a in args if self._index_of(a) is not None), None)
            if embeddings is None:
                return
        index = self._index_of(embeddings)
        self._layers.setdefault(module.layer_idx, set()).add(-1 if index is None else index)

    def _index_of(self, embeddings: Any) -> int | None:
        """The record of the rotary call that returned ``embeddings`` (``(cos, sin)`` or a tensor), if any."""
        cos = embeddings[0] if isinstance(embeddings, (tuple, list)) and embeddings else embeddings
        found = self._outputs.get(id(cos))
        return found[1] if found is not None and found[0]() is cos else None

    def layer_specs(self, num_layers: int) -> list[RopeSpec | str]:
        """Per cache layer ``0..num_layers-1``: the :class:`RopeSpec` it received in every recorded
        call (its layout read from the cos / sin), or a one-line reason why there is none."""
        records = {index: record for record, index in self._records.items()}
        result: list[RopeSpec | str] = []
        for layer in range(num_layers):
            seen = self._layers.get(layer, set())
            if not self._rotary_modules:
                result.append(f"the model has no rotary embedding module (a class named *{ROTARY_CLASS_SUFFIX})")
            elif not seen:
                result.append("its attention received no rotary embedding (`position_embeddings`)")
            elif -1 in seen:
                result.append(f"its `position_embeddings` come from no *{ROTARY_CLASS_SUFFIX} module kvpack can read")
            else:
                distinct = {records[index] for index in seen}
                reasons = [r for r in distinct if isinstance(r, str)]
                if reasons:
                    result.append(reasons[0])
                elif len(distinct) > 1:
                    result.append(
                        "its rotary frequencies changed during the prefill (dynamic RoPE past the model's original "
                        "context), so no single set undoes it"
                    )
                else:
                    result.append(distinct.pop())
        return result


def _call_spec(module: Any, args: tuple, kwargs: dict, output: Any) -> RopeSpec | str:
    """The spec a rotary module's call used, with the layout of its cos / sin, or why it is unreadable."""
    name = type(module).__name__
    positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
    layer_type = kwargs.get("layer_type", args[2] if len(args) > 2 else None)
    prefix = f"{layer_type}_" if isinstance(layer_type, str) else ""
    inv_freq = getattr(module, prefix + "inv_freq", None)
    scaling = getattr(module, prefix + "attention_scaling", None)
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.ndim != 1 or not isinstance(positions, torch.Tensor):
        return f"its rotary module {name} holds no inv_freq kvpack can read"
    if not isinstance(output, (tuple, list)) or len(output) != 2:
        return f"its rotary module {name} does not return (cos, sin)"
    try:
        spec = RopeSpec(tuple(inv_freq.detach().to("cpu", torch.float32).tolist()), 1.0 if scaling is None else scaling)
    except InvalidInputError as exc:
        return f"its rotary module {name}: {exc}"
    layout = _output_layout(spec, positions, output[0], output[1])
    if layout is None:
        return (
            f"the cos / sin of its rotary module {name} do not follow from its inv_freq (a variant kvpack cannot undo)"
        )
    return dataclasses.replace(spec, layout=layout)


def _output_layout(spec: RopeSpec, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """The layout ``cos`` / ``sin`` are laid out for, from ``c = cos(p * inv_freq) * scaling`` (angles rounded to
    float32 as transformers does): ``[c, c]`` rotate_half, each value twice interleaved, ``c`` alone
    (GPT-OSS: the attention pairs the halves) rotate_half; None when they follow from none of these."""
    half = len(spec.inv_freq)
    if positions.ndim != 2 or cos.ndim != 3 or cos.shape != sin.shape or cos.shape[-1] not in (half, 2 * half):
        return None
    if cos.shape[1] != positions.shape[1] or cos.shape[0] not in (1, positions.shape[0]) or not cos.is_floating_point():
        return None
    angles = positions.detach().to("cpu", torch.float32)[..., None] * torch.tensor(spec.inv_freq, dtype=torch.float32)
    scale = spec.attention_scaling
    expected = (torch.cos(angles.double()) * scale, torch.sin(angles.double()) * scale)
    got = (cos.detach().to("cpu", torch.float64), sin.detach().to("cpu", torch.float64))
    tolerance = scale * (torch.finfo(cos.dtype).eps + 1e-6)
    widen = {
        ROTATE_HALF: lambda t: t if cos.shape[-1] == half else torch.cat([t, t], -1),
        INTERLEAVED: lambda t: t.repeat_interleave(2, -1),
    }
    for layout, widened in widen.items():
        if all(
            g.shape == widened(e).shape and float((g - widened(e)).abs().max()) <= tolerance
            for g, e in zip(got, expected, strict=True)
        ):
            return layout
    return None


def rotary_layers(
    model: Any, token_ids: torch.Tensor, forward: Forward, capture: RotaryCapture | None = None, num_layers: int = 0
) -> list[RopeSpec | str]:
    """Per cache layer, the rotary parameters that undo its keys exactly, or why there are none.

    Args:
        model: a transformers causal LM.
        token_ids: int64 ``(batch, seq_len)``; the probe runs on the first ``PROBE_TOKENS``.
        forward: runs the model (see :data:`Forward`).
        capture: what the forward pass that made the cache recorded (the frequencies it really
            used); without it, those of the probe (exact unless a dynamic RoPE variant runs past
            the model's original context).
        num_layers: layers of the cache (with ``capture``).

    Returns:
        A :class:`RopeSpec` (``inv_freq``, ``attention_scaling``, ``layout``; a NoPE layer gets
        one zero frequency: un-RoPE is the identity) or a one-line reason, per layer.
    """
    ids = token_ids[:1, :PROBE_TOKENS]
    positions = torch.arange(ids.shape[1])[None]
    shiftable = "position_ids" in inspect.signature(model.forward).parameters
    runs = []
    for shift in (0, PROBE_SHIFT) if shiftable else (0,):
        with RotaryCapture(model) as probe:
            keys = forward(ids, positions + shift if shiftable else None)
        runs.append((keys, probe.layer_specs(len(keys))))
    specs = capture.layer_specs(num_layers) if capture is not None else runs[0][1]
    result: list[RopeSpec | str] = []
    for layer, spec in enumerate(specs):
        if len(runs) < 2 or layer >= len(runs[0][0]):  # no probe: the layout of the cos / sin
            result.append(spec)
            continue
        layout = _probe_layout(runs[0][0][layer], runs[1][0][layer], runs[0][1][layer], runs[1][1][layer], ids.shape[1])
        if layout == NO_ROPE:
            result.append(RopeSpec((0.0,)))
        elif isinstance(spec, str):
            result.append(spec)
        elif layout is None:
            result.append(
                f"its keys are not RoPE of their first {spec.rope_dim} channels in either layout ({', '.join(LAYOUTS)})"
            )
        else:
            result.append(dataclasses.replace(spec, layout=layout))
    return result


def _probe_layout(
    first: torch.Tensor, shifted: torch.Tensor, spec: RopeSpec | str, shifted_spec: RopeSpec | str, tokens: int
) -> str | None:
    """The layout that turns the first run's keys (of ``tokens`` tokens at positions from 0) into the
    shifted run's, ``none`` when they are equal, None when none does."""
    first, shifted = first.detach().to("cpu", torch.float32), shifted.detach().to("cpu", torch.float32)
    norm = float(shifted.norm())
    if first.shape != shifted.shape or first.ndim != 4 or not norm > 0:
        return None
    errors = {NO_ROPE: float((first - shifted).norm()) / norm}
    start = max(tokens - first.shape[2], 0)  # a sliding-window layer holds the last tokens
    same = isinstance(spec, RopeSpec) and isinstance(shifted_spec, RopeSpec)
    if same and spec == dataclasses.replace(shifted_spec, layout=spec.layout) and spec.rope_dim <= first.shape[-1]:
        inv_freq = torch.tensor(spec.inv_freq, dtype=torch.float32)
        for layout in (ROTATE_HALF, INTERLEAVED):
            before = rotate_keys(first, inv_freq, spec.attention_scaling, start, True, layout)
            moved = rotate_keys(before, inv_freq, spec.attention_scaling, start + PROBE_SHIFT, False, layout)
            errors[layout] = float((moved - shifted).norm()) / norm
    passing = [layout for layout, error in errors.items() if error <= PROBE_TOLERANCE]
    if isinstance(spec, RopeSpec) and spec.layout in passing:
        return spec.layout
    return min(passing, key=errors.__getitem__) if passing else None
