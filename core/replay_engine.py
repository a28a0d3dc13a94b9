"""The replay engine: serves recorded generations (:mod:`chatstream.recording`) with no model.

It lives in core because two things build it: the ``replay`` engine plugin (from
``plugin_config.replay``) and :class:`~chatstream.mock_transformer.MockTransformer` (from its
stand-in model). A request is matched on its exact prompt text and the generation settings that
change the output, and streams the recorded deltas exactly as the client saw them at recording
time: penalties, prompt formats and stop strings were applied then and are not recomputed.
Neither torch nor a model is loaded.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import Field, field_validator

from .mock_engine import MockEngine
from .options import PluginOptions, parse_options
from .recording import GenerationRecord, RecordingStore
from .types import FinishReason, GenerationRequest, TextDelta

ENGINE_NAME = "replay"
OPTIONS_PATH = "plugin_config.replay"


class ReplayBehaviour(PluginOptions):
    """How a recording is replayed, wherever it comes from."""

    fallback: str = Field(
        "error",
        description="what a request that was never recorded gets: 'error' (a 404 naming the nearest "
        "recorded prompt), 'mock' (the generator mock's canned answers) or the text to answer with",
    )
    timing: Literal["none", "recorded"] = Field(
        "none",
        description="'none' streams as fast as the consumer reads; 'recorded' sends each delta at "
        "the offset it was recorded at",
    )


class ReplayOptions(ReplayBehaviour):
    """``plugin_config.replay``."""

    dir: str = Field(
        min_length=1,
        description="the recording directory: where a transformers engine recorded "
        "(plugin_config.transformers.record_dir)",
    )

    @field_validator("dir", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value


class ReplayEngine:
    """Streams recorded generations; see the module docstring."""

    name = ENGINE_NAME

    def __init__(
        self,
        store: RecordingStore,
        *,
        fallback: str = "error",
        timing: str = "none",
        add_special_tokens: bool | None = None,
        tokenizer: Any = None,
    ) -> None:
        behaviour = parse_options(ReplayBehaviour, {"fallback": fallback, "timing": timing}, OPTIONS_PATH)
        self.store = store
        self.fallback = behaviour.fallback
        self.timing = behaviour.timing
        self.add_special_tokens = add_special_tokens
        if tokenizer is None:
            from .mock_transformer import MockTokenizer

            tokenizer = MockTokenizer(store)
        self.tokenizer: Any = tokenizer
        self._turn: dict[str, int] = {}
        self._lock = threading.Lock()
        self._mock: MockEngine | None = None
        if self.fallback != "error":
            self._mock = MockEngine({} if self.fallback == "mock" else {"texts": [self.fallback]})

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def count_tokens(self, text: str) -> int | None:
        """The recorded token count of ``text`` when it was a recorded prompt, else None."""
        return self.store.prompt_token_count(text)

    def _effective_add_special_tokens(self, request: GenerationRequest) -> bool | None:
        if request.add_special_tokens is not None:
            return request.add_special_tokens
        return self.add_special_tokens

    def lookup(self, request: GenerationRequest) -> GenerationRecord | None:
        """The recording this request replays (the next one in turn when there are several), or None."""
        found = self.store.find(
            request.prompt, request.params, request.stop, self._effective_add_special_tokens(request)
        )
        if not found:
            return None
        key = found[0].key
        with self._lock:
            turn = self._turn.get(key, 0)
            self._turn[key] = turn + 1
        return found[turn % len(found)]

    def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta]:
        """The recorded stream of ``request``.

        Looks the request up at once, so an unrecorded one raises ``RecordingNotFoundError`` from
        this call (with ``fallback="error"``), before anything streams.
        """
        record = self.lookup(request)
        if record is not None:
            return self._replay(record)
        if self._mock is not None:
            return self._mock.generate(request)
        raise self.store.not_found(
            request.prompt, request.params, request.stop, self._effective_add_special_tokens(request)
        )

    async def _replay(self, record: GenerationRecord) -> AsyncIterator[TextDelta]:
        started = time.monotonic()
        for delta in record.deltas:
            if self.timing == "recorded":
                await asyncio.sleep(max(0.0, started + delta.t - time.monotonic()))
            else:
                await asyncio.sleep(0)  # let other requests and disconnect checks run
            reason = FinishReason(delta.finish_reason) if delta.finish_reason else None
            yield TextDelta(delta.text, tokens=delta.tokens, finish_reason=reason)


def engine_from_options(
    options: ReplayOptions | dict[str, Any] | None, add_special_tokens: bool | None = None
) -> ReplayEngine:
    """A ``ReplayEngine`` from ``plugin_config.replay`` (a dict is validated; errors name the option)."""
    checked = parse_options(ReplayOptions, options, OPTIONS_PATH)
    return ReplayEngine(
        RecordingStore(checked.dir),
        fallback=checked.fallback,
        timing=checked.timing,
        add_special_tokens=add_special_tokens,
    )
