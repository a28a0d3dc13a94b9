"""The ``replay`` engine: serves generations recorded by the ``transformers`` engine, with no model.

Record once with ``plugin_config.transformers.record_dir``; replay anywhere with
``engine = "replay"`` and ``plugin_config.replay``:

- ``dir`` (required): the recording directory (format: :mod:`chatstream.recording`).
- ``fallback``: what a request that was never recorded gets. ``"error"`` (default) raises
  :class:`~chatstream.recording.RecordingNotFoundError`, whose message names the nearest recorded
  prompt; ``"mock"`` streams the generator mock's canned answers; any other string is streamed
  as a fixed answer.
- ``timing``: ``"none"`` (default) streams as fast as the consumer reads; ``"recorded"`` waits
  so that each delta arrives at the offset it was recorded at.

A request is matched on its exact prompt text and the generation settings that change the output
(see :mod:`chatstream.recording`), and streams the recorded deltas exactly as the client saw them
at recording time: penalties, prompt formats and stop strings were applied then and are not
recomputed. Neither torch nor a model is loaded. ``MockTransformer`` (``chatstream.mock_transformer``)
gives the same engine behind model and tokenizer stand-ins.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from chatstream.hookspecs import hookimpl
from chatstream.recording import GenerationRecord, RecordingStore
from chatstream.types import EngineConfig, FinishReason, GenerationRequest, TextDelta

ENGINE_NAME = "replay"
TIMINGS = ("none", "recorded")
OPTIONS = ("dir", "fallback", "timing")


class ReplayEngine:
    """Streams recorded generations; see the module docstring for its options."""

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
        if not isinstance(fallback, str):
            raise ValueError(
                f"replay option fallback={fallback!r} is invalid: "
                "use 'error', 'mock' or the text to answer with"
            )
        if timing not in TIMINGS:
            raise ValueError(f"replay option timing={timing!r} is invalid: use one of {', '.join(TIMINGS)}")
        self.store = store
        self.fallback = fallback
        self.timing = timing
        self.add_special_tokens = add_special_tokens
        if tokenizer is None:
            from chatstream.mock_transformer import MockTokenizer

            tokenizer = MockTokenizer(store)
        self.tokenizer: Any = tokenizer
        self._turn: dict[str, int] = {}
        self._lock = threading.Lock()
        self._mock: Any = None
        if fallback != "error":
            from chatstream.plugins.engines.mock import MockEngine

            self._mock = MockEngine({} if fallback == "mock" else {"texts": [fallback]})

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
            stream: AsyncIterator[TextDelta] = self._mock.generate(request)
            return stream
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


def engine_from_options(options: dict[str, Any], add_special_tokens: bool | None = None) -> ReplayEngine:
    """A ``ReplayEngine`` from ``plugin_config.replay`` options; errors name the option and the fix."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(
            f"plugin_config.replay has unknown option(s) {', '.join(map(repr, unknown))}: "
            f"use {', '.join(OPTIONS)}"
        )
    directory = options.get("dir")
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise ValueError(
            "the replay engine needs plugin_config.replay.dir, the directory a transformers engine "
            "recorded into (plugin_config.transformers.record_dir); "
            "e.g. CHATSTREAM_PLUGIN_CONFIG__REPLAY__DIR=recordings"
        )
    return ReplayEngine(
        RecordingStore(directory),
        fallback=options.get("fallback", "error"),
        timing=options.get("timing", "none"),
        add_special_tokens=add_special_tokens,
    )


def create_replay_engine(config: EngineConfig) -> ReplayEngine:
    """The engine factory registered as ``replay`` (a ``MockTransformer`` model brings its own options)."""
    from chatstream.mock_transformer import MockModel

    if isinstance(config.model, MockModel):
        return config.model.mock.create_engine(config)
    return engine_from_options(dict(config.options), config.add_special_tokens)


@hookimpl
def register_engines(register: Any) -> None:
    """Register the ``replay`` engine."""
    register(ENGINE_NAME, create_replay_engine)


@hookimpl
def register_commands(cli: Any) -> None:
    """Add ``chatstream recordings DIR``: list what a recording directory holds."""
    import click

    @cli.command("recordings")
    @click.argument("directory", type=click.Path(exists=True, file_okay=False))
    @click.option("--json", "as_json", is_flag=True, help="print JSON")
    def recordings(directory: str, as_json: bool) -> None:
        """List the generations recorded in DIRECTORY (for the replay engine)."""
        import json

        store = RecordingStore(directory)
        rows = [
            {
                "name": r.name,
                "prompt": r.prompt,
                "answer": r.text,
                "finish_reason": r.finish_reason,
                "tokens": len(r.token_ids),
                "temperature": r.params.get("temperature"),
                "seed": r.params.get("seed"),
            }
            for r in store.records
        ]
        if as_json:
            click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
            return
        model = store.manifest.get("model") or "(unknown model)"
        click.echo(f"{len(rows)} generation(s) recorded from {model}")
        for row in rows:
            prompt = str(row["prompt"]).replace("\n", "\\n")
            answer = str(row["answer"]).replace("\n", "\\n")
            click.echo(
                f"- {prompt[-60:]!r} -> {answer[:60]!r} [{row['finish_reason']}, {row['tokens']} tokens]"
            )
