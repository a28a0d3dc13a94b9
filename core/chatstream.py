"""``ChatStream``: takes a chat request, queues it, streams the model's answer, keeps the history."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import Response

from .admission import Admission, Load
from .conversations import ConversationBook, first_question, owner_of, unknown_conversation
from .engine_choice import choose_engine
from .errors import ChatStreamError, ClientDisconnected, StreamAborted, check_unicode
from .pipeline import clamp_params
from .plugin_manager import LoadedPlugins, each_implementation, get_loaded_plugins
from .prompt import AbstractChatPrompt
from .prompt_fit import fit_prompt
from .registry import Contribution, lookup, registry
from .sessions import AbstractRequestHandler, ChatSession, SessionConflict, SessionStore
from .settings import Settings, SettingsError, load_settings
from .turn import Turn
from .types import (
    Engine,
    EngineConfig,
    FinishedReason,
    GenerationParams,
    GenerationRequest,
    TextDelta,
    validate_params,
)

F = TypeVar("F", bound=Callable[..., Any])

# After the drain period, how long the answers the server ends get to send their last event.
_STOP_GRACE_S = 1.0

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


@dataclass
class GenerationStats:
    """What a finished request reports: tokens generated, when the first came, how it ended, and
    (where the engine says) the prompt's length and how much of it came from the prefix cache."""

    tokens: int = 0
    first_token_at: float | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None

    def update(self, delta: TextDelta) -> None:
        if delta.tokens and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.tokens = max(self.tokens, delta.tokens)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason.value
        if delta.prompt_tokens is not None:
            self.prompt_tokens = delta.prompt_tokens
        if delta.cached_tokens is not None:
            self.cached_tokens = delta.cached_tokens


class ChatStreamRequestBody(BaseModel):
    """The body of ``POST /chat_stream``."""

    model_config = ConfigDict(extra="ignore")

    user_input: str = Field("", description="the user's message")

    _unicode = field_validator("user_input")(check_unicode)

    regenerate: bool = Field(False, description="generate the last answer again instead of adding a message")
    generation_params: dict[str, Any] | None = Field(
        None, description="per-request overrides (temperature, top_p, ...), validated and clamped"
    )
    conversation_id: str | None = Field(
        None,
        max_length=100,
        description="continue this one of the session's conversations (it becomes current); "
        "default: the current one",
    )


