"""``ChatStream``: takes a chat request, queues it, streams the model's answer, keeps the history."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Message, Send

from .admission import Admission, Load, TooManyRequests
from .pipeline import clamp_params
from .plugin_manager import LoadedPlugins, get_loaded_plugins
from .prompt import AbstractChatPrompt
from .registry import Contribution, collect, lookup
from .sessions import AbstractRequestHandler, ChatSession, SessionConflict, SessionStore
from .settings import Settings, SettingsError, load_settings
from .types import (
    Engine,
    EngineConfig,
    FinishedReason,
    FinishReason,
    GenerationParams,
    GenerationRequest,
    TextDelta,
)

F = TypeVar("F", bound=Callable[..., Any])

# Constructor options that are settings of the same name.
_SETTING_OPTIONS = (
    "device",
    "num_of_concurrent_executions",
    "max_queue_size",
    "too_many_request_as_http_error",
    "use_mock_response",
    "mock_params",
    "max_new_tokens",
    "context_len",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "repetition_penalty_method",
    "add_special_tokens",
)
# Settings that are also per-request generation parameters.
_PARAM_SETTINGS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "repetition_penalty_method",
)


class ChatStreamError(Exception):
    """A request chatstream refuses, with the HTTP status and a message that says how to fix it."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field:
            body["field"] = self.field
        return body


class StreamAborted(Exception):
    """A streamed answer failed after its headers were sent; the connection is closed unfinished."""


class ClientDisconnected(Exception):
    """The client went away before its request got a slot."""


@dataclass
class GenerationStats:
    """What a finished request reports: tokens generated, when the first came, how it ended."""

    tokens: int = 0
    first_token_at: float | None = None
    finish_reason: str | None = None

    def update(self, delta: TextDelta) -> None:
        if delta.tokens and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.tokens = max(self.tokens, delta.tokens)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason.value


class ChatStreamRequestBody(BaseModel):
    """The body of ``POST /chat_stream``."""

    model_config = ConfigDict(extra="ignore")

    user_input: str = Field("", description="the user's message")
    regenerate: bool = Field(False, description="generate the last answer again instead of adding a message")
    generation_params: dict[str, Any] | None = Field(
        None, description="per-request overrides (temperature, top_p, ...), validated and clamped"
    )


