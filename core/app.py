"""Build the FastAPI application that ``chatstream serve`` runs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from .chatstream import ChatStream
from .registry import lookup
from .settings import Settings


def install_transports(
    app: FastAPI, cs: ChatStream, names: list[str], options: dict[str, Any] | None = None
) -> None:
    """Mount each named transport (``settings.transports``) on ``app``."""
    transports = cs.contributions("transports")
    for name in names:
        install = lookup(transports, "transport", name, "transports").obj
        install(app, cs, options if options is not None else cs.settings.plugin_options(name) or None)


def create_app(
    settings: Settings | None = None, chatstream: ChatStream | None = None, **options: Any
) -> FastAPI:
    """An app serving one ``ChatStream`` with the transports named in settings; starts and stops it."""
    cs = chatstream or ChatStream(settings=settings, **options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await cs.start()
        try:
            yield
        finally:
            await cs.close()

    app = FastAPI(title="chatstream", lifespan=lifespan)
    app.state.chatstream = cs
    install_transports(app, cs, cs.settings.transports)
    return app
