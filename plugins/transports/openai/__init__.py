"""The OpenAI-compatible transport: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models``, and the stateful Responses and Conversations APIs (``/v1/responses``,
``/v1/conversations``, in :mod:`.responses`).

Any OpenAI client (the official ``openai`` package, LangChain, curl) can talk to a chatstream
server. The request's messages are rendered with the served model's own prompt format, the
request waits in the same admission queue as ``/chat_stream`` requests, and the answer streams as
server-sent events (``data: {...}`` chunks, then ``data: [DONE]``) or comes back whole.
``/v1/completions`` continues a raw ``prompt`` string as it is (no prompt format), which is what
another chatstream's ``upstream`` engine sends in its ``completions`` mode.

The wire format (bodies, checks, errors) is in ``protocol``, the serving logic in ``serving``;
this module mounts the routes.

Access: with no ``api_keys`` configured the endpoints are open (clients always send some key,
which is then ignored). Once keys are configured, a caller needs a key whose role allows
``chat_completions`` (both completion endpoints) / ``models`` / ``responses`` / ``conversations``
(``Authorization: Bearer <key>`` or ``X-API-Key``), unless the default role allows them. Stored
responses and conversations belong to the key that made them, configured or not.

Options (``plugin_config.openai`` or ``install(app, cs, options)``):
- ``model_id``: the model name the API reports (default: the ``model`` setting, ``mock`` for the
  generator mock, or the loaded model's name);
- ``max_body_bytes``: the largest request body accepted (default 4 MiB).

Beyond OpenAI's parameters, ``top_k``, ``min_p``, ``repetition_penalty`` and
``repetition_penalty_method`` are accepted (as vLLM does), so clients can pass them through
``extra_body``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from chatstream.access import AccessDenied, AccessPolicy, presented_key
from chatstream.chatstream import ChatStream
from chatstream.hookspecs import hookimpl
from chatstream.http import json_body
from chatstream.options import parse_options
from chatstream.plugins.transports.openai.protocol import (
    CHAT_NAMES,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
)
from chatstream.plugins.transports.openai.serving import (
    TRANSPORT,
    OpenAIOptions,
    chat_completions,
    openai_endpoint,
    served_model_id,
    text_completions,
)

from .responses import install_responses


def install(app: FastAPI, cs: ChatStream, options: OpenAIOptions | dict[str, Any] | None = None) -> None:
    """Mount ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and ``/v1/models/{id}``."""
    chosen = parse_options(OpenAIOptions, options, "plugin_config.openai")
    policy = AccessPolicy(cs.settings)
    installed_at = int(time.time())
    keys_configured = bool(cs.settings.api_keys)

    def model_card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": installed_at, "owned_by": "chatstream"}

    def check_access(request: Request, api: str) -> None:
        # Without configured keys the API is open: OpenAI clients send a key whatever happens.
        if not keys_configured:
            return
        try:
            request.state.role = policy.check(presented_key(request.headers), api)
        except AccessDenied as exc:
            code = "invalid_api_key" if exc.status == 401 else "forbidden"
            raise OpenAIError(exc.status, exc.message, None, code) from None

    def generation_endpoint(
        answer: Callable[..., Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            return await answer(cs, request, chosen)

        run.__doc__ = answer.__doc__
        return openai_endpoint(cs, check_access, "chat_completions", CHAT_NAMES, run, generates=True)

    completions_endpoint = generation_endpoint(chat_completions)
    text_endpoint = generation_endpoint(text_completions)

    async def models_endpoint(request: Request) -> Response:
        try:
            check_access(request, "models")
        except OpenAIError as exc:
            return exc.response()
        return JSONResponse({"object": "list", "data": [model_card(served_model_id(cs, chosen))]})

    async def model_endpoint(request: Request, model_id: str) -> Response:
        try:
            check_access(request, "models")
            served = served_model_id(cs, chosen)
            if model_id != served:
                raise OpenAIError(
                    404,
                    f"model {model_id!r} is not served here; this server serves {served!r}",
                    "model",
                    "model_not_found",
                )
        except OpenAIError as exc:
            return exc.response()
        return JSONResponse(model_card(served))

    completions_endpoint.__doc__ = chat_completions.__doc__
    text_endpoint.__doc__ = text_completions.__doc__
    models_endpoint.__doc__ = "GET: the served model, as an OpenAI model list."
    model_endpoint.__doc__ = "GET: the served model's card (404 for any other id)."
    app.add_api_route(
        "/v1/chat/completions",
        completions_endpoint,
        methods=["POST"],
        name="chat_completions",
        openapi_extra=json_body(ChatCompletionRequest),
    )
    app.add_api_route(
        "/v1/completions",
        text_endpoint,
        methods=["POST"],
        name="completions",
        openapi_extra=json_body(CompletionRequest),
    )
    install_responses(app, cs, chosen, check_access)
    app.add_api_route("/v1/models", models_endpoint, methods=["GET"], name="models")
    app.add_api_route("/v1/models/{model_id:path}", model_endpoint, methods=["GET"], name="model")


@hookimpl(trylast=True)
def register_transports(register: Any) -> None:
    register(TRANSPORT, install, options=OpenAIOptions)
