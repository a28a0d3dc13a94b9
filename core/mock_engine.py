"""The generator mock engine: streams canned text with no model loaded (``use_mock_response=True``).

It lives in core because more than one engine uses it: the ``mock`` plugin registers it, and the
replay engine answers unrecorded prompts with it (``fallback = "mock"``).

``mock_params``:
- ``type``: ``round`` (cycle through ``texts``, one per request), ``long`` (a long text),
  or ``echo`` (repeat the user's last message).
- ``texts``: the texts ``round`` cycles through (optional).
- ``initial_wait_sec``: delay before the first token; ``time_per_token_sec``: delay per token.

Text streams word by word; Japanese and Chinese characters stream one by one.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import Field

from .detokenize import StopStringFilter
from .options import PluginOptions, parse_options
from .types import FinishReason, GenerationRequest, TextDelta

DEFAULT_TEXTS = (
    "Hello! I am a mock assistant. I stream canned text so you can build without a model.",
    "こんにちは！これはモックの応答です。モデルなしで動作を確認できます。",
    "Streaming works: each word arrives as its own chunk, like tokens from a real model.",
)
LONG_TEXT = " ".join(
    f"This is sentence number {n} of a long mock answer, useful for testing scrolling and cancellation."
    for n in range(1, 41)
)
MOCK_TYPES = ("round", "long", "echo")

# One token: a CJK character, or a run of other non-space characters with its leading space.
_TOKEN = re.compile(
    r"[\u3000-\u30ff\u3400-\u9fff\uff00-\uffef]|\s*[^\s\u3000-\u30ff\u3400-\u9fff\uff00-\uffef]+|\s+"
)


def split_mock_tokens(text: str) -> list[str]:
    """Split text into the pieces the mock streams; joining them gives the text back."""
    return _TOKEN.findall(text)


class MockParams(PluginOptions):
    """The generator mock's parameters (the ``mock_params`` setting, or ``plugin_config.mock``)."""

    type: Literal["round", "long", "echo"] = Field(
        "round", description="round: cycle through texts; long: a long text; echo: repeat the user's message"
    )
    texts: list[str] | None = Field(None, min_length=1, description="the answers round cycles through")
    initial_wait_sec: float = Field(0.0, ge=0, description="wait before the first token")
    time_per_token_sec: float = Field(0.0, ge=0, description="wait between tokens")


class MockEngine:
    """An engine that needs no model: see the module docstring for its parameters."""

    name = "mock"
    tokenizer: Any = None

    def __init__(self, mock_params: MockParams | dict[str, Any] | None = None) -> None:
        params = parse_options(MockParams, mock_params, "mock_params")
        self.type = params.type
        self.initial_wait = params.initial_wait_sec
        self.time_per_token = params.time_per_token_sec
        self._texts = itertools.cycle(list(params.texts or DEFAULT_TEXTS))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def count_tokens(self, text: str) -> int | None:
        return len(split_mock_tokens(text))

    def answer_for(self, request: GenerationRequest) -> str:
        """The text this request will stream."""
        if self.type == "long":
            return LONG_TEXT
        if self.type == "echo":
            users = [m["content"] for m in request.messages or () if m.get("role") == "user"]
            return users[-1] if users else request.prompt
        return next(self._texts)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta]:
        tokens = split_mock_tokens(self.answer_for(request))
        if self.initial_wait:
            await asyncio.sleep(self.initial_wait)
        limit = request.params.max_new_tokens
        # Stop strings end the answer as a model's would: client code tested on the mock sees
        # its stop sequences work (or not) as they will on a real engine.
        stops = StopStringFilter(request.stop)
        count = 0
        for piece in tokens[:limit]:
            if self.time_per_token:
                await asyncio.sleep(self.time_per_token)
            else:
                await asyncio.sleep(0)  # let other requests and disconnect checks run
            count += 1
            shown = stops.feed(piece)
            if shown or not stops.stopped:
                yield TextDelta(shown, count)
            if stops.stopped:
                yield TextDelta("", count, FinishReason.STOP)
                return
        rest = stops.flush()
        reason = FinishReason.LENGTH if len(tokens) > limit else FinishReason.STOP
        yield TextDelta(rest, count, reason)
