"""The OpenAI serving logic: a ``/v1`` request becomes a :class:`chatstream.turn.Turn`, and its
answer becomes OpenAI's objects (a ``chat.completion``, SSE chunks, a ``text_completion``).

The request waits in the same admission queue as ``/chat_stream`` requests and goes through the
same turn: prompt fitting, admission, the engine's first event, streaming, release and report.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field
from starlette.requests import ClientDisconnect

from chatstream.chatstream import ChatStream, GenerationStats
from chatstream.errors import ChatStreamError, ClientDisconnected
from chatstream.http import client_left
from chatstream.options import PluginOptions
from chatstream.plugins.transports.openai.protocol import (
    CHAT_NAMES,
    TEXT_NAMES,
    ChatCompletionRequest,
    CompletionRequest,
    Message,
    OpenAIError,
    openai_error,
    parse_request,
)
from chatstream.prompt import AbstractChatPrompt
from chatstream.sessions import ChatSession
from chatstream.streaming import ChatStreamingResponse
from chatstream.turn import EngineFailed, ServerShutdown, Turn, report_refused
from chatstream.types import GenerationParams, GenerationRequest

B = TypeVar("B", ChatCompletionRequest, CompletionRequest)
TRANSPORT = "openai"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class OpenAIOptions(PluginOptions):
    """``plugin_config.openai``."""

    model_id: str | None = Field(
        None,
        description="the model name the API reports (default: the model setting, mock, or the model's name)",
    )
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=1024, description="the largest request body accepted"
    )


# -- conversation and parameters -------------------------------------------------------------------
def build_prompt(cs: ChatStream, messages: list[Message]) -> AbstractChatPrompt:
    """The conversation in the model's prompt format, ending with the pending answer.

    System (and ``developer``) messages become the system prompt; consecutive messages of one role
    are joined, since prompt formats expect user and assistant turns to alternate.
    """
    prompt = cs.new_prompt()
    systems = [m.content for m in messages if m.role in ("system", "developer")]
    if systems:
        prompt.set_system("\n\n".join(systems))
    turns: list[tuple[str, str]] = []
    for message in messages:
        if message.role in ("system", "developer"):
            continue
        if turns and turns[-1][0] == message.role:
            turns[-1] = (message.role, f"{turns[-1][1]}\n\n{message.content}")
        else:
            turns.append((message.role, message.content))
    for role, text in turns:
        if role == "user":
            prompt.add_requester_msg(text)
        else:
            prompt.add_responder_msg(text)
    prompt.add_responder_msg(None)
    return prompt


def generation_params(cs: ChatStream, body: ChatCompletionRequest | CompletionRequest) -> GenerationParams:
    """The request's parameters on top of the server's defaults, validated and clamped."""
    max_completion_tokens = getattr(body, "max_completion_tokens", None)  # chat only
    length_name = "max_completion_tokens" if max_completion_tokens is not None else "max_tokens"
    overrides: dict[str, Any] = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_new_tokens": max_completion_tokens if max_completion_tokens is not None else body.max_tokens,
        "seed": body.seed,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "repetition_penalty_method": body.repetition_penalty_method,
        "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty,
    }
    # OpenAI's penalties are subtracted from the logits, whatever the server's defaults say.
    if body.frequency_penalty is not None:
        overrides["frequency_penalty_method"] = "subtractive"
    if body.presence_penalty is not None:
        overrides["presence_penalty_method"] = "subtractive"
    try:
        return cs.generation_params(None, **overrides)
    except ChatStreamError as exc:
        raise openai_error(exc, {**_names(body), "max_new_tokens": length_name}) from None


def _names(body: ChatCompletionRequest | CompletionRequest) -> dict[str, str]:
    names = TEXT_NAMES if isinstance(body, CompletionRequest) else CHAT_NAMES
    if getattr(body, "max_completion_tokens", None) is not None:
        return {**names, "max_new_tokens": "max_completion_tokens"}
    return names


def served_model_id(cs: ChatStream, options: OpenAIOptions) -> str:
    """The model name this server reports and echoes."""
    if options.model_id:
        return options.model_id
    if cs.settings.model:
        return cs.settings.model
    if cs.settings.use_mock_response or cs.engine.name == "mock":
        return "mock"
    given = getattr(getattr(cs.engine, "config", None), "model", None)  # a model object passed in
    if given is not None:
        name = getattr(given, "name_or_path", None) or getattr(
            getattr(given, "config", None), "name_or_path", None
        )
        return str(name) if name else type(given).__name__
    from chatstream.models import EMBEDDED_MODEL_ID

    return EMBEDDED_MODEL_ID


def _finish_reason(stats: GenerationStats) -> str:
    return "length" if stats.finish_reason == "length" else "stop"


def _usage(prompt_tokens: int | None, stats: GenerationStats) -> dict[str, Any]:
    """OpenAI's ``usage``: token counts, and the prompt tokens served from the prefix cache
    (``prompt_tokens_details.cached_tokens``) when the engine says."""
    prompt = prompt_tokens or stats.prompt_tokens or 0
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": stats.tokens,
        "total_tokens": prompt + stats.tokens,
    }
    if stats.cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": stats.cached_tokens}
    return usage


# -- the endpoints ---------------------------------------------------------------------------------
class _Completion:
    """One admitted completion's answer in OpenAI's objects."""

    def __init__(self, turn: Turn, model_id: str, text: bool = False) -> None:
        self.turn = turn
        self.text = text  # True: a /v1/completions answer (its own object names and choice shape)
        self.model_id = model_id
        self.id = f"{'cmpl' if text else 'chatcmpl'}-{turn.request_id}"
        self.created = int(time.time())

    @property
    def object(self) -> str:
        return "text_completion" if self.text else "chat.completion"

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        if self.text:
            choice = {
                "index": 0,
                "text": delta.get("content", ""),
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {
            "id": self.id,
            "object": "text_completion" if self.text else "chat.completion.chunk",
            "created": self.created,
            "model": self.model_id,
            "choices": [choice],
        }
        return _event(chunk)

    async def events(self, include_usage: bool) -> AsyncGenerator[bytes, None]:
        """The server-sent events of a streamed answer; the turn finishes when this ends."""
        turn = self.turn
        try:
            yield self._chunk({"content": ""} if self.text else {"role": "assistant", "content": ""})
            async for text in turn.stream():
                yield self._chunk({"content": text})
            yield self._chunk({}, _finish_reason(turn.stats))
            if include_usage:
                usage: dict[str, Any] = {
                    "id": self.id,
                    "object": "text_completion" if self.text else "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model_id,
                    "choices": [],
                    "usage": _usage(turn.prompt_tokens, turn.stats),
                }
                yield _event(usage)
            yield b"data: [DONE]\n\n"
        except ServerShutdown:
            # The server ends the stream on purpose: an error clients raise, then the usual end.
            yield _event(_shutdown_error().body())
            yield b"data: [DONE]\n\n"
        except EngineFailed as exc:
            # Headers are gone already: the error travels as an event, which OpenAI clients raise.
            yield _event(generation_error(exc).body())
        finally:
            await turn.finish()

    async def whole(self) -> Response:
        """The whole answer as one object; stops generating if the client leaves."""
        turn = self.turn
        text = await whole_text(turn)
        if isinstance(text, Response):
            return text
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": _finish_reason(turn.stats)}
        if self.text:
            choice["text"] = text
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return JSONResponse(
            {
                "id": self.id,
                "object": self.object,
                "created": self.created,
                "model": self.model_id,
                "choices": [choice],
                "usage": _usage(turn.prompt_tokens, turn.stats),
            }
        )


async def whole_text(turn: Turn) -> str | Response:
    """A turn's whole answer (generation stops if the client leaves), or the response to send
    instead when it ended early; the turn is finished either way."""
    try:
        return "".join([piece async for piece in turn.stream(watch_client=True)])
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the status marks it in logs
    except (ServerShutdown, EngineFailed) as exc:
        return generation_error(exc).response()
    finally:
        await turn.finish()


def generation_error(exc: ServerShutdown | EngineFailed) -> OpenAIError:
    """How an answer that ended early reads in OpenAI's shape: the server shutting down, or the
    engine failing."""
    if isinstance(exc, ServerShutdown):
        return _shutdown_error()
    return OpenAIError(500, f"generation failed: {exc}", None, "engine_error")


def openai_endpoint(
    cs: ChatStream,
    check_access: Callable[[Request, str], None],
    access: str,
    names: dict[str, str],
    handler: Callable[..., Awaitable[Response]],
    *,
    generates: bool,
) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint that checks the caller's role for ``access``, runs ``handler(request,
    **path_params)`` and answers every refusal in OpenAI's shape (core's fields named per
    ``names``); a generating endpoint's refusals before its turn began are reported here."""

    async def endpoint(request: Request) -> Response:
        try:
            check_access(request, access)
            return await handler(request, **request.path_params)
        except ChatStreamError as exc:
            failure = openai_error(exc, names)
        except OpenAIError as exc:
            failure = exc
        except ClientDisconnect:
            return client_left(cs, TRANSPORT)
        if generates and not failure.reported:
            refusal = ChatStreamError(failure.status, failure.code or "invalid_request", failure.message)
            await report_refused(cs, TRANSPORT, refusal, getattr(request.state, "request_id", None))
        return failure.response()

    endpoint.__doc__ = handler.__doc__
    return endpoint


