"""Hook specifications: the whole contract between chatstream and its plugins.

Hooks come in families. ``register_*`` hooks contribute named parts: each receives a
``register`` callback and calls it once per contribution; every implementation is called, and a
name given twice is refused with an error naming both plugins. ``startup``/``shutdown`` and
``on_*`` hooks observe the life of the server; every implementation is called, and return values
are ignored unless a hook says otherwise. All hooks take keyword arguments; new parameters are
only ever added, so an implementation may accept any subset of them.

Nothing on the per-token path goes through pluggy: hooks are factories called at start-up or once
per request.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("chatstream")
hookimpl = pluggy.HookimplMarker("chatstream")


@hookspec
def register_prompt_formats(register: Any) -> None:
    """Contribute prompt formats. Called once when the plugins load.

    Call ``register(name, cls, *, model_patterns=(), description="")`` for each format: ``cls``
    is an ``AbstractChatPrompt`` subclass; ``model_patterns`` are case-insensitive regular
    expressions matched against a model id or path to pick this format automatically.
    """


@hookspec
def register_logits_processors(register: Any) -> None:
    """Contribute logits processors usable in ``sampling.pipeline``. Called once when plugins load.

    Call ``register(name, factory)``; ``factory(rows, options)`` receives the batch's
    ``RowInfo`` list and the operator's options for this processor, and returns a processor with
    the transformers interface ``__call__(input_ids, scores) -> scores``, or None when no row
    needs it. The order processors run in is the order ``sampling.pipeline`` names them.
    """


@hookspec
def register_engines(register: Any) -> None:
    """Contribute generation engines. Called once when plugins load.

    Call ``register(name, factory)``; ``factory(config: EngineConfig)`` returns an ``Engine``.
    The ``engine`` setting picks one by name.
    """


@hookspec
def register_session_stores(register: Any) -> None:
    """Contribute session stores (where conversations live). Called once when plugins load.

    Call ``register(name, factory)``; ``factory(options)`` returns a store. The
    ``session_store`` setting picks one by name.
    """


@hookspec
def register_request_handlers(register: Any) -> None:
    """Contribute request handlers (who is asking, where their history is). Called once.

    Call ``register(name, cls)``; the ``request_handler`` setting picks one by name.
    """


@hookspec
def register_transports(register: Any) -> None:
    """Contribute transports (ways to reach a ``ChatStream``: HTTP APIs, UIs). Called once.

    Call ``register(name, install)``; ``install(app, chatstream, options)`` mounts routes on a
    FastAPI app. The ``transports`` setting lists which ones ``chatstream serve`` installs.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add CLI commands. Called when the ``chatstream`` command starts.

    ``cli`` is the top-level ``click.Group``; decorate new commands with ``@cli.command()``.
    Keep imports of heavy modules inside the command function.
    """


@hookspec
def startup(chatstream: Any) -> Any:
    """Called once after a ``ChatStream`` has started its engine, before it serves requests.

    May return an awaitable, which is awaited.
    """


@hookspec
def shutdown(chatstream: Any) -> Any:
    """Called once when a ``ChatStream`` stops, after in-flight requests ended. May return an awaitable."""


@hookspec
def on_request_finished(chatstream: Any, request_id: str, reason: str, info: dict[str, Any]) -> None:
    """Called once after every generation request (``/chat_stream``, ``/v1``, the console),
    however it ended, refusals included.

    ``reason`` is one of ``success``, ``client_disconnected_before_streaming``,
    ``client_disconnected_while_streaming``, ``unknown_error_occurred``, ``too_many_requests``,
    ``invalid_request`` (refused with a 4xx) and ``server_shutdown`` (the server ended the answer
    when its drain period ran out). ``request_id`` is the response's ``X-Request-Id``.
    ``info`` holds ``tokens``, ``duration_s``, ``error`` (a message, or None), ``ttft_s`` (time to
    the first token, or None), ``finish_reason`` (the engine's: ``stop``, ``length``, ...) and
    ``transport`` (``chat_stream``, ``openai`` or ``console``).
    """


@hookspec
def on_feedback(chatstream: Any, feedback: dict[str, Any]) -> None:
    """Called when a user sends feedback on a message (like/dislike).

    ``feedback`` holds ``message_id``, ``type``, ``message`` (that message's text), ``prompt``
    (the prompt up to that message, or None when the format cannot render it),
    ``generation_params`` and any form ``data`` the client sent.
    """
