"""Build the FastAPI application that ``chatstream serve`` runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .chatstream import ChatStream
from .logs import RequestIdMiddleware
from .registry import lookup
from .settings import Settings


def install_transports(
    app: FastAPI, cs: ChatStream, names: list[str], options: dict[str, Any] | None = None
) -> None:
    """Mount each named transport (``settings.transports``) on ``app``, with its options
    (``plugin_config.<name>``, validated when it declares an options model; ``options`` overrides)."""
    transports = cs.contributions("transports")
    for name in names:
        transport = lookup(transports, "transport", name, "transports")
        raw = options if options is not None else cs.settings.plugin_config.get(name)
        transport.obj(app, cs, transport.parse_options(raw))


class LifecycleGate:
    """Pure ASGI: holds requests until the model has loaded and refuses them while draining.

    Paths in ``open_paths`` (health, readiness, metrics) always pass, so probes get answers while
    a slow model loads. Streaming bodies pass through untouched.
    """

    def __init__(self, app: ASGIApp, cs: ChatStream, state: Any) -> None:
        self.app = app
        self.cs = cs
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.state.open_paths:
            await self.app(scope, receive, send)
            return
        if self.cs.draining:
            refusal = JSONResponse(
                {
                    "error": "shutting_down",
                    "message": "the server is shutting down: retry on another instance",
                },
                status_code=503,
                headers={"Retry-After": "5", "Connection": "close"},
            )
            await refusal(scope, receive, send)
            return
        start: asyncio.Task[None] | None = getattr(self.state, "chatstream_start", None)
        if start is not None and not start.done():
            # Requests made while the model loads wait for it (asyncio.wait: a client leaving
            # must not cancel the shared start task).
            await asyncio.wait({start})
        if start is not None and start.done() and not start.cancelled() and start.exception() is not None:
            error = start.exception()
            refusal = JSONResponse(
                {
                    "error": "model_not_loaded",
                    "message": f"the model failed to load ({type(error).__name__}: {error}); "
                    "see the server log, fix the setting and restart",
                },
                status_code=503,
            )
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(
    settings: Settings | None = None, chatstream: ChatStream | None = None, **options: Any
) -> FastAPI:
    """An app serving one ``ChatStream`` with the transports named in settings; starts and stops it.

    The model loads in the background so health and readiness answer at once; other requests
    wait for the load. At shutdown, new requests are refused, answers in progress get
    ``shutdown_grace_s`` to finish, then the ``ChatStream`` closes.
    """
    cs = chatstream or ChatStream(settings=settings, **options)
    grace_s = cs.settings.shutdown_grace_s

    def log_start_failure(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            cs.logger.error("the model failed to load", exc_info=task.exception())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start = asyncio.create_task(cs.start(), name="chatstream-start")
        start.add_done_callback(log_start_failure)
        app.state.chatstream_start = start
        try:
            yield
        finally:
            if not start.done():
                start.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await start
            await cs.drain(grace_s)
            await cs.close()

    app = FastAPI(title="chatstream", lifespan=lifespan)
    app.state.chatstream = cs
    app.state.open_paths = set()  # transports add the paths that must answer while loading or draining
    app.state.chatstream_start = None
    # Added before the transports' middleware, so theirs wrap the gate's answers too.
    app.add_middleware(LifecycleGate, cs=cs, state=app.state)
    install_transports(app, cs, cs.settings.transports)
    # Outermost: every response, the gate's and the transports' included, carries X-Request-Id.
    app.add_middleware(RequestIdMiddleware)
    return app