def _shutdown_error() -> OpenAIError:
    return OpenAIError(
        503, "the server is shutting down: the answer was cut short; retry", None, "server_shutdown"
    )


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def chat_completions(cs: ChatStream, request: Request, options: OpenAIOptions) -> Response:
    """``POST /v1/chat/completions``: the answer to a conversation, streamed (SSE) or whole."""
    body, params = await _parse(cs, request, options, ChatCompletionRequest)
    session = ChatSession(None, build_prompt(cs, body.messages))
    turn = cs.turn(session, params, transport=TRANSPORT, request=request, extra_stop=list(body.stop))
    return await _answer(cs, turn, options, body)


async def text_completions(cs: ChatStream, request: Request, options: OpenAIOptions) -> Response:
    """``POST /v1/completions``: the continuation of a raw prompt, streamed (SSE) or whole."""
    body, params = await _parse(cs, request, options, CompletionRequest)
    # The session only collects the answer; the prompt is sent as the caller wrote it (its
    # control tokens are the caller's to write: this is the raw-prompt API).
    session = ChatSession(None, cs.new_prompt())
    session.prompt.add_requester_msg(body.prompt)
    session.prompt.add_responder_msg(None)
    turn = cs.turn(session, params, transport=TRANSPORT, request=request)
    gen_request = GenerationRequest(
        prompt=body.prompt, params=params, stop=list(body.stop), request_id=turn.request_id
    )
    return await _answer(cs, turn, options, body, gen_request)


async def _parse(
    cs: ChatStream, request: Request, options: OpenAIOptions, model: type[B]
) -> tuple[B, GenerationParams]:
    """The body as ``model`` and its generation parameters (``OpenAIError`` naming what is wrong)."""
    if not cs.ready:
        await cs.start()
    body = await parse_request(
        request, options.max_body_bytes, model, max_input_chars=cs.settings.max_input_chars
    )
    return body, generation_params(cs, body)


async def _answer(
    cs: ChatStream,
    turn: Turn,
    options: OpenAIOptions,
    body: ChatCompletionRequest | CompletionRequest,
    gen_request: GenerationRequest | None = None,
) -> Response:
    """Start the turn and send its answer (shared by both completion endpoints)."""
    try:
        await turn.start(gen_request)
    except ChatStreamError as exc:
        failure = openai_error(exc, _names(body))
        failure.reported = True
        raise failure from None
    except ClientDisconnected:
        return Response(status_code=499)
    completion = _Completion(turn, served_model_id(cs, options), text=isinstance(body, CompletionRequest))
    if not body.stream:
        return await completion.whole()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return ChatStreamingResponse(
        completion.events(include_usage),
        finalizer=turn.finish,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        send_timeout_s=cs.settings.client_read_timeout_s,
    )
