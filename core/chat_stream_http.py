"""``POST /chat_stream`` over HTTP: the body, ``?format=``, and the streamed answer.

The documented wire format: a ``text/plain`` stream whose every chunk is the whole answer so far
(``?format=delta``, or the ``stream_format`` setting, sends only new text), with the answer's
message id in ``X-Message-Id``. Refusals are JSON ``{"error", "message", "field"}`` with a 4xx
(or the documented in-band ``{"error": "too_many_requests"}`` with a 200 unless
``too_many_request_as_http_error``). If generation fails after the stream started, the response
ends without its last chunk, which HTTP clients report as an error.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from chatstream.chatstream import ChatStream, ChatStreamRequestBody
from chatstream.errors import ChatStreamError, ClientDisconnected, StreamAborted, field_error
from chatstream.streaming import ChatStreamingResponse
from chatstream.turn import EngineFailed, ServerShutdown, Turn, report_refused

TRANSPORT = "chat_stream"


async def answer_chat_stream(
    cs: ChatStream,
    request: Request,
    request_body: dict[str, Any] | str | bytes | None = None,
    callback: Callable[[Request, str], Any] | None = None,
) -> Response:
    """The response to ``POST /chat_stream`` (``ChatStream.handle_chat_stream_request``)."""
    if not cs.ready:
        await cs.start()
    turn: Turn | None = None
    session = None
    try:
        stream_format = request.query_params.get("format", cs.settings.stream_format)
        if stream_format not in ("cumulative", "delta"):
            raise ChatStreamError(
                400, "invalid_format", f"format={stream_format!r}: use cumulative or delta", field="format"
            )
        body = await parse_chat_body(cs, request, request_body)
        session = await cs.open_session(request)
        if body.conversation_id is not None and body.conversation_id != session.conversation_id:
            await cs.open_conversation(session, body.conversation_id)  # it becomes current
        params = cs.generation_params(session, **(body.generation_params or {}))
        cs.begin_turn(session, body)
        turn = cs.turn(session, params, transport=TRANSPORT, request=request, callback=callback)
        await turn.start()
    except ChatStreamError as exc:
        if turn is None:  # refused before its turn began: counted here
            await report_refused(cs, TRANSPORT, exc, getattr(request.state, "request_id", None))
        if exc.code == "too_many_requests":  # the documented body, in-band (200) unless asked for 429
            status = exc.status if cs.settings.too_many_request_as_http_error else 200
            refusal = JSONResponse({"error": "too_many_requests"}, status_code=status, headers=exc.headers)
        else:
            refusal = JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers or None)
        if session is not None and turn is not None and turn.saved_question:
            cs.request_handler.finish_response(refusal, session)  # the question is kept: so is its session
        return refusal
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the status marks it in logs
    response = ChatStreamingResponse(
        _chunks(turn, stream_format == "delta"),
        finalizer=turn.finish,
        media_type="text/plain; charset=utf-8",
        headers={"X-Message-Id": session.prompt.get_contents()[-1].id, "Cache-Control": "no-cache"},
        send_timeout_s=cs.settings.client_read_timeout_s,
    )
    cs.request_handler.finish_response(response, session)
    return response


async def _chunks(turn: Turn, delta: bool) -> AsyncIterator[bytes]:
    text = ""
    try:
        async for piece in turn.stream():
            text += piece
            # "replace": a lone surrogate (valid in JSON, not in UTF-8) must not end the stream.
            yield (piece if delta else text).encode("utf-8", "replace")
        # Before the last chunk: a client that sees the end and asks again at once finds its
        # answer stored, its session free (no 409) and the slot back.
        await turn.finish()
    except (EngineFailed, ServerShutdown) as exc:
        await turn.finish()
        # The status line is gone: the one signal a plain-text stream has left is to end
        # without its last chunk, which HTTP clients report as an error (curl exit 18,
        # httpx RemoteProtocolError, fetch's reader rejects), not as a complete answer.
        raise StreamAborted(str(exc)) from None


async def parse_chat_body(
    cs: ChatStream, request: Request, body: dict[str, Any] | str | bytes | None
) -> ChatStreamRequestBody:
    """The ``/chat_stream`` body (given, or read from the request), or a ``ChatStreamError``."""
    if body is None:
        raw = await request.body()
        if len(raw) > 16 * cs.settings.max_input_chars + 4096:
            raise ChatStreamError(413, "body_too_large", "the request body is too large", field="user_input")
        body = raw
    if isinstance(body, bytes | str):
        try:
            body = json.loads(body) if body else {}
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ChatStreamError(
                400, "invalid_json", 'the body must be JSON like {"user_input": "Hello"}'
            ) from None
    if not isinstance(body, dict):
        raise ChatStreamError(
            400, "invalid_body", 'the body must be a JSON object like {"user_input": "Hello"}'
        )
    try:
        parsed = ChatStreamRequestBody.model_validate(body)
    except ValidationError as exc:
        raise field_error(exc) from None
    if len(parsed.user_input) > cs.settings.max_input_chars:
        raise ChatStreamError(
            413,
            "input_too_long",
            f"user_input has {len(parsed.user_input)} characters; the limit is "
            f"{cs.settings.max_input_chars} (setting max_input_chars)",
            field="user_input",
        )
    return parsed