def _remember_explicit(init: F) -> F:
    """Record which constructor arguments the caller passed, so they (and only they) override settings."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._explicit = set(signature.bind(self, *args, **kwargs).arguments) - {"self"}
        return init(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _check_engine(name: str, obj: Any) -> None:
    if not callable(obj):
        raise SettingsError(f"engine {name!r}: the registered factory is not callable")


class ChatStream:
    """Serves one model as streaming chat to many users, with load control.

    Every option has a setting of the same name (``CHATSTREAM_<NAME>``); options passed here win
    over the environment and the settings file. ``model``/``tokenizer`` may be objects or a path;
    with neither, the embedded SmolLM2 model is served (or nothing is loaded when
    ``use_mock_response`` is true). ``device``, ``context_len`` and ``add_special_tokens`` are used
    by model engines and ignored by the mock.
    """

    _explicit: set[str]  # constructor arguments the caller passed (set by _remember_explicit)
    draining = False  # set by drain()/close(): new requests are refused, /ready says "draining"

    @_remember_explicit
    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        device: str | None = None,
        num_of_concurrent_executions: int = 2,
        max_queue_size: int = 5,
        too_many_request_as_http_error: bool = False,
        use_mock_response: bool = False,
        mock_params: dict[str, Any] | None = None,
        chat_prompt_clazz: type[AbstractChatPrompt] | None = None,
        max_new_tokens: int = 256,
        context_len: int = 1024,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        repetition_penalty: float | None = None,
        repetition_penalty_method: str = "multiplicative",
        add_special_tokens: bool | None = None,
        request_handler: AbstractRequestHandler | None = None,
        logger: logging.Logger | None = None,
        *,
        settings: Settings | None = None,
        plugins: LoadedPlugins | None = None,
        engine: Engine | None = None,
        session_store: SessionStore | None = None,
    ) -> None:
        explicit = self._explicit
        given = locals()
        overrides = {name: given[name] for name in _SETTING_OPTIONS if name in explicit}
        if mock_params is None and "mock_params" in overrides:
            del overrides["mock_params"]
        if isinstance(model, (str, os.PathLike)):
            overrides["model"] = os.fspath(model)
        if isinstance(tokenizer, (str, os.PathLike)):
            overrides["tokenizer"] = os.fspath(tokenizer)
        if settings is None:
            self.settings = load_settings(**overrides)
        else:
            self.settings = settings.model_copy(update=overrides) if overrides else settings
            self.settings = Settings.model_validate(self.settings.model_dump())
        self.logger = logger or logging.getLogger("chatstream")
        self.plugins = plugins or get_loaded_plugins()
        self.instance_name = os.environ.get("CHATSTREAM_INSTANCE_NAME") or socket.gethostname()
        self.admission = Admission(self.settings.num_of_concurrent_executions, self.settings.max_queue_size)
        self._model_obj = None if isinstance(model, (str, os.PathLike)) else model
        self._tokenizer_obj = None if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self._explicit_prompt_class = chat_prompt_clazz
        self.prompt_class: type[AbstractChatPrompt] | None = None
        self.prompt_format_reason = ""
        self.engine = engine if engine is not None else self._create_engine()
        # `is not None`: a store with ``__len__`` is falsy while empty, and must still be used.
        self.session_store: SessionStore = (
            session_store if session_store is not None else self._create_session_store()
        )
        self.request_handler = (
            request_handler if request_handler is not None else self._create_request_handler()
        )
        self.request_handler.bind(self)
        self.default_params = self._default_params()
        self._active_sessions: set[str] = set()
        self._started = False
        self._start_lock = asyncio.Lock()
        self._console_prompt: AbstractChatPrompt | None = None
        if (
            self._explicit_prompt_class is not None
            or self.engine.tokenizer is not None
            or self.settings.use_mock_response
        ):
            self._select_prompt_class()

    # -- composition ---------------------------------------------------------------------------------
    @property
    def pm(self) -> Any:
        return self.plugins.pm

    def contributions(self, kind: str) -> dict[str, Contribution[Any]]:
        """Named contributions of one kind from the loaded plugins (e.g. ``"engines"``)."""
        return collect(self.pm, kind)

    def _engine_name(self) -> str:
        return "mock" if self.settings.use_mock_response else self.settings.engine

    def _create_engine(self) -> Engine:
        name = self._engine_name()
        engines = collect(self.pm, "engines", check=_check_engine)
        factory = lookup(engines, "engine", name, "engine").obj
        config = EngineConfig(
            model=self._model_obj,
            tokenizer=self._tokenizer_obj,
            model_path=self.settings.model,
            device=self.settings.device,
            max_batch_size=self.settings.num_of_concurrent_executions,
            context_len=self.settings.context_len,
            add_special_tokens=self.settings.add_special_tokens,
            build_pipeline=self._pipeline_builder() if name != "mock" else None,
            options=self.settings.plugin_options(name),
            mock_params=dict(self.settings.mock_params) if name == "mock" else {},
        )
        return factory(config)

    def _pipeline_builder(self) -> Any:
        from . import pipeline  # imports torch: only for model engines

        return pipeline.make_pipeline_builder(self.settings.sampling, pipeline.processor_registry(self.pm))

    def _create_session_store(self) -> SessionStore:
        stores = self.contributions("session_stores")
        factory = lookup(stores, "session store", self.settings.session_store, "session_store").obj
        store: SessionStore = factory(self.settings.plugin_options(self.settings.session_store))
        return store

    def _create_request_handler(self) -> AbstractRequestHandler:
        handlers = self.contributions("request_handlers")
        handler_cls = lookup(
            handlers, "request handler", self.settings.request_handler, "request_handler"
        ).obj
        handler: AbstractRequestHandler = handler_cls(
            **self.settings.plugin_options(self.settings.request_handler)
        )
        return handler

    def _default_params(self) -> GenerationParams:
        values = {name: getattr(self.settings, name) for name in _PARAM_SETTINGS}
        try:
            return GenerationParams(**values)
        except ValidationError as exc:
            raise SettingsError(f"invalid generation settings: {exc}") from None

    def _select_prompt_class(self) -> None:
        tokenizer = self.engine.tokenizer
        if self._explicit_prompt_class is not None:
            cls = self._explicit_prompt_class
            self.prompt_format_reason = f"chat_prompt_clazz={cls.__name__}"
        else:
            model_id = self.settings.model
            if model_id is None and not self.settings.use_mock_response:
                from .models import EMBEDDED_MODEL_ID

                model_id = EMBEDDED_MODEL_ID
            if model_id is None and tokenizer is not None:
                model_id = getattr(tokenizer, "name_or_path", None)
            from .prompt_formats import prompt_format_registry, select_prompt_format

            formats = prompt_format_registry(self.pm)
            chosen, reason = select_prompt_format(
                formats, name=self.settings.prompt_format, model_id=model_id, tokenizer=tokenizer
            )
            cls = chosen.obj
            self.prompt_format_reason = f"{chosen.name} ({reason})"
        if tokenizer is not None:
            cls = cls.for_tokenizer(tokenizer)
        self.prompt_class = cls
        self.logger.info("prompt format: %s", self.prompt_format_reason)

    # -- life cycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model and run the ``startup`` hooks; called on the first request if not before."""
        async with self._start_lock:
            if self._started:
                return
            await self.engine.start()
            if self.prompt_class is None:
                self._select_prompt_class()
            self._started = True
            await self.call_hook("startup", chatstream=self)

    async def start_queue_worker(self) -> None:
        """Kept for code written against the documented API; same as ``start()``."""
        await self.start()

    async def drain(self, grace_s: float) -> bool:
        """Stop admitting requests and wait up to ``grace_s`` seconds for those in progress or in
        line to finish; True when all did. Graceful shutdown calls this before ``close()``."""
        self.draining = True
        self.admission.close()
        deadline = time.monotonic() + max(0.0, grace_s)
        while self.load.processing or self.load.waiting or self._active_sessions:
            if time.monotonic() >= deadline:
                load = self.load
                self.logger.warning(
                    "shutdown: %d generation(s) still running and %d waiting after %.1f s; stopping them",
                    load.processing,
                    load.waiting,
                    grace_s,
                )
                return False
            await asyncio.sleep(0.05)  # a shutdown path: polling keeps the hot path free of bookkeeping
        return True

    async def close(self) -> None:
        """Stop admitting, close the engine and the store, run the ``shutdown`` hooks."""
        self.draining = True
        self.admission.close()
        if self._started:
            await self.call_hook("shutdown", chatstream=self)
        await self.engine.close()
        await self.session_store.close()
        self._started = False

    @property
    def ready(self) -> bool:
        return self._started

    def is_generating(self, session_id: str | None) -> bool:
        """True while an answer is being generated for this session."""
        return session_id is not None and session_id in self._active_sessions

    async def call_hook(self, name: str, **kwargs: Any) -> None:
        """Call every implementation of a lifecycle or event hook, awaiting those that are async."""
        for result in getattr(self.pm.hook, name)(**kwargs):
            if inspect.isawaitable(result):
                await result

    # -- prompts --------------------------------------------------------------------------------------
    def new_prompt(self) -> AbstractChatPrompt:
        """An empty conversation in this model's format."""
        if self.prompt_class is None:
            self._select_prompt_class()
        assert self.prompt_class is not None
        return self.prompt_class()

    def restore_prompt(self, data: dict[str, Any]) -> AbstractChatPrompt:
        """A conversation from ``to_dict`` data, in this model's format."""
        prompt = self.new_prompt()
        if data:
            prompt.load_dict(data)
        return prompt

    def render(self, prompt: AbstractChatPrompt, params: GenerationParams) -> str:
        """The prompt text, dropping the oldest whole exchanges until it fits ``context_len``."""
        text = prompt.create_prompt()
        budget = self.settings.context_len - params.max_new_tokens
        count = self.engine.count_tokens(text)
        if count is None or count <= budget:
            return text
        trimmed = type(prompt).from_dict(prompt.to_dict())
        while count is not None and count > budget:
            if not trimmed.drop_oldest_exchange():
                raise ChatStreamError(
                    400,
                    "prompt_too_long",
                    f"the message is {count} tokens with the system prompt, but context_len="
                    f"{self.settings.context_len} leaves {budget} after "
                    f"max_new_tokens={params.max_new_tokens}; "
                    "send a shorter message or lower max_new_tokens",
                    field="user_input",
                )
            text = trimmed.create_prompt()
            count = self.engine.count_tokens(text)
        return text

    def generation_params(self, session: ChatSession | None = None, **overrides: Any) -> GenerationParams:
        """Default parameters updated by the session's and the request's values (validated, clamped)."""
        values = self.default_params.model_dump()
        if session is not None:
            values.update(session.generation_params)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            params = GenerationParams(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(p) for p in error["loc"]) or "generation_params"
            raise ChatStreamError(
                422, "invalid_parameter", f"generation_params.{field}: {error['msg']}", field=field
            ) from None
        return clamp_params(params, self.settings.sampling.limits)

    async def open_session(self, request: Request) -> ChatSession:
        """The request's session from the request handler; an unreachable store is a 503."""
        try:
            return await self.request_handler.open_session(request)
        except ConnectionError as exc:
            raise ChatStreamError(503, "session_store_unavailable", str(exc)) from None

    async def save_session(self, request: Request, session: ChatSession) -> None:
        """Keep the session through the request handler; an unreachable store is a 503."""
        try:
            await self.request_handler.save_session(request, session)
        except ConnectionError as exc:
            raise ChatStreamError(503, "session_store_unavailable", str(exc)) from None

    # -- load control ---------------------------------------------------------------------------------
    def get_load(self) -> dict[str, Any]:
        """Current load: generations in progress, requests waiting, their maxima, this instance's name."""
        return {**self.load.to_dict(), "instance_name": self.instance_name}

    @property
    def load(self) -> Load:
        return self.admission.load

    async def admit(self, request: Request | None = None, poll_s: float = 0.1) -> None:
        """Take a generation slot, waiting in line; leave the line if the client disconnects.

        Raises ``TooManyRequests`` when the line is full and ``ClientDisconnected`` when the client left.
        """
        if request is None:
            await self.admission.acquire()
            return
        waiter = asyncio.ensure_future(self.admission.acquire())
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=poll_s)
                if done:
                    waiter.result()
                    return
                if await request.is_disconnected():
                    raise ClientDisconnected()
        except BaseException:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError, TooManyRequests):
                    await waiter
            raise

    # -- streaming ------------------------------------------------------------------------------------
    def generation_request(
        self, session: ChatSession, params: GenerationParams, request_id: str = ""
    ) -> GenerationRequest:
        """What the engine is asked for the session's pending answer (may raise ``ChatStreamError``)."""
        prompt = session.prompt
        stop = list(prompt.get_stop_strs() or [])  # documented subclasses may return None
        stop += [token for token in prompt.get_eos_tokens() if token and token not in stop]
        return GenerationRequest(
            prompt=self.render(prompt, params),
            params=params,
            stop=stop,
            request_id=request_id or uuid.uuid4().hex,
            add_special_tokens=self._add_special_tokens(prompt),
            messages=prompt.messages(),
            # What users (or earlier answers, or an API client's system message) wrote stays text
            # for the tokenizer, whatever it holds.
            literal_spans=[m["content"] for m in prompt.rendered_messages()],
        )

    async def start_generation(
        self, gen_request: GenerationRequest, request: Request | None = None
    ) -> AsyncGenerator[TextDelta, None]:
        """Ask the engine and wait for its first delta, so that a request the engine refuses (a
        prompt too long, a sampling option it cannot run, a recording that is missing) becomes a
        ``ChatStreamError`` (4xx) before anything streams. Leaving clients raise ``ClientDisconnected``.
        """
        try:
            deltas = self.engine.generate(gen_request)
        except Exception as exc:
            raise _request_error(exc) from exc
        first_step = asyncio.ensure_future(deltas.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({first_step}, timeout=0.1)
                if done:
                    break
                if request is not None and await request.is_disconnected():
                    raise ClientDisconnected()
            first: TextDelta | None = first_step.result()
        except StopAsyncIteration:
            first = None
        except BaseException as exc:
            if not first_step.done():
                first_step.cancel()
                with contextlib.suppress(BaseException):
                    await first_step
            with anyio.CancelScope(shield=True):
                await deltas.aclose()
            if isinstance(exc, Exception) and not isinstance(exc, ClientDisconnected):
                raise _request_error(exc) from exc
            raise
        return _resume(first, deltas)

    async def stream_answer(
        self,
        session: ChatSession,
        deltas: AsyncGenerator[TextDelta, None],
        stats: GenerationStats | None = None,
    ) -> AsyncGenerator[str, None]:
        """Stream the pending answer of ``session`` from the engine's ``deltas`` (a slot must be held).

        The answer (complete, or partial if the consumer stops early) is written into the prompt;
        an answer cut by an engine error is not: the question stays, waiting for its answer
        (``regenerate`` asks again, a new message replaces it). ``stats`` (if given) is updated as
        tokens arrive.
        """
        prompt = session.prompt
        answer = ""
        failed = False
        replacer = prompt.output_replacer()  # e.g. "<NL>" back to "\n" for formats that need it
        try:
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    if stats is not None:
                        stats.update(delta)
                    shown = replacer.feed(delta.text) if delta.text else ""
                    if shown:
                        answer += shown
                        yield shown
                    if delta.finish_reason == FinishReason.ERROR:
                        raise RuntimeError("the engine reported an error")
            rest = replacer.flush()
            if rest:
                answer += rest
                yield rest
        except Exception:
            failed = True  # a half answer is not kept as if it were the model's whole answer
            raise
        finally:
            if failed:
                prompt.clear_last_responder_message()
            else:
                prompt.set_responder_last_msg(answer)

    def _add_special_tokens(self, prompt: AbstractChatPrompt) -> bool | None:
        if self.settings.add_special_tokens is not None:
            return self.settings.add_special_tokens
        return prompt.add_special_tokens

    async def handle_chat_stream_request(
        self,
        request: Request,
        request_body: dict[str, Any] | str | bytes | None = None,
        callback: Callable[[Request, str], Any] | None = None,
    ) -> Response:
        """Answer ``POST /chat_stream``: a streaming response of the cumulative answer text.

        ``callback(request, message)`` (plain or async) is told how the request ended.
        """
        if not self._started:
            await self.start()
        request_id = uuid.uuid4().hex
        started_at = time.monotonic()
        try:
            stream_format = request.query_params.get("format", self.settings.stream_format)
            if stream_format not in ("cumulative", "delta"):
                raise ChatStreamError(
                    400,
                    "invalid_format",
                    f"format={stream_format!r}: use cumulative or delta",
                    field="format",
                )
            body = await self._parse_body(request, request_body)
            session = await self.open_session(request)
            if self.is_generating(session.id):
                raise ChatStreamError(
                    409,
                    "session_busy",
                    "this session is already generating an answer; wait for it or stop it",
                )
            params = self.generation_params(session, **(body.generation_params or {}))
            self._begin_turn(session, body)
            gen_request = self.generation_request(session, params, request_id)
        except ChatStreamError as exc:
            return JSONResponse(exc.to_dict(), status_code=exc.status)
        if session.id is not None:
            self._active_sessions.add(session.id)
        try:
            await self.admit(request)
        except TooManyRequests as exc:
            self._active_sessions.discard(session.id or "")
            await self.report_finished(
                request, callback, request_id, FinishedReason.TOO_MANY_REQUESTS, started_at
            )
            return self._too_many_requests_response(exc)
        except (ClientDisconnected, asyncio.CancelledError):
            self._active_sessions.discard(session.id or "")
            await self.report_finished(
                request, callback, request_id, FinishedReason.CLIENT_DISCONNECTED_BEFORE_STREAMING, started_at
            )
            raise
        try:
            if session.id is not None:
                # Keep the question before the answer starts: a store that is down is a clear 503
                # now, not a history silently lost after the answer was shown.
                await self.save_session(request, session)
            deltas = await self.start_generation(gen_request, request)
        except (ClientDisconnected, asyncio.CancelledError):
            self.admission.release()
            self._active_sessions.discard(session.id or "")
            await self.report_finished(
                request, callback, request_id, FinishedReason.CLIENT_DISCONNECTED_BEFORE_STREAMING, started_at
            )
            raise
        except Exception as exc:
            self.admission.release()
            self._active_sessions.discard(session.id or "")
            error = ChatStreamError(500, "engine_error", f"generation could not start: {exc}")
            if isinstance(exc, ChatStreamError):
                error = exc
            else:
                self.logger.exception("request %s: generation could not start", request_id)
            await self.report_finished(
                request,
                callback,
                request_id,
                FinishedReason.UNKNOWN_ERROR_OCCURRED,
                started_at,
                error=error.message,
            )
            return JSONResponse(error.to_dict(), status_code=error.status)
        outcome = _Outcome()
        response = ChatStreamingResponse(
            self._stream_body(request, session, deltas, request_id, outcome),
            finalizer=functools.partial(
                self._finish_stream, request, session, deltas, request_id, callback, started_at, outcome
            ),
            media_type="text/plain; charset=utf-8",
            headers={"X-Message-Id": session.prompt.get_contents()[-1].id, "Cache-Control": "no-cache"},
            send_timeout_s=self.settings.client_read_timeout_s,
        )
        self.request_handler.finish_response(response, session)
        return response

    async def _stream_body(
        self,
        request: Request,
        session: ChatSession,
        deltas: AsyncGenerator[TextDelta, None],
        request_id: str,
        outcome: _Outcome,
    ) -> AsyncIterator[bytes]:
        stream_format = request.query_params.get("format", self.settings.stream_format)
        text = ""
        try:
            async with contextlib.aclosing(self.stream_answer(session, deltas, outcome.stats)) as answer:
                async for delta in answer:
                    text += delta
                    outcome.streamed = True
                    # The documented wire format sends the whole answer so far in every chunk.
                    # "replace": a lone surrogate (valid in JSON, not in UTF-8) must not end the stream.
                    yield (delta if stream_format == "delta" else text).encode("utf-8", "replace")
            outcome.reason = FinishedReason.SUCCESS
            # Before the last chunk: a client that sees the end and asks again at once finds its
            # answer stored, its session free (no 409) and the slot back.
            with anyio.CancelScope(shield=True):
                await self._settle(request, session, deltas, request_id, outcome)
        except (asyncio.CancelledError, GeneratorExit):
            if outcome.streamed:
                outcome.reason = FinishedReason.CLIENT_DISCONNECTED_WHILE_STREAMING
            raise
        except Exception as exc:
            outcome.reason = FinishedReason.UNKNOWN_ERROR_OCCURRED
            outcome.error = f"{type(exc).__name__}: {exc}"
            self.logger.exception("request %s failed", request_id)
            with anyio.CancelScope(shield=True):
                await self._settle(request, session, deltas, request_id, outcome)
            # The status line is gone: the one signal a plain-text stream has left is to end
            # without its last chunk, which HTTP clients report as an error (curl exit 18,
            # httpx RemoteProtocolError, fetch's reader rejects), not as a complete answer.
            raise StreamAborted(outcome.error) from None

    async def _finish_stream(
        self,
        request: Request,
        session: ChatSession,
        deltas: AsyncGenerator[TextDelta, None],
        request_id: str,
        callback: Callable[[Request, str], Any] | None,
        started_at: float,
        outcome: _Outcome,
    ) -> None:
        """Run once per streamed response, whether or not its body ever started: the engine row and
        the slot are freed, the conversation (possibly partial) saved, the end reported."""
        try:
            await self._settle(request, session, deltas, request_id, outcome)
        finally:
            await self.report_finished(
                request,
                callback,
                request_id,
                outcome.reason,
                started_at,
                error=outcome.error,
                stats=outcome.stats,
            )

    async def _settle(
        self,
        request: Request,
        session: ChatSession,
        deltas: AsyncGenerator[TextDelta, None],
        request_id: str,
        outcome: _Outcome,
    ) -> None:
        """Free the engine row, save the conversation, then free the session and the slot; once.
        (Saving first: once the load is back to zero, every conversation is stored.)"""
        if outcome.settled:
            return
        outcome.settled = True
        try:
            await deltas.aclose()
        finally:
            try:
                if session.id is not None:
                    await self.request_handler.save_session(request, session)
            except Exception:
                self.logger.exception("request %s: the conversation could not be saved", request_id)
            finally:
                self._active_sessions.discard(session.id or "")
                self.admission.release()

    async def _parse_body(
        self, request: Request, body: dict[str, Any] | str | bytes | None
    ) -> ChatStreamRequestBody:
        if body is None:
            raw = await request.body()
            if len(raw) > 16 * self.settings.max_input_chars + 4096:
                raise ChatStreamError(
                    413, "body_too_large", "the request body is too large", field="user_input"
                )
            body = raw
        if isinstance(body, (bytes, str)):
            try:
                body = json.loads(body) if body else {}
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                raise ChatStreamError(
                    400, "invalid_json", 'the body must be JSON like {"user_input": "Hello"}'
                ) from None
        if not isinstance(body, dict):
            raise ChatStreamError(
                400, "invalid_body", 'the body must be a JSON object like {"user_input": "Hello"}'
            )
        try:
            parsed = ChatStreamRequestBody.model_validate(body)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(p) for p in error["loc"])
            raise ChatStreamError(422, "invalid_field", f"{field}: {error['msg']}", field=field) from None
        if len(parsed.user_input) > self.settings.max_input_chars:
            raise ChatStreamError(
                413,
                "input_too_long",
                f"user_input has {len(parsed.user_input)} characters; the limit is "
                f"{self.settings.max_input_chars} (setting max_input_chars)",
                field="user_input",
            )
        return parsed

    def _begin_turn(self, session: ChatSession, body: ChatStreamRequestBody) -> None:
        prompt = session.prompt
        if body.regenerate:
            contents = prompt.get_contents()
            if not contents or contents[-1].role != prompt.responder:
                raise ChatStreamError(
                    409,
                    "nothing_to_regenerate",
                    "there is no answer to regenerate yet; send user_input first",
                    field="regenerate",
                )
            prompt.clear_last_responder_message()
            contents[-1].id = uuid.uuid4().hex
            return
        contents = prompt.get_contents()
        if contents and contents[-1].role == prompt.responder and contents[-1].message is None:
            prompt.remove_last_requester_msg()  # a turn whose answer never came (the server stopped)
        if not body.user_input.strip():
            raise ChatStreamError(
                422, "empty_input", "user_input is empty: send the message text", field="user_input"
            )
        prompt.add_requester_msg(body.user_input)
        prompt.add_responder_msg(None)

    def _too_many_requests_response(self, exc: TooManyRequests) -> Response:
        body = {"error": "too_many_requests"}
        if self.settings.too_many_request_as_http_error:
            return JSONResponse(body, status_code=429, headers={"Retry-After": str(exc.retry_after)})
        return JSONResponse(body, status_code=200)

    async def report_finished(
        self,
        request: Request | None,
        callback: Callable[[Request, str], Any] | None,
        request_id: str,
        reason: FinishedReason,
        started_at: float,
        error: str | None = None,
        stats: GenerationStats | None = None,
        transport: str = "chat_stream",
    ) -> None:
        """Tell the callback and the ``on_request_finished`` hook how a request ended."""
        stats = stats or GenerationStats()
        info = {
            "duration_s": time.monotonic() - started_at,
            "error": error,
            "tokens": stats.tokens,
            "ttft_s": None if stats.first_token_at is None else stats.first_token_at - started_at,
            "finish_reason": stats.finish_reason,
            "transport": transport,
        }
        try:
            if callback is not None:
                result = callback(request, reason.value)  # type: ignore[arg-type]
                if inspect.isawaitable(result):
                    await result
            await self.call_hook(
                "on_request_finished", chatstream=self, request_id=request_id, reason=reason.value, info=info
            )
        except Exception:
            self.logger.exception("a request-finished callback or hook failed")

    def append_apis(self, app: Any, opts: dict[str, Any] | None = None) -> None:
        """Mount the HTTP endpoints on a FastAPI app: ``opts`` is ``{"all": True}`` (default),
        ``{"include": [names]}`` or ``{"exclude": [names]}``."""
        from .app import install_transports

        install_transports(app, self, ["fastapi"], opts or {"all": True})

    # -- console --------------------------------------------------------------------------------------
    async def handle_console_input(self, user_input: str) -> AsyncIterator[str]:
        """Answer one console message; yields the cumulative answer text. History is kept in memory."""
        if not self._started:
            await self.start()
        if self._console_prompt is None:
            self._console_prompt = self.new_prompt()
        session = ChatSession(None, self._console_prompt)
        self._begin_turn(session, ChatStreamRequestBody(user_input=user_input))
        gen_request = self.generation_request(session, self.generation_params())
        await self.admit()
        try:
            text = ""
            async for delta in self.stream_answer(session, await self.start_generation(gen_request)):
                text += delta
                yield text
        finally:
            self.admission.release()


