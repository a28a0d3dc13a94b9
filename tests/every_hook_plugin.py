"""A third-party plugin that implements every hook chatstream defines, recording each call.

``tests/test_plugin_contract.py`` runs a server with it and checks that every hook was called with
what ``core/hookspecs.py`` promises; a hook added to the specs without an implementation here fails
``test_every_hook_has_a_test_implementation``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import click
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import Field

from chatstream.hookspecs import hookimpl
from chatstream.options import PluginOptions
from chatstream.plugins.handlers.simple_session import SimpleSessionRequestHandler
from chatstream.plugins.prompts.chatml import ChatMLPrompt
from chatstream.plugins.stores.memory import MemorySessionStore


class EveryHookPrompt(ChatMLPrompt):
    """ChatML under another name."""


class StoreOptions(PluginOptions):
    max_sessions: int = Field(100, ge=1, description="sessions kept")


class TransportOptions(PluginOptions):
    greeting: str = Field("hello", description="what GET /every_hook answers")


class ProcessorOptions(PluginOptions):
    scale: float = Field(1.0, gt=0, description="multiplies every score")


class EveryHook:
    """Contributes one of each kind (names start with ``every_hook``) and records every hook call."""

    def __init__(self, engine_factory: Any) -> None:
        self.engine_factory = engine_factory  # the built-in mock engine's factory
        self.calls: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def _record(self, hook: str, **kwargs: Any) -> None:
        self.calls[hook].append(kwargs)

    @hookimpl
    def register_prompt_formats(self, register: Any) -> None:
        self._record("register_prompt_formats")
        register("every_hook_format", EveryHookPrompt, description="ChatML, renamed")

    @hookimpl
    def register_logits_processors(self, register: Any) -> None:
        self._record("register_logits_processors")

        def factory(rows: Any, options: ProcessorOptions) -> Any:
            self._record("processor_factory", options=options)
            return None

        register("every_hook_processor", factory, options=ProcessorOptions)

    @hookimpl
    def register_engines(self, register: Any) -> None:
        self._record("register_engines")

        def factory(config: Any) -> Any:
            self._record("engine_factory", options=config.options)
            return self.engine_factory(config)

        register("every_hook_engine", factory)

    @hookimpl
    def register_session_stores(self, register: Any) -> None:
        self._record("register_session_stores")

        def factory(options: StoreOptions) -> Any:
            self._record("store_factory", options=options)
            return MemorySessionStore(max_sessions=options.max_sessions)

        register("every_hook_store", factory, options=StoreOptions)

    @hookimpl
    def register_request_handlers(self, register: Any) -> None:
        self._record("register_request_handlers")
        register("every_hook_handler", SimpleSessionRequestHandler)

    @hookimpl
    def register_transports(self, register: Any) -> None:
        self._record("register_transports")

        def install(app: FastAPI, chatstream: Any, options: TransportOptions) -> None:
            self._record("transport_install", options=options)

            async def greet() -> JSONResponse:
                return JSONResponse({"greeting": options.greeting})

            app.add_api_route("/every_hook", greet, methods=["GET"])

        register("every_hook_transport", install, options=TransportOptions)

    @hookimpl
    def register_commands(self, cli: click.Group) -> None:
        self._record("register_commands")

        @cli.command("every-hook")
        def every_hook() -> None:
            """Say that the plugin's command runs."""
            click.echo("every hook command ran")

    @hookimpl
    def startup(self, chatstream: Any) -> None:
        self._record("startup", chatstream=chatstream)

    @hookimpl
    async def shutdown(self, chatstream: Any) -> None:
        self._record("shutdown", chatstream=chatstream)

    @hookimpl
    def on_request_finished(
        self, chatstream: Any, request_id: str, reason: str, info: dict[str, Any]
    ) -> None:
        self._record(
            "on_request_finished", chatstream=chatstream, request_id=request_id, reason=reason, info=info
        )

    @hookimpl
    def on_feedback(self, chatstream: Any, feedback: dict[str, Any]) -> None:
        self._record("on_feedback", chatstream=chatstream, feedback=feedback)