def _remember_explicit(init: F) -> F:
    """Record which constructor arguments the caller passed, so they (and only they) override settings."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._explicit = set(signature.bind(self, *args, **kwargs).arguments) - {"self"}
        return init(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


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
        self.plugins = plugins or get_loaded_plugins(self.settings)
        self.instance_name = os.environ.get("CHATSTREAM_INSTANCE_NAME") or socket.gethostname()
        self.admission = Admission(self.settings.num_of_concurrent_executions, self.settings.max_queue_size)
        self._model_obj = None if isinstance(model, (str, os.PathLike)) else model
        self._tokenizer_obj = None if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self._explicit_prompt_class = chat_prompt_clazz
        self.prompt_class: type[AbstractChatPrompt] | None = None
        self.prompt_format_reason = ""
        self.default_params = self._default_params()
        self.engine = engine if engine is not None else self._create_engine()
        # `is not None`: a store with ``__len__`` is falsy while empty, and must still be used.
        self.session_store: SessionStore = (
            session_store if session_store is not None else self._create_session_store()
        )
        # Conversations and stored responses as objects of their own, in the same store.
        self.conversations = ConversationBook(
            self.session_store,
            max_conversations=self.settings.max_conversations_per_owner,
            max_responses=self.settings.max_responses_per_owner,
        )
        self.request_handler = (
            request_handler if request_handler is not None else self._create_request_handler()
        )
        self.request_handler.bind(self)
        self._active_sessions: set[str] = set()
        self._session_locks: dict[str, asyncio.Lock] = {}
        self._hook_failures: set[tuple[str, str]] = set()  # (hook, plugin) already logged in full
        self.stopping = asyncio.Event()  # set when the drain ran out: answers still streaming end
        self._started = False
        self._start_lock = asyncio.Lock()
        self._console_prompt: AbstractChatPrompt | None = None
        # Renders and tokenizes prompts off the event loop; one thread, since tokenizers are not
        # all safe to share between threads.
        self._prompt_worker = ThreadPoolExecutor(1, thread_name_prefix="chatstream-prompt")
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
        return registry(self.pm, kind)

    def _create_engine(self) -> Engine:
        engines = self.contributions("engines")
        name, reason = choose_engine(self.settings, engines, model_object=self._model_obj is not None)
        if name != "mock":
            self.logger.info("engine %r: %s (set engine / --engine to choose another)", name, reason)
        engine = lookup(engines, "engine", name, "engine")
        config = EngineConfig(
            model=self._model_obj,
            tokenizer=self._tokenizer_obj,
            model_path=self.settings.model,
            device=self.settings.device,
            max_batch_size=self.settings.num_of_concurrent_executions,
            context_len=self.settings.context_len,
            add_special_tokens=self.settings.add_special_tokens,
            build_pipeline=self._pipeline_builder() if name != "mock" else None,
            options=engine.parse_options(self.settings.plugin_config.get(name)),
            mock_params=dict(self.settings.mock_params) if name == "mock" else {},
            default_params=self.default_params,
            engines=engines,
        )
        return engine.obj(config)

    def _pipeline_builder(self) -> Any:
        from . import pipeline  # imports torch: only for model engines

        return pipeline.make_pipeline_builder(self.settings.sampling, pipeline.processor_registry(self.pm))

    def _create_session_store(self) -> SessionStore:
        name = self.settings.session_store
        contribution = lookup(self.contributions("session_stores"), "session store", name, "session_store")
        store: SessionStore = contribution.obj(
            contribution.parse_options(self.settings.plugin_config.get(name))
        )
        return store

    def _create_request_handler(self) -> AbstractRequestHandler:
        name = self.settings.request_handler
        contribution = lookup(
            self.contributions("request_handlers"), "request handler", name, "request_handler"
        )
        options = contribution.parse_options(self.settings.plugin_config.get(name))
        handler: AbstractRequestHandler = contribution.obj(**dict(options))  # validated keys as arguments
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
            started = time.monotonic()
            self.logger.info("loading the model with the %r engine...", self.engine.name)
            await self.engine.start()
            self.logger.info("model loaded in %.1f s: serving", time.monotonic() - started)
            if self.prompt_class is None:
                self._select_prompt_class()
            self._started = True
            await self.call_hook("startup", chatstream=self)

    async def start_queue_worker(self) -> None:
        """Kept for code written against the documented API; same as ``start()``."""
        await self.start()

    async def drain(self, grace_s: float) -> bool:
        """Stop admitting requests and wait up to ``grace_s`` seconds for those in progress or in
        line to finish; True when all did. Answers still streaming then are ended by the server
        (reason ``server_shutdown``: OpenAI streams get an error event and ``[DONE]``). Graceful
        shutdown calls this before ``close()``."""
        self.draining = True
        self.admission.close()
        if await self._idle_within(grace_s):
            return True
        load = self.load
        self.logger.warning(
            "shutdown: %d generation(s) still running and %d waiting after %.1f s; stopping them",
            load.processing,
            load.waiting,
            grace_s,
        )
        self.stopping.set()
        await self._idle_within(_STOP_GRACE_S)
        return False

    async def _idle_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + max(0.0, seconds)
        while self.load.processing or self.load.waiting or self._active_sessions:
            if time.monotonic() >= deadline:
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
        self._prompt_worker.shutdown(wait=False, cancel_futures=True)
        self._prompt_worker = ThreadPoolExecutor(1, thread_name_prefix="chatstream-prompt")
        self._started = False

    @property
    def ready(self) -> bool:
        return self._started

    def is_generating(self, session_id: str | None) -> bool:
        """True while an answer is being generated for this session."""
        return session_id is not None and session_id in self._active_sessions

    async def call_hook(self, name: str, **kwargs: Any) -> None:
        """Call every implementation of a lifecycle or event hook, one at a time, awaiting those
        that are async. One that raises is logged with its plugin's name (with the traceback the
        first time) and the others still run: a plugin's bug never changes what a client gets."""
        for _impl, plugin, alone in each_implementation(self.pm, name):
            try:
                for result in alone(**kwargs):
                    if inspect.isawaitable(result):
                        await result
            except Exception:
                first = (name, plugin) not in self._hook_failures
                self._hook_failures.add((name, plugin))
                self.logger.error("plugin %r failed in its %s hook", plugin, name, exc_info=first)

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

    def generation_params(self, session: ChatSession | None = None, **overrides: Any) -> GenerationParams:
        """Default parameters updated by the session's and the request's values (validated, clamped).

        A refused value is a ``ChatStreamError`` whose ``field`` is the parameter's name.
        """
        values = self.default_params.model_dump()
        if session is not None:
            values.update(session.generation_params)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return clamp_params(validate_params(values), self.settings.sampling.limits)

    async def open_session(self, request: Request) -> ChatSession:
        """The request's session from the request handler; an unreachable store is a 503."""
        try:
            return await self.request_handler.open_session(request)
        except ConnectionError as exc:
            raise ChatStreamError(503, "session_store_unavailable", str(exc)) from None

    async def save_session(self, request: Request | None, session: ChatSession) -> None:
        """Keep the session through the request handler, and its current conversation among the
        session's stored conversations; an unreachable store is a 503."""
        try:
            await self._keep_conversation(session)
            await self.request_handler.save_session(request, session)  # type: ignore[arg-type]
        except ConnectionError as exc:
            raise ChatStreamError(503, "session_store_unavailable", str(exc)) from None

    # -- a session's conversations --------------------------------------------------------------------
    def conversation_owner(self, session: ChatSession) -> str | None:
        """The owner id of a browser session's conversations (None for stateless requests)."""
        return None if session.id is None else owner_of("session", session.id)

    async def _keep_conversation(self, session: ChatSession) -> None:
        """Copy the session's conversation into its stored conversations (made on first use)."""
        owner = self.conversation_owner(session)
        if owner is None:
            return
        state = {"prompt": session.prompt.to_dict(), "generation_params": dict(session.generation_params)}
        title = first_question(session.prompt)
        if session.conversation_id is not None:
            # One write; a conversation made empty (New chat) is named by its first question.
            kept = await self.conversations.update_conversation(
                owner, session.conversation_id, default_title=title, changes=state
            )
            if kept is not None:
                return

        if not session.prompt.get_contents():
            return  # nothing to keep yet: a conversation is made by its first message
        record = await self.conversations.create_conversation(owner, title=title, extra=state)
        session.conversation_id = record["id"]

    async def session_conversation(self, session: ChatSession, conversation_id: str) -> dict[str, Any]:
        """One of the session's stored conversations; ``ChatStreamError`` 404 when it is not the
        session's (another session's, an API key's, or none)."""
        owner = self.conversation_owner(session)
        record = None if owner is None else await self.conversations.conversation(owner, conversation_id)
        if record is None or "prompt" not in record:
            raise unknown_conversation(conversation_id)
        return record

    async def open_conversation(self, session: ChatSession, conversation_id: str) -> dict[str, Any]:
        """Make one of the session's stored conversations its current one (the prompt and the
        generation parameters it was left with); ``ChatStreamError`` 404 when it is not the session's."""
        record = await self.session_conversation(session, conversation_id)
        session.prompt = self.restore_prompt(record.get("prompt") or {})
        session.generation_params = dict(record.get("generation_params") or {})
        session.conversation_id = conversation_id
        return record

    @contextlib.asynccontextmanager
    async def session_lock(self, session_id: str | None) -> AsyncIterator[None]:
        """Serializes read-modify-write of one session's record in this process."""
        if session_id is None:
            yield
            return
        lock = self._session_locks.setdefault(session_id, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not getattr(lock, "_waiters", None):
                self._session_locks.pop(session_id, None)

    async def save_turn(self, request: Request | None, session: ChatSession) -> None:
        """Save a turn's conversation, keeping the generation parameters stored meanwhile (a
        ``set_generation_params`` during the stream is not overwritten by the stream's save)."""
        async with self.session_lock(session.id):
            await self.request_handler.refresh_session(request, session)
            await self.save_session(request, session)

    # -- load control ---------------------------------------------------------------------------------
    def get_load(self) -> dict[str, Any]:
        """Current load: generations in progress, requests waiting, their maxima, this instance's name."""
        return {**self.load.to_dict(), "instance_name": self.instance_name}

    @property
    def load(self) -> Load:
        return self.admission.load

    # -- streaming ------------------------------------------------------------------------------------
    async def prepare_generation(
        self, session: ChatSession, params: GenerationParams, request_id: str = ""
    ) -> GenerationRequest:
        """What the engine is asked for the session's pending answer: the prompt rendered as
        segments, tokenized once and fitted into the context (may raise ``ChatStreamError``).

        Rendering and tokenizing cost time in proportion to the conversation, so they run in a
        worker thread: a huge request never stalls the event loop (``/health`` keeps answering).
        """
        prompt = session.prompt
        add_special_tokens = self._add_special_tokens(prompt)
        context_len = min(self.settings.context_len, getattr(self.engine, "context_len", None) or 1 << 62)
        fit = functools.partial(
            fit_prompt,
            prompt,
            self.engine,
            context_len=context_len,
            max_new_tokens=params.max_new_tokens,
            add_special_tokens=add_special_tokens,
        )
        fitted = await asyncio.get_running_loop().run_in_executor(self._prompt_worker, fit)
        stop = list(prompt.get_stop_strs() or [])  # documented subclasses may return None
        stop += [token for token in prompt.get_eos_tokens() if token and token not in stop]
        return GenerationRequest(
            prompt=fitted.text,
            params=params,
            stop=stop,
            request_id=request_id or uuid.uuid4().hex,
            add_special_tokens=add_special_tokens,
            messages=prompt.messages(),
            segments=fitted.segments,
            prompt_ids=fitted.ids,
            prompt_tokens=fitted.tokens,
            cache_scope=session.id,
        )

    def turn(
        self,
        session: ChatSession,
        params: GenerationParams,
        *,
        transport: str,
        request: Request | None = None,
        callback: Callable[[Any, str], Any] | None = None,
        extra_stop: list[str] | None = None,
    ) -> Turn:
        """A :class:`~chatstream.turn.Turn` answering the session's pending message. With a
        ``request``, its ``X-Request-Id`` names the turn and its disconnect is watched."""
        request_id = None
        is_connected = None
        if request is not None:
            request_id = getattr(request.state, "request_id", None)

            async def is_connected() -> bool:
                return not await request.is_disconnected()

        return Turn(
            self,
            session,
            params,
            transport=transport,
            request=request,
            request_id=request_id,
            is_connected=is_connected,
            callback=callback,
            extra_stop=extra_stop,
        )

    async def handle_chat_stream_request(
        self,
        request: Request,
        request_body: dict[str, Any] | str | bytes | None = None,
        callback: Callable[[Request, str], Any] | None = None,
    ) -> Response:
        """Answer ``POST /chat_stream``: a streaming response of the cumulative answer text.

        ``callback(request, message)`` (plain or async) is told how the request ended. The HTTP
        side (body, ``?format=``, the streaming response) lives in ``chat_stream_http``.
        """
        from .chat_stream_http import answer_chat_stream

        return await answer_chat_stream(self, request, request_body, callback)

    def _add_special_tokens(self, prompt: AbstractChatPrompt) -> bool | None:
        if self.settings.add_special_tokens is not None:
            return self.settings.add_special_tokens
        return prompt.add_special_tokens

    def begin_turn(self, session: ChatSession, body: ChatStreamRequestBody) -> None:
        """Add the body's question (or, with ``regenerate``, clear the last answer) to the session,
        with the pending answer after it."""
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
        self.begin_turn(session, ChatStreamRequestBody(user_input=user_input))
        turn = self.turn(session, self.generation_params(), transport="console")
        try:
            await turn.start()
            text = ""
            async for delta in turn.stream():
                text += delta
                yield text
        finally:
            await turn.finish()
            # The console keeps its history itself (no store): the answer, or no half answer.
            if turn.reason == FinishedReason.UNKNOWN_ERROR_OCCURRED:
                session.prompt.clear_last_responder_message()
            else:
                session.prompt.set_responder_last_msg(turn.answer)


__all__ = [
    "ChatStream",
    "ChatStreamError",
    "ChatStreamRequestBody",
    "ClientDisconnected",
    "GenerationStats",
    "SessionConflict",
    "StreamAborted",
]