def _request_error(exc: Exception) -> Exception:
    """An engine's refusal as a ``ChatStreamError``: its own HTTP ``status``/``code`` when it has
    them, 400 for a ``ValueError`` (the request cannot be served as asked); other errors unchanged."""
    status, code = getattr(exc, "status", None), getattr(exc, "code", None)
    if isinstance(exc, ChatStreamError):
        return exc
    if isinstance(status, int) and isinstance(code, str):
        return ChatStreamError(status, code, str(exc))
    if isinstance(exc, ValueError):
        return ChatStreamError(400, "invalid_request", str(exc))
    return exc


async def _resume(
    first: TextDelta | None, rest: AsyncGenerator[TextDelta, None]
) -> AsyncGenerator[TextDelta, None]:
    """The engine's deltas again, the first one (already awaited) included."""
    async with contextlib.aclosing(rest):
        if first is None:
            return
        yield first
        async for delta in rest:
            yield delta


@dataclass
class _Outcome:
    """How a streamed response ended, filled in by its body and read by its finalizer."""

    reason: FinishedReason = FinishedReason.CLIENT_DISCONNECTED_BEFORE_STREAMING
    error: str | None = None
    streamed: bool = False
    settled: bool = False  # slot released, conversation saved, session freed
    stats: GenerationStats = field(default_factory=GenerationStats)


class ChatStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that always closes its body iterator and then runs ``finalizer``,
    even when the client left before the body started, so a vanished client frees its slot.

    With ``send_timeout_s``, a client that reads nothing for that long (the server's send waits on
    full socket buffers) is treated as gone: the stream ends unfinished and the slot is freed, so a
    client that stops reading without closing cannot hold a slot forever.
    """

    def __init__(
        self,
        content: Any,
        *,
        finalizer: Callable[[], Awaitable[None]] | None = None,
        send_timeout_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self.finalizer = finalizer
        self.send_timeout_s = send_timeout_s

    async def stream_response(self, send: Send) -> None:
        timeout = self.send_timeout_s

        async def send_in_time(message: Message) -> None:
            with anyio.fail_after(timeout):
                await send(message)

        try:
            await super().stream_response(send if timeout is None else send_in_time)
        except StreamAborted:
            # Return without the last body message: the server closes the connection unfinished
            # (uvicorn logs one line, "returned without completing response"); the cause is logged.
            pass
        except TimeoutError:
            logging.getLogger("chatstream").warning(
                "a client read nothing for %.0f s (client_read_timeout_s): its stream was ended", timeout
            )
        finally:
            with anyio.CancelScope(shield=True):
                closer = getattr(self.body_iterator, "aclose", None)
                try:
                    if closer is not None:
                        await closer()
                finally:
                    if self.finalizer is not None:
                        finalizer, self.finalizer = self.finalizer, None
                        await finalizer()


__all__ = [
    "ChatStream",
    "ChatStreamError",
    "ChatStreamRequestBody",
    "GenerationStats",
    "SessionConflict",
    "StreamAborted",
]
