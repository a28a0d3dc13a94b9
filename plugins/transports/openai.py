"""The OpenAI-compatible transport: ``POST /v1/chat/completions``, ``POST /v1/completions`` and
``GET /v1/models``.

Any OpenAI client (the official ``openai`` package, LangChain, curl) can talk to a chatstream
server. The request's messages are rendered with the served model's own prompt format, the
request waits in the same admission queue as ``/chat_stream`` requests, and the answer streams as
server-sent events (``data: {...}`` chunks, then ``data: [DONE]``) or comes back whole.
``/v1/completions`` continues a raw ``prompt`` string as it is (no prompt format), which is what
another chatstream's ``upstream`` engine sends in its ``completions`` mode.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so clients raise
their usual exceptions (``BadRequestError``, ``AuthenticationError``, ``RateLimitError``).

Access: with no ``api_keys`` configured the endpoints are open (clients always send some key,
which is then ignored). Once keys are configured, a caller needs a key whose role allows
``chat_completions`` (both completion endpoints) / ``models`` (``Authorization: Bearer <key>`` or
``X-API-Key``), unless the default role allows them.

Options (``plugin_config.openai`` or ``install(app, cs, options)``):
- ``model_id``: the model name the API reports (default: the ``model`` setting, ``mock`` for the
  generator mock, or the loaded model's name);
- ``max_body_bytes``: the largest request body accepted (default 4 MiB).

Beyond OpenAI's parameters, ``top_k``, ``min_p``, ``repetition_penalty`` and
``repetition_penalty_method`` are accepted (as vLLM does), so clients can pass them through
``extra_body``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chatstream.access import AccessDenied, AccessPolicy, presented_key
from chatstream.admission import TooManyRequests
from chatstream.chatstream import (
    ChatStream,
    ChatStreamError,
    ChatStreamingResponse,
    ClientDisconnected,
    GenerationStats,
)
from chatstream.hookspecs import hookimpl
from chatstream.plugins.transports.fastapi import json_body
from chatstream.prompt import AbstractChatPrompt
from chatstream.sessions import ChatSession
from chatstream.types import FinishedReason, GenerationParams, GenerationRequest, TextDelta

TRANSPORT = "openai"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
OPTIONS = ("model_id", "max_body_bytes")
# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.1

# HTTP status -> OpenAI error type.
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


class OpenAIError(Exception):
    """A request refused with an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(self.status)
        if kind is None:
            kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# -- the request body ------------------------------------------------------------------------------
class Message(BaseModel):
    """One chat message. ``content`` is text or a list of ``{"type": "text", "text": ...}`` parts."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Any = Field(None, validate_default=True)
    name: str | None = None  # accepted for compatibility; prompt formats have no place for it

    @field_validator("content")
    @classmethod
    def _text_content(cls, value: Any) -> str:
        return _valid_unicode(cls._joined_text(value))

    @staticmethod
    def _joined_text(value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            texts = []
            for index, part in enumerate(value):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError(f'part {index} must be an object like {{"type": "text", "text": "..."}}')
                if part["type"] != "text":
                    raise ValueError(
                        f"part {index} has type {part['type']!r}: this server accepts only text parts"
                    )
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"part {index} needs a string 'text'")
                texts.append(part["text"])
            return "".join(texts)
        if value is None:
            raise ValueError("content is missing: send the message text (tool calls are not supported)")
        raise ValueError("content must be a string or a list of text parts")


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with token counts."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _GenerationBody(BaseModel):
    """What both completion bodies share: the model, streaming and the sampling parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: Any = Field(None, validate_default=True)  # becomes a list of strings
    seed: int | None = None
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    # Extensions (as in vLLM and TGI).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    repetition_penalty_method: Literal["multiplicative", "subtractive"] | None = None
    # Accepted and ignored: it does not change the answer.
    user: str | None = None
    # Accepted only with the value that means "off"; anything else is refused, not silently ignored.
    logit_bias: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Any) -> list[str]:
        return _stop_list(value)


class ChatCompletionRequest(_GenerationBody):
    """The body of ``POST /v1/chat/completions`` (the parameters this server understands)."""

    messages: list[Message]
    max_completion_tokens: int | None = None
    # Accepted and ignored: they do not change the answer.
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # Accepted only with the value that means "off".
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None


