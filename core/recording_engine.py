"""Recording as a wrapper around an engine: every finished request is written for the replay engine.

``RecordingEngine(engine, RecordingWriter(dir))`` serves what ``engine`` serves and writes each
request that finishes (EOS, a stop string or a length limit) to the directory in the format of
:mod:`chatstream.recording`; cancelled and failed requests are not recorded. The stream is
recorded as the client saw it, delta by delta with its timing. From a token engine (one whose
``generate`` takes ``trace=``, as every :class:`~chatstream.step_loop.StepLoopEngine` does) it
also keeps the prompt and output token ids and, where the engine has them, the top
``top_logits`` scores of each step; from any other engine, the text alone. Everything else
(``encode``, ``generate_ids``, counters) is the wrapped engine's.

Engine plugins offer it through :class:`RecordingOptions` (``record_dir``,
``record_top_logits``) and :func:`with_recording`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from typing import Any, TypeVar

from pydantic import Field

from .options import PluginOptions, parse_options
from .recording import GenerationRecord, RecordedDelta, RecordingWriter
from .step_loop import TokenTrace
from .types import Engine, EngineConfig, FinishReason, GenerationRequest, TextDelta

_RECORDED = (None, FinishReason.STOP, FinishReason.LENGTH)


class RecordingOptions(PluginOptions):
    """The recording options an engine plugin takes (mixed into its own options model)."""

    record_dir: str | None = Field(
        None,
        description="write every finished request to this directory, for the replay engine "
        "(engine = 'replay', plugin_config.replay.dir); unset: no recording",
    )
    record_top_logits: int = Field(
        5, ge=0, le=1000, description="how many of the highest scores to record per generated token"
    )

    def refuse_recording(self, path: str) -> None:
        """Raised by an engine given ``record_dir`` directly: recording is its factory's wrapper."""
        if self.record_dir:
            raise ValueError(
                f"{path}.record_dir is applied by the engine's registered factory, which wraps the "
                "engine in chatstream.recording_engine.RecordingEngine: build the engine with it"
            )


OptionsT = TypeVar("OptionsT", bound="RecordingOptions")


class RecordingEngine:
    """Serves ``engine`` and records its finished requests with ``writer`` (see the module docstring)."""

    def __init__(
        self,
        engine: Any,
        writer: RecordingWriter,
        top_logits: int = 5,
        add_special_tokens: bool | None = None,
    ) -> None:
        self.engine = engine
        self.name: str = str(engine.name)
        self.writer = writer
        self.top_logits = top_logits
        self.add_special_tokens = add_special_tokens
        self._traced = bool(getattr(engine, "supports_trace", False))

    def __getattr__(self, name: str) -> Any:
        # Only called for names this wrapper does not have: the wrapped engine's.
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self.engine.tokenizer = value

    @property
    def recorder(self) -> RecordingWriter:
        """The writer of recorded generations."""
        return self.writer

    def model_name(self) -> str:
        """The model named in the recording: the engine's ``model_name`` or its name."""
        name = getattr(self.engine, "model_name", None)
        return str(name) if name else self.name

    async def start(self) -> None:
        """Start the engine, then write the recording's manifest (model, engine, tokenizer)."""
        await self.engine.start()
        await asyncio.to_thread(
            self.writer.write_manifest, model=self.model_name(), engine=self.name, tokenizer=self.tokenizer
        )

    async def close(self) -> None:
        """Close the engine, then wait for every recorded request to be written."""
        await self.engine.close()
        await asyncio.to_thread(self.writer.close)

    def count_tokens(self, text: str) -> int | None:
        count: int | None = self.engine.count_tokens(text)
        return count

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TextDelta, None]:
        """The engine's stream, passed on unchanged; a request that finishes is recorded."""
        started = time.monotonic()
        trace = TokenTrace(self.top_logits) if self._traced else None
        stream = (
            self.engine.generate(request, trace=trace) if trace is not None else self.engine.generate(request)
        )
        deltas: list[RecordedDelta] = []
        async for delta in stream:
            reason = delta.finish_reason
            if reason in _RECORDED:
                elapsed = time.monotonic() - started
                deltas.append(
                    RecordedDelta(delta.text, delta.tokens, elapsed, reason.value if reason else None)
                )
                if reason is not None:
                    self._record(request, trace, deltas, delta.tokens)
            yield delta

    def _record(
        self, request: GenerationRequest, trace: TokenTrace | None, deltas: list[RecordedDelta], tokens: int
    ) -> None:
        """Hand a finished request to the writer thread, which writes its files."""
        add = request.add_special_tokens
        record = GenerationRecord(
            prompt=request.prompt,
            params=request.params.model_dump(mode="json"),
            deltas=list(deltas),
            finish_reason=deltas[-1].finish_reason or FinishReason.STOP.value,
            stop=[s for s in request.stop if s],
            add_special_tokens=add if add is not None else self.add_special_tokens,
            engine=self.name,
            model=self.model_name(),
            request_id=request.request_id,
        )
        if trace is None:
            self.writer.submit(record)
            return
        # EOS is a sampled step the consumer never sees as a token. The step loop may still add
        # steps of a row cut by a stop string: only those the stream counted are kept.
        taken = trace.steps[: tokens + int(trace.ended_on_eos)]
        record.prompt_token_ids = list(trace.prompt_ids)
        record.token_ids = [step[0] for step in taken]
        record.top_logits = len(taken[0][1]) if taken else 0
        # One decode per finished request, here: the tokenizer is not shared with another thread.
        # Special tokens left out, as they are from the streamed text.
        record.decoded = self.tokenizer.decode(
            record.token_ids[:tokens], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        top_ids = [step[1] for step in taken] if record.top_logits else None
        top_values = [step[2] for step in taken] if record.top_logits else None
        self.writer.submit(record, top_ids, top_values)


def with_recording(
    engine: Engine, options: RecordingOptions, add_special_tokens: bool | None = None
) -> Engine:
    """``engine`` wrapped in a :class:`RecordingEngine` when ``options.record_dir`` is set, else itself."""
    if not options.record_dir:
        same: Engine = engine
        return same
    wrapped: Engine = RecordingEngine(
        engine, RecordingWriter(options.record_dir), options.record_top_logits, add_special_tokens
    )
    return wrapped


def build_recorded(
    build: Callable[[EngineConfig], Any], config: EngineConfig, model: type[OptionsT], path: str
) -> Engine:
    """What an engine factory returns: ``build(config)`` with the options (``model``, at ``path``)
    validated and the recording options taken out, wrapped for recording when ``record_dir`` is set."""
    options = parse_options(model, config.options, path)
    engine = build(replace(config, options=options.model_copy(update={"record_dir": None})))
    return with_recording(engine, options, config.add_special_tokens)
