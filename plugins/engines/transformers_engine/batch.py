"""The running batch of the transformers engine: its rows, their shared left-padded KV cache, and
the tensor work of merging two batches and of slicing rows out of one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatstream.step_loop import StepRow
from chatstream.types import LogitsProcessor, RowInfo

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .kv_cache import SlotKVCache


@dataclass(eq=False)
class _Row(StepRow):
    """One request as the step loop sees it."""

    generator: Any = None  # the row's seeded torch.Generator, or None

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens

    @property
    def info(self) -> RowInfo:
        return RowInfo(params=self.params, prompt_len=len(self.prompt_ids))


@dataclass
class _Batch:
    """The running batch: rows side by side in one left-padded KV cache.

    Invariants: the cache holds every row's history except its last token (``pending``), which
    the next decode step feeds; ``mask`` marks real cache positions (1) vs left padding (0);
    ``positions`` is each row's next position id; ``history`` is every row's full token history
    left-padded with -1 (what processors see); ``generated`` counts tokens sampled per row.
    In slots mode the cache lives in the :class:`SlotKVCache` and ``cache`` is None.
    """

    rows: list[_Row]
    cache: Any
    mask: torch.Tensor
    pending: torch.Tensor
    positions: torch.Tensor
    history: torch.Tensor
    generated: torch.Tensor
    limits: torch.Tensor  # per row: max_new_tokens
    processors: list[LogitsProcessor] | None = None  # None = rebuild before the next use
    generators: list[Any] = field(default_factory=list)


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """One batch holding both: the shorter cache and history are left-padded to the longer."""
    import torch
    import torch.nn.functional as F

    length = max(a.mask.shape[1], b.mask.shape[1])

    def pad_left(tensor: torch.Tensor, dim_from_end: int, size: int, value: float = 0) -> torch.Tensor:
        missing = size - tensor.shape[-dim_from_end]
        if missing == 0:
            return tensor
        pad = [0, 0] * (dim_from_end - 1) + [missing, 0]
        return F.pad(tensor, pad, value=value)

    if a.cache is not None and b.cache is not None:  # slots mode: the cache lives in the slots
        for layer_a, layer_b in zip(a.cache.layers, b.cache.layers, strict=True):
            layer_a.keys = torch.cat([pad_left(layer_a.keys, 2, length), pad_left(layer_b.keys, 2, length)])
            layer_a.values = torch.cat(
                [pad_left(layer_a.values, 2, length), pad_left(layer_b.values, 2, length)]
            )
    hist_len = max(a.history.shape[1], b.history.shape[1])
    return _Batch(
        rows=a.rows + b.rows,
        cache=a.cache,
        mask=torch.cat([pad_left(a.mask, 1, length), pad_left(b.mask, 1, length)]),
        pending=torch.cat([a.pending, b.pending]),
        positions=torch.cat([a.positions, b.positions]),
        history=torch.cat([pad_left(a.history, 1, hist_len, -1), pad_left(b.history, 1, hist_len, -1)]),
        generated=torch.cat([a.generated, b.generated]),
        limits=torch.cat([a.limits, b.limits]),
        processors=None,
        generators=a.generators + b.generators,
    )


def _keep_rows(
    batch: _Batch, keep: Sequence[bool], slots: SlotKVCache | None, first_slot: int = 0
) -> _Batch | None:
    """The batch without the rows not in ``keep`` (marked done), or None when none stays.

    The left padding every remaining row shares is trimmed; in slots mode the last rows move into
    the freed slots (the batch's rows sit in slots from ``first_slot`` on).
    """
    import torch

    if all(keep):
        return batch
    for row, kept in zip(batch.rows, keep, strict=True):
        if not kept:
            row.done = True
    if not any(keep):
        return None
    device = batch.pending.device
    if slots is not None:
        index = slots.compact(keep, first_slot)
        rows = torch.tensor(index, device=device)
        mask = batch.mask[: len(index)]
    else:
        index = [i for i, kept in enumerate(keep) if kept]
        rows = torch.tensor(index, device=device)
        mask = batch.mask.index_select(0, rows)
        # Columns that are padding in every remaining row can go: the cache shrinks with the batch.
        start = int((mask.sum(dim=0) > 0).long().argmax()) if mask.shape[1] else 0
        for layer in batch.cache.layers:
            layer.keys = layer.keys.index_select(0, rows)[:, :, start:]
            layer.values = layer.values.index_select(0, rows)[:, :, start:]
        mask = mask[:, start:]
    history = batch.history.index_select(0, rows)
    hist_start = int((history >= 0).any(dim=0).long().argmax())
    return _Batch(
        rows=[batch.rows[i] for i in index],
        cache=batch.cache,
        mask=mask,
        pending=batch.pending.index_select(0, rows),
        positions=batch.positions.index_select(0, rows),
        history=history[:, hist_start:],
        generated=batch.generated.index_select(0, rows),
        limits=batch.limits.index_select(0, rows),
        processors=None,
        generators=[batch.generators[i] for i in index],
    )