def _valid_unicode(text: str) -> str:
    """``text`` if it can be sent back as UTF-8; a lone surrogate (valid JSON, ``"\\ud800"``) cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds an unpaired surrogate (like \\ud800): send valid Unicode") from None
    return text


def _stop_list(value: Any) -> list[str]:
    """``stop`` as a list of non-empty strings."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError("stop must be a string or a list of strings")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return list(stops)


class CompletionRequest(_GenerationBody):
    """The body of ``POST /v1/completions``: a raw prompt continued as it is."""

    prompt: Any = Field(None, validate_default=True)  # missing: the validator names the field
    best_of: int | None = None
    # Accepted only with the value that means "off".
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> str:
        # A list of one string is what many clients send; several prompts would need n answers.
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise ValueError("prompt must be one string (lists of prompts and token ids are not supported)")
        if not value:
            raise ValueError("prompt is empty: send the text to continue")
        return _valid_unicode(value)


_UNSUPPORTED_HINT = "this server does not support it; leave it out"


def _check_supported_text(body: CompletionRequest) -> None:
    """Refuse ``/v1/completions`` features that this server cannot honour."""
    for name in ("n", "best_of"):
        value = getattr(body, name)
        if value not in (None, 1):
            raise OpenAIError(400, f"{name}={value}: only {name}=1 is supported", name)
    for name in ("echo", "suffix", "logprobs", "logit_bias"):
        if getattr(body, name):
            raise OpenAIError(400, f"{name}: {_UNSUPPORTED_HINT}", name)
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(400, "stream_options is only allowed with stream=true", "stream_options")


def _check_supported(body: Any) -> None:
    """Refuse features that would change the answer but that this server cannot honour."""
    if isinstance(body, CompletionRequest):
        _check_supported_text(body)
        return
    if body.n not in (None, 1):
        raise OpenAIError(400, f"n={body.n}: only n=1 is supported; send one request per completion", "n")
    if body.logprobs:
        raise OpenAIError(400, f"logprobs: {_UNSUPPORTED_HINT}", "logprobs")
    if body.top_logprobs:
        raise OpenAIError(400, f"top_logprobs: {_UNSUPPORTED_HINT}", "top_logprobs")
    if body.logit_bias:
        raise OpenAIError(400, f"logit_bias: {_UNSUPPORTED_HINT}", "logit_bias")
    if body.response_format and body.response_format.get("type") != "text":
        raise OpenAIError(
            400,
            f"response_format {body.response_format.get('type')!r}: only 'text' is supported",
            "response_format",
        )
    if body.tools:
        raise OpenAIError(400, f"tools: {_UNSUPPORTED_HINT}", "tools")
    if body.tool_choice not in (None, "none", "auto"):
        raise OpenAIError(400, f"tool_choice: {_UNSUPPORTED_HINT}", "tool_choice")
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(400, "stream_options is only allowed with stream=true", "stream_options")
    if not body.messages:
        raise OpenAIError(400, "messages is empty: send at least one user message", "messages")
    if body.messages[-1].role != "user":
        raise OpenAIError(
            400,
            f"messages: the last message has role {body.messages[-1].role!r}; end the conversation with "
            "a 'user' message (the answer is generated for it)",
            "messages",
        )


def _param_path(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "role")`` -> ``messages[0].role``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


