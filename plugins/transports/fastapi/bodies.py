"""What the ``fastapi`` transport's endpoints share: reading a small JSON body, answering with the
session's cookie."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from chatstream.chatstream import ChatStream
from chatstream.errors import ChatStreamError, field_error
from chatstream.sessions import ChatSession

M = TypeVar("M", bound=BaseModel)

MAX_BODY_BYTES = 64 * 1024  # for the small JSON bodies of the non-chat endpoints


async def parse_body(request: Request, model: type[M], max_bytes: int = MAX_BODY_BYTES) -> M:
    """The request's JSON body as ``model``, or a ``ChatStreamError`` naming what is wrong."""
    raw = await request.body()
    if len(raw) > max_bytes:
        raise ChatStreamError(
            413, "body_too_large", f"the body is {len(raw)} bytes; the limit is {max_bytes}"
        )
    try:
        data = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ChatStreamError(400, "invalid_json", "the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ChatStreamError(400, "invalid_body", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise field_error(exc) from None


def respond(cs: ChatStream, session: ChatSession, body: Any, status: int = 200) -> Response:
    response = JSONResponse(body, status_code=status)
    cs.request_handler.finish_response(response, session)
    return response
