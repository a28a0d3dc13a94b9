"""The OpenAI wire format: request bodies, their checks, and OpenAI-shaped errors.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so clients raise
their usual exceptions (``BadRequestError``, ``AuthenticationError``, ``RateLimitError``). Core's
refusals (:class:`chatstream.errors.ChatStreamError`) are mapped here, in one place
(:func:`openai_error`), each field named as ``/v1`` clients send it (``max_tokens``, ``messages``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chatstream.errors import ChatStreamError, check_unicode

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
        self.reported = False  # True once its turn reported how the request ended

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
        return check_unicode(cls._joined_text(value))

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
    include_obfuscation: bool | None = None  # accepted: padding against length side channels, not needed here


class _GenerationBody(BaseModel):
    """What both completion bodies share: the model, streaming and the sampling parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's documented ranges.
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = None
    stop: Any = Field(None, validate_default=True)  # becomes a list of strings
    seed: int | None = None
    n: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
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
        return check_unicode(value)


_UNSUPPORTED_HINT = "this server does not support it; leave it out"
# Input limits, as /chat_stream has: the longest conversation a request may send.
MAX_MESSAGES = 2048
# Core field names as /v1 clients know them, in messages and in the error's ``param``.
CHAT_NAMES = {"user_input": "messages", "max_new_tokens": "max_tokens"}
TEXT_NAMES = {"user_input": "prompt", "max_new_tokens": "max_tokens"}


def _unsupported(message: str, param: str) -> OpenAIError:
    return OpenAIError(400, message, param, "unsupported_parameter")


def openai_error(exc: ChatStreamError, names: dict[str, str]) -> OpenAIError:
    """A core refusal in OpenAI's shape, each field named as /v1 clients send it (422 is 400 here)."""
    status = 400 if exc.status == 422 else exc.status
    return OpenAIError(status, exc.message_for(names), exc.field_for(names), exc.code, exc.headers or None)


def _check_supported_text(body: CompletionRequest) -> None:
    """Refuse ``/v1/completions`` features that this server cannot honour."""
    for name in ("n", "best_of"):
        value = getattr(body, name)
        if value not in (None, 1):
            raise _unsupported(f"{name}={value}: only {name}=1 is supported", name)
    for name in ("echo", "suffix", "logprobs", "logit_bias"):
        if getattr(body, name):
            raise _unsupported(f"{name}: {_UNSUPPORTED_HINT}", name)
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(
            400, "stream_options is only allowed with stream=true", "stream_options", "invalid_value"
        )


def _check_supported(body: Any, max_input_chars: int) -> None:
    """Refuse features that would change the answer but that this server cannot honour."""
    if isinstance(body, CompletionRequest):
        _check_supported_text(body)
        if len(body.prompt) > max_input_chars:
            raise OpenAIError(
                400,
                f"prompt has {len(body.prompt)} characters; the limit is {max_input_chars} "
                "(setting max_input_chars)",
                "prompt",
                "input_too_long",
            )
        return
    if body.n not in (None, 1):
        raise _unsupported(f"n={body.n}: only n=1 is supported; send one request per completion", "n")
    for name in ("logprobs", "top_logprobs", "logit_bias", "tools"):
        if getattr(body, name):
            raise _unsupported(f"{name}: {_UNSUPPORTED_HINT}", name)
    if body.response_format and body.response_format.get("type") != "text":
        raise _unsupported(
            f"response_format {body.response_format.get('type')!r}: only 'text' is supported",
            "response_format",
        )
    if body.tool_choice not in (None, "none", "auto"):
        raise _unsupported(f"tool_choice: {_UNSUPPORTED_HINT}", "tool_choice")
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(
            400, "stream_options is only allowed with stream=true", "stream_options", "invalid_value"
        )
    if not body.messages:
        raise OpenAIError(
            400, "messages is empty: send at least one user message", "messages", "invalid_value"
        )
    if len(body.messages) > MAX_MESSAGES:
        raise OpenAIError(
            400,
            f"messages has {len(body.messages)} messages; the limit is {MAX_MESSAGES}: send fewer "
            "(drop the oldest turns)",
            "messages",
            "too_many_messages",
        )
    for index, message in enumerate(body.messages):
        if len(message.content) > max_input_chars:
            raise OpenAIError(
                400,
                f"messages[{index}].content has {len(message.content)} characters; the limit is "
                f"{max_input_chars} (setting max_input_chars)",
                f"messages[{index}].content",
                "input_too_long",
            )
    if body.messages[-1].role != "user":
        raise OpenAIError(
            400,
            f"messages: the last message has role {body.messages[-1].role!r}; end the conversation with "
            "a 'user' message (the answer is generated for it)",
            "messages",
            "invalid_value",
        )


def _param_path(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "role")`` -> ``messages[0].role``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


async def parse_request(
    request: Request,
    max_body_bytes: int,
    model: type[BaseModel] = ChatCompletionRequest,
    max_input_chars: int = 16000,
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
        cause = (error.get("ctx") or {}).get("error")
        if error["type"] == "extra_forbidden":
            message = f"unrecognized field {param!r}: remove it (see GET /v1/models and the OpenAI chat API)"
        elif error["type"] == "missing":
            message = f"{param} is required"
        elif isinstance(cause, ValueError):  # our validators' own words
            message = f"{param}: {cause}"
        else:
            message = f"{param}: {error['msg']}"
        raise OpenAIError(400, message, param, "invalid_value") from None
    check = getattr(body, "check_supported", None)  # the Responses and Conversations bodies'
    if check is not None:
        check(max_input_chars)
    else:
        _check_supported(body, max_input_chars)
    return body
