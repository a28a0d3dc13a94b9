"""The FastAPI transport: the documented ChatStream HTTP endpoints, mounted by ``append_apis``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from chatstream.chatstream import ChatStream
from chatstream.hookspecs import hookimpl

Endpoint = Callable[[ChatStream, Request], Awaitable[Response]]


async def chat_stream(cs: ChatStream, request: Request) -> Response:
    """POST: body ``{"user_input": "..."}``; streams the answer, each chunk the whole text so far."""
    return await cs.handle_chat_stream_request(request)


async def get_load(cs: ChatStream, request: Request) -> Response:
    """GET: generations in progress, requests waiting, their maxima and this instance's name."""
    return JSONResponse(cs.get_load())


# name -> (HTTP method, handler)
ENDPOINTS: dict[str, tuple[str, Endpoint]] = {
    "chat_stream": ("POST", chat_stream),
    "get_load": ("GET", get_load),
}


def selected_endpoints(options: dict[str, Any] | None) -> list[str]:
    """Endpoint names chosen by ``{"all": True}``, ``{"include": [...]}`` or ``{"exclude": [...]}``."""
    options = dict(options or {"all": True})
    unknown_keys = set(options) - {"all", "include", "exclude"}
    if unknown_keys:
        raise ValueError(
            f"append_apis options {sorted(unknown_keys)} are unknown: use all, include or exclude"
        )
    names = list(ENDPOINTS)
    for key in ("include", "exclude"):
        unknown = set(options.get(key) or ()) - set(names)
        if unknown:
            raise ValueError(
                f"append_apis {key}: unknown endpoints {sorted(unknown)}; known: {', '.join(names)}"
            )
    if options.get("include") is not None:
        names = [name for name in names if name in options["include"]]
    elif not options.get("all", True) and options.get("exclude") is None:
        names = []
    return [name for name in names if name not in set(options.get("exclude") or ())]


def install(app: FastAPI, cs: ChatStream, options: dict[str, Any] | None = None) -> None:
    """Mount the selected endpoints of ``cs`` on ``app``."""
    for name in selected_endpoints(options):
        method, handler = ENDPOINTS[name]

        async def endpoint(request: Request, _handler: Endpoint = handler) -> Response:
            return await _handler(cs, request)

        endpoint.__doc__ = handler.__doc__
        app.add_api_route(f"/{name}", endpoint, methods=[method], name=name)


@hookimpl
def register_transports(register: Any) -> None:
    register("fastapi", install)
