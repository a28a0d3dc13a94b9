"""Repetition, frequency and presence penalties: logits processors that discourage repeats.

Each processor keeps per-row token counts between calls: the first call counts a row's whole
history, later calls only add the newest token (and, with a window, remove the one that left
it). That relies on the engine contract that a processor object serves one batch composition,
and that each row grows by exactly one token between calls; a call whose width is not one more
than the previous one is treated as a fresh history and counted in full. Applying a penalty
touches only the columns of the history's tokens, not the whole vocabulary.

Rows in ``input_ids`` may be left-padded with ``-1`` (the chatstream engine does that); negative
ids, and ids outside the scores' vocabulary, are never counted.

Methods (``p`` is the row's penalty, ``c`` a token's count):

- ``repetition``: every seen token once. multiplicative: a positive logit is divided by ``p``,
  a negative one multiplied (the transformers rule); subtractive: ``logit - p``.
- ``frequency``: grows with the count. subtractive: ``logit - c * p`` (OpenAI);
  multiplicative: the division rule with ``p ** c``.
- ``presence``: any seen token once, like repetition, but by default over generated tokens only.

torch is imported inside functions so that loading plugins stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, get_args

from pydantic import Field, StrictBool

from chatstream.hookspecs import hookimpl
from chatstream.options import PluginOptions, parse_options
from chatstream.types import LogitsProcessor, PenaltyMethod, RowInfo

if TYPE_CHECKING:  # pragma: no cover
    import torch

_METHODS: tuple[str, ...] = get_args(PenaltyMethod)


class PenaltyOptions(PluginOptions):
    """``sampling.processors.<repetition|frequency|presence>``."""

    include_prompt: StrictBool | None = Field(
        None,
        description="count the prompt's tokens too (default: repetition yes, frequency and presence no)",
    )
    window: int | None = Field(
        None, ge=1, description="count only the last this many tokens (null: the whole history)"
    )


# p ** count overflows float32 after a few hundred repeats; these bounds keep the division rule finite
# (a logit divided by 1e30 is 0 for every practical purpose) and avoid 0 * inf = nan.
_MAX_FACTOR = 1e30
_MIN_FACTOR = 1e-30


def _check_method(name: str, method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"{name}_penalty_method={method!r} is invalid: use one of {', '.join(_METHODS)}")


def _check_penalty(name: str, value: float | None, method: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}_penalty={value!r} is invalid: use a finite number or None (off)")
    if method == "multiplicative" and value <= 0:
        raise ValueError(
            f"{name}_penalty={value} is invalid with {name}_penalty_method='multiplicative': "
            "use a value > 0 (1.0 means no penalty, > 1.0 discourages repeats)"
        )


def _is_neutral(value: float | None, method: str) -> bool:
    return value is None or (value == 1.0 if method == "multiplicative" else value == 0.0)


def _broadcast(value: Any, rows: int | None, what: str) -> list[Any]:
    """A per-row list from a scalar (any batch size; ``rows`` None) or a sequence of ``rows`` values."""
    if isinstance(value, (list, tuple)):
        if rows is not None and len(value) != rows:
            raise ValueError(f"{what} has {len(value)} values for a batch of {rows} rows")
        return list(value)
    return [value] * (rows or 1)


class _TokenCounts:
    """Per-row token counts over the part of each row's history a penalty looks at."""

    def __init__(self, prompt_lens: Sequence[int] | None, include_prompt: bool, window: int | None) -> None:
        self.prompt_lens = None if prompt_lens is None else list(prompt_lens)
        self.include_prompt = include_prompt
        self.window = window
        self.counts: torch.Tensor | None = None  # [batch, vocab + 1] int32; the last column is a sink
        self.prompt_end: torch.Tensor | None = None  # [batch, 1]: first column after each row's prompt
        self.width = -1

    def update(self, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Counts after this call's ``input_ids``, ``[batch, vocab_size + 1]`` (the last column is a sink)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        batch, width = input_ids.shape
        if self.prompt_lens is not None and len(self.prompt_lens) != batch:
            raise ValueError(
                f"this processor was built for {len(self.prompt_lens)} rows but got {batch}: "
                "build a new pipeline when the batch changes"
            )
        same_rows = self.counts is not None and self.counts.shape == (batch, vocab_size + 1)
        if same_rows and width == self.width + 1:
            self._add_last(input_ids, vocab_size)
        else:
            self._recount(input_ids, vocab_size)
        self.width = width
        assert self.counts is not None
        return self.counts

    def _recount(self, input_ids: torch.Tensor, vocab_size: int) -> None:
        import torch

        batch, width = input_ids.shape
        columns = torch.arange(width, device=input_ids.device)
        if self.prompt_lens is None:
            # Used inside model.generate: the first call's whole input is the prompt.
            self.prompt_end = torch.full((batch, 1), width, device=input_ids.device)
        else:
            padding = (input_ids < 0).sum(dim=1, keepdim=True)
            lens = torch.tensor(self.prompt_lens, device=input_ids.device).unsqueeze(1)
            self.prompt_end = padding + lens
        counted = (input_ids >= 0) & (input_ids < vocab_size)
        if not self.include_prompt:
            counted &= columns >= self.prompt_end
        if self.window is not None:
            counted &= columns >= width - self.window
        index = torch.where(counted, input_ids, vocab_size)
        counts = torch.zeros(batch, vocab_size + 1, dtype=torch.int32, device=input_ids.device)
        self.counts = counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.int32))

    def _add_last(self, input_ids: torch.Tensor, vocab_size: int) -> None:
        import torch

        assert self.counts is not None and self.prompt_end is not None
        width = input_ids.shape[1]
        columns = [width - 1]
        signs = [1]
        if self.window is not None and width - 1 - self.window >= 0:
            columns.append(width - 1 - self.window)  # the token that just left the window
            signs.append(-1)
        tokens = input_ids[:, columns]
        counted = (tokens >= 0) & (tokens < vocab_size)
        if not self.include_prompt:
            counted &= torch.tensor(columns, device=input_ids.device) >= self.prompt_end
        index = torch.where(counted, tokens, vocab_size)
        delta = torch.tensor(signs, dtype=torch.int32, device=input_ids.device).expand_as(index)
        self.counts.scatter_add_(1, index, delta)


