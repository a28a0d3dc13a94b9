"""Fitting a conversation into the context: render it as segments, tokenize once, and drop the
oldest whole exchanges until the prompt leaves room for the answer.

The cost is linear in the conversation: one rendering and one tokenization of the whole history,
then (only when it is too long) the oldest exchanges are dropped in one cut sized from that count
and the much shorter rest is measured again, until it fits. Callers run this off the event loop.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .errors import ChatStreamError
from .prompt import AbstractChatPrompt, PromptShapeError
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
    """The prompt of ``prompt`` (not changed) within ``context_len - max_new_tokens`` tokens."""
    budget = context_len - max_new_tokens
    segments = render(prompt)
    ids, tokens = measure(engine, segments, add_special_tokens)
    if tokens is None or tokens <= budget:
        return FittedPrompt(segments, ids, tokens)
    trimmed = copy.copy(prompt)
    trimmed.chat_contents = list(prompt.chat_contents)
    while tokens is not None and tokens > budget:
        text_chars = max(len(joined(segments)), 1)
        excess_chars = (tokens - budget) * text_chars / tokens  # the text to drop, at this density
        if not _drop_oldest(trimmed, excess_chars):
            raise _too_long(tokens, context_len, max_new_tokens)
        segments = render(trimmed)
        ids, tokens = measure(engine, segments, add_special_tokens)
    return FittedPrompt(segments, ids, tokens)


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


def _drop_oldest(prompt: AbstractChatPrompt, chars: float) -> bool:
    """Drop the oldest whole exchanges holding at least ``chars`` characters (at least one, always
    keeping the last); False when there is only one exchange left."""
    contents = prompt.chat_contents
    starts = [i for i, c in enumerate(contents) if c.role == prompt.requester]
    if len(starts) < 2:
        return False
    dropped = 0.0
    cut = starts[1]
    for index, start in enumerate(starts[1:], 1):
        cut = start
        dropped += sum(len(c.message or "") for c in contents[starts[index - 1] : start])
        if dropped >= chars:
            break
    del contents[:cut]
    return True
