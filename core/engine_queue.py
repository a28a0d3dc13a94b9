"""The hand-off between an engine's step-loop thread and the coroutines of its requests.

Each request owns an asyncio queue on its own event loop. The step loop puts, in order: token ids
(an ``int`` or a list of ints), then either a :class:`FinishReason` or an exception, with
:func:`deliver` (one thread-safe call per event loop and step). The request's coroutine reads
them with :func:`id_batches` (raw ids) or :func:`text_deltas` (detokenized, stop-filtered text),
taking everything already queued at once, so a slow reader catches up in one delta.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from .detokenize import TokenTextStream
from .types import FinishReason, TextDelta


class QueuedRow(Protocol):
    """A request as the step loop sees it: where its items go."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]


def check_prompt_room(prompt_ids: Sequence[int], context_len: int) -> int:
    """Tokens left for the answer; ``ValueError`` (a 4xx) for an empty prompt or one that fills
    the context."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token of prompt text")
    room = context_len - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"the prompt is {len(prompt_ids)} tokens but context_len is {context_len}: "
            "shorten the conversation (prompt_ttl) or raise context_len"
        )
    return room


def deliver(items: Sequence[tuple[QueuedRow, Any]]) -> None:
    """Hand items to their requests' queues (from any thread): one thread-safe call per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
    for row, item in items:
        by_loop.setdefault(row.loop, []).append((row.queue, item))
    for loop, puts in by_loop.items():
        # A closed event loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_put_all, puts)


def _put_all(puts: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for target, item in puts:
        target.put_nowait(item)


async def next_items(source: asyncio.Queue[Any]) -> list[Any]:
    """Wait for at least one item, then take everything already queued."""
    items = [await source.get()]
    while not source.empty():
        items.append(source.get_nowait())
    return items


def _ids(item: Any) -> list[int] | None:
    if isinstance(item, int):
        return [item]
    return list(item) if isinstance(item, list) else None


async def id_batches(source: asyncio.Queue[Any]) -> AsyncIterator[list[int]]:
    """The token ids as they arrive, a list per wake-up; ends at the finish reason, raises the
    step loop's exception."""
    while True:
        items = await next_items(source)
        ids = [token for item in items for token in (_ids(item) or ())]
        if ids:
            yield ids
        last = items[-1]
        if isinstance(last, BaseException):
            raise last
        if isinstance(last, FinishReason):
            return


async def text_deltas(source: asyncio.Queue[Any], stream: TokenTextStream) -> AsyncIterator[TextDelta]:
    """Detokenized, stop-filtered text as it arrives; the last delta carries the finish reason
    (``STOP`` when ``stream`` met a stop string). Raises the step loop's exception."""
    while True:
        items = await next_items(source)
        parts: list[str] = []
        reason: FinishReason | None = None
        for item in items:
            ids = _ids(item)
            if ids is not None:
                parts.append(stream.add(ids))
                if stream.stopped:
                    reason = FinishReason.STOP
                    break
            elif isinstance(item, FinishReason):
                reason = item
            else:
                raise item
        if reason is not None:
            parts.append(stream.finish())
            yield TextDelta("".join(parts), tokens=stream.tokens, finish_reason=reason)
            return
        text = "".join(parts)
        if text:
            yield TextDelta(text, tokens=stream.tokens)
