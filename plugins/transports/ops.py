"""The ``ops`` transport: what operators and orchestrators need around the chat API.

- ``GET /health``: 200 ``{"status": "ok"}`` while the process is alive; 503 ``{"status": "failed"}``
  when the model failed to load (a liveness probe should restart the process).
- ``GET /ready``: 200 ``{"status": "ready"}`` when the model is loaded and requests are admitted;
  503 ``{"status": "loading"}`` while the model loads and ``{"status": "draining"}`` during shutdown.
- ``GET /metrics``: Prometheus text format (one registry per ``ChatStream``). Open by default, as
  scrapers rarely send keys; with option ``protect_metrics = true`` it needs a role allowed ``metrics``.
- Every HTTP response carries ``X-Request-Id`` (the client's, when it sent a valid one, else a new
  one); log records written while the request runs carry it as ``request_id``.

Plugin option (``plugin_config.ops``): ``protect_metrics`` (bool). The log format and the shutdown
grace period are the core settings ``log_format`` and ``shutdown_grace_s``.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import re
import sys
import uuid
import weakref
from collections.abc import Iterator
from typing import IO, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatstream.access import AccessDenied, AccessPolicy, presented_key
from chatstream.chatstream import ChatStream
from chatstream.hookspecs import hookimpl
from chatstream.settings import SettingsError

OPS_PATHS = ("/health", "/ready", "/metrics")
OPTION_NAMES = ("protect_metrics",)
LOG_FORMATS = ("text", "json")

# The id of the HTTP request being handled, for log records and for code that wants to pass it on.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# A client's id is echoed only if it is short and plain, so it cannot forge log lines or headers.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")

log = logging.getLogger("chatstream.requests")


# -- options ------------------------------------------------------------------------------------------
def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"plugin_config.ops.{name}={value!r}: use true or false")


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


# -- metrics ------------------------------------------------------------------------------------------
class _LoadCollector(Collector):
    """Load gauges read from the ``ChatStream`` at scrape time, so they are never stale."""

    def __init__(self, cs: ChatStream) -> None:
        self._cs = weakref.ref(cs)

    def collect(self) -> Iterator[Metric]:
        cs = self._cs()
        if cs is None:
            return
        load = cs.load
        values = (
            ("chatstream_active_generations", "Generations in progress.", load.processing),
            ("chatstream_queue_length", "Requests waiting for a generation slot.", load.waiting),
            ("chatstream_generation_slots", "Generations allowed at once.", load.max_processing),
            ("chatstream_queue_capacity", "Requests allowed to wait.", load.max_waiting),
            ("chatstream_ready", "1 when the model is loaded and requests are admitted.", _is_ready(cs)),
        )
        for name, documentation, value in values:
            yield GaugeMetricFamily(name, documentation, value=float(value))


class ChatStreamMetrics:
    """The Prometheus metrics of one ``ChatStream``, in a registry of its own."""

    def __init__(self, cs: ChatStream) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "chatstream_requests",
            "Chat requests by how they ended (on_request_finished reason) and transport.",
            ["transport", "reason"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "chatstream_generated_tokens",
            "Tokens generated, including those of answers the client left.",
            ["transport"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "chatstream_time_to_first_token_seconds",
            "From receiving a request to its first generated token (queueing included).",
            ["transport"],
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.per_token = Histogram(
            "chatstream_time_per_output_token_seconds",
            "Mean time between generated tokens after the first, per request.",
            ["transport"],
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
            registry=self.registry,
        )
        self.duration = Histogram(
            "chatstream_request_duration_seconds",
            "From receiving a chat request to its end, by outcome.",
            ["transport", "reason"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.registry.register(_LoadCollector(cs))
        # Memory, CPU and open files of this process (Linux only; a no-op elsewhere).
        ProcessCollector(registry=self.registry)

    def observe(self, reason: str, info: dict[str, Any]) -> None:
        """Count one finished request from the ``on_request_finished`` info."""
        transport = str(info.get("transport") or "unknown")
        self.requests.labels(transport=transport, reason=reason).inc()
        tokens = int(info.get("tokens") or 0)
        if tokens:
            self.tokens.labels(transport=transport).inc(tokens)
        ttft = info.get("ttft_s")
        duration = info.get("duration_s")
        if ttft is not None:
            self.ttft.labels(transport=transport).observe(ttft)
            # The first token's latency is the TTFT; the rest share the time after it.
            if duration is not None and tokens > 1:
                per_token = max(0.0, duration - ttft) / (tokens - 1)
                self.per_token.labels(transport=transport).observe(per_token)
        if duration is not None:
            self.duration.labels(transport=transport, reason=reason).observe(duration)

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)


# One metrics object per ChatStream, so several apps in one process never share counters.
_metrics: weakref.WeakKeyDictionary[ChatStream, ChatStreamMetrics] = weakref.WeakKeyDictionary()


def metrics_of(cs: ChatStream) -> ChatStreamMetrics:
    """The metrics of ``cs``, created on first use."""
    metrics = _metrics.get(cs)
    if metrics is None:
        metrics = _metrics[cs] = ChatStreamMetrics(cs)
    return metrics


# -- endpoints ----------------------------------------------------------------------------------------
def _is_ready(cs: ChatStream) -> bool:
    return cs.ready and not getattr(cs, "draining", False)


def _start_failure(request: Request) -> BaseException | None:
    """The error that stopped the model from loading in the background, if it did."""
    task = getattr(request.app.state, "chatstream_start", None)
    if task is None or not task.done() or task.cancelled():
        return None
    error: BaseException | None = task.exception()
    return error


def install(app: FastAPI, cs: ChatStream, options: dict[str, Any] | None = None) -> None:
    """Mount /health, /ready and /metrics and the request id middleware on ``app``."""
    options = dict(options or {})
    unknown = set(options) - set(OPTION_NAMES)
    if unknown:
        raise ValueError(
            f"ops transport options {sorted(unknown)} are unknown: use {', '.join(OPTION_NAMES)}"
        )
    protect_metrics = _as_bool("protect_metrics", options.get("protect_metrics", False))
    metrics = metrics_of(cs)
    policy = AccessPolicy(cs.settings)

    async def health(request: Request) -> Response:
        """200 while the process is alive; 503 when the model failed to load."""
        error = _start_failure(request)
        if error is not None:
            return JSONResponse(
                {"status": "failed", "error": f"the model failed to load: {type(error).__name__}: {error}"},
                status_code=503,
            )
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        """200 when requests are admitted; 503 while loading, draining or after a failed load."""
        if getattr(cs, "draining", False):
            return JSONResponse({"status": "draining"}, status_code=503)
        if cs.ready:
            return JSONResponse({"status": "ready"})
        status = "failed" if _start_failure(request) is not None else "loading"
        return JSONResponse({"status": status}, status_code=503)

    async def metrics_endpoint(request: Request) -> Response:
        """Prometheus metrics in text format."""
        if protect_metrics:
            try:
                policy.check(presented_key(request.headers), "metrics")
            except AccessDenied as exc:
                return JSONResponse(
                    {"error": "unauthorized" if exc.status == 401 else "forbidden", "message": exc.message},
                    status_code=exc.status,
                )
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/health", health, methods=["GET"], name="health")
    app.add_api_route("/ready", ready, methods=["GET"], name="ready")
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], name="metrics")
    # create_app's start-up gate lets these through while the model loads or the server drains.
    open_paths = getattr(app.state, "open_paths", None)
    if isinstance(open_paths, set):
        open_paths.update(OPS_PATHS)
    app.add_middleware(RequestIdMiddleware)


# -- hooks --------------------------------------------------------------------------------------------
@hookimpl
def register_transports(register: Any) -> None:
    register("ops", install)


@hookimpl
def on_request_finished(chatstream: Any, request_id: str, reason: str, info: dict[str, Any]) -> None:
    """Count the request in the metrics (when ``ops`` is mounted for it) and log one line about it."""
    metrics = _metrics.get(chatstream)
    if metrics is None:
        return
    metrics.observe(reason, info)
    log.info(
        "chat request finished: %s",
        reason,
        extra={
            "reason": reason,
            "generation_id": request_id,
            "transport": info.get("transport"),
            "tokens": info.get("tokens"),
            "ttft_s": info.get("ttft_s"),
            "duration_s": info.get("duration_s"),
            "finish_reason": info.get("finish_reason"),
        },
    )