async def parse_request(
    request: Request, max_body_bytes: int, model: type[BaseModel] = ChatCompletionRequest
) -> Any:
    """The request's body as ``model``, or an ``OpenAIError`` that names the offending field."""
    raw = await request.body()
    if len(raw) > max_body_bytes:
        raise OpenAIError(
            413, f"the body is {len(raw)} bytes; the limit is {max_body_bytes}", None, "body_too_large"
        )
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise OpenAIError(
            400, 'the body must be JSON like {"model": "...", "messages": [...]}', None, "invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the body must be a JSON object", None, "invalid_body")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = _param_path(tuple(error["loc"])) or None
        if error["type"] == "extra_forbidden":
            message = f"unrecognized field {param!r}: remove it (see GET /v1/models and the OpenAI chat API)"
        elif error["type"] == "missing":
            message = f"{param} is required"
        else:
            message = f"{param}: {error['msg'].removeprefix('Value error, ')}"
        raise OpenAIError(400, message, param, "invalid_value") from None
    _check_supported(body)
    return body


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
        names = {"max_new_tokens": length_name}
        param = names.get(exc.field or "", exc.field)
        message = exc.message.removeprefix("generation_params.")
        if param == "generation_params":  # a rule across fields: the message names the field
            message = message.split("Value error, ", 1)[-1]
            named = [(message.find(f"{name}="), name) for name in overrides if f"{name}=" in message]
            param = min(named)[1] if named else None
        message = message.replace("max_new_tokens", length_name)
        raise OpenAIError(400, message, param, "invalid_value") from None


def served_model_id(cs: ChatStream, options: dict[str, Any]) -> str:
    """The model name this server reports and echoes."""
    if options.get("model_id"):
        return str(options["model_id"])
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


def _usage(prompt_tokens: int | None, stats: GenerationStats) -> dict[str, int]:
    # An engine that cannot count (None) reports 0 prompt tokens rather than breaking clients.
    prompt = prompt_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": stats.tokens, "total_tokens": prompt + stats.tokens}


