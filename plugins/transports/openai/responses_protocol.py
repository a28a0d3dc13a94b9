"""The wire format of OpenAI's Responses and Conversations APIs: request bodies and their checks.

Only text is served. Parameters that would change the answer but that this server cannot honour
(tools, reasoning, background mode, structured output, logprobs, ...) are refused with a 400 that
names the parameter, never silently dropped. Input items are messages (``role`` and text content,
as a string or ``input_text`` / ``output_text`` parts); other item types are refused by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chatstream.conversations import message_item
from chatstream.errors import check_unicode

from .protocol import MAX_MESSAGES, OpenAIError

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text")
MAX_METADATA = 16
_UNSUPPORTED = "this server generates text only and does not support it; leave it out"


def _unsupported(param: str, what: str = _UNSUPPORTED) -> OpenAIError:
    return OpenAIError(400, f"{param}: {what}", param, "unsupported_parameter")


def _invalid(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param, "invalid_value")


def parse_items(value: Any, param: str, max_input_chars: int) -> list[dict[str, Any]]:
    """Input items (a string, or a list of message items) as stored message items."""
    if isinstance(value, str):
        return [message_item("user", check_text(value, param, max_input_chars))]
    if not isinstance(value, list) or not value:
        raise _invalid(param, "send a string or a non-empty list of message items")
    if len(value) > MAX_MESSAGES:
        raise _invalid(param, f"{len(value)} items; the limit is {MAX_MESSAGES}")
    items = []
    for index, raw in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(raw, dict):
            raise _invalid(where, 'each item must be an object like {"role": "user", "content": "..."}')
        kind = raw.get("type", "message")
        if kind != "message":
            raise _unsupported(f"{where}.type", f"items of type {kind!r} are not supported; send messages")
        unknown = sorted(set(raw) - {"type", "role", "content", "id", "status"})
        if unknown:
            raise _invalid(f"{where}.{unknown[0]}", "unrecognized field: remove it")
        role = raw.get("role")
        if role not in ROLES:
            raise _invalid(f"{where}.role", f"use one of {', '.join(ROLES)} (got {role!r})")
        text = _content_text(raw.get("content"), f"{where}.content", max_input_chars)
        items.append(message_item("system" if role == "developer" else role, text))
    return items


def _content_text(content: Any, param: str, max_input_chars: int) -> str:
    if isinstance(content, str):
        return check_text(content, param, max_input_chars)
    if not isinstance(content, list):
        raise _invalid(param, "send a string or a list of input_text parts")
    texts = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _unsupported(f"{where}.type", f"parts of type {kind!r} are not supported; send input_text")
        if not isinstance(part.get("text"), str):
            raise _invalid(f"{where}.text", "must be a string")
        texts.append(part["text"])
    return check_text("".join(texts), param, max_input_chars)


def check_text(text: str, param: str, max_input_chars: int) -> str:
    try:
        check_unicode(text)
    except ValueError as exc:
        raise _invalid(param, str(exc)) from None
    if len(text) > max_input_chars:
        raise OpenAIError(
            400,
            f"{param} has {len(text)} characters; the limit is {max_input_chars} (setting max_input_chars)",
            param,
            "input_too_long",
        )
    return text


def check_metadata(value: Any, param: str = "metadata") -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_METADATA:
        raise _invalid(param, f"an object of at most {MAX_METADATA} string values")
    for key, item in value.items():
        if not isinstance(key, str) or len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            raise _invalid(f"{param}.{key}", "keys up to 64 characters, string values up to 512")
    return dict(value)


class ResponseCreateRequest(BaseModel):
    """The body of ``POST /v1/responses``."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: Any = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    store: bool = True
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    previous_response_id: str | None = None
    conversation: Any = None  # an id, or {"id": ...}
    metadata: Any = None
    # Extensions, as on /v1/chat/completions.
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    # Accepted; they do not change the answer.
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    parallel_tool_calls: bool | None = None
    # Accepted only with the value that means "off".
    tools: list[Any] | None = None
    tool_choice: Any = None
    reasoning: Any = None
    background: bool | None = None
    include: list[Any] | None = None
    text: Any = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    prompt: Any = None

    @field_validator("instructions")
    @classmethod
    def _plain_text(cls, value: str | None) -> str | None:
        return None if value is None else check_unicode(value)

    def check_supported(self, max_input_chars: int) -> None:
        """Refuse what this server cannot honour, naming the parameter."""
        if self.tools:
            raise _unsupported("tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise _unsupported("tool_choice")
        for name in ("reasoning", "prompt", "top_logprobs", "max_tool_calls"):
            if getattr(self, name) is not None:
                raise _unsupported(name)
        if self.background:
            raise _unsupported("background", "background mode is not supported; stream instead")
        if self.include:
            raise _unsupported("include")
        text_format = (
            (self.text or {}).get("format", {"type": "text"}) if isinstance(self.text, dict) else None
        )
        if self.text is not None and (not isinstance(text_format, dict) or text_format.get("type") != "text"):
            raise _unsupported("text.format", "only the 'text' format is supported")
        if self.input is None:
            raise OpenAIError(400, "input is required: send the user's message", "input", "missing")
        if self.previous_response_id is not None and self.conversation is not None:
            raise _invalid("previous_response_id", "use previous_response_id or conversation, not both")
        if self.stream_options is not None and not self.stream:
            raise _invalid("stream_options", "only allowed with stream=true")
        if self.instructions is not None and len(self.instructions) > max_input_chars:
            check_text(self.instructions, "instructions", max_input_chars)

    def conversation_id(self) -> str | None:
        value = self.conversation
        if value is None:
            return None
        if isinstance(value, dict) and isinstance(value.get("id"), str):
            return value["id"]
        if isinstance(value, str):
            return value
        raise _invalid("conversation", 'send a conversation id or {"id": "conv_..."}')


class ConversationCreateRequest(BaseModel):
    """The body of ``POST /v1/conversations``."""

    model_config = ConfigDict(extra="forbid")

    items: list[Any] | None = None
    metadata: Any = None

    def check_supported(self, max_input_chars: int) -> None:
        check_metadata(self.metadata)


class ConversationUpdateRequest(BaseModel):
    """The body of ``POST /v1/conversations/{id}``."""

    model_config = ConfigDict(extra="forbid")

    metadata: Any

    def check_supported(self, max_input_chars: int) -> None:
        check_metadata(self.metadata)


class ItemsCreateRequest(BaseModel):
    """The body of ``POST /v1/conversations/{id}/items``."""

    model_config = ConfigDict(extra="forbid")

    items: list[Any]

    def check_supported(self, max_input_chars: int) -> None:
        if not self.items:
            raise _invalid("items", "send at least one item")


def page(
    items: list[dict[str, Any]], query: dict[str, str], *, default_order: str = "desc"
) -> dict[str, Any]:
    """A list object of ``items`` (oldest first) per ``limit`` (1-100, default 20), ``order``
    (``asc``/``desc``) and ``after`` (an item id), as OpenAI's list endpoints page."""
    order = query.get("order", default_order)
    if order not in ("asc", "desc"):
        raise _invalid("order", f"use asc or desc (got {order!r})")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise _invalid("limit", "a whole number from 1 to 100") from None
    if not 1 <= limit <= 100:
        raise _invalid("limit", f"a whole number from 1 to 100 (got {limit})")
    ordered = list(items) if order == "asc" else list(reversed(items))
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise _invalid("after", f"no item {after!r} in this list")
        ordered = ordered[ids.index(after) + 1 :]
    chunk = ordered[:limit]
    return {
        "object": "list",
        "data": chunk,
        "first_id": chunk[0]["id"] if chunk else None,
        "last_id": chunk[-1]["id"] if chunk else None,
        "has_more": len(ordered) > limit,
    }
