"""The FastAPI transport: the documented ChatStream HTTP endpoints, mounted by ``append_apis``.

Each endpoint is checked against the caller's role (``roles`` / ``api_keys`` settings) before it
runs. Bodies are pydantic models: a wrong type, a missing field or an oversized body is a 4xx whose
JSON names the field.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.requests import ClientDisconnect

from chatstream.access import AccessDenied, AccessPolicy, presented_key
from chatstream.chat_stream_http import answer_chat_stream
from chatstream.chatstream import ChatStream, ChatStreamError, ChatStreamRequestBody
from chatstream.hookspecs import Feedback, hookimpl
from chatstream.http import client_left, json_body
from chatstream.options import PluginOptions, parse_options
from chatstream.prompt import AbstractChatPrompt
from chatstream.sessions import ChatSession
from chatstream.types import GenerationParams

from . import conversations
from .bodies import parse_body, respond

Endpoint = Callable[[ChatStream, Request], Awaitable[Response]]


class FeedbackBody(BaseModel):
    """The body of ``POST /set_feedback``."""

    model_config = ConfigDict(extra="forbid")

    message_id: str = Field(min_length=1, max_length=200)
    type: Literal["like", "dislike"]
    data: dict[str, Any] | None = None


async def chat_stream(cs: ChatStream, request: Request) -> Response:
    """POST ``{"user_input": "...", "regenerate": false}``: streams the answer (header X-Message-Id)."""
    return await answer_chat_stream(cs, request)


async def clear_context(cs: ChatStream, request: Request) -> Response:
    """POST: forget this session's conversation."""
    session = await cs.open_session(request)
    if cs.is_generating(session.id):
        raise ChatStreamError(409, "session_busy", "an answer is being generated; stop it first")
    session.prompt.clear_history()
    if session.id is not None and not session.is_new:  # a new session has nothing to clear
        await cs.save_session(request, session)
    return respond(cs, session, {"success": True})


async def get_prompt(cs: ChatStream, request: Request) -> Response:
    """GET: this session's conversation as the model sees it (rendered prompt and messages)."""
    session = await cs.open_session(request)
    prompt = session.prompt
    return respond(
        cs,
        session,
        {
            "prompt": rendered_or_none(prompt),
            "messages": [{"role": c.role, "message": c.message, "id": c.id} for c in prompt.get_contents()],
            "format": type(prompt).__name__,
        },
    )


def rendered_or_none(prompt: AbstractChatPrompt) -> str | None:
    """The prompt the model would see, or None when the format cannot render this conversation
    yet (a chat template that needs a user message, before the first one)."""
    try:
        return prompt.create_prompt() if prompt.get_contents() else prompt.build_initial_prompt()
    except Exception:
        return None


async def set_generation_params(cs: ChatStream, request: Request) -> Response:
    """POST any of temperature, top_k, top_p, min_p, max_new_tokens, penalties, seed for this session."""
    raw = await parse_body(request, _ParamsBody)
    values = raw.model_dump(exclude_unset=True)
    session = await cs.open_session(request)
    if session.id is None:
        raise ChatStreamError(
            409,
            "stateless",
            "this request handler keeps no session: send generation_params with each request",
        )
    # Validate first: a refused value stores nothing.
    cs.generation_params(ChatSession(None, session.prompt, {**session.generation_params, **values}))
    async with cs.session_lock(session.id):  # a turn saving meanwhile re-reads these parameters
        if not session.is_new:
            session = await cs.open_session(request)  # the record as it is now, under the lock
        session.generation_params = {**session.generation_params, **values}
        effective = cs.generation_params(session)
        await cs.save_session(request, session)
    return respond(cs, session, effective.model_dump())


async def get_generation_params(cs: ChatStream, request: Request) -> Response:
    """GET: the generation parameters this session's requests use."""
    session = await cs.open_session(request)
    return respond(cs, session, cs.generation_params(session).model_dump())


async def set_feedback(cs: ChatStream, request: Request) -> Response:
    """POST ``{"message_id", "type": "like"|"dislike", "data": {...}}``: goes to the ``on_feedback`` hook."""
    body = await parse_body(request, FeedbackBody)
    session = await cs.open_session(request)
    prompt = session.prompt
    contents = prompt.get_contents()
    index = next((i for i, c in enumerate(contents) if c.id == body.message_id), None)
    if index is None:
        raise ChatStreamError(
            404, "unknown_message", f"message_id {body.message_id!r} is not in this conversation"
        )
    upto = type(prompt).from_dict(prompt.to_dict())
    del upto.get_contents()[index:]
    if contents[index].role == prompt.responder:
        upto.add_responder_msg(None)  # the prompt that produced this answer
    feedback: Feedback = {
        "message_id": body.message_id,
        "type": body.type,
        "message": contents[index].message or "",
        "prompt": rendered_or_none(upto),
        "generation_params": cs.generation_params(session).model_dump(),
        "data": body.data or {},
    }
    await cs.call_hook("on_feedback", chatstream=cs, feedback=feedback)
    return respond(cs, session, {"success": True})


async def get_load(cs: ChatStream, request: Request) -> Response:
    """GET: generations in progress, requests waiting, their maxima and this instance's name."""
    return JSONResponse(cs.get_load())