# -- the endpoints ---------------------------------------------------------------------------------
class _Completion:
    """One admitted chat completion: what it streams, and how it reports its end."""

    def __init__(
        self,
        cs: ChatStream,
        request: Request,
        session: ChatSession,
        gen_request: GenerationRequest,
        model_id: str,
        started_at: float,
        text: bool = False,
    ) -> None:
        self.text = text  # True: a /v1/completions answer (its own object names and choice shape)
        self.cs = cs
        self.request = request
        self.session = session
        self.gen_request = gen_request
        self.model_id = model_id
        self.started_at = started_at
        self.id = f"{'cmpl' if text else 'chatcmpl'}-{gen_request.request_id}"
        self.created = int(time.time())
        self.stats = GenerationStats()

    async def finish(self, reason: FinishedReason, error: str | None = None) -> None:
        """Give the slot back and report how the request ended (shielded: runs even when cancelled)."""
        self.cs.admission.release()
        with anyio.CancelScope(shield=True):
            await self.cs.report_finished(
                self.request,
                None,
                self.gen_request.request_id,
                reason,
                self.started_at,
                error=error,
                stats=self.stats,
                transport=TRANSPORT,
            )

    def prompt_tokens(self) -> int | None:
        return self.cs.engine.count_tokens(self.gen_request.prompt)

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        if self.text:
            choice = {
                "index": 0,
                "text": delta.get("content", ""),
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        chunk = {
            "id": self.id,
            "object": "text_completion" if self.text else "chat.completion.chunk",
            "created": self.created,
            "model": self.model_id,
            "choices": [choice],
        }
        return _event(chunk)

    async def events(
        self, deltas: AsyncGenerator[TextDelta, None], include_usage: bool
    ) -> AsyncGenerator[bytes, None]:
        """The server-sent events of a streamed answer; the slot is released when this ends."""
        reason = FinishedReason.SUCCESS
        error: str | None = None
        streamed = False
        try:
            yield self._chunk({"content": ""} if self.text else {"role": "assistant", "content": ""})
            # aclosing: when this generator is closed at a yield, the answer (and the engine row)
            # must be closed now, not whenever the garbage collector gets to it.
            async with contextlib.aclosing(self.cs.stream_answer(self.session, deltas, self.stats)) as answer:
                async for text in answer:
                    streamed = True
                    yield self._chunk({"content": text})
            yield self._chunk({}, _finish_reason(self.stats))
            if include_usage:
                usage: dict[str, Any] = {
                    "id": self.id,
                    "object": "text_completion" if self.text else "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model_id,
                    "choices": [],
                    "usage": _usage(self.prompt_tokens(), self.stats),
                }
                yield _event(usage)
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            reason = (
                FinishedReason.CLIENT_DISCONNECTED_WHILE_STREAMING
                if streamed
                else FinishedReason.CLIENT_DISCONNECTED_BEFORE_STREAMING
            )
            raise
        except Exception as exc:
            reason = FinishedReason.UNKNOWN_ERROR_OCCURRED
            error = f"{type(exc).__name__}: {exc}"
            self.cs.logger.exception("request %s failed", self.gen_request.request_id)
            # Headers are gone already: the error travels as an event, which OpenAI clients raise.
            yield _event(OpenAIError(500, f"generation failed: {error}", None, "engine_error").body())
        finally:
            await self.finish(reason, error)

    async def whole(self, deltas: AsyncGenerator[TextDelta, None]) -> Response:
        """The whole answer as one ``chat.completion``; stops generating if the client leaves."""
        reason = FinishedReason.SUCCESS
        error: str | None = None

        async def collect() -> str:
            async with contextlib.aclosing(self.cs.stream_answer(self.session, deltas, self.stats)) as answer:
                return "".join([text async for text in answer])

        task = asyncio.ensure_future(collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await self.request.is_disconnected():
                    task.cancel()
                    reason = (
                        FinishedReason.CLIENT_DISCONNECTED_WHILE_STREAMING
                        if self.stats.tokens
                        else FinishedReason.CLIENT_DISCONNECTED_BEFORE_STREAMING
                    )
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    return Response(status_code=499)  # nobody reads it; the status marks it in logs
            text = task.result()
        except asyncio.CancelledError:
            reason = FinishedReason.CLIENT_DISCONNECTED_WHILE_STREAMING
            task.cancel()
            raise
        except Exception as exc:
            reason = FinishedReason.UNKNOWN_ERROR_OCCURRED
            error = f"{type(exc).__name__}: {exc}"
            self.cs.logger.exception("request %s failed", self.gen_request.request_id)
            return OpenAIError(500, f"generation failed: {error}", None, "engine_error").response()
        finally:
            await self.finish(reason, error)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": _finish_reason(self.stats)}
        if self.text:
            choice["text"] = text
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return JSONResponse(
            {
                "id": self.id,
                "object": "text_completion" if self.text else "chat.completion",
                "created": self.created,
                "model": self.model_id,
                "choices": [choice],
                "usage": _usage(self.prompt_tokens(), self.stats),
            }
        )


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class _EventStream:
    """The body of a streamed answer, already started, so closing it always runs its clean-up.

    A generator that never started skips its ``finally`` on ``aclose()``; if the client left
    before the first byte was sent, the slot would never be released.
    """

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        self._events = events
        self._first: bytes | None = None

    async def start(self) -> None:
        self._first = await self._events.__anext__()

    def __aiter__(self) -> _EventStream:
        return self

    async def __anext__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()


async def chat_completions(cs: ChatStream, request: Request, options: dict[str, Any]) -> Response:
    """``POST /v1/chat/completions``: the answer to a conversation, streamed (SSE) or whole."""
    if not cs.ready:
        await cs.start()
    started_at = time.monotonic()
    request_id = uuid.uuid4().hex
    body = await parse_request(request, options.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES))
    params = generation_params(cs, body)
    session = ChatSession(None, build_prompt(cs, body.messages))
    try:
        gen_request = cs.generation_request(session, params, request_id)
    except ChatStreamError as exc:
        param = "messages" if exc.field == "user_input" else exc.field
        raise OpenAIError(
            exc.status, exc.message.replace("max_new_tokens", "max_tokens"), param, exc.code
        ) from None
    gen_request.stop = [*gen_request.stop, *(s for s in body.stop if s not in gen_request.stop)]
    return await _answer(cs, request, options, body, session, gen_request, started_at)


async def text_completions(cs: ChatStream, request: Request, options: dict[str, Any]) -> Response:
    """``POST /v1/completions``: the continuation of a raw prompt, streamed (SSE) or whole."""
    if not cs.ready:
        await cs.start()
    started_at = time.monotonic()
    body = await parse_request(
        request, options.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES), CompletionRequest
    )
    params = generation_params(cs, body)
    # The session only collects the answer; the prompt is sent as the caller wrote it.
    session = ChatSession(None, cs.new_prompt())
    session.prompt.add_requester_msg(body.prompt)
    session.prompt.add_responder_msg(None)
    gen_request = GenerationRequest(
        prompt=body.prompt, params=params, stop=list(body.stop), request_id=uuid.uuid4().hex
    )
    return await _answer(cs, request, options, body, session, gen_request, started_at, text=True)