class _PenaltyProcessor:
    """Shared machinery: per-row values and methods, incremental counts, the two method branches."""

    name = ""
    default_include_prompt = False
    default_method: PenaltyMethod = "subtractive"

    def __init__(
        self,
        penalty: float | Sequence[float | None] | None,
        method: PenaltyMethod | Sequence[PenaltyMethod] | None = None,
        *,
        prompt_lens: Sequence[int] | None = None,
        include_prompt: bool | None = None,
        window: int | None = None,
    ) -> None:
        rows = None if prompt_lens is None else len(prompt_lens)
        if rows is None and isinstance(penalty, (list, tuple)):
            rows = len(penalty)
        self.penalties: list[float | None] = _broadcast(penalty, rows, f"{self.name}_penalty")
        what = f"{self.name}_penalty_method"
        chosen = self.default_method if method is None else method
        self.methods: list[str] = _broadcast(chosen, rows or len(self.penalties), what)
        if len(self.methods) != len(self.penalties):
            raise ValueError(
                f"{self.name}_penalty has {len(self.penalties)} values but "
                f"{self.name}_penalty_method has {len(self.methods)}"
            )
        for value, row_method in zip(self.penalties, self.methods, strict=True):
            _check_method(self.name, row_method)
            _check_penalty(self.name, value, row_method)
        if prompt_lens is not None and any(not isinstance(n, int) or n < 0 for n in prompt_lens):
            raise ValueError(f"prompt_lens must be integers >= 0, got {list(prompt_lens)}")
        options = parse_options(
            PenaltyOptions,
            {"include_prompt": include_prompt, "window": window},
            f"sampling.processors.{self.name}",
        )
        include = self.default_include_prompt if options.include_prompt is None else options.include_prompt
        window = options.window
        # A scalar penalty serves any batch size (model.generate); per-row lists fix it.
        self._per_row = rows is not None
        self._counter = _TokenCounts(prompt_lens, include, window)
        self._multiplicative = any(
            m == "multiplicative" and not _is_neutral(v, m)
            for v, m in zip(self.penalties, self.methods, strict=True)
        )
        self._subtractive = any(
            m == "subtractive" and not _is_neutral(v, m)
            for v, m in zip(self.penalties, self.methods, strict=True)
        )
        self._row_tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _params(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row ``[batch, 1]`` tensors: the dividing factor, the subtracted amount, the method mask."""
        import torch

        batch = scores.shape[0]
        if self._row_tensors is None or self._row_tensors[0].shape[0] != batch:
            if self._per_row and batch != len(self.penalties):
                raise ValueError(
                    f"this {self.name} processor was built for {len(self.penalties)} rows but got {batch}"
                )
            values = self.penalties if self._per_row else self.penalties * batch
            methods = self.methods if self._per_row else self.methods * batch
            mult = [
                v if m == "multiplicative" and v is not None else 1.0
                for v, m in zip(values, methods, strict=True)
            ]
            sub = [
                v if m == "subtractive" and v is not None else 0.0
                for v, m in zip(values, methods, strict=True)
            ]
            is_mult = [m == "multiplicative" for m in methods]
            device = scores.device
            self._row_tensors = (
                torch.tensor(mult, dtype=torch.float32, device=device).unsqueeze(1),
                torch.tensor(sub, dtype=torch.float32, device=device).unsqueeze(1),
                torch.tensor(is_mult, device=device).unsqueeze(1),
            )
        return self._row_tensors

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        batch, vocab = scores.shape
        counts = self._counter.update(input_ids, vocab)
        if not (self._multiplicative or self._subtractive):
            return scores.clone()
        factor, amount, is_mult = self._params(scores)
        # Every token with a count is somewhere in the history, so only the history's columns
        # need work: gather their scores and counts, penalize, scatter back. Repeated tokens
        # compute the same value, so the scatter does not depend on which copy lands last.
        # Padding and out-of-vocabulary ids go to a sink column that is dropped at the end.
        index = torch.where((input_ids >= 0) & (input_ids < vocab), input_ids, vocab)
        out = scores.new_empty((batch, vocab + 1))
        out[:, :vocab] = scores
        out[:, vocab] = 0
        values = out.gather(1, index)
        seen = counts.gather(1, index)
        if not self._subtractive:
            penalized = self._multiply(values, seen, factor)
        elif not self._multiplicative:
            penalized = self._subtract(values, seen, amount)
        else:
            penalized = self._multiply(values, seen, factor).where(
                is_mult, self._subtract(values, seen, amount)
            )
        return out.scatter_(1, index, penalized)[:, :vocab]

    def _multiply(self, scores: torch.Tensor, counts: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """The division rule (by ``factor`` where seen) on every row; rows of factor 1 are unchanged."""
        factor = factor.to(scores.dtype)
        penalized = (scores * factor).where(scores < 0, scores / factor)
        return penalized.where(counts > 0, scores)

    def _subtract(self, scores: torch.Tensor, counts: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
        """``logit - amount`` where seen."""
        return scores - (counts > 0).to(scores.dtype) * amount.to(scores.dtype)


class RepetitionPenaltyProcessor(_PenaltyProcessor):
    """Penalize every token already in the history (prompt included by default), once.

    ``RepetitionPenaltyProcessor(penalty=1.3)`` inside ``model.generate`` matches transformers'
    ``RepetitionPenaltyLogitsProcessor``. Per-row values (lists) and ``prompt_lens`` are what the
    batch factory passes.
    """

    name = "repetition"
    default_include_prompt = True
    default_method: PenaltyMethod = "multiplicative"


class PresencePenaltyProcessor(_PenaltyProcessor):
    """Penalize every token that appeared (generated tokens only, by default), once."""

    name = "presence"
    default_include_prompt = False
    default_method: PenaltyMethod = "subtractive"


class FrequencyPenaltyProcessor(_PenaltyProcessor):
    """Penalize tokens in proportion to how often they appeared (generated tokens only, by default)."""

    name = "frequency"
    default_include_prompt = False
    default_method: PenaltyMethod = "subtractive"

    def _multiply(self, scores: torch.Tensor, counts: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        import torch

        # factor ** count in float32 (counts are exact there), then the division rule in scores' dtype.
        power = torch.pow(factor, counts.to(torch.float32)).clamp_(_MIN_FACTOR, _MAX_FACTOR)
        power = power.to(scores.dtype)
        return (scores * power).where(scores < 0, scores / power)

    def _subtract(self, scores: torch.Tensor, counts: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
        return scores - counts.to(scores.dtype) * amount.to(scores.dtype)


def _factory(cls: type[_PenaltyProcessor]) -> Any:
    name = cls.name

    def factory(rows: Sequence[RowInfo], options: PenaltyOptions | dict[str, Any]) -> LogitsProcessor | None:
        chosen = parse_options(PenaltyOptions, options, f"sampling.processors.{name}")
        penalties = [getattr(row.params, f"{name}_penalty") for row in rows]
        methods = [getattr(row.params, f"{name}_penalty_method") for row in rows]
        if all(_is_neutral(value, method) for value, method in zip(penalties, methods, strict=True)):
            return None  # no row needs it: the step pays nothing
        return cls(
            penalties,
            methods,
            prompt_lens=[row.prompt_len for row in rows],
            include_prompt=chosen.include_prompt,
            window=chosen.window,
        )

    factory.__name__ = f"{name}_penalty_factory"
    factory.__doc__ = f"Build one {cls.__name__} for a batch from each row's {name}_penalty, or None."
    return factory


repetition_factory = _factory(RepetitionPenaltyProcessor)
frequency_factory = _factory(FrequencyPenaltyProcessor)
presence_factory = _factory(PresencePenaltyProcessor)


@hookimpl(trylast=True)
def register_logits_processors(register: Any) -> None:
    """Contribute the ``repetition``, ``frequency`` and ``presence`` penalties."""
    register("repetition", repetition_factory, options=PenaltyOptions)
    register("frequency", frequency_factory, options=PenaltyOptions)
    register("presence", presence_factory, options=PenaltyOptions)