async def get_resource_usage(cs: ChatStream, request: Request) -> Response:
    """GET: this process's memory, and GPU memory when a GPU is in use."""
    import psutil

    process = psutil.Process(os.getpid())
    usage: dict[str, Any] = {
        "instance_name": cs.instance_name,
        "process": {
            "rss_bytes": process.memory_info().rss,
            "cpu_percent": process.cpu_percent(interval=None),
        },
        "system": {"memory_percent": psutil.virtual_memory().percent},
        "gpus": [],
    }
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            usage["gpus"].append(
                {
                    "index": index,
                    "name": torch.cuda.get_device_name(index),
                    "allocated_bytes": torch.cuda.memory_allocated(index),
                    "reserved_bytes": torch.cuda.memory_reserved(index),
                    "total_bytes": torch.cuda.get_device_properties(index).total_memory,
                }
            )
    return JSONResponse(usage)


# The body of ``POST /set_generation_params``: any subset of the generation parameters, each
# checked with the rest by ``GenerationParams`` itself (one list of fields, in core).
_OPTIONAL_FIELDS: dict[str, Any] = {
    name: (Optional[info.annotation], None)  # noqa: UP045 (the annotation is a runtime object)
    for name, info in GenerationParams.model_fields.items()
}
_ParamsBody: type[BaseModel] = create_model(
    "SetGenerationParamsBody", __config__=ConfigDict(extra="forbid"), **_OPTIONAL_FIELDS
)


# What the OpenAPI schema says about the bodies and query parameters the endpoints read by hand.
OPENAPI: dict[str, dict[str, Any]] = {
    "chat_stream": {
        **json_body(ChatStreamRequestBody),
        "parameters": [
            {
                "name": "format",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "enum": ["cumulative", "delta"]},
                "description": "chunks carry the whole answer so far (cumulative) or only new text",
            }
        ],
    },
    "set_generation_params": json_body(_ParamsBody),
    "set_feedback": json_body(FeedbackBody),
}

# name -> (HTTP method, handler)
ENDPOINTS: dict[str, tuple[str, Endpoint]] = {
    "chat_stream": ("POST", chat_stream),
    "clear_context": ("POST", clear_context),
    "get_prompt": ("GET", get_prompt),
    "set_generation_params": ("POST", set_generation_params),
    "get_generation_params": ("GET", get_generation_params),
    "set_feedback": ("POST", set_feedback),
    "get_load": ("GET", get_load),
    "get_resource_usage": ("GET", get_resource_usage),
}


EndpointName = Literal[
    "chat_stream",
    "clear_context",
    "get_prompt",
    "set_generation_params",
    "get_generation_params",
    "set_feedback",
    "get_load",
    "get_resource_usage",
    "conversations",
]


class EndpointOptions(PluginOptions):
    """``plugin_config.fastapi`` (and ``append_apis(app, opts)``): which endpoints to mount."""

    all: bool = Field(True, description="mount every endpoint (unless include or exclude says otherwise)")
    include: list[EndpointName] | None = Field(None, description="mount only these endpoints")
    exclude: list[EndpointName] | None = Field(None, description="mount every endpoint but these")


def selected_endpoints(options: EndpointOptions | dict[str, Any] | None) -> list[str]:
    """Endpoint names chosen by ``{"all": True}``, ``{"include": [...]}`` or ``{"exclude": [...]}``."""
    chosen = parse_options(EndpointOptions, options, "plugin_config.fastapi")
    names = [*ENDPOINTS, "conversations"]
    if chosen.include is not None:
        names = [name for name in names if name in chosen.include]
    elif not chosen.all and chosen.exclude is None:
        names = []
    return [name for name in names if name not in set(chosen.exclude or ())]


def install(app: FastAPI, cs: ChatStream, options: EndpointOptions | dict[str, Any] | None = None) -> None:
    """Mount the selected endpoints of ``cs`` on ``app``, each behind the role check."""
    policy = AccessPolicy(cs.settings)

    def guarded(name: str, handler: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        # A closure, not default arguments: FastAPI would publish those as query parameters
        # (``?_name=get_load`` would pass another endpoint's role check).
        async def endpoint(request: Request) -> Response:
            try:
                request.state.role = policy.check(presented_key(request.headers), name)
                return await handler(cs, request)
            except AccessDenied as exc:
                return JSONResponse(
                    {"error": "unauthorized" if exc.status == 401 else "forbidden", "message": exc.message},
                    status_code=exc.status,
                )
            except ChatStreamError as exc:
                return JSONResponse(exc.to_dict(), status_code=exc.status)
            except ClientDisconnect:
                return client_left(cs, name)

        endpoint.__doc__ = handler.__doc__
        return endpoint

    for name in selected_endpoints(options):
        if name == "conversations":  # a group of routes, under one role API name
            for method, path, route in conversations.ROUTES:
                app.add_api_route(path, guarded(name, route), methods=[method], name=route.__name__)
            continue
        method, handler = ENDPOINTS[name]
        app.add_api_route(
            f"/{name}", guarded(name, handler), methods=[method], name=name, openapi_extra=OPENAPI.get(name)
        )


@hookimpl(trylast=True)
def register_transports(register: Any) -> None:
    register("fastapi", install, options=EndpointOptions)
