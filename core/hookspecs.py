"""Hook specifications: the whole contract between chatstream and its plugins.

Hooks come in families. ``register_*`` hooks contribute named parts: each receives a
``register`` callback and calls it once per contribution; every implementation is called once, when
the kind's registry is first built (see ``chatstream.registry``). A name given by two plugins is an
error naming both, unless one implementation has a higher priority: a ``tryfirst`` contribution
replaces a normal one, a normal one replaces a ``trylast`` one (built-ins that users commonly replace
are ``trylast``). Contributions with options pass ``options=`` a pydantic model (subclass
``chatstream.options.PluginOptions``): core validates the settings section against it and hands the
factory the model instance.

``startup``/``shutdown`` and ``on_*`` hooks observe the life of the server: each implementation is
called on its own; one that raises is logged with its plugin's name and the others still run.
Return values are ignored unless a hook says otherwise. All hooks take keyword arguments; new
parameters are only ever added, so an implementation may accept any subset of them.

Nothing on the per-token path goes through pluggy: hooks are factories called at start-up or once
per request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click
    from fastapi import FastAPI
    from pydantic import BaseModel

    from .chatstream import ChatStream
    from .prompt import AbstractChatPrompt
    from .sessions import AbstractRequestHandler, SessionStore
    from .types import Engine, EngineConfig, LogitsProcessor, RowInfo

hookspec = pluggy.HookspecMarker("chatstream")
hookimpl = pluggy.HookimplMarker("chatstream")


# -- what register_* hooks receive ----------------------------------------------------------------------
class RegisterPromptFormat(Protocol):
    """``register`` of ``register_prompt_formats``."""

    def __call__(
        self,
        name: str,
        cls: type[AbstractChatPrompt],
        *,
        model_patterns: Sequence[str] = (),
        description: str = "",
    ) -> None: ...


# ``factory(rows, options)``: one processor for the batch, or None when no row needs it.
LogitsProcessorFactory = Callable[["Sequence[RowInfo]", Any], "LogitsProcessor | None"]


class RegisterLogitsProcessor(Protocol):
    """``register`` of ``register_logits_processors``."""

    def __call__(
        self, name: str, factory: LogitsProcessorFactory, *, options: type[BaseModel] | None = None
    ) -> None: ...


class RegisterEngine(Protocol):
    """``register`` of ``register_engines``."""

    def __call__(
        self, name: str, factory: Callable[[EngineConfig], Engine], *, options: type[BaseModel] | None = None
    ) -> None: ...


class RegisterSessionStore(Protocol):
    """``register`` of ``register_session_stores``."""

    def __call__(
        self, name: str, factory: Callable[[Any], SessionStore], *, options: type[BaseModel] | None = None
    ) -> None: ...


class RegisterRequestHandler(Protocol):
    """``register`` of ``register_request_handlers``."""

    def __call__(
        self, name: str, cls: type[AbstractRequestHandler], *, options: type[BaseModel] | None = None
    ) -> None: ...


# ``install(app, chatstream, options)`` mounts the transport's routes and middleware on ``app``.
TransportInstaller = Callable[["FastAPI", "ChatStream", Any], None]


class RegisterTransport(Protocol):
    """``register`` of ``register_transports``."""

    def __call__(
        self, name: str, install: TransportInstaller, *, options: type[BaseModel] | None = None
    ) -> None: ...


# -- what event hooks receive ----------------------------------------------------------------------------
FinishedReasonName = Literal[
    "success",
    "client_disconnected_before_streaming",
    "client_disconnected_while_streaming",
    "unknown_error_occurred",
    "too_many_requests",
    "invalid_request",
    "server_shutdown",
]


class RequestFinishedInfo(TypedDict):
    """``info`` of ``on_request_finished``."""

    tokens: int  # tokens generated
    duration_s: float  # from admission to the end of the answer
    error: str | None  # what went wrong, or None
    ttft_s: float | None  # time to the first token, or None when none came
    finish_reason: str | None  # the engine's: "stop", "length", ... (None when it never finished)
    transport: str  # "chat_stream", "openai" or "console"
    prompt_tokens: int | None  # the prompt's length in tokens (None when the engine does not say)
    cached_tokens: int | None  # prompt tokens reused from an earlier turn's KV cache, not computed


class Feedback(TypedDict):
    """``feedback`` of ``on_feedback``."""

    message_id: str
    type: Literal["like", "dislike"]
    message: str  # the text of the message the feedback is about
    prompt: str | None  # the prompt up to that message; None when the format cannot render it
    generation_params: dict[str, Any]  # the session's generation parameters
    data: dict[str, Any]  # the form data the client sent ({} when none)


# -- the hooks -------------------------------------------------------------------------------------------
@hookspec
def register_prompt_formats(register: RegisterPromptFormat) -> None:
    """Contribute prompt formats.

    Call ``register(name, cls, *, model_patterns=(), description="")`` for each format: ``cls``
    is an ``AbstractChatPrompt`` subclass; ``model_patterns`` are case-insensitive regular
    expressions matched against a model id or path to pick this format automatically.
    """


@hookspec
def register_logits_processors(register: RegisterLogitsProcessor) -> None:
    """Contribute logits processors usable in ``sampling.pipeline``.

    Call ``register(name, factory, *, options=None)``; ``factory(rows, options)`` receives the
    batch's ``RowInfo`` list and the operator's options for this processor
    (``sampling.processors.<name>``: the ``options`` model instance, or a dict when none was given),
    and returns a processor with the transformers interface ``__call__(input_ids, scores) -> scores``,
    or None when no row needs it. The order processors run in is the order ``sampling.pipeline``
    names them.
    """


@hookspec
def register_engines(register: RegisterEngine) -> None:
    """Contribute generation engines.

    Call ``register(name, factory, *, options=None)``; ``factory(config: EngineConfig)`` returns an
    ``Engine``, with ``config.options`` from ``plugin_config.<name>``. The ``engine`` setting picks
    one by name.
    """


@hookspec
def register_session_stores(register: RegisterSessionStore) -> None:
    """Contribute session stores (where conversations live).

    Call ``register(name, factory, *, options=None)``; ``factory(options)`` returns a store, with
    the options of ``plugin_config.<name>``. The ``session_store`` setting picks one by name.
    """


@hookspec
def register_request_handlers(register: RegisterRequestHandler) -> None:
    """Contribute request handlers (who is asking, where their history is).

    Call ``register(name, cls, *, options=None)``; the ``request_handler`` setting picks one by
    name. It is built as ``cls(**plugin_config.<name>)``, the keys validated first when an
    ``options`` model is given.
    """


@hookspec
def register_transports(register: RegisterTransport) -> None:
    """Contribute transports (ways to reach a ``ChatStream``: HTTP APIs, UIs).

    Call ``register(name, install, *, options=None)``; ``install(app, chatstream, options)`` mounts
    routes on a FastAPI app, with the options of ``plugin_config.<name>``. The ``transports``
    setting lists which ones ``chatstream serve`` installs.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add CLI commands. Called when the ``chatstream`` command starts.

    ``cli`` is the top-level ``click.Group``; decorate new commands with ``@cli.command()``.
    Keep imports of heavy modules inside the command function.
    """


@hookspec
def startup(chatstream: ChatStream) -> Any:
    """Called once after a ``ChatStream`` has started its engine, before it serves requests.

    May return an awaitable, which is awaited.
    """


@hookspec
def shutdown(chatstream: ChatStream) -> Any:
    """Called once when a ``ChatStream`` stops, after in-flight requests ended. May return an awaitable."""


@hookspec
def on_request_finished(
    chatstream: ChatStream, request_id: str, reason: FinishedReasonName, info: RequestFinishedInfo
) -> None:
    """Called once after every generation request (``/chat_stream``, ``/v1``, the console),
    however it ended, refusals included.

    ``reason`` is one of ``success``, ``client_disconnected_before_streaming``,
    ``client_disconnected_while_streaming``, ``unknown_error_occurred``, ``too_many_requests``,
    ``invalid_request`` (refused with a 4xx) and ``server_shutdown`` (the server ended the answer
    when its drain period ran out). ``request_id`` is the response's ``X-Request-Id``.
    ``info`` holds ``tokens``, ``duration_s``, ``error`` (a message, or None), ``ttft_s`` (time to
    the first token, or None), ``finish_reason`` (the engine's: ``stop``, ``length``, ...),
    ``transport`` (``chat_stream``, ``openai`` or ``console``), ``prompt_tokens`` (the prompt's
    length) and ``cached_tokens`` (how many prompt tokens came from the prefix cache instead of
    being computed); those two are None when the engine does not say.
    """


@hookspec
def on_feedback(chatstream: ChatStream, feedback: Feedback) -> None:
    """Called when a user sends feedback on a message (like/dislike).

    ``feedback`` holds ``message_id``, ``type``, ``message`` (that message's text), ``prompt``
    (the prompt up to that message, or None when the format cannot render it),
    ``generation_params`` and ``data`` (the form data the client sent, ``{}`` when none).
    """