async def _answer(
    cs: ChatStream,
    request: Request,
    options: dict[str, Any],
    body: ChatCompletionRequest | CompletionRequest,
    session: ChatSession,
    gen_request: GenerationRequest,
    started_at: float,
    text: bool = False,
) -> Response:
    """Admit the request, start the engine and send the answer (shared by both completion endpoints)."""
    request_id = gen_request.request_id
    try:
        await cs.admit(request)
    except TooManyRequests as exc:
        await cs.report_finished(
            request, None, request_id, FinishedReason.TOO_MANY_REQUESTS, started_at, transport=TRANSPORT
        )
        raise OpenAIError(
            429,
            "the server is busy: every generation slot is in use and the queue is full; retry later",
            None,
            "too_many_requests",
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    except (ClientDisconnected, asyncio.CancelledError):
        await cs.report_finished(
            request,
            None,
            request_id,
            FinishedReason.CLIENT_DISCONNECTED_BEFORE_STREAMING,
            started_at,
            transport=TRANSPORT,
        )
        raise
    completion = _Completion(
        cs, request, session, gen_request, served_model_id(cs, options), started_at, text=text
    )
    try:
        deltas = await cs.start_generation(gen_request, request)
    except ClientDisconnected:
        await completion.finish(FinishedReason.CLIENT_DISCONNECTED_BEFORE_STREAMING)
        raise
    except Exception as exc:
        if isinstance(exc, ChatStreamError):
            failure = OpenAIError(exc.status, exc.message, exc.field, exc.code)
        else:
            cs.logger.exception("request %s: generation could not start", request_id)
            failure = OpenAIError(500, f"generation could not start: {exc}", None, "engine_error")
        await completion.finish(FinishedReason.UNKNOWN_ERROR_OCCURRED, failure.message)
        raise failure from None
    if not body.stream:
        return await completion.whole(deltas)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    stream = _EventStream(completion.events(deltas, include_usage))
    await stream.start()
    return ChatStreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        send_timeout_s=cs.settings.client_read_timeout_s,
    )


def install(app: FastAPI, cs: ChatStream, options: dict[str, Any] | None = None) -> None:
    """Mount ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and ``/v1/models/{id}``."""
    options = dict(options or {})
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"openai transport options {sorted(unknown)} are unknown: use {', '.join(OPTIONS)}")
    max_body = options.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)
    if isinstance(max_body, str) and max_body.strip().isdigit():  # from an environment variable
        max_body = int(max_body)
    if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1024:
        raise ValueError(f"openai transport option max_body_bytes={max_body!r}: use a whole number >= 1024")
    options["max_body_bytes"] = max_body
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
        answer: Callable[[ChatStream, Request, dict[str, Any]], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        """An endpoint that checks access, runs ``answer`` and turns errors into the OpenAI shape."""

        async def endpoint(request: Request) -> Response:
            try:
                check_access(request, "chat_completions")
                return await answer(cs, request, options)
            except OpenAIError as exc:
                return exc.response()
            except ChatStreamError as exc:
                return OpenAIError(exc.status, exc.message, exc.field, exc.code).response()

        return endpoint

    completions_endpoint = generation_endpoint(chat_completions)
    text_endpoint = generation_endpoint(text_completions)

    async def models_endpoint(request: Request) -> Response:
        try:
            check_access(request, "models")
        except OpenAIError as exc:
            return exc.response()
        return JSONResponse({"object": "list", "data": [model_card(served_model_id(cs, options))]})

    async def model_endpoint(request: Request, model_id: str) -> Response:
        try:
            check_access(request, "models")
            served = served_model_id(cs, options)
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
    app.add_api_route("/v1/models", models_endpoint, methods=["GET"], name="models")
    app.add_api_route("/v1/models/{model_id:path}", model_endpoint, methods=["GET"], name="model")


@hookimpl
def register_transports(register: Any) -> None:
    register(TRANSPORT, install)
