"""Temperature, top-k, top-p and min-p: logits processors that shape the sampling distribution.

Each processor takes per-row values (a list, one per row) or one value for every row, and works
on the whole batch at once. Filtered tokens get ``-inf``. Values that turn a filter off
(``top_k=0``, ``top_p=1``, ``min_p=0``, ``temperature`` 0 or 1) leave their row unchanged.

The batch factories also leave greedy rows (temperature 0) alone: no filter here can change which
token has the highest score, so filtering them would only cost time. When no row needs a
processor, its factory returns None.

torch is imported inside functions so that loading plugins stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from chatstream.hookspecs import hookimpl
from chatstream.options import NoOptions, parse_options
from chatstream.types import LogitsProcessor, RowInfo

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _row_tensor(values: list[Any], scores: torch.Tensor, what: str, dtype: Any = None) -> torch.Tensor:
    """``[batch, 1]`` tensor of per-row values; one value serves every row."""
    import torch

    batch = scores.shape[0]
    if len(values) == 1:
        values = values * batch
    elif len(values) != batch:
        raise ValueError(f"{what} has {len(values)} values for a batch of {batch} rows")
    return torch.tensor(values, dtype=dtype or torch.float32, device=scores.device).unsqueeze(1)


class _RowValues:
    """Caches the per-row tensor for the device and batch size it was last used with."""

    def __init__(self, values: list[Any], what: str) -> None:
        self.values = values
        self.what = what
        self._cached: torch.Tensor | None = None

    def tensor(self, scores: torch.Tensor, dtype: Any = None) -> torch.Tensor:
        cached = self._cached
        if cached is None or cached.shape[0] != scores.shape[0] or cached.device != scores.device:
            cached = self._cached = _row_tensor(self.values, scores, self.what, dtype)
        return cached


class TemperatureProcessor:
    """Divide each row's logits by its temperature; rows at 0 (greedy) or 1 are left as they are."""

    def __init__(self, temperature: float | Sequence[float]) -> None:
        values = _values(temperature)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"temperature={value!r} is invalid: use a number >= 0 (0 means greedy)")
        self._divisor = _RowValues([float(v) if v > 0 else 1.0 for v in values], "temperature")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self._divisor.tensor(scores).to(scores.dtype)


class TopKProcessor:
    """Keep each row's ``top_k`` highest logits (ties with the k-th kept); ``top_k=0`` keeps all."""

    def __init__(self, top_k: int | Sequence[int]) -> None:
        values = _values(top_k)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"top_k={value!r} is invalid: use a whole number >= 0 (0 turns it off)")
        self._k: list[int] = values
        self._plan: tuple[Any, int, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        batch, vocab = scores.shape
        key = (batch, vocab, scores.device)
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, *self._make_plan(scores))
        _, largest, kth, off = self._plan
        if largest == 0:
            return scores.clone()
        # One topk at the largest k serves every row: a row's k-th value is its threshold.
        threshold = scores.topk(largest, dim=-1).values.gather(1, kth).masked_fill(off, -math.inf)
        return scores.masked_fill(scores < threshold, -math.inf)

    def _make_plan(self, scores: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The largest k in use, each row's k-th index, and which rows keep everything."""
        import torch

        batch, vocab = scores.shape
        ks = self._k * batch if len(self._k) == 1 else self._k
        if len(ks) != batch:
            raise ValueError(f"top_k has {len(ks)} values for a batch of {batch} rows")
        on = [0 < k < vocab for k in ks]
        largest = max((k for k, row_on in zip(ks, on, strict=True) if row_on), default=0)
        kth = torch.tensor(
            [k - 1 if row_on else 0 for k, row_on in zip(ks, on, strict=True)], device=scores.device
        )
        off = torch.tensor([not row_on for row_on in on], device=scores.device)
        return largest, kth.unsqueeze(1), off.unsqueeze(1)


class TopPProcessor:
    """Keep the smallest set of highest-probability tokens whose probabilities add up to ``top_p``.

    A token is kept when the tokens ranked above it hold less than ``top_p`` of the probability,
    so the most likely token always stays. ``top_p=1`` keeps all.
    """

    def __init__(self, top_p: float | Sequence[float]) -> None:
        values = _values(top_p)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"top_p={value!r} is invalid: use a number in (0, 1] (1 turns it off)")
        self._p = _RowValues([float(v) for v in values], "top_p")
        self._all_on = all(v < 1 for v in values)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        p = self._p.tensor(scores)
        # After top-k most logits are -inf already; sorting only the finite ones is much cheaper
        # than sorting the whole vocabulary (one host sync to learn how many there are).
        finite = int(torch.isfinite(scores).sum(dim=-1).max().item())
        values, order = scores.topk(max(finite, 1), dim=-1)
        probs = values.float().softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs
        # The most likely token has no mass above it, so it always stays (top_p > 0).
        drop_sorted = mass_above >= p
        if not self._all_on:
            drop_sorted &= p < 1
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, drop_sorted)
        return scores.masked_fill(drop, -math.inf)


