"""The errors a client can cause, in one hierarchy: status, code, the field, a message with the fix.

Core and plugins raise them with core's names for fields (``max_new_tokens``, ``user_input``);
each transport shows them in its own wire format, naming each field as its clients send it
(``/v1`` says ``max_tokens``), through :meth:`ChatStreamError.message_for` and
:meth:`ChatStreamError.field_for`. Messages are built for the transport's names, never edited.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

Namer = Callable[[str], str]
"""Core field name -> the name a transport's clients use for it."""

Message = str | Callable[[Namer], str]


def _same(name: str) -> str:
    return name


class ChatStreamError(Exception):
    """A request chatstream refuses, with the HTTP status and a message that says how to fix it.

    ``message`` is text, or a function of a namer that writes the text with each field named as
    the transport's clients send it: ``lambda name: f"{name('max_new_tokens')} is too large"``.
    ``field`` is the core name of the offending field, if one is to blame.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: Message,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.field = field
        self.headers = dict(headers or {})
        self._message = message
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The message with core's field names."""
        return self.message_for(None)

    def message_for(self, names: Mapping[str, str] | None) -> str:
        """The message with each field named as ``names`` says (missing names stay core's)."""
        if isinstance(self._message, str):
            return self._message
        return self._message(_namer(names))

    def field_for(self, names: Mapping[str, str] | None) -> str | None:
        """The offending field as ``names`` says (a dotted path keeps its tail: ``a.b`` -> ``x.b``)."""
        if self.field is None:
            return None
        return _namer(names)(self.field)

    def to_dict(self) -> dict[str, Any]:
        """The ``/chat_stream`` error body: ``{"error": code, "message": ..., "field": ...}``."""
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field:
            body["field"] = self.field
        return body


def _namer(names: Mapping[str, str] | None) -> Namer:
    if not names:
        return _same

    def name(field: str) -> str:
        head, dot, tail = field.partition(".")
        if field in names:
            return names[field]
        if head in names:
            return names[head] + dot + tail
        return field

    return name


def field_error(exc: ValidationError, code: str = "invalid_field") -> ChatStreamError:
    """A body's first validation error as a 422 that names the field as sent (``messages.0.content``)
    and says what is wrong in the validator's own words."""
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or "body"
    cause = (error.get("ctx") or {}).get("error")
    text = str(cause) if isinstance(cause, ValueError) else error["msg"]
    return ChatStreamError(422, code, f"{field}: {text}", field=field)


def check_unicode(text: str) -> str:
    """``text`` if it can be sent back as UTF-8; a lone surrogate (valid JSON, ``"\\ud800"``) cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds an unpaired surrogate (like \\ud800): send valid Unicode") from None
    return text


class ParamValueError(ValueError):
    """A generation parameter's value is refused; raised inside validators so the field survives
    pydantic's wrapping (``error["ctx"]["error"]``)."""

    def __init__(self, field: str, message: Message) -> None:
        self.field = field
        self.message = message
        super().__init__(message if isinstance(message, str) else message(_same))


class StreamAborted(Exception):
    """A streamed answer failed after its headers were sent; the connection is closed unfinished."""


class ClientDisconnected(Exception):
    """The client went away before its request got a slot or its first token."""
