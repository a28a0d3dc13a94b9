"""Fitting a conversation into the context: render it as segments, tokenize once, and drop the
oldest whole exchanges until the prompt leaves room for the answer.

Cuts move in large steps, so that a long conversation keeps the same first kept message, and so
the same prompt prefix, for many turns. Candidate cut points lie on a grid laid from the start of
the conversation: every exchange is counted on its own (its tokens when written in the middle of
a conversation), and a cut point follows each exchange at which the running total passes a
multiple of half the budget. The first cut point whose rest fits (measured exactly) is taken.
Nothing is kept between turns, yet the choice is the same on every turn until the rest from that
point no longer fits: then the next grid point is taken, and the rest is again about half the
budget. Stateless clients, which resend the whole conversation, get the same cuts.

The cost is linear in the conversation: one rendering and one tokenization of the whole history,
then (only when it is too long) two small renderings per dropped exchange to count it and an exact
measurement of the rest at a cut point (the first one whose estimated rest fits, and the next ones
while the exact measurement says it does not). Callers run this off the event loop.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .errors import ChatStreamError
from .prompt import AbstractChatPrompt, ChatContent, PromptShapeError
from .types import Segment, joined


@runtime_checkable
class PromptEncoder(Protocol):
    """An engine that makes prompt ids from segments (content stays text); core then sends those
    very ids, so a prompt is tokenized once."""

    def encode(
        self, prompt: str | Sequence[Segment], add_special_tokens: bool | None = None
    ) -> list[int]: ...


@dataclass(frozen=True)
class FittedPrompt:
    """A rendered prompt that fits: its segments, their ids (None when the engine does not
    tokenize here), and its length in tokens (None when nobody can count)."""

    segments: list[Segment]
    ids: list[int] | None
    tokens: int | None

    @property
    def text(self) -> str:
        return joined(self.segments)


def render(prompt: AbstractChatPrompt) -> list[Segment]:
    """The prompt's segments; a conversation the format cannot render is the client's to fix."""
    try:
        return prompt.render_segments()
    except PromptShapeError as exc:
        raise ChatStreamError(400, "invalid_conversation", str(exc), field="messages") from None


def measure(
    engine: Any, segments: list[Segment], add_special_tokens: bool | None
) -> tuple[list[int] | None, int | None]:
    """``(ids, tokens)`` of ``segments`` as ``engine`` would see them."""
    if isinstance(engine, PromptEncoder) and getattr(engine, "tokenizer", None) is not None:
        ids = engine.encode(segments, add_special_tokens)
        return ids, len(ids)
    return None, engine.count_tokens(joined(segments))


def fit_prompt(
    prompt: AbstractChatPrompt,
    engine: Any,
    *,
    context_len: int,
    max_new_tokens: int,
    add_special_tokens: bool | None,
) -> FittedPrompt:
    """The prompt of ``prompt`` (not changed) within ``context_len - max_new_tokens`` tokens.

    When the whole conversation does not fit, the oldest exchanges are dropped up to the first
    grid cut point (see the module docstring) whose rest fits; the system prompt and the last
    exchange are always kept. When only the last exchange is left and it still does not fit,
    the request is refused (400 ``prompt_too_long``).
    """
    budget = context_len - max_new_tokens
    segments = render(prompt)
    ids, tokens = measure(engine, segments, add_special_tokens)
    if tokens is None or tokens <= budget:
        return FittedPrompt(segments, ids, tokens)
    trimmed = copy.copy(prompt)
    # Exchanges that chat mode or the prompt TTL hide are not rendered: they play no part.
    contents = prompt.visible_contents()
    starts = [i for i, c in enumerate(contents) if c.role == prompt.requester]
    grid = _grid_cuts(prompt, engine, contents, starts, budget, tokens, add_special_tokens)
    tried: set[int] = set()
    for cut in itertools.chain(grid, starts[-1:]):  # at last, the last exchange alone
        if cut in tried or cut == 0:
            continue
        tried.add(cut)
        trimmed.chat_contents = contents[cut:]
        segments = render(trimmed)
        ids, tokens = measure(engine, segments, add_special_tokens)
        if tokens is None or tokens <= budget:
            return FittedPrompt(segments, ids, tokens)
    raise _too_long(tokens, context_len, max_new_tokens)


def _grid_cuts(
    prompt: AbstractChatPrompt,
    engine: Any,
    contents: list[ChatContent],
    starts: list[int],
    budget: int,
    whole: int,
    add_special_tokens: bool | None,
) -> Iterator[int]:
    """The grid cut points (indexes into ``contents``) worth measuring, oldest first.

    Exchange ``j`` runs from ``starts[j]`` (from 0 for the first) to ``starts[j + 1]``; a cut
    point is the start of the exchange after the one where the running count first reaches a
    multiple of ``budget // 2``. Points whose estimated rest (``whole`` minus the dropped count)
    exceeds the budget are skipped without measuring. The last exchange is never cut away.
    """
    step = max(budget // 2, 1)
    probe = copy.copy(prompt)
    probe.system = None  # the count of an exchange does not depend on the system prompt
    probe.prompt_ttl = None
    probe.chat_mode = True
    dropped = 0
    next_line = step
    for j in range(len(starts) - 1):
        exchange = contents[(starts[j] if j else 0) : starts[j + 1]]
        dropped += _exchange_tokens(probe, engine, exchange, add_special_tokens)
        if dropped < next_line:
            continue
        next_line = (dropped // step + 1) * step
        if whole - dropped <= budget:
            yield starts[j + 1]


def _exchange_tokens(
    probe: AbstractChatPrompt, engine: Any, exchange: list[ChatContent], add_special_tokens: bool | None
) -> int:
    """The tokens ``exchange`` adds to a conversation that already has one exchange before it:
    the conversation ``exchange + exchange`` measured, less ``exchange`` alone. Depends only on the
    exchange, so an exchange's count never changes as the conversation grows."""
    try:
        probe.chat_contents = exchange
        _, once = measure(engine, probe.render_segments(), add_special_tokens)
        probe.chat_contents = exchange + exchange
        _, twice = measure(engine, probe.render_segments(), add_special_tokens)
    except Exception:  # a shape the format refuses twice over (two user messages in a row): estimate
        text = "".join(c.message or "" for c in exchange)
        once, (_, twice) = 0, measure(engine, [Segment.content(text)], False)
    return max((twice or 0) - (once or 0), 0)


def _too_long(tokens: int, context_len: int, max_new_tokens: int) -> ChatStreamError:
    """The refusal of a prompt whose last exchange alone does not fit, naming what to change."""
    if tokens < context_len:
        room = context_len - tokens
        return ChatStreamError(
            400,
            "prompt_too_long",
            lambda name: (
                f"{name('max_new_tokens')}={max_new_tokens} does not fit: the prompt is {tokens} tokens and "
                f"context_len is {context_len}; use {name('max_new_tokens')} <= {room}, or a shorter message"
            ),
            field="max_new_tokens",
        )
    return ChatStreamError(
        400,
        "prompt_too_long",
        lambda name: (
            f"{name('user_input')} is {tokens} tokens with the system prompt, more than context_len="
            f"{context_len}: send a shorter message"
        ),
        field="user_input",
    )