class MinPProcessor:
    """Drop tokens less likely than ``min_p`` times the row's most likely token; ``min_p=0`` keeps all."""

    def __init__(self, min_p: float | Sequence[float]) -> None:
        values = _values(min_p)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"min_p={value!r} is invalid: use a number in [0, 1] (0 turns it off)")
        # prob_i < min_p * prob_max  <=>  logit_i < logit_max + log(min_p): no softmax needed.
        self._log_min_p = _RowValues([math.log(v) if v > 0 else -math.inf for v in values], "min_p")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        log_min_p = self._log_min_p.tensor(scores)
        threshold = scores.amax(dim=-1, keepdim=True).float() + log_min_p
        return scores.masked_fill(scores.float() < threshold, -math.inf)


def temperature_factory(
    rows: Sequence[RowInfo], options: NoOptions | dict[str, Any]
) -> LogitsProcessor | None:
    """One ``TemperatureProcessor`` for the batch, or None when every row is greedy or at 1."""
    parse_options(NoOptions, options, "sampling.processors.temperature")
    # Greedy rows (temperature 0, or so small that dividing would overflow) keep their logits.
    values = [1.0 if row.params.greedy else row.params.temperature for row in rows]
    if all(t == 1.0 for t in values):
        return None
    return TemperatureProcessor(values)


def top_k_factory(rows: Sequence[RowInfo], options: NoOptions | dict[str, Any]) -> LogitsProcessor | None:
    """One ``TopKProcessor`` for the batch, or None when no sampled row sets ``top_k``."""
    parse_options(NoOptions, options, "sampling.processors.top_k")
    values = [0 if row.params.greedy else row.params.top_k for row in rows]
    return TopKProcessor(values) if any(values) else None


def top_p_factory(rows: Sequence[RowInfo], options: NoOptions | dict[str, Any]) -> LogitsProcessor | None:
    """One ``TopPProcessor`` for the batch, or None when no sampled row sets ``top_p`` below 1."""
    parse_options(NoOptions, options, "sampling.processors.top_p")
    values = [1.0 if row.params.greedy else row.params.top_p for row in rows]
    return TopPProcessor(values) if any(v < 1 for v in values) else None


def min_p_factory(rows: Sequence[RowInfo], options: NoOptions | dict[str, Any]) -> LogitsProcessor | None:
    """One ``MinPProcessor`` for the batch, or None when no sampled row sets ``min_p``."""
    parse_options(NoOptions, options, "sampling.processors.min_p")
    values = [0.0 if row.params.greedy else row.params.min_p for row in rows]
    return MinPProcessor(values) if any(values) else None


@hookimpl(trylast=True)
def register_logits_processors(register: Any) -> None:
    """Contribute ``temperature``, ``top_k``, ``top_p`` and ``min_p``."""
    register("temperature", temperature_factory, options=NoOptions)
    register("top_k", top_k_factory, options=NoOptions)
    register("top_p", top_p_factory, options=NoOptions)
    register("min_p", min_p_factory, options=NoOptions)
