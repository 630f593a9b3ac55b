"""The file a choice of widths makes: its exact size in bytes and its decoded error, by encoding it.

Rate control (:mod:`kvpack.allocation.fit`) asks what a candidate allocation really gives. Each
entry is encoded as compress encodes it (:func:`kvpack.entry.encode_for_file`), passed through
the entropy stage and laid out as the writer lays it out (:class:`kvpack.formats.writer.KvpSizer`),
header included, so the size is that of the file compress then writes, to the byte. The error is
that of the decoded entries (:func:`kvpack.entry.decode_entry`), per K/V tensor, as compress
reports it (:class:`kvpack.metrics.ErrorAccumulator`). An entry already measured with the same
widths is not encoded again (its stored sizes and errors are kept, not its bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvpack.config import CodecConfig
from kvpack.dtypes import dtype_name
from kvpack.entry import decode_entry, encode_for_file, stack
from kvpack.formats.entropy import EntropyConfig
from kvpack.formats.writer import KvpSizer, StoredSection
from kvpack.metrics import ErrorAccumulator


@dataclass
class _Measured:
    """One entry encoded at one choice of widths: its sections as stored (sizes only) and, once
    asked for, the relative squared error of each of its source tensors."""

    shape: tuple[int, ...]
    dtype: str
    codec: CodecConfig | None
    stored: dict[str, StoredSection]
    errors: list[float] | None = None


class FileMeasure:
    """Sizes and errors of the files that choices of widths make (a cache of entry encodings).

    Args:
        layout: the file's entries ``(entry name, source tensor names, codec)`` in file order
            (:func:`kvpack.entry.entry_layout`).
        get: tensor name -> tensor (read again for every entry encoded).
        metadata: the file's metadata, as the writer gets it (its header is sized with it).
        entropy: the file's entropy stage.
    """

    def __init__(
        self,
        layout: list[tuple[str, list[str], CodecConfig | None]],
        get: Callable[[str], torch.Tensor],
        metadata: dict[str, str],
        entropy: EntropyConfig,
    ):
        self.layout = layout
        self.get = get
        self.metadata = metadata
        self.entropy = entropy
        self._cache: dict[tuple[str, bytes | None], _Measured] = {}
        self.encoded = 0  # entries encoded so far (cache misses)

    def measure(self, widths: dict[str, torch.Tensor], errors: bool = False) -> tuple[int, float | None]:
        """The file with ``widths`` (entry name -> int64 ``(n_groups,)`` widths; other quantized entries
        keep the codec's fixed width).

        Returns:
            ``(file bytes, mean relative squared error)``: the size of the file compress writes, and
            with ``errors`` the mean over the K/V tensors of ``||x - x_hat||^2 / ||x||^2`` of the
            decoded file (the metric compress reports per tensor; else ``None``).

        Raises:
            InvalidInputError: see :func:`kvpack.entry.encode_tensor`.
        """
        sizer = KvpSizer(self.metadata, self.entropy)
        tensor_errors: list[float] = []
        for name, sources, codec in self.layout:
            chosen = widths.get(name) if codec is not None else None
            key = (name, None if chosen is None else chosen.to(torch.int8).numpy().tobytes())
            found = self._cache.get(key)
            if found is None or (errors and codec is not None and found.errors is None):
                found = self._encode(sizer, name, sources, codec, chosen, errors and codec is not None)
                self._cache[key] = found
            else:
                sizer.place(name, found.shape, found.dtype, found.codec, found.stored)
            if errors and codec is not None:
                tensor_errors.extend(found.errors)
        mean = sum(tensor_errors) / len(tensor_errors) if tensor_errors else 0.0
        return sizer.file_size(), (mean if errors else None)

    def _encode(
        self,
        sizer: KvpSizer,
        name: str,
        sources: list[str],
        codec: CodecConfig | None,
        widths: torch.Tensor | None,
        errors: bool,
    ) -> _Measured:
        """Encode one entry, place it in ``sizer`` and measure its decoded error when asked."""
        self.encoded += 1
        stacked = name != sources[0]
        x = stack(self.get, sources) if stacked else self.get(name)
        if codec is not None and widths is not None:
            codec = codec.with_widths(widths)
        shape, dtype = tuple(x.shape), dtype_name(x.dtype)
        codec, sections, transposes = encode_for_file(name, x, codec, widths, self.entropy)
        stored = sizer.stage(name, shape, dtype, codec, sections, transposes)
        entry = sizer.place(name, shape, dtype, codec, stored)
        measured = _Measured(shape, dtype, codec, {k: s.sized() for k, s in stored.items()})
        if errors:
            decoded = decode_entry(entry, sections)
            measured.errors = []
            for i in range(len(sources)):  # per layer, also of a stacked entry (as compress reports it)
                accumulator = ErrorAccumulator()
                accumulator.add(x[i] if stacked else x, decoded[i] if stacked else decoded)
                measured.errors.append(accumulator.result()["rel_mse"])
        return measured
