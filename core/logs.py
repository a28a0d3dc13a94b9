"""Request ids and log output: ``X-Request-Id`` on every HTTP response, and the log handler.

The request id middleware gives each HTTP request an id (the client's ``X-Request-Id`` when it is
short and plain, else a new one) and puts it in every log record written while the request runs.
``configure_logging`` sends all records to one handler in the ``log_format`` setting's format.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import re
import sys
import uuid
from typing import IO, Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .settings import SettingsError

LOG_FORMATS = ("text", "json")

# The id of the HTTP request being handled, for log records and for code that wants to pass it on.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# A client's id is echoed only if it is short and plain, so it cannot forge log lines or headers.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


# -- request ids and logging --------------------------------------------------------------------------
class RequestIdMiddleware:
    """Pure ASGI: gives each HTTP request an id (``X-Request-Id``) without touching the body stream."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        token = request_id_var.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1").strip()
            return text if _VALID_REQUEST_ID.fullmatch(text) else None
    return None


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (None outside a request) to every record a handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


# Attributes every LogRecord has; anything else was passed with ``extra=`` and is worth writing.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key != "request_id" and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def make_log_handler(log_format: str, stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler writing ``text`` or ``json`` records, with the request id filter."""
    if log_format not in LOG_FORMATS:
        raise SettingsError(f"log_format={log_format!r}: use text or json")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    return handler


def configure_logging(level: str, log_format: str, stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record (uvicorn's too, when it is not given its own config) to one handler.

    Replaces the root logger's handlers, so calling it twice does not double the lines.
    """
    handler = make_log_handler(log_format, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
